r"""Unstructured pruning masks: which layers, masks from scores, applying and removing them, Fisher blocks.

The mechanics under :mod:`oba.unstructured` (which chooses the weights by a criterion of :mod:`oba.criteria`).

Conventions
    * **sparsity is the fraction of weights REMOVED** (0.9 keeps 10 %), everywhere in this package, always
      checked to lie in [0, 1). (The published OBA script's ``--pruning_ratio`` is the fraction *kept*.)
    * Masks are ``torch.nn.utils.prune`` re-parametrisations: a pruned module holds ``weight_orig`` (the
      parameter) and a ``weight_mask`` buffer, and ``weight = weight_orig * weight_mask`` is recomputed by a
      forward pre-hook; :func:`remove_masks` (``prune.remove``) makes the pruning permanent. Pruning a module
      twice multiplies the masks, as ``torch.nn.utils.prune`` does.
    * ``scope="global"`` ranks all chosen weights together; ``scope="layer"`` removes the same fraction from
      every layer. Ties are broken by position (stable sort), so masks are deterministic.
    * ``layers`` chooses the modules: ``None`` (every ``nn.Linear`` and ``nn.Conv*``), a regular expression
      matched (``re.fullmatch``) against module names, or a list of modules or module names.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn
from torch.func import functional_call

from oba.batches import to_device
from oba.curvature import Batch, LossFn, unflatten_params
from oba.empirical_fisher import (
    DenseGradients,
    EmpiricalFisher,
    GradientMatrix,
    block_fishers,
    collect_gradients,
    linear_gradient_factors,
    make_blocks,
)

__all__ = [
    "PRUNABLE",
    "apply_masks",
    "apply_weights",
    "check_sparsity",
    "current_weights",
    "fisher_blocks",
    "masked_loss",
    "masks_from_scores",
    "prunable_layers",
    "remove_masks",
    "sparsity_report",
    "weight_name",
]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` (the fraction REMOVED) as a float, or a ``ValueError`` unless 0 <= sparsity < 1."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number (the fraction of weights removed), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise ValueError(
            f"sparsity is the fraction of weights REMOVED and must satisfy 0 <= sparsity < 1, got {sparsity!r}"
            " (to keep 10 % of the weights, pass sparsity=0.9)"
        )
    return s


def prunable_layers(
    model: nn.Module, layers: str | Iterable[nn.Module | str] | None = None
) -> OrderedDict[str, nn.Module]:
    """The chosen modules, ``name -> module`` in model order (see the module docstring for ``layers``)."""
    named = OrderedDict((n, m) for n, m in model.named_modules() if n)
    if layers is None:
        chosen = [n for n, m in named.items() if isinstance(m, PRUNABLE)]
    elif isinstance(layers, str):
        pattern = re.compile(layers)
        chosen = [n for n in named if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(f"no module name matches {layers!r}; modules: {', '.join(list(named)[:30])}")
    else:
        by_id = {id(m): n for n, m in named.items()}
        chosen = []
        for item in layers:
            name = item if isinstance(item, str) else by_id.get(id(item))
            if name is None or name not in named:
                raise ValueError(f"{item!r} is not a (named) submodule of {type(model).__name__}")
            chosen.append(name)
    for n in chosen:
        if not isinstance(named[n], PRUNABLE):
            raise ValueError(
                f"module {n!r} ({type(named[n]).__name__}) is not supported for unstructured pruning; "
                f"supported: {', '.join(c.__name__ for c in PRUNABLE)}"
            )
    order = {n: i for i, n in enumerate(named)}
    return OrderedDict((n, named[n]) for n in sorted(set(chosen), key=order.__getitem__))


def weight_name(module: nn.Module) -> str:
    """The parameter holding the weight: ``weight_orig`` once pruned, else ``weight``."""
    return "weight_orig" if hasattr(module, "weight_orig") else "weight"


def current_weights(model: nn.Module, layers: Mapping[str, nn.Module]) -> OrderedDict[str, Tensor]:
    """The effective weights, ``<module>.weight -> tensor`` (``weight_orig * weight_mask`` when pruned), detached."""
    return OrderedDict((f"{n}.weight", m.weight.detach()) for n, m in layers.items())


def masks_from_scores(scores: Mapping[str, Tensor], sparsity: float, scope: str = "global") -> OrderedDict[str, Tensor]:
    """Keep-masks (1 = kept, 0 = removed; the scores' dtype) removing the lowest-scored fraction ``sparsity``.

    ``scope="global"``: ``round(sparsity * total)`` weights over all tensors; ``"layer"``:
    ``round(sparsity * numel)`` in each tensor.
    """
    sparsity = check_sparsity(sparsity)
    if scope == "layer":
        return OrderedDict((n, masks_from_scores({n: s}, sparsity)[n]) for n, s in scores.items())
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN")
    k = round(sparsity * flat.numel())
    keep = torch.ones_like(flat)
    keep[torch.argsort(flat, stable=True)[:k]] = 0.0
    pieces = keep.split([s.numel() for s in scores.values()])
    return OrderedDict((n, m.reshape(s.shape).to(s.dtype)) for (n, s), m in zip(scores.items(), pieces, strict=True))


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Attach keep-masks with ``prune.custom_from_mask`` (keys: module names or ``<module>.weight``)."""
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if name not in modules:
            raise KeyError(f"no module {name!r} in the model")
        prune.custom_from_mask(modules[name], "weight", mask.to(modules[name].weight.device))


def remove_masks(model: nn.Module) -> list[str]:
    """Make every mask permanent (``prune.remove``); returns the module names that had one."""
    done = []
    for n, m in model.named_modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
            done.append(n)
    return done


def sparsity_report(model: nn.Module, layers=None) -> OrderedDict[str, float]:
    """Fraction of zero weights per layer and ``"total"`` (the effective weights, masks applied)."""
    chosen = prunable_layers(model, layers)
    out, zeros, total = OrderedDict(), 0, 0
    for n, m in chosen.items():
        w = m.weight.detach()
        out[n] = float((w == 0).float().mean())
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    out["total"] = zeros / max(total, 1)
    return out


def apply_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Write new weights (keys ``<module>.weight``) into the model, into ``weight_orig`` when pruned;
    positions where the mask is 0 are set to 0 so that they stay zero after :func:`remove_masks`."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in weights.items():
            m = modules[key[: -len(".weight")]]
            target = getattr(m, weight_name(m))
            target.copy_(value.to(target))
            if hasattr(m, "weight_mask"):
                target.mul_(m.weight_mask)
                m.weight = target * m.weight_mask  # refresh the derived attribute now, not at the next forward


def fisher_blocks(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    layers=None,
    num_grads: int = 1000,
    damp: float = 1e-3,
    blocks: str | int = "layer",
    grad_mode: str = "auto",
    progress: bool = True,
) -> tuple[list[EmpiricalFisher], list, GradientMatrix]:
    """Empirical Fisher blocks of the chosen layers' weights from ``num_grads`` gradients.

    ``grad_mode``: ``"factored"`` (bias-free ``nn.Linear`` only: :class:`oba.empirical_fisher.LinearGradients`, G never
    stored), ``"per_sample"`` or ``"per_batch"`` (G stored, float32), ``"auto"`` (factored when possible,
    else per-sample). ``blocks``: ``"layer"``, ``"joint"`` or a chunk size (:func:`oba.empirical_fisher.make_blocks`).
    Returns ``(fishers, blocks, grads)``.
    """
    chosen = prunable_layers(model, layers)
    for n, m in chosen.items():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            raise ValueError(f"{n} is already masked: Fisher blocks are built on an unmasked model")
    linear_ok = all(isinstance(m, nn.Linear) and m.bias is None for m in chosen.values())
    if grad_mode == "auto":
        grad_mode = "factored" if linear_ok else "per_sample"
    if grad_mode == "factored":
        grads: GradientMatrix = linear_gradient_factors(model, loss_fn, batches, list(chosen), num_grads)
    else:
        names = [f"{n}.weight" for n in chosen]
        grads = DenseGradients(collect_gradients(model, loss_fn, batches, names, num_grads, mode=grad_mode))
    shapes = OrderedDict((f"{n}.weight", m.weight.shape) for n, m in chosen.items())
    block_list = make_blocks(shapes, blocks)
    return block_fishers(grads, block_list, damp), block_list, grads


@torch.no_grad()
def masked_loss(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], names: Sequence[str]
) -> Callable[[Tensor], float]:
    """``f(flat_weights) -> mean loss`` over the fixed ``batches`` with the named weights replaced.

    ``flat_weights`` is the concatenation (:func:`oba.curvature.flatten_params` order) of the weights
    ``names``; the model itself is not changed. Used to judge CBS candidates by their real loss.
    """
    params = OrderedDict((n, p.detach()) for n, p in model.named_parameters() if n in set(names))
    device = next(model.parameters()).device
    batches = [to_device(tuple(b[:2]), device) for b in batches]

    @torch.no_grad()  # the decorator above covers only this setup, not later calls of the closure
    def loss(flat: Tensor) -> float:
        new = unflatten_params(flat.to(device, next(iter(params.values())).dtype), params)
        total = count = 0.0
        for x, y in batches:
            total += float(loss_fn(functional_call(model, new, (x,)), y)) * y.shape[0]
            count += y.shape[0]
        return total / count

    return loss
