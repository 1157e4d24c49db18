"""Compute cost (MACs, FLOPs) and parameter counts of a model, without running real compute.

Convention. FLOPs are those of :class:`torch.utils.flop_counter.FlopCounterMode`: matrix
multiplications (``mm``, ``addmm``, ``bmm``, ``baddbmm``), convolutions and fused attention,
each multiply-accumulate counting 2 FLOPs. Element-wise work (bias additions, BatchNorm,
LayerNorm, activations, softmax, pooling, residual additions) is not counted, as in the
pruning literature's MAC tables. Hence ``macs = flops // 2``, the number usually quoted as
"FLOPs" in papers (e.g. ResNet-50: 4.1 G).

Counting runs one forward pass (in eval mode, without autograd) on a deep copy of the model, with
``FlopCounterMode``'s formulas attributed to the modules running (``_MacCounter``),
by default on the ``meta`` device, where tensors have shapes but no data: a ViT-B/16 counts in
about a second and the caller's model is never touched. Because only shapes matter, this
works equally for models whose layers were shrunk by torch-pruning.

Parameters are counted over ``model.parameters()``: all of them, trainable or frozen, each
shared tensor once. For layers wrapped by :mod:`torch.nn.utils.prune` this counts
``weight_orig`` (a parameter) and not ``weight_mask`` (a buffer), i.e. the effective weight's
size once; :attr:`FlopCount.nonzero_params` counts the unmasked nonzero entries.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from oba.arguments import check_whole_number
from oba.batches import modes_restored

__all__ = [
    "FlopCount",
    "count_flops",
    "count_nonzero_params",
    "count_params",
    "counted_forward",
    "latency_ms",
    "macs_by_module",
]


@dataclass(frozen=True)
class FlopCount:
    """Cost of one forward pass of the given inputs (the whole batch, not per sample).

    Attributes:
        macs: multiply-accumulates of matmuls, convolutions and attention (``flops // 2``).
        flops: floating-point operations as counted by ``FlopCounterMode`` (2 per MAC).
        params: parameter entries, all of them (see the module docstring).
        nonzero_params: nonzero entries of the effective parameters (``weight_orig * mask``
            for pruned layers); ``None`` when the model lives on the meta device.
    """

    macs: int
    flops: int
    params: int
    nonzero_params: int | None = None


def count_flops(
    model: nn.Module,
    inputs_or_shape: Tensor | Sequence[Tensor] | Sequence[int] | torch.Size,
    device: str | torch.device | None = "meta",
) -> FlopCount:
    """Count MACs, FLOPs and parameters of ``model`` on the given input.

    Args:
        model: any module; it is deep-copied, never modified, moved or run.
        inputs_or_shape: an input shape including the batch dimension, e.g. ``(1, 3, 32, 32)``
            (a float tensor of that shape is used), or an input tensor, or a sequence of input
            tensors passed as positional arguments.
        device: where the copy runs: ``"meta"`` (default, no real compute), another device
            (for models with data-dependent control flow), or ``None`` for the model's own
            device. Hooks registered on the model are copied along and run on the copy.

    Returns:
        A :class:`FlopCount` for one forward pass of the whole batch.
    """
    macs = _run_counter(model, inputs_or_shape, device)[""]
    return FlopCount(
        macs=macs,
        flops=2 * macs,
        params=count_params(model),
        nonzero_params=count_nonzero_params(model),
    )


def macs_by_module(
    model: nn.Module,
    inputs_or_shape: Tensor | Sequence[Tensor] | Sequence[int] | torch.Size,
    device: str | torch.device | None = "meta",
    *,
    in_place: bool = False,
) -> dict[str, int]:
    """MACs of every module's forward pass (its children included), keyed by ``model.named_modules()`` names.

    ``""`` is the whole model (its total MACs, as :func:`count_flops` counts them); modules that do no counted
    work are absent. Same convention and arguments as :func:`count_flops`. ``in_place=True`` runs ``model``
    itself instead of a copy (``device`` ignored): one forward pass in eval mode under ``torch.no_grad`` (no
    BatchNorm statistics move; the modes are restored), cheaper than copying a large model, but the model's
    forward hooks run; for callers that own the model (the pruning loop).
    """
    if not in_place:
        return _run_counter(model, inputs_or_shape, device)
    with modes_restored(model), torch.no_grad():
        model.eval()
        return counted_forward(model, inputs_or_shape)[1]


def counted_forward(
    model: nn.Module, inputs: Tensor | Sequence[Tensor] | Mapping[str, Any]
) -> tuple[Any, dict[str, int]]:
    """``model`` run once on ``inputs`` as it is (its modes and autograd as the caller set them) under
    the counter: ``(output, MACs per module)``, the latter as :func:`macs_by_module` gives them. For a caller
    that runs the model anyway: the pruning loop counts the dense model in Torch-Pruning's tracing pass.
    ``nn.MultiheadAttention``'s fused inference kernel, which the counter does not see, is off for the pass."""
    target, dtype = _device_and_dtype(model)
    args, kwargs = _call_arguments(inputs, dtype, target)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with _counting(model) as counter:
            out = model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return out, counter.macs()


class _MacCounter(TorchDispatchMode):
    r"""The FLOPs of every operation :class:`~torch.utils.flop_counter.FlopCounterMode` has a formula for (its
    ``flop_registry``; an operation without one is decomposed first, as there), added to the module running it and
    to every module enclosing it: :meth:`macs` gives ``{name in model.named_modules(): flops // 2}`` with ``""`` the
    total, the same counts as ``FlopCounterMode``'s per-module table. The running modules are followed with
    global forward pre/post hooks, attached for the block only (:func:`_counting`); ``FlopCounterMode``'s module
    tracker also hooks the backward pass, whose per-tensor hooks cost more than the count itself in a pass with
    autograd (Torch-Pruning's tracing).

    On the ``meta`` device an operation's output is a function of its inputs' shapes, strides and dtypes and its other
    arguments alone; many of its shape functions run in Python (``native_layer_norm`` near a millisecond a call), so
    the outputs of an operation that neither writes nor aliases its inputs are remembered for the pass: a model's
    repeated blocks (ViT-B/16's twelve) compute each shape once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.on_meta = _device_and_dtype(model)[0].type == "meta"
        self.names = {m: n for n, m in model.named_modules()}
        self.running: list[str] = []
        self.flops: dict[str, int] = {}
        self.total = 0
        self._shapes: dict[tuple, Any] = {}  # (operation, its arguments' key) -> the outputs' (size, stride, dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = self._on_meta(func, args, kwargs)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            self.total += flops
            for name in set(self.running):
                if name is not None:
                    self.flops[name] = self.flops.get(name, 0) + flops
        return out

    def macs(self) -> dict[str, int]:
        return {**{name: f // 2 for name, f in self.flops.items()}, "": self.total // 2}

    def _on_meta(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``func(*args, **kwargs)``; on meta tensors, outputs of a pure operation seen with the same arguments'
        metadata are made anew (empty meta tensors) instead of running its shape function again."""
        key = _meta_key(func, args, kwargs) if self.on_meta else None
        if key is None:
            return func(*args, **kwargs)
        if key not in self._shapes:
            out = func(*args, **kwargs)
            leaves, spec = pytree.tree_flatten(out)
            if not all(isinstance(t, Tensor) and t.is_meta for t in leaves):
                return out
            self._shapes[key] = ([(t.shape, t.stride(), t.dtype) for t in leaves], spec)
            return out
        metas, spec = self._shapes[key]
        made = [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in metas]
        return pytree.tree_unflatten(made, spec)


def _meta_key(func: Any, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """A key of ``func`` applied to ``args``/``kwargs`` that fixes its outputs' metadata, or ``None`` where it may not:
    an operation that writes or aliases an argument (in-place, ``out=``, views), a tensor not on the meta device, an
    argument that is neither a tensor nor a plain value."""
    schema = func._schema
    if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
        return None
    key: list[Any] = [func]
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, Tensor):
            if not leaf.is_meta:
                return None
            key.append((tuple(leaf.shape), leaf.stride(), leaf.storage_offset(), leaf.dtype))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
            key.append((type(leaf), leaf))
        else:
            return None
    return (*key, pytree.tree_structure((args, kwargs)))


@contextlib.contextmanager
def _counting(model: nn.Module) -> Iterator[_MacCounter]:
    """A :class:`_MacCounter` of ``model`` active for the block, with the hooks that follow the running modules."""
    counter = _MacCounter(model)

    def enter(module: nn.Module, _args: Any) -> None:
        counter.running.append(counter.names.get(module))

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:  # returns None: the output stays
        counter.running.pop()

    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        with counter:
            yield counter
    finally:
        for hook in hooks:
            hook.remove()


def _run_counter(
    model: nn.Module, inputs_or_shape: Tensor | Sequence[Tensor] | Sequence[int] | torch.Size, device
) -> dict[str, int]:
    """MACs per module (:class:`_MacCounter`) of one forward pass of a replica of ``model``."""
    replica = _replicate(model, device)
    target, dtype = _device_and_dtype(replica)
    args, kwargs = _call_arguments(inputs_or_shape, dtype, target)
    with torch.no_grad(), _counting(replica) as counter:
        replica(*args, **kwargs)
    return counter.macs()


def latency_ms(model: nn.Module, inputs: Tensor | Sequence[Tensor] | Mapping[str, Any], repeats: int = 10) -> float:
    """Measured wall-clock time of one forward pass of ``model`` on ``inputs``, in milliseconds: the median of
    ``repeats`` passes after one warm-up, in eval mode under ``torch.inference_mode`` (the modes are restored).
    What pruning is for, beside the counted MACs; a GPU model is synchronised around each pass. Other work on the
    machine inflates it: compare models measured side by side."""
    check_whole_number("repeats", repeats)
    target, dtype = _device_and_dtype(model)
    args, kwargs = _call_arguments(inputs, dtype, target)
    sync = torch.cuda.synchronize if target.type == "cuda" else lambda: None
    times = []
    with modes_restored(model), torch.inference_mode():
        model.eval()
        for run in range(repeats + 1):
            sync()
            start = time.perf_counter()
            model(*args, **kwargs)
            sync()
            if run:  # the first pass warms up
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def count_params(model: nn.Module) -> int:
    """All parameter entries of ``model`` (trainable or not, shared ones once; masks excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int | None:
    """Nonzero entries of the effective parameters; ``weight_orig`` counts through its mask.

    Returns ``None`` if any parameter is on the meta device (no values to inspect).
    """
    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if param.is_meta:
                    return None
                mask = _prune_mask(module, name)
                effective = param if mask is None else param * mask
                total += int(torch.count_nonzero(effective))
    return total


def _prune_mask(module: nn.Module, param_name: str) -> Tensor | None:
    """The ``torch.nn.utils.prune`` mask of ``<name>_orig``, if ``param_name`` is one."""
    if not param_name.endswith("_orig"):
        return None
    return module._buffers.get(param_name[: -len("_orig")] + "_mask")


def _call_arguments(inputs_or_shape: Any, dtype: torch.dtype, device: torch.device) -> tuple[list, dict[str, Any]]:
    """Positional and keyword arguments of the model on ``device``: a dict is passed as keyword arguments
    (e.g. ``{"input_ids": ids}`` for Hugging Face models), anything else as :func:`_as_inputs` reads it."""
    if isinstance(inputs_or_shape, Mapping):
        return [], {k: _to_device(v, device) if isinstance(v, Tensor) else v for k, v in inputs_or_shape.items()}
    return [_to_device(x, device) for x in _as_inputs(inputs_or_shape, dtype)], {}


def _as_inputs(
    inputs_or_shape: Tensor | Sequence[Tensor] | Sequence[int] | torch.Size, dtype: torch.dtype
) -> list[Tensor]:
    """Input tensors; a shape becomes a meta tensor of the model's floating dtype."""
    if isinstance(inputs_or_shape, Tensor):
        return [inputs_or_shape]
    items = list(inputs_or_shape)
    if items and all(isinstance(item, Tensor) for item in items):
        return items
    if items and all(isinstance(item, int) for item in items):
        return [torch.empty(items, dtype=dtype, device="meta")]
    raise TypeError(
        "inputs_or_shape must be a shape (ints, batch dimension included), "
        f"a tensor, or a sequence of tensors; got {inputs_or_shape!r}"
    )


def _replicate(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """An eval-mode deep copy of ``model`` on ``device`` (its own device if ``None``).

    Parameters and buffers are mapped to ``device`` while copying, so a CPU or GPU model is
    never duplicated in its own memory on the way to the meta device.
    """
    memo: dict[int, object] = {}
    if device is not None:
        device = torch.device(device)
        if device.type != "meta" and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            raise ValueError(
                f"a model on the meta device has no values to copy to {device}; count it with device='meta'"
            )
        for param in model.parameters():
            if param.device != device:
                memo[id(param)] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
        for buffer in model.buffers():
            if buffer.device != device:
                memo[id(buffer)] = buffer.detach().to(device)
    for module in model.modules():
        # Plain tensor attributes, such as the ``weight = weight_orig * weight_mask`` that
        # torch.nn.utils.prune recomputes before each forward, may be non-leaf tensors, which
        # deepcopy refuses; copy their values instead.
        for value in vars(module).values():
            if isinstance(value, Tensor) and id(value) not in memo:
                target = value.device if device is None else device
                memo[id(value)] = value.detach().to(target, copy=True)
    replica = copy.deepcopy(model, memo)
    return replica.eval()


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first tensor and its first floating-point dtype."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())
    return device, dtype


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``; meta tensors stand in for data, so a meta input becomes zeros."""
    if device.type == "meta":
        return torch.empty_like(x, device="meta")
    if x.is_meta:
        return torch.zeros(x.shape, dtype=x.dtype, device=device)
    return x.to(device)
