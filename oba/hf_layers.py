"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer) for Torch-Pruning and oba.

``Conv1D(nf, nx)`` is a linear layer with its weight transposed: ``weight`` is ``[nx, nf]`` (in, out), ``bias`` is
``[nf]`` and ``y = x @ W + b``; its forward reads ``nf`` for the output shape. Torch-Pruning 1.6 does not know it,
so :class:`Conv1DPruner` (a Torch-Pruning custom pruner, passed as ``customized_pruners``) prunes it: output channel
``c`` is column ``W[:, c]`` and ``b[c]``, input channel ``c`` is row ``W[c, :]``. ``transformers`` is an optional
extra: without it :func:`conv1d_type` is ``None`` and nothing here is used.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch_pruning as tp
from torch import nn

__all__ = ["Conv1DPruner", "conv1d_type", "customized_pruners", "dense_layer_types", "is_conv1d"]


@functools.cache  # asked for every layer on the pruning loop's paths: import once
def conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D``, or ``None`` when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(layer: object) -> bool:
    """Whether ``layer`` is a Hugging Face ``Conv1D``."""
    kind = conv1d_type()
    return kind is not None and isinstance(layer, kind)


def dense_layer_types() -> tuple[type, ...]:
    """The layers whose MACs are ``C_in * C_out`` per position and whose channels prune like a linear layer's:
    ``nn.Linear`` and, with transformers installed, ``Conv1D``."""
    kind = conv1d_type()
    return (nn.Linear,) if kind is None else (nn.Linear, kind)


class Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Prunes a ``Conv1D``: out channels are the weight's columns (dim 1) and the bias, in channels its rows
    (dim 0); ``nf`` / ``nx`` follow, so its forward reshapes to the new width."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.nx)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.nf

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.nx


def customized_pruners() -> dict[type, tp.pruner.function.BasePruningFunc]:
    """``customized_pruners`` for ``tp.DependencyGraph().build_dependency``: ``{Conv1D: Conv1DPruner()}`` with
    transformers installed, else ``{}``."""
    kind = conv1d_type()
    return {} if kind is None else {kind: Conv1DPruner()}
