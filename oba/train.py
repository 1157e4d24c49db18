"""Evaluation, resumable fine-tuning and batch-norm recalibration.

* :func:`evaluate` -- accuracy and mean loss of a classifier over a loader.
* :func:`fine_tune` -- SGD (momentum, weight decay) with a MultiStepLR schedule, per-epoch metrics
  appended to a JSONL log, an atomic checkpoint after every epoch, and exact resumption: rerunning the
  same call after an interruption continues from the next epoch and ends with the same weights as an
  uninterrupted run (given deterministic kernels; on CPU they are).
* :func:`recalibrate_batchnorm` -- recompute batch-norm running statistics (e.g. after pruning).

Loaders yield ``(inputs, targets)`` batches (extra items are ignored), as those of :func:`oba.data.loader`.

Files go through :mod:`oba.io`: the checkpoint is replaced atomically, log lines are appended with an ``fsync``
(a torn last line is dropped), and checkpoints are read with ``weights_only=True`` (:func:`load_checkpoint`).

Multi-process runs (``torchrun``; :mod:`oba.process_group`): when a :mod:`torch.distributed` process group is
initialised, :func:`evaluate` all-reduces its sums, and :func:`fine_tune` (every process calls it with the same
arguments):

* trains a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper of the model (parameters and buffers
  broadcast from rank 0 at the start, gradients averaged over processes); give each process its part of the data
  with :func:`oba.data.distributed_loader` -- ``loader.sampler.set_epoch(epoch)`` is called at every epoch (for
  any loader whose sampler has it, also without a process group);
* after every epoch copies the buffers (BatchNorm statistics) from rank 0, so every process ends the epoch with
  the same state, and sums the metrics over the processes (``train_num_samples`` and ``eval_num_samples`` are
  global; :func:`evaluate` runs on every process);
* writes the log and the checkpoint on rank 0 only (atomically), the checkpoint holding every process's RNG
  states, while the others wait at a barrier. Every process reads the checkpoint on resumption (a filesystem
  shared by the processes), each restoring its own RNG states (with another number of processes: rank 0's, with
  a warning); all processes must agree on the epoch to resume from.

Without a process group nothing changes.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oba import process_group as pg
from oba.arguments import check_whole_number
from oba.batches import LossFn, batch_count, check_batch, modes_restored, to_device
from oba.io import append_jsonl, atomic_write, load_torch, read_jsonl, save_torch
from oba.models.checkpoints import state_dict_mismatches

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "evaluate",
    "fine_tune",
    "load_checkpoint",
    "read_jsonl",
    "recalibrate_batchnorm",
]

CHECKPOINT_FORMAT = "oba.fine_tune/1"
"""The ``format`` entry of checkpoints written by :func:`fine_tune`."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's model state does not fit the model (different keys or shapes)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf (the message names the epoch and batch; no step was taken with it)."""


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _prepare(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is None:
        return _model_device(model)
    device = torch.device(device)
    model.to(device)
    return device


def _unpack(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"expected (inputs, targets) batches, got {type(batch).__name__}")


def _batches(loader: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    desc: str = "eval",
    distributed: bool | None = None,
) -> dict[str, float | int]:
    """Accuracy and mean loss of a classifier over ``loader``.

    The model runs in eval mode under :func:`torch.no_grad`; every submodule's train/eval mode is restored
    afterwards.

    Args:
        loss_fn: ``loss_fn(logits, targets)`` returning the *mean* loss of a batch; default cross-entropy.
        device: where to run; default the model's device (given, the model is moved there).
        progress: show a tqdm progress bar (on rank 0 only under ``torch.distributed``).
        max_batches: stop after that many batches.
        distributed: all-reduce the sums (loss, correct, samples) over the processes, so that every process
            returns the metrics of the union of their loaders (give each its own part of the data, e.g.
            ``oba.data.distributed_loader(test_set, even=False)``); every process must call it then.
            Default: when a process group with several processes is initialised.

    Returns:
        ``{"accuracy": fraction in [0, 1], "loss": mean loss per sample, "correct": int, "num_samples": int}``
        (accuracy and loss are NaN for an empty loader).
    """
    device = _prepare(model, device)
    distributed = pg.is_distributed() if distributed is None else distributed
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    with modes_restored(model), torch.no_grad():
        model.eval()
        bar = tqdm(
            _batches(loader, max_batches),
            total=batch_count(loader, max_batches),
            desc=desc,
            disable=not progress or not pg.is_main_process(),
            leave=False,
        )
        for batch in bar:
            inputs, targets = _unpack(batch)
            inputs, targets = to_device(inputs, device), targets.to(device, non_blocking=True)
            logits = model(inputs)
            bs = targets.shape[0]
            total_loss += loss_fn(logits, targets).double() * bs
            correct += (logits.argmax(dim=1) == targets).sum()
            n += bs
    if distributed:
        total_loss, correct, n = _global_sums(total_loss, correct, n)
    if n == 0:
        return {"accuracy": math.nan, "loss": math.nan, "correct": 0, "num_samples": 0}
    c = int(correct)
    return {"accuracy": c / n, "loss": float(total_loss) / n, "correct": c, "num_samples": n}


def _global_sums(total_loss: Tensor, correct: Tensor, n: int) -> tuple[float, int, int]:
    """``(loss sum, correct, samples)`` summed over all processes (one all-reduce)."""
    loss, c, count = pg.all_reduce_sum([total_loss.double(), correct.double(), torch.tensor(float(n))])
    return float(loss), int(c), int(count)


# --------------------------------------------------------------------------------------------------
# Batch-norm recalibration
# --------------------------------------------------------------------------------------------------


def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable[Any],
    num_batches: int | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> nn.Module:
    """Recompute the running mean/variance of every batch-norm layer from ``num_batches`` batches.

    The running statistics are reset and re-estimated as the plain (cumulative) average over the batches
    (``momentum=None``), with the model in train mode and without gradients; afterwards every submodule's
    mode and every layer's momentum are restored. Layers without running statistics are left alone. Use a
    loader without augmentation. Returns ``model``.

    Raises:
        ValueError: the loader gave no batch (the statistics would be left reset).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    device = _prepare(model, device)
    momenta = [m.momentum for m in bns]
    seen = 0
    with modes_restored(model), torch.no_grad():
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            total = batch_count(loader, num_batches)
            for batch in tqdm(
                _batches(loader, num_batches), total=total, desc="BN recalibration", disable=not progress
            ):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(to_device(inputs, device))
                seen += 1
        finally:
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: the loader gave no batch")
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoints (read and written through oba.io)
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a :func:`fine_tune` checkpoint on the CPU with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        oba.io.DamagedFileError: the file is truncated or corrupt (delete it to restart the run).
        oba.io.UnsafeCheckpointError: the file pickles objects a checkpoint of :func:`fine_tune` never holds.
        ValueError: the file is not a :func:`fine_tune` checkpoint.
    """
    ckpt = load_torch(path, what="fine_tune checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fine_tune checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def _check_model_state(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    problems = state_dict_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint {path} belongs to a different model ({'; '.join(problems)}). "
            "Use another checkpoint_path, or resume=False to start afresh (it will be overwritten)."
        )


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct torch generators a DataLoader draws from (its own and its sampler's)."""
    found: list[torch.Generator] = []
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def _rng_state(loaders: Sequence[Any]) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        "loaders": [[g.get_state() for g in _loader_generators(ld)] if ld is not None else [] for ld in loaders],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], loaders: Sequence[Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for which, ld, saved in zip(("train", "eval"), loaders, state["loaders"], strict=True):
        gens = _loader_generators(ld) if ld is not None else []
        if len(gens) != len(saved):
            if which == "eval":  # evaluation does not depend on the order; nothing to warn about
                continue
            warnings.warn(
                f"the {which} loader has {len(gens)} random generator(s), the checkpoint {len(saved)}: "
                "their states are not restored, so the resumed data order may differ",
                stacklevel=4,  # the caller of fine_tune (via _resume)
            )
            continue
        for g, s in zip(gens, saved, strict=True):
            g.set_state(s)


def _plain_scheduler_state(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if isinstance(out.get("milestones"), Counter):
        out["milestones"] = dict(out["milestones"])  # a plain dict: no reliance on Counter being allow-listed
    return out


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------


def fine_tune(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    nesterov: bool = False,
    eval_loader: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    log_path: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    distributed: bool | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs`` epochs of SGD; resumable. Returns the per-epoch metrics.

    The optimiser is ``torch.optim.SGD(model.parameters(), lr, momentum, weight_decay, nesterov)`` over all
    parameters with ``requires_grad`` (pruned weights should be fixed by masks or parametrisations), and
    the learning rate is multiplied by ``gamma`` at each epoch in ``milestones`` (``MultiStepLR``).

    After every epoch:

    * the metrics ``{"epoch" (1-based), "lr", "train_loss", "train_accuracy", "train_num_samples", "eval_loss",
      "eval_accuracy", "eval_num_samples" (when ``eval_loader``), "seconds"}`` are appended to ``log_path`` as
      one JSON line (flushed and fsync-ed);
    * ``checkpoint_path`` is replaced atomically by a checkpoint holding the model, optimiser and scheduler
      states, the number of completed epochs, the metrics so far, the hyper-parameters, and the RNG states
      (torch, CUDA, numpy, python, and the generators of both loaders). It holds only tensors and plain
      containers: ``torch.load(path, weights_only=True)`` (or :func:`load_checkpoint`) reads it.

    Resumption: if ``checkpoint_path`` exists and ``resume`` is true, training restarts after the last
    completed epoch, with every state restored, so the final weights equal those of an uninterrupted run
    (on CPU, or with deterministic GPU kernels). The log is rewritten from the checkpoint's metrics (so a
    partial last line or epochs logged after the checkpoint disappear). ``epochs`` may be raised to extend
    a finished run; the other hyper-parameters must match. Without resumption the log is started afresh.

    Under ``torch.distributed`` (``distributed=True``; default: when a process group with several processes is
    initialised) the model is trained with DDP, the metrics are global, and only rank 0 writes files: see the
    module docstring.

    Args:
        seed: when starting afresh, ``torch.manual_seed(seed)`` (plus numpy, python and the generators of the
            loaders, e.g. ``DataLoader(..., generator=g)``) first, ``seed + rank`` under ``torch.distributed``;
            ignored on resumption (the saved states are restored instead).
        device: where to train (the model is moved there); default the model's device.
        loss_fn: ``loss_fn(logits, targets)`` returning the mean loss of a batch; default cross-entropy.

    Raises:
        CheckpointMismatchError: the checkpoint holds a different model's weights.
        ValueError: the checkpoint was made with other hyper-parameters, or has more epochs than asked.
        oba.io.DamagedFileError: the checkpoint is truncated or corrupt (delete it to restart).
    """
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, milestones=milestones, gamma=gamma)
    paths = dict(checkpoint_path=checkpoint_path, log_path=log_path)
    _check_arguments(model, train_loader, eval_loader, epochs=epochs, device=device, **hyper, **paths)
    run = _setup(
        model, train_loader, eval_loader, nesterov=nesterov, loss_fn=loss_fn, device=device, progress=progress,
        distributed=distributed, **hyper, **paths,
    )  # fmt: skip
    if run.checkpoint_path is not None and resume and run.checkpoint_path.exists():
        start, history = _resume(run, epochs)
    else:
        start, history = 0, []
        _seed_everything(seed, run.distributed, run.loaders)
    if run.log_path is not None and run.main:  # the checkpoint's epochs (none when starting afresh), atomically
        atomic_write(run.log_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in history), mode="w")
    if run.distributed:
        _wrap_in_ddp(run, start)
    with modes_restored(model):
        for epoch in range(start, epochs):
            history.append(_train_epoch(run, epoch, epochs))
            _end_epoch(run, history)
    return history


def _check_arguments(
    model: Any,
    train_loader: Any,
    eval_loader: Any,
    *,
    epochs: Any,
    lr: Any,
    momentum: Any,
    weight_decay: Any,
    milestones: Any,
    gamma: Any,
    device: Any,
    checkpoint_path: Any,
    log_path: Any,
) -> None:
    """Refuse, before anything changes, arguments :func:`fine_tune` would trip over deep inside torch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, loader in (("train_loader", train_loader), ("eval_loader", eval_loader)):
        if loader is not None and (isinstance(loader, (str, bytes, Tensor)) or not isinstance(loader, Iterable)):
            raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, got {type(loader).__name__}")
    check_whole_number("epochs", epochs, 0)
    for name, value, low in (("lr", lr, 0.0), ("gamma", gamma, 0.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= low:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(milestones, (str, bytes)) or not all(
        isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in milestones
    ):
        raise ValueError(f"milestones must be a sequence of epoch numbers >= 1 (e.g. [30, 60]), got {milestones!r}")
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available here (torch.cuda.is_available() is False)")
    for name, path in (("checkpoint_path", checkpoint_path), ("log_path", log_path)):
        if path is not None and Path(path).is_dir():
            raise ValueError(f"{name}={str(path)!r} is a directory: pass a file path inside it")


@dataclass
class _Run:
    """What the steps of one :func:`fine_tune` call share."""

    model: nn.Module
    net: nn.Module  # what batches go through: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    config: dict[str, Any]  # the hyper-parameters, which a resumed run must share
    loss_fn: LossFn
    device: torch.device
    train_loader: Iterable[Any]
    eval_loader: Iterable[Any] | None
    distributed: bool
    main: bool  # this process writes the files and prints
    progress: bool
    checkpoint_path: Path | None
    log_path: Path | None
    checked: bool = False  # the first training batch was checked (check_batch)

    @property
    def loaders(self) -> list[Any]:
        return [self.train_loader, self.eval_loader]


def _setup(
    model: nn.Module,
    train_loader: Iterable[Any],
    eval_loader: Iterable[Any] | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: Sequence[int],
    gamma: float,
    nesterov: bool,
    loss_fn: LossFn | None,
    device: str | torch.device | None,
    progress: bool,
    distributed: bool | None,
    checkpoint_path: str | os.PathLike | None,
    log_path: str | os.PathLike | None,
) -> _Run:
    """Move the model to its device; build the optimiser (SGD over the trainable parameters) and scheduler."""
    distributed = pg.is_distributed() if distributed is None else distributed
    device = _prepare(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    config = {
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "milestones": sorted(int(m) for m in milestones),
        "gamma": float(gamma),
        "nesterov": bool(nesterov),
    }
    return _Run(
        model=model,
        net=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma),
        config=config,
        loss_fn=loss_fn if loss_fn is not None else nn.CrossEntropyLoss(),
        device=device,
        train_loader=train_loader,
        eval_loader=eval_loader,
        distributed=distributed,
        main=pg.is_main_process() or not distributed,
        progress=progress,
        checkpoint_path=Path(checkpoint_path) if checkpoint_path is not None else None,
        log_path=Path(log_path) if log_path is not None else None,
    )


def _resume(run: _Run, epochs: int) -> tuple[int, list[dict[str, Any]]]:
    """Restore the model, optimiser, scheduler and RNG states from the checkpoint; return the number of completed
    epochs and their metrics."""
    path = run.checkpoint_path
    ckpt = load_checkpoint(path)
    _check_model_state(run.model, ckpt["model"], path)
    if ckpt["config"] != run.config:
        changed = {k: (ckpt["config"].get(k), v) for k, v in run.config.items() if ckpt["config"].get(k) != v}
        raise ValueError(
            f"the checkpoint {path} was made with other hyper-parameters (checkpoint vs now: {changed}); "
            "use another checkpoint_path, or resume=False to start afresh"
        )
    start = int(ckpt["epoch"])
    if start > epochs:
        raise ValueError(f"the checkpoint {path} has {start} completed epochs, more than epochs={epochs}")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    sched_state = dict(ckpt["scheduler"])
    sched_state["milestones"] = Counter({int(k): int(v) for k, v in sched_state["milestones"].items()})
    run.scheduler.load_state_dict(sched_state)
    _set_rng_state(_own_rng_state(ckpt, run.distributed), run.loaders)
    return start, list(ckpt["history"])


def _seed_everything(seed: int | None, distributed: bool, loaders: Sequence[Any] = ()) -> None:
    """Seed torch, numpy, python and the loaders' own generators with ``seed`` (``seed + rank`` under
    ``torch.distributed``), if given.

    Seeding the loaders' generators makes a seeded run a function of its arguments: its data order does not depend
    on how often the loader was iterated before (e.g. by an earlier stage of the iterative protocol, which a resumed
    run skips)."""
    if seed is None:
        return
    seed = seed + (pg.get_rank() if distributed else 0)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    for loader in loaders:
        for g in _loader_generators(loader) if loader is not None else []:
            g.manual_seed(seed)


def _wrap_in_ddp(run: _Run, start: int) -> None:
    """Train through :class:`~torch.nn.parallel.DistributedDataParallel`, once every process resumes at ``start``."""
    if not pg.same_on_all_ranks([start]):
        raise RuntimeError(
            f"the processes disagree on the epoch to resume from (this one: {start}): the checkpoint "
            f"{run.checkpoint_path} must be visible to every process (a shared filesystem), or pass resume=False"
        )
    from torch.nn.parallel import DistributedDataParallel

    run.net = DistributedDataParallel(run.model, device_ids=[run.device] if run.device.type == "cuda" else None)


def _train_epoch(run: _Run, epoch: int, epochs: int) -> dict[str, Any]:
    """One epoch of SGD (0-based ``epoch``), then the evaluation: the epoch's metrics (global ones under DDP)."""
    t0 = time.perf_counter()
    epoch_lr = run.optimizer.param_groups[0]["lr"]
    for ld in run.loaders:  # DistributedSampler: a new shuffle every epoch, reproducible on resumption
        if callable(getattr(getattr(ld, "sampler", None), "set_epoch", None)):
            ld.sampler.set_epoch(epoch)
    total_loss, correct, n = _sgd_steps(run, desc=f"epoch {epoch + 1}/{epochs}")
    if run.distributed:
        pg.broadcast_buffers(run.model)  # DDP leaves each process with its own last BatchNorm statistics
        total_loss, correct, n = _global_sums(total_loss, correct, n)
    if n == 0:
        raise ValueError("train_loader yielded no batches: nothing to train on (check the dataset and batch size)")
    if not math.isfinite(float(total_loss)):
        raise NonFiniteLossError(
            f"epoch {epoch + 1}: the training loss is {float(total_loss) / n} (NaN or inf); the checkpoint of the "
            "last finished epoch (if any) is intact: check the data for NaN/inf, lower lr, and rerun"
        )
    run.scheduler.step()
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "lr": float(epoch_lr),
        "train_loss": float(total_loss) / n,
        "train_accuracy": int(correct) / n,
        "train_num_samples": n,
    }
    if run.eval_loader is not None:
        metrics = evaluate(
            run.model, run.eval_loader, loss_fn=run.loss_fn, device=run.device, progress=run.progress,
            distributed=run.distributed,
        )  # fmt: skip
        run.model.train()
        record.update(
            eval_loss=metrics["loss"], eval_accuracy=metrics["accuracy"], eval_num_samples=metrics["num_samples"]
        )
    record["seconds"] = time.perf_counter() - t0
    return record


def _sgd_steps(run: _Run, desc: str) -> tuple[Tensor, Tensor, int]:
    """One pass over the training loader in train mode, a step per batch: the sums (loss, correct, samples)."""
    run.model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    n = 0
    # iter() first: tqdm.auto's asyncio variant calls iter() on what it is given, which for a DataLoader
    # would create a second iterator (drawing from its generator and starting workers twice).
    bar = tqdm(
        iter(run.train_loader),
        total=batch_count(run.train_loader, None),
        desc=desc,
        disable=not run.progress or not run.main,
        leave=False,
    )
    for index, batch in enumerate(bar):
        inputs, targets = _unpack(batch)
        inputs, targets = to_device(inputs, run.device), targets.to(run.device, non_blocking=True)
        if not run.checked:  # the run's first batch, before it changes anything (one forward in eval mode)
            loss = check_batch(run.model, run.loss_fn, (inputs, targets), "the first batch of train_loader")
            if loss is not None and not bool(torch.isfinite(loss).all()):
                raise NonFiniteLossError(
                    f"the first batch of train_loader gives a loss of {loss.tolist()} in eval mode, before any "
                    "training: check the data for NaN/inf inputs or labels, and the model for NaN/inf weights"
                )
            run.checked = True
        run.optimizer.zero_grad(set_to_none=True)
        logits = run.net(inputs)
        loss = run.loss_fn(logits, targets)
        if not run.distributed and not bool(torch.isfinite(loss)):  # under DDP: the epoch's global sum is checked
            raise NonFiniteLossError(
                f"{desc}, batch {index}: the training loss is {float(loss)} (no step was taken with it). Check that "
                "batch for NaN/inf inputs or labels, and lower lr if the loss diverged; the checkpoint of the last "
                "finished epoch (if any) is intact and a rerun resumes from it"
            )
        loss.backward()
        run.optimizer.step()
        bs = targets.shape[0]
        total_loss += loss.detach().double() * bs
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        n += bs
    return total_loss, correct, n


def _end_epoch(run: _Run, history: list[dict[str, Any]]) -> None:
    """Write the checkpoint and log the epoch's metrics (``history[-1]``; rank 0), then wait for every process."""
    record = history[-1]
    if run.checkpoint_path is not None:
        _save_checkpoint(run, history)
    if run.log_path is not None and run.main:
        append_jsonl(run.log_path, record)
    if run.progress and run.main:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
        tqdm.write(json.dumps(shown))
    if run.distributed:
        pg.barrier()  # the checkpoint is complete before any process goes on (or returns)


def _save_checkpoint(run: _Run, history: list[dict[str, Any]]) -> None:
    """Replace the checkpoint atomically, on rank 0, with the state after epoch ``history[-1]["epoch"]``; every
    process's RNG states are gathered into it (a collective: every process calls this)."""
    rng = pg.gather_objects(_rng_state(run.loaders)) if run.distributed else [_rng_state(run.loaders)]
    if not run.main:
        return
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "epoch": history[-1]["epoch"],
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": _plain_scheduler_state(run.scheduler.state_dict()),
        "config": run.config,
        "history": history,
        "rng": rng[0],
    }
    if run.distributed:
        ckpt["rng_per_rank"] = rng
    save_torch(ckpt, run.checkpoint_path)


def _own_rng_state(ckpt: Mapping[str, Any], distributed: bool) -> Mapping[str, Any]:
    """This process's RNG states from a checkpoint: its rank's when the checkpoint has one per process of this
    group, else rank 0's (``"rng"``; a warning under ``torch.distributed``, the data order may differ)."""
    per_rank = ckpt.get("rng_per_rank")
    if not distributed:
        return ckpt["rng"]
    if per_rank is not None and len(per_rank) == pg.get_world_size():
        return per_rank[pg.get_rank()]
    warnings.warn(
        f"the checkpoint holds RNG states of {len(per_rank) if per_rank else 1} process(es), this run has "
        f"{pg.get_world_size()}: every process resumes from rank 0's, so the resumed run may differ from an "
        "uninterrupted one",
        stacklevel=4,  # the caller of fine_tune (via _resume)
    )
    return ckpt["rng"]
