"""Shapes that modules cache from the width of their own tensors, kept in step with pruning.

Some modules store a view shape of a per-channel tensor when they are built, e.g. timm's MetaFormer ``Scale``
(PoolFormer): ``self.shape = (dim, 1, 1)`` and ``x * self.scale.view(self.shape)``. Pruning changes ``scale`` to
``dim'`` entries and leaves ``shape`` stale, so the forward fails. :func:`cached_shapes` finds such attributes while
they still agree with their tensor -- a tuple of ints, one entry equal to the length of a 1-D parameter or buffer of
the same module, every other entry 1 -- and :func:`sync_cached_shapes` sets that entry to the tensor's current length.
Layers whose sizes Torch-Pruning updates itself (conv, linear, normalisation, ...) are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["CachedShape", "cached_shapes", "sync_cached_shapes"]

_SIZED_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.PReLU,
    nn.RNNBase,
)


@dataclass
class CachedShape:
    """``module.<attribute>[position]`` is the length of ``module.<tensor>``."""

    module: nn.Module
    attribute: str
    tensor: str
    position: int


def cached_shapes(model: nn.Module) -> list[CachedShape]:
    """The cached shapes of ``model``'s modules (module docstring), found while they agree with their tensors."""
    found = []
    for m in model.modules():
        if isinstance(m, _SIZED_LAYERS):
            continue
        lengths = {
            name: t.shape[0]
            for name, t in [*m._parameters.items(), *m._buffers.items()]
            if t is not None and t.dim() == 1
        }
        for attribute, value in vars(m).items():
            if not (isinstance(value, tuple) and value and all(type(v) is int for v in value)):
                continue
            wide = [i for i, v in enumerate(value) if v != 1]
            if len(wide) != 1:
                continue
            owners = [name for name, n in lengths.items() if n == value[wide[0]] and n > 1]
            if len(owners) == 1:
                found.append(CachedShape(m, attribute, owners[0], wide[0]))
    return found


def sync_cached_shapes(found: list[CachedShape]) -> None:
    """Set every cached shape's entry to its tensor's current length."""
    for c in found:
        value = list(getattr(c.module, c.attribute))
        value[c.position] = int(getattr(c.module, c.tensor).shape[0])
        setattr(c.module, c.attribute, tuple(value))
