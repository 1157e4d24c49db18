"""Small helpers for iterating over batches, shared by scoring (:mod:`oba.importance`) and training, and the
type of the loss functions both take (:data:`LossFn`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LossFn", "batch_count", "to_device"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(logits, targets)`` returning the mean loss of a batch (re-exported by :mod:`oba.curvature`)."""


def batch_count(loader: Iterable[Any], max_batches: int | None) -> int | None:
    """How many batches an iteration over ``loader`` capped at ``max_batches`` yields (``None``: unknown)."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor in it (nested tuples/lists too) moved to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x
