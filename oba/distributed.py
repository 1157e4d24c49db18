r"""Multi-process runs with :mod:`torch.distributed` (``torchrun``): sharded scoring, pruning, DDP fine-tuning.

Launch any script that uses this module with ``torchrun --standalone --nproc_per_node=K script.py ...``
(one process per GPU, or K CPU processes with the gloo backend; see ``scripts/prune_distributed.py``);
:func:`init_process_group_from_env` joins the group that ``torchrun`` describes in the environment. Without an
initialised process group (a plain ``python script.py``) every function here behaves exactly as its
single-process counterpart.

Scoring: shards of batches, sums all-reduced
--------------------------------------------
Every process is given the *same* sequence of batches :math:`b_0, b_1, \dots, b_{M-1}` (e.g. a loader with
the same seed on every rank) and scores only its rank-strided shard :math:`B_r = \{b_i : i \equiv r \bmod K\}`
(:func:`shard`). Every process still iterates (loads) all batches, so that it can check them and take its
share: scoring, not loading, is what is split (``shard=False`` with a :func:`distributed_loader` splits the
loading too, giving up the comparison with one process on the same batches). The per-parameter criteria of
:func:`oba.score` are means of per-batch scores,

.. math::  s = \frac1M \sum_{i<M} s(b_i) = \frac{\sum_r \Sigma_r}{\sum_r M_r}, \qquad
           \Sigma_r = \sum_{b \in B_r} s(b),\quad M_r = |B_r|,

so each process computes its sum :math:`\Sigma_r` and count :math:`M_r` (:func:`oba.importance.score_sums`),
both are all-reduced (summed over processes), and only then is the mean taken -- and ``absolute=True``'s
:math:`|s|`, which is not linear, applied. This holds for every data-dependent criterion of :func:`oba.score`:
``taylor`` (:math:`\theta \odot g_b`), ``obd_fisher`` (:math:`\theta^2 \odot \widehat{\mathrm{diag}}F_b`),
``obd_hessian`` (:math:`\theta^2 \odot \mathrm{diag} H_b`), ``oba`` (:math:`\delta\theta \odot H_b\delta\theta`,
any ``terms=``, ``first_order=``): each is a function of one batch, then averaged. ``magnitude`` needs no data
and is computed locally (the weights are the same everywhere).

The K-FAC factors (:mod:`oba.kfac`) are ratios of sums too, :math:`A = \sum a a^\top / \#\text{rows}` and
:math:`S = \sum_n \sum_t g g^\top / \#\text{samples}`: the sums and both counts are all-reduced
(:func:`oba.kfac.kfac_factor_sums`), then divided; Kron-OBD / Kron-OBS (damping, inverses) are computed from
the global factors on every process. The result on K processes therefore equals the single-process result on
the union of the same batches up to the order of floating-point additions (float tolerance). Exceptions:
random draws -- Hutchinson probes of ``obd_hessian`` (``method="hutchinson"``) and sampled labels of K-FAC
(``sampled=True``) -- use ``seed + rank`` on each process, an equally valid but different draw.

An all-reduce hands every process the same reduced values (computed once per element, then distributed), so
the channel rankings, and hence the pruned architectures and weights of :func:`oba.prune_structured` with
:func:`distributed_scorer`, are identical on all processes (given deterministic kernels for the per-group
sums); :func:`check_same_model` verifies that cheaply after pruning. EigenDamage (:mod:`oba.eigendamage`) rotates
every reparametrised layer into the eigenbasis of its K-FAC factors inside the scorer: with the all-reduced
factors every process computes the same eigendecompositions, rotations and costs (its default ``sampled=True``
draws labels with ``seed + rank``, as above).

Safety checks (``check=True``, default): before scoring, every process verifies that all hold the same model
(widths and a weighted checksum of the parameters) and, after going through the batches, the same sequence of
batches (count and a checksum of all their tensors); a mismatch raises :class:`RuntimeError` on every process
instead of silently pruning differently. Each is one small all-reduce.

Fine-tuning: DDP
----------------
:func:`oba.train.fine_tune` wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel` when a
process group is initialised; feed it a :func:`distributed_loader` (a :class:`DistributedSeededSampler`: each
process a disjoint, equally long part of every epoch; ``set_epoch`` is called by ``fine_tune``). Gradients are
averaged over processes, so K processes with per-process batch size :math:`b` take the steps of one process
with batch size :math:`K b` (up to BatchNorm, whose batch statistics stay per process). Only rank 0 writes the
checkpoint and the log (atomically), the others wait at a barrier; every process can resume from the
checkpoint (a shared filesystem is assumed). :func:`oba.train.evaluate` all-reduces its sums, so every process
reports the global accuracy of the union of the shards (use ``distributed_loader(..., even=False)`` so that
each sample is counted once).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from oba import importance, kfac
from oba.curvature import Batch, LossFn, Params
from oba.data.datasets import SeededIndex
from oba.group_importance import Normalizer
from oba.prune import Scorer, layer_widths, make_scorer

__all__ = [
    "DistributedSeededSampler",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "check_same_model",
    "distributed_loader",
    "distributed_scorer",
    "gather_objects",
    "get_rank",
    "get_world_size",
    "init_process_group_from_env",
    "is_distributed",
    "is_main_process",
    "kfac_factors",
    "same_on_all_ranks",
    "score",
    "shard",
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


def _model_fingerprint(model: nn.Module) -> list[float]:
    """Layer widths, parameter count and a position-weighted float64 sum of every parameter."""
    widths = list(layer_widths(model).values())
    params = list(model.parameters())
    sums = [p.detach().double().sum().cpu() for p in params]  # one transfer per parameter, no sync in between
    checksum = float(sum((k + 1) * s for k, s in enumerate(sums))) if sums else 0.0
    return [len(widths), sum((k + 1) * w for k, w in enumerate(widths)), sum(p.numel() for p in params), checksum]


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


# ------------------------------------------------------------------------------------------ sharding
def shard(batches: Iterable[Batch], rank: int | None = None, world_size: int | None = None) -> Iterator[Batch]:
    """This process's rank-strided shard of ``batches``: items ``rank, rank + K, rank + 2K, ...`` (K processes).

    ``rank`` / ``world_size`` default to those of the process group (all of ``batches`` without one).
    """
    r = get_rank() if rank is None else rank
    k = get_world_size() if world_size is None else world_size
    if not 0 <= r < k:
        raise ValueError(f"rank must be in [0, {k}), got {r}")
    for i, batch in enumerate(batches):
        if i % k == r:
            yield batch


def _tensor_sum(x: Any) -> float:
    """The float64 sum of every real tensor in ``x`` (nested tuples/lists too)."""
    if isinstance(x, Tensor):
        return 0.0 if x.is_complex() else float(x.detach().double().sum())
    if isinstance(x, (tuple, list)):
        return sum(_tensor_sum(v) for v in x)
    return 0.0


class _Shard:
    """Iterates this process's shard of the first ``max_batches`` batches (or, with ``sharded=False``, all of
    them: the caller gave each process its own data) and fingerprints the whole sequence it went through."""

    def __init__(self, batches: Iterable[Batch], max_batches: int | None, sharded: bool) -> None:
        self.batches, self.max_batches, self.sharded = batches, max_batches, sharded
        self.count, self.checksum = 0, 0.0

    def __iter__(self) -> Iterator[Batch]:
        k, r = (get_world_size(), get_rank()) if self.sharded else (1, 0)
        for i, batch in enumerate(itertools.islice(self.batches, self.max_batches)):
            self.count += 1
            self.checksum += (i + 1) * _tensor_sum(batch)
            if i % k == r:
                yield batch

    def check_same(self) -> None:
        """Raise on every process unless all went through the same batches (a collective: call it on all)."""
        if not self.sharded:
            return
        if not same_on_all_ranks([self.count, self.checksum]):
            raise RuntimeError(
                "the processes were given different batches (count or contents differ): every process must get "
                "the same sequence of batches (e.g. the same loader with the same seed), which is sharded here; "
                "pass shard=False if each process already holds its own part of the data"
            )


# ------------------------------------------------------------------------------------------ scoring
def score(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Batch] | None,
    criterion: str = "oba",
    *,
    params=None,
    max_batches: int | None = None,
    absolute: bool = False,
    progress: bool = True,
    shard: bool = True,
    check: bool = True,
    **options: Any,
) -> Params:
    """:func:`oba.score` over all processes: each scores its shard of ``batches``, sums and counts are all-reduced.

    The result, the same on every process, equals ``oba.score`` of one process on all the batches (module
    docstring). Without a process group this *is* ``oba.score``.

    Args:
        batches: the same sequence on every process (``shard=True``, default): the first ``max_batches`` of
            them are dealt out rank-strided. With ``shard=False`` each process scores all of its own
            ``batches`` (e.g. a :func:`distributed_loader`), capped at ``max_batches`` each.
        progress: a progress bar on rank 0.
        check: verify that all processes hold the same model and batches (raises :class:`RuntimeError`).
        params, absolute, options: as for :func:`oba.score`; ``obd_hessian``'s Hutchinson ``seed`` is offset
            by the rank.
    """
    if not is_distributed():
        return importance.score(
            model, loss_fn, batches, criterion, params=params, max_batches=max_batches, absolute=absolute,
            progress=progress, **options,
        )  # fmt: skip
    if criterion == "magnitude":  # no data: the same on every process
        return importance.score(model, None, None, criterion, params=params, absolute=absolute, **options)
    if batches is None:
        raise ValueError(f"criterion {criterion!r} needs data: pass loss_fn and batches (an iterable of (x, y))")
    if criterion == "obd_hessian":
        options["seed"] = int(options.get("seed", 0)) + get_rank()
    if check:
        check_same_model(model)
    local = _Shard(batches, max_batches, shard)
    sums, count = importance.score_sums(
        model, loss_fn, local, criterion, params=params, progress=progress and is_main_process(), **options
    )
    if check:
        local.check_same()
    *reduced, total = all_reduce_sum([*sums.values(), torch.tensor(float(count))])
    if int(total) == 0:
        raise ValueError("batches is empty on every process: no data to score with")
    out = OrderedDict((n, t / int(total)) for n, t in zip(sums, reduced, strict=True))
    return OrderedDict((n, t.abs()) for n, t in out.items()) if absolute else out


def kfac_factors(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    layers: Sequence[nn.Module] | None = None,
    sampled: bool = False,
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
    shard: bool = True,
    check: bool = True,
) -> dict[nn.Module, kfac.KFACFactors]:
    r""":func:`oba.kfac.kfac_factors` over all processes: the factor sums :math:`\sum a a^\top`,
    :math:`\sum g g^\top` and their counts (rows, samples) of each shard are all-reduced, then divided.

    Arguments as for :func:`oba.kfac.kfac_factors` and :func:`score` (``shard``, ``check``); sampled labels
    (``sampled=True``) use ``seed + rank``. Without a process group this *is* ``oba.kfac.kfac_factors``.
    """
    if not is_distributed():
        return kfac.kfac_factors(
            model, loss_fn, batches, layers=layers, sampled=sampled, max_batches=max_batches, seed=seed,
            progress=progress,
        )  # fmt: skip
    if check:
        check_same_model(model)
    local = _Shard(batches, max_batches, shard)
    sums = kfac.kfac_factor_sums(
        model,
        loss_fn,
        local,
        layers=layers,
        sampled=sampled,
        seed=seed + get_rank(),
        progress=progress and is_main_process(),
    )
    if check:
        local.check_same()
    order = list(sums.A)
    counts = torch.tensor([float(sums.rows[m]) for m in order] + [float(sums.samples)], dtype=torch.float64)
    reduced = all_reduce_sum([*(sums.A[m] for m in order), *(sums.S[m] for m in order), counts])
    a_sums, s_sums, counts = reduced[: len(order)], reduced[len(order) : 2 * len(order)], reduced[-1]
    total = kfac.KFACSums(
        A=dict(zip(order, a_sums, strict=True)),
        S=dict(zip(order, s_sums, strict=True)),
        rows={m: int(c) for m, c in zip(order, counts[:-1].tolist(), strict=True)},
        samples=int(counts[-1]),
    )
    if total.samples == 0:
        raise ValueError("batches is empty on every process: no data to compute K-FAC factors with")
    return total.factors()


def distributed_scorer(
    criterion: str,
    loss_fn: LossFn | None = None,
    *,
    normalizer: Normalizer = "mean",
    group_reduction: str = "sum",
    progress: bool = False,
    shard: bool = True,
    check: bool = True,
    **options: Any,
) -> Scorer:
    """:func:`oba.prune.make_scorer` over all processes, for :func:`oba.prune_structured`.

    ``prune_structured(model, x, distributed_scorer("oba", loss_fn), batches=loader, ...)`` run by every
    process (each with the same model and the same ``loader``, same seed): at each step the step's
    ``batches_per_step`` batches are dealt out rank-strided, the per-parameter scores (:func:`score`) or K-FAC
    factors (:func:`kfac_factors`) are all-reduced, and every process ranks and removes the same channels.
    Without a process group the scorer is ``make_scorer(criterion, loss_fn, ...)`` itself.

    ``"eigendamage"`` scores a model reparametrised by :func:`oba.eigendamage.to_eigenbasis`; what
    :func:`oba.eigendamage.prune_eigendamage` does in one process is, on several::

        dense = copy.deepcopy(model)
        to_eigenbasis(model)
        prune_structured(model, x, distributed_scorer("eigendamage", loss_fn), reference=dense,
                         ignored_layers=eigenbasis_ignored_layers(model), batches=loader, keep_flops=0.5)

    Args:
        criterion: one of :data:`oba.prune.STRUCTURED_CRITERIA`.
        shard, check: as for :func:`score`.
        normalizer, group_reduction, progress, options: as for :func:`oba.prune.make_scorer`.
    """
    return make_scorer(
        criterion, loss_fn, normalizer=normalizer, group_reduction=group_reduction, progress=progress,
        score_fn=functools.partial(score, shard=shard, check=check),
        factor_fn=functools.partial(kfac_factors, shard=shard, check=check), **options,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ data for DDP
class DistributedSeededSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` whose items carry per-sample augmentation seeds.

    Per epoch (``set_epoch``; :func:`oba.train.fine_tune` calls it) one permutation of the dataset (if
    ``shuffle``) and one seed per sample are drawn from a generator seeded with ``seed + epoch``: the same on
    every process, whatever the number of processes. Process ``r`` of ``K`` takes positions ``r, r + K, ...``.

    Args:
        even: every process gets the same number of samples (DDP training needs it): the order is padded by
            repeating its start, or cut with ``drop_last``. ``even=False``: each sample exactly once, the
            shards differing by at most one (evaluation).
        with_seeds: yield :class:`oba.data.SeededIndex` items (default: when the dataset supports them, as
            :mod:`oba.data`'s do), so random augmentation depends only on ``seed``, the epoch and the sample.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        even: bool = True,
        with_seeds: bool | None = None,
    ) -> None:
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.even = even
        self.with_seeds = bool(getattr(dataset, "supports_seeded_index", False)) if with_seeds is None else with_seeds
        if not even:
            n = len(dataset)  # type: ignore[arg-type]
            self.num_samples = len(range(self.rank, n, self.num_replicas))
            self.total_size = n

    def __iter__(self) -> Iterator[int | SeededIndex]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.even:
            if self.drop_last:
                order = order[: self.total_size]
            else:
                pad = self.total_size - n
                order += (order * math.ceil(pad / max(n, 1)))[:pad]
        mine = order[self.rank : self.total_size : self.num_replicas]
        if not self.with_seeds:
            return iter(mine)
        seeds = torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64).tolist()  # by sample
        return iter([SeededIndex(i, seeds[i]) for i in mine])


def distributed_loader(
    dataset: Dataset,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    *,
    even: bool = True,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over this process's part of ``dataset``
    (:class:`DistributedSeededSampler`; without a process group, all of it).

    ``batch_size`` is per process: K processes train with a global batch of ``K * batch_size``. Use
    ``shuffle=True`` for training, ``shuffle=False, even=False`` for evaluation (each sample once).
    ``fine_tune`` calls ``loader.sampler.set_epoch(epoch)`` at each epoch (do it yourself in your own loop).
    """
    sampler = DistributedSeededSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, even=even)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(int(seed) + get_rank()),  # worker seeds, per process
        collate_fn=collate_fn,
    )
