"""The :mod:`torch.distributed` process group and its collectives, for multi-process runs (``torchrun``).

Plain plumbing with no pruning or scoring in it, so that training (:mod:`oba.train`) and data loading
(:func:`oba.data.distributed_loader`) can use it without depending on the scoring stack; :mod:`oba.distributed`
(sharded scoring and pruning) builds on it and re-exports every public name.

Without an initialised process group (a plain ``python script.py``) every function behaves as for a single
process: rank 0 of 1, collectives return their input, :func:`barrier` does nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "check_same_model",
    "gather_objects",
    "get_rank",
    "get_world_size",
    "init_process_group_from_env",
    "is_distributed",
    "is_main_process",
    "same_on_all_ranks",
]


# ------------------------------------------------------------------------------------------ process group
def is_distributed() -> bool:
    """Whether a :mod:`torch.distributed` process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every process arrives here (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def init_process_group_from_env(backend: str | None = None, timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ...) and return
    this process's device.

    Under ``torchrun``: the group is initialised once (``backend`` default ``"nccl"`` with CUDA, else
    ``"gloo"``), and each process uses GPU ``LOCAL_RANK`` (``torch.cuda.set_device``) or the CPU. Without
    ``torchrun`` (no ``WORLD_SIZE`` in the environment) nothing is initialised: the device is the first GPU,
    else the CPU. A group initialised before is kept.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and dist.is_available() and not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kwargs)
    return device


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ collectives
def all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The element-wise sums over all processes of ``tensors`` (one collective on a flat float64 buffer).

    Returns new tensors of the inputs' shapes, dtypes and devices (integers are exact up to 2**53); without a
    process group, the inputs themselves.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(_comm_device(), torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].reshape(t.shape).to(t.device, t.dtype))
        offset += t.numel()
    return out


def same_on_all_ranks(values: Sequence[float], rel_tol: float = 1e-9) -> bool:
    """Whether every process passed the same ``values`` (to ``rel_tol``): one MAX all-reduce of ``[v, -v]``."""
    if not is_distributed():
        return True
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    both = torch.cat([v, -v]).to(_comm_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(v)].cpu().tolist(), (-both[len(v) :]).cpu().tolist()
    return all(math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-12) for a, b in zip(high, low, strict=True))


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (pickled; ``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``model`` (BatchNorm running statistics, ...) from process ``src`` to all others."""
    if not is_distributed():
        return
    for b in model.buffers():
        if b.device.type == _comm_device().type:
            dist.broadcast(b, src)
        else:
            tmp = b.detach().to(_comm_device())
            dist.broadcast(tmp, src)
            b.copy_(tmp)


# ------------------------------------------------------------------------------------------ same model everywhere
def _model_fingerprint(model: nn.Module) -> list[float]:
    """Parameter count, a digest of every parameter's shape, the number of elements and a position-weighted
    float64 sum of every parameter.

    The shapes hold every layer width (``out_channels``, ``out_features``, normalisation widths, ...) and more;
    the digest is a 24-bit integer, small enough for :func:`same_on_all_ranks`'s relative tolerance to compare it
    exactly.
    """
    params = list(model.parameters())
    shapes = repr([tuple(p.shape) for p in params]).encode()
    shape_digest = int.from_bytes(hashlib.sha256(shapes).digest()[:3], "big")
    sums = [p.detach().double().sum().cpu() for p in params]  # one transfer per parameter, no sync in between
    checksum = float(sum((k + 1) * s for k, s in enumerate(sums))) if sums else 0.0
    return [len(params), shape_digest, sum(p.numel() for p in params), checksum]


def check_same_model(model: nn.Module, what: str = "model") -> None:
    """Raise :class:`RuntimeError` on every process unless all hold the same ``model`` (widths and weights).

    One small all-reduce of a fingerprint; nothing without a process group.
    """
    if not same_on_all_ranks(_model_fingerprint(model)):
        raise RuntimeError(
            f"the {what} differs between processes (layer widths or weights): load the same weights on every "
            "rank (e.g. the same seed or checkpoint) before scoring; distributed scoring prunes identically only "
            "if every process starts from the same model"
        )
