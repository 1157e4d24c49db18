r"""Per-parameter importance criteria, accumulated over mini-batches: :func:`score`.

Removing parameters changes them by :math:`\delta\theta` (removal of a set S: :math:`\delta\theta_S = -\theta_S`)
and, to second order, the loss by

.. math::  \Delta L \approx g^\top \delta\theta + \tfrac12\, \delta\theta^\top H\, \delta\theta ,

with :math:`g` and :math:`H` the gradient and Hessian of the mean mini-batch loss. The criteria (each a
tensor per parameter, shaped like it; :math:`\odot` is the element-wise product):

==================  ================================================================================
``magnitude``       :math:`|\theta|^p` (``p=1`` L1, ``p=2`` L2); needs no data
``taylor``          :math:`\theta \odot g` (first order; Molchanov et al.)
``obd_fisher``      :math:`\theta^2 \odot \mathrm{diag}(F)`, :math:`F = \frac1N \sum_n g_n g_n^\top` the
                    empirical Fisher from per-sample gradients (``fisher="per_sample"``) or from the
                    mini-batch gradients (``fisher="per_batch"``, cheaper, needed with train-mode BatchNorm)
``obd_hessian``     :math:`\theta^2 \odot \mathrm{diag}(H)`, exact for small models, Hutchinson's estimate
                    otherwise (:func:`oba.curvature.hessian_diagonal`)
``oba``             :math:`\delta\theta \odot (H\,\delta\theta)` with :math:`\delta\theta = -\theta` by default
                    (Optimal Brain Apoptosis): the parameter's share of the quadratic form,
                    :math:`\sum_i s_i = \delta\theta^\top H \delta\theta`, cross terms included (unlike OBD,
                    which keeps :math:`H_{ii}` only). One exact Hessian-vector product per batch.
                    ``first_order=True`` gives
                    :math:`g \odot \delta\theta + \tfrac12\,\delta\theta \odot H\delta\theta`,
                    whose sum is the whole Taylor estimate of :math:`\Delta L` above.
                    ``terms=("series", "parallel")`` uses only those terms of the layer-wise
                    decomposition (:mod:`oba.decompose`): the published code's two-term criterion.
==================  ================================================================================

Scores of data-dependent criteria are the mean of the per-batch scores over the batches
(:func:`score_sums` returns the sum and the number of batches, the part that adds up over disjoint shards of
the batches: :mod:`oba.distributed` all-reduces it). They are
*signed* where the formula is (Taylor, OBA, OBD with a Hessian diagonal of either sign): a structure's
score is the sum of its parameters' signed scores, then the absolute value (:mod:`oba.group_importance`), so
that contributions can cancel. ``absolute=True`` returns :math:`|s|` per parameter, the saliency used to
rank single weights.

Scoring happens in the model's current train/eval mode and never changes the model (no running-statistic
updates, no hooks left, ``.grad`` untouched); see :func:`oba.curvature.curvature_context`.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oba.batches import batch_count, to_device
from oba.curvature import (
    Batch,
    LossFn,
    Params,
    gradient,
    hessian_diagonal,
    hvp,
    per_sample_gradients,
    select_params,
)
from oba.decompose import TERMS, HessianDecomposition

__all__ = ["CRITERIA", "score", "score_sums"]

CRITERIA: tuple[str, ...] = ("magnitude", "taylor", "obd_fisher", "obd_hessian", "oba")

_OPTIONS: dict[str, set[str]] = {
    "magnitude": {"p"},
    "taylor": set(),
    "obd_fisher": {"fisher", "chunk_size"},
    "obd_hessian": {"method", "samples", "max_exact", "seed"},
    "oba": {"delta", "first_order", "terms", "hvp_method"},
}


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
    **options: Any,
) -> Params:
    """Importance of every selected parameter under ``criterion``, averaged over ``batches``.

    Args:
        model: the network; parameters are addressed by their names in ``named_parameters()``.
        loss_fn: ``loss_fn(outputs, targets)``, the mean mini-batch loss (unused by ``magnitude``).
        batches: an iterable of ``(inputs, targets)`` (e.g. a DataLoader); moved to the model's device.
        criterion: one of :data:`CRITERIA` (see the module docstring for the formulas).
        params: which parameters to score (names or parameters; default all with ``requires_grad``).
        max_batches: use at most this many batches.
        absolute: return ``|s|`` per parameter instead of the signed score.
        progress: a tqdm progress bar over the batches.
        options: per criterion -- ``magnitude``: ``p`` (1 or 2, default 1); ``obd_fisher``: ``fisher``
            (``"per_sample"`` default, or ``"per_batch"``), ``chunk_size``; ``obd_hessian``: ``method``
            (``"auto"``, ``"exact"``, ``"hutchinson"``), ``samples`` (probes per batch, default 16),
            ``max_exact``, ``seed``; ``oba``: ``delta`` (a dict shaped like the parameters, the change
            removal makes; default ``-θ``), ``first_order`` (default False), ``terms`` (a subset of
            :data:`oba.decompose.TERMS`: replace H by those terms of its decomposition;
            ``("series", "parallel")`` is the published OBA code's criterion; default all four, exactly H),
            ``hvp_method`` (``"rev_rev"``, default: double backward, the faster on CPU; or ``"fwd_rev"``,
            see :func:`oba.curvature.hvp`).

    Returns:
        dict name -> tensor shaped like the parameter (detached, the parameter's dtype and device).
    """
    _check_options(criterion, options)
    if criterion == "magnitude":
        p = options.get("p", 1)
        if p not in (1, 2):
            raise ValueError(f"magnitude: p must be 1 or 2, got {p!r}")
        return OrderedDict((n, t.abs() ** p) for n, t in select_params(model, params).items())
    totals, count = score_sums(
        model, loss_fn, batches, criterion, params=params, max_batches=max_batches, progress=progress, **options
    )
    if count == 0:
        raise ValueError("batches is empty: no data to score with")
    out = OrderedDict((n, t / count) for n, t in totals.items())
    return OrderedDict((n, t.abs()) for n, t in out.items()) if absolute else out


def score_sums(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Batch] | None,
    criterion: str = "oba",
    *,
    params=None,
    max_batches: int | None = None,
    progress: bool = True,
    **options: Any,
) -> tuple[Params, int]:
    r"""The sum over ``batches`` of the per-batch scores of a data-dependent criterion, and the number of batches.

    :func:`score` is ``sums / count`` (then ``|.|`` with ``absolute=True``). The sum is what adds up over
    disjoint shards of the batches: :math:`\sum_{b \in B_1 \cup B_2} s_b = \sum_{b \in B_1} s_b + \sum_{b \in
    B_2} s_b`, so :mod:`oba.distributed` all-reduces sums and counts and divides afterwards. Empty ``batches``
    give zeros and a count of 0 (no error). Arguments as for :func:`score`; ``magnitude`` needs no data and has
    no sums.
    """
    _check_options(criterion, options)
    if criterion == "magnitude":
        raise ValueError("magnitude needs no data and has no per-batch sums: use score(..., 'magnitude')")
    if batches is None or loss_fn is None:
        raise ValueError(f"criterion {criterion!r} needs data: pass loss_fn and batches (an iterable of (x, y))")
    theta = select_params(model, params)
    per_batch = _BATCH_SCORES[criterion]
    device = next(iter(theta.values())).device
    totals: Params = OrderedDict((n, torch.zeros_like(t)) for n, t in theta.items())
    count = 0
    stream = itertools.islice(iter(batches), max_batches)
    total_batches = batch_count(batches, max_batches)
    generator = torch.Generator().manual_seed(int(options.get("seed", 0)))
    if criterion == "oba" and options.get("terms") is not None:  # traced once, re-used for every batch
        options["decomposition"] = HessianDecomposition(model, loss_fn, list(theta))
    for batch in tqdm(stream, total=total_batches, desc=f"score [{criterion}]", disable=not progress):
        batch = to_device(batch, device)  # a malformed batch is reported by the curvature functions
        s = per_batch(model, loss_fn, batch, theta, generator=generator, **options)
        totals = s if count == 0 else OrderedDict((n, totals[n] + s[n]) for n in totals)
        count += 1
    return totals, count


def _check_options(criterion: str, options: Mapping[str, Any]) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    unknown = set(options) - _OPTIONS[criterion]
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[criterion])) or "none"
        raise TypeError(f"criterion {criterion!r} takes no option(s) {sorted(unknown)}; its options: {allowed}")


# --------------------------------------------------------------------------------------------------
# One batch of each criterion: (model, loss_fn, batch, theta, generator, **options) -> Params
# --------------------------------------------------------------------------------------------------
def _taylor(model: nn.Module, loss_fn: LossFn, batch: Batch, theta: Params, **_: Any) -> Params:
    g = gradient(model, loss_fn, batch, list(theta))
    return OrderedDict((n, t * g[n]) for n, t in theta.items())


def _obd_fisher(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    theta: Params,
    *,
    fisher: str = "per_sample",
    chunk_size: int | None = None,
    **_: Any,
) -> Params:
    if fisher == "per_sample":
        grads = per_sample_gradients(model, loss_fn, batch, list(theta), chunk_size=chunk_size)
        diag = OrderedDict((n, (g**2).mean(0)) for n, g in grads.items())
    elif fisher == "per_batch":
        diag = OrderedDict((n, g**2) for n, g in gradient(model, loss_fn, batch, list(theta)).items())
    else:
        raise ValueError(f"obd_fisher: fisher must be 'per_sample' or 'per_batch', got {fisher!r}")
    return OrderedDict((n, t**2 * diag[n]) for n, t in theta.items())


def _obd_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    theta: Params,
    *,
    generator: torch.Generator,
    method: str = "auto",
    samples: int = 16,
    max_exact: int = 2_000,
    **_: Any,
) -> Params:
    diag = hessian_diagonal(
        model,
        loss_fn,
        batch,
        list(theta),
        method=method,
        samples=samples,
        max_exact=max_exact,
        generator=generator,
    )
    return OrderedDict((n, t**2 * diag[n]) for n, t in theta.items())


def _oba(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    theta: Params,
    *,
    delta: Mapping[str, Tensor] | None = None,
    first_order: bool = False,
    terms: Sequence[str] | None = None,
    hvp_method: str = "rev_rev",
    decomposition: HessianDecomposition | None = None,
    **_: Any,
) -> Params:
    d = OrderedDict((n, -t) for n, t in theta.items()) if delta is None else delta
    if terms is None or set(terms) == set(TERMS):
        hd = hvp(model, loss_fn, batch, d, list(theta), method=hvp_method)
    else:
        hd = decomposition.hvp(batch, d, terms)
    if not first_order:
        return OrderedDict((n, d[n] * hd[n]) for n in theta)
    g = gradient(model, loss_fn, batch, list(theta))
    return OrderedDict((n, g[n] * d[n] + 0.5 * d[n] * hd[n]) for n in theta)


_BATCH_SCORES = {"taylor": _taylor, "obd_fisher": _obd_fisher, "obd_hessian": _obd_hessian, "oba": _oba}
