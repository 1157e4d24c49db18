"""Small helpers for iterating over batches, shared by scoring (:mod:`oba.importance`) and training, the type of
the loss functions both take (:data:`LossFn`), and :func:`check_batch`, which tells a user what is wrong with a
batch before it changes anything."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

T = TypeVar("T")

__all__ = [
    "BadBatchError",
    "LossFn",
    "batch_count",
    "check_batch",
    "check_example_inputs",
    "check_example_type",
    "check_inputs_like",
    "first_checked",
    "modes_restored",
    "split_batch",
    "to_device",
]

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


def split_batch(batch: Any) -> tuple[tuple[Tensor, ...], Tensor]:
    """``(inputs, targets)`` -> ``((model arguments...), targets)``; ``inputs`` is a tensor or a tuple of them."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "batch must be a pair (inputs, targets), where inputs is a Tensor or a tuple of Tensors "
            f"passed to the model as positional arguments; got {type(batch).__name__}"
        )
    inputs, targets = batch
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return args, targets


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (``model.train(mode)`` alone would not)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class BadBatchError(ValueError):
    """A batch the model or the loss cannot take; the message names the batch and what was expected."""


_CLASS_INDEX_LOSSES = (F.cross_entropy, F.nll_loss)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return "(" + "; ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def check_inputs_like(inputs: Any, example_inputs: Any, name: str) -> None:
    """A :class:`BadBatchError` when tensor ``inputs`` differ from tensor ``example_inputs`` (the input a model was
    traced with) in anything but the batch size: shape ``[1:]`` or dtype."""
    x, example = inputs, example_inputs
    if not (isinstance(x, Tensor) and isinstance(example, Tensor)):
        return
    if x.shape[1:] != example.shape[1:] or x.dtype != example.dtype:
        raise BadBatchError(
            f"{name} has inputs of {_describe(x)}, but example_inputs have {_describe(example)}: the batches must "
            "match the example input (all but the batch size)"
        )


def first_checked(model: nn.Module, loss_fn: LossFn | None, batches: Iterable[Any]) -> Iterator[Any]:
    """An iterator over ``batches``, unchanged, whose first batch went through :func:`check_batch` (on the model's
    device) now, when this is called: before the caller attaches hooks or traces anything. Only that first batch is
    drawn ahead."""
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        return stream
    device = next(iter(model.parameters()), torch.empty(0)).device
    check_batch(model, loss_fn, to_device(first, device))
    return itertools.chain([first], stream)


def check_example_type(example_inputs: Any) -> None:
    """``example_inputs`` must be a tensor, a tuple or list of arguments, or a dict of keyword arguments (the
    forms Torch-Pruning traces with); a :class:`BadBatchError` otherwise."""
    if not isinstance(example_inputs, (Tensor, tuple, list, dict)):
        raise BadBatchError(
            f"example_inputs must be a tensor (or a tuple/dict of model arguments), got "
            f"{type(example_inputs).__name__}: pass one input the model takes, e.g. torch.randn(1, 3, 32, 32)"
        )


def check_example_inputs(model: nn.Module, example_inputs: Any, forward: Callable[[], T] | None = None) -> T | None:
    """``example_inputs`` must be what Torch-Pruning traces the model with: a tensor (``model(x)``), a tuple or
    list (``model(*x)``) or a dict (``model(**x)``) on which the model runs. Checked with one forward pass in eval
    mode under ``torch.no_grad`` (nothing changes); a :class:`BadBatchError` otherwise. ``forward``: a function
    running that pass some other way (e.g. counting its MACs), whose result is returned."""
    check_example_type(example_inputs)
    with torch.no_grad(), modes_restored(model):
        model.eval()
        try:
            if forward is not None:
                return forward()
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
            return None
        except Exception as err:
            raise BadBatchError(
                f"the model fails on example_inputs ({_describe(example_inputs)}): {_first_line(err)}. Pass one "
                "input the model takes (a batch of 1 shaped like the data), e.g. torch.randn(1, 3, 32, 32)"
            ) from err


def check_batch(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    name: str = "batch 0",
    *,
    example_inputs: Any = None,
) -> Tensor | None:
    r"""Check one ``(inputs, targets)`` batch against ``model`` (and ``example_inputs``) and ``loss_fn``, changing
    nothing: a :class:`BadBatchError` names the batch (``name``, e.g. ``"batch 0 of step 1"``), what it holds and
    what was expected.

    Checks, in order: the batch is a pair; its inputs match ``example_inputs`` but for the batch size (shape and
    dtype); the model runs on them (one forward pass in eval mode under ``torch.no_grad``: no BatchNorm statistics
    move, the modes are restored); for class-index losses (``F.cross_entropy``, ``F.nll_loss`` and their modules)
    integer labels lie in :math:`[0, C)` for the model's :math:`C` outputs (or equal ``ignore_index``); the loss
    runs on the outputs and targets. Callers check the first batch of a run (the cost is one forward pass).

    Returns:
        the batch's loss in eval mode (a NaN/inf here is the caller's to report), or ``None`` without ``loss_fn``.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise BadBatchError(
            f"{name} is a {type(batch).__name__}{length}: expected (inputs, targets) pairs, e.g. from a DataLoader "
            "over a labelled dataset"
        )
    args, targets = split_batch(batch)
    check_inputs_like(batch[0], example_inputs, name)
    example = example_inputs if isinstance(example_inputs, Tensor) else None
    with torch.no_grad(), modes_restored(model):
        model.eval()
        try:
            out = model(*args)
        except Exception as err:
            raise BadBatchError(
                f"{name}: the model fails on its inputs ({_describe(args[0] if len(args) == 1 else args)}): "
                f"{_first_line(err)}. Pass batches whose inputs the model takes"
                + (f" (like example_inputs: {_describe(example)})" if example is not None else "")
            ) from err
        if loss_fn is None:
            return None
        if not isinstance(targets, Tensor):
            raise BadBatchError(f"{name} has targets of type {type(targets).__name__}: expected a tensor")
        _check_class_indices(loss_fn, out, targets, name)
        try:
            return loss_fn(out, targets)
        except Exception as err:
            raise BadBatchError(
                f"{name}: the loss fails on the model's outputs ({_describe(out)}) and the targets "
                f"({_describe(targets)}): {_first_line(err)}. Check that the targets are what the loss expects"
            ) from err


def _check_class_indices(loss_fn: LossFn, out: Any, targets: Tensor, name: str) -> None:
    """Integer labels of a class-index loss must lie in [0, C) (or be its ignore_index)."""
    is_class_loss = loss_fn in _CLASS_INDEX_LOSSES or isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))
    if not is_class_loss or not isinstance(out, Tensor) or out.ndim < 2 or targets.is_floating_point():
        return
    if targets.numel() == 0 or targets.dtype == torch.bool:
        return
    classes = out.shape[1]
    ignore = getattr(loss_fn, "ignore_index", -100)
    valid = ((targets >= 0) & (targets < classes)) | (targets == ignore)
    if not bool(valid.all()):
        bad = targets[~valid]
        raise BadBatchError(
            f"{name} has labels in [{int(bad.min())}, {int(bad.max())}] outside [0, {classes - 1}]: the model has "
            f"{classes} outputs, so the class-index loss needs labels 0..{classes - 1}. Build the model with the "
            "dataset's number of classes (e.g. num_classes=...), or map the labels"
        )
