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

so each process computes its sum :math:`\Sigma_r` and count :math:`M_r` (:func:`oba.criteria.score_sums`),
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

import functools
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from oba import criteria, kfac
from oba.criteria import CriterionScorer, make_scorer
from oba.curvature import Batch, LossFn, Params
from oba.data.loading import DistributedSeededSampler, distributed_loader
from oba.process_group import (
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    check_same_model,
    gather_objects,
    get_rank,
    get_world_size,
    init_process_group_from_env,
    is_distributed,
    is_main_process,
    same_on_all_ranks,
)

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
        return criteria.score(
            model, loss_fn, batches, criterion, params=params, max_batches=max_batches, absolute=absolute,
            progress=progress, **options,
        )  # fmt: skip
    if not criteria.get(criterion).needs_data:  # the same on every process
        return criteria.score(model, None, None, criterion, params=params, absolute=absolute, **options)
    if batches is None:
        raise ValueError(f"criterion {criterion!r} needs data: pass loss_fn and batches (an iterable of (x, y))")
    if "seed" in criteria.get(criterion).options:  # random probes: a different stream on every process
        options["seed"] = int(options.get("seed", 0)) + get_rank()
    if check:
        check_same_model(model)
    local = _Shard(batches, max_batches, shard)
    sums, count = criteria.score_sums(
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
    criterion: str, loss_fn: LossFn | None = None, *, shard: bool = True, check: bool = True, **kwargs: Any
) -> CriterionScorer:
    """:func:`oba.criteria.make_scorer` over all processes, for :func:`oba.prune_structured`.

    ``prune_structured(model, x, distributed_scorer("oba", loss_fn), batches=loader, ...)`` run by every
    process (each with the same model and the same ``loader``, same seed): at each step the step's
    ``batches_per_step`` batches are dealt out rank-strided, the per-parameter scores (:func:`score`) or K-FAC
    factors (:func:`kfac_factors`) are all-reduced, and every process ranks and removes the same channels.
    Without a process group the scorer is ``make_scorer(criterion, loss_fn, ...)`` itself. ``"eigendamage"``
    rewrites every process's model alike before the first step, as in one process.

    Args:
        criterion: one of ``oba.criteria.names("structured")``.
        shard, check: as for :func:`score`.
        kwargs: as for :func:`oba.criteria.make_scorer` (``normalizer``, ``group_reduction``, ``progress``, the
            criterion's options).
    """
    return make_scorer(
        criterion, loss_fn, score_fn=functools.partial(score, shard=shard, check=check),
        factor_fn=functools.partial(kfac_factors, shard=shard, check=check), **kwargs,
    )  # fmt: skip
