r"""The formulas of the per-parameter importance criteria, one batch at a time, and their accumulation.

Each criterion is a function of one batch (:func:`taylor`, :func:`obd_fisher`, :func:`obd_hessian`, :func:`oba`;
:func:`magnitude` needs no data); :func:`accumulate` sums them over batches. The criteria are named, and their
options checked, in the registry :mod:`oba.criteria`, whose :func:`oba.criteria.score` (``oba.score``) is the
entry point.

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
                    decomposition (:mod:`oba.decompose`): the published code's two-term criterion,
                    registered as ``oba_two_term``.
==================  ================================================================================

Scores of data-dependent criteria are the mean of the per-batch scores over the batches
(:func:`accumulate` returns the sum and the number of batches, the part that adds up over disjoint shards of
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
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oba.arguments import check_whole_number
from oba.batches import batch_count, first_checked, to_device
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

__all__ = [
    "NonFiniteScoreError",
    "PerBatchScore",
    "accumulate",
    "magnitude",
    "oba",
    "oba_setup",
    "obd_fisher",
    "obd_hessian",
    "taylor",
]


class NonFiniteScoreError(ValueError):
    """A batch gave NaN or infinite scores (a NaN/inf input, a diverged model, an overflow)."""


PerBatchScore = Callable[..., Params]
"""``per_batch(model, loss_fn, batch, theta, *, generator, **options) -> Params``: one batch's scores."""


def magnitude(model: nn.Module, params=None, *, p: int = 1) -> Params:
    r""":math:`|\theta|^p` of the selected parameters (``p`` 1 or 2); no data."""
    if p not in (1, 2):
        raise ValueError(f"magnitude: p must be 1 or 2, got {p!r}")
    return OrderedDict((n, t.abs() if p == 1 else t.square()) for n, t in select_params(model, params).items())


def accumulate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    per_batch: PerBatchScore,
    *,
    params=None,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "score",
    setup: Callable[..., dict[str, Any]] | None = None,
    skip_nonfinite: bool = False,
    **options: Any,
) -> tuple[Params, int]:
    r"""The sum over ``batches`` of ``per_batch`` scores, and the number of batches.

    The sum is what adds up over disjoint shards of the batches,
    :math:`\sum_{b \in B_1 \cup B_2} s_b = \sum_{b \in B_1} s_b + \sum_{b \in B_2} s_b` (:mod:`oba.distributed`
    all-reduces sums and counts and divides afterwards). ``setup(model, loss_fn, theta, options) -> options``
    runs once before the first batch (e.g. :func:`oba_setup` traces the decomposition once for every batch).
    Empty ``batches`` give zeros and a count of 0 (no error); ``options`` go to ``per_batch``.

    A batch whose scores are not all finite raises :class:`NonFiniteScoreError` naming the batch (its index in
    ``batches``) and the first affected parameter; with ``skip_nonfinite=True`` such batches are left out (and
    not counted) with a warning instead.
    """
    check_whole_number("max_batches", max_batches, allow_none=True)
    theta = select_params(model, params)
    if any(t.is_meta for t in theta.values()):
        raise ValueError(
            "the model's parameters are on the meta device and hold no values: materialise and load it first "
            "(e.g. model.to_empty(device='cpu') then model.load_state_dict(...))"
        )
    device = next(iter(theta.values())).device
    totals: Params = OrderedDict((n, torch.zeros_like(t)) for n, t in theta.items())
    count = 0
    stream = first_checked(model, loss_fn, itertools.islice(iter(batches), max_batches))  # bad data named first
    total_batches = batch_count(batches, max_batches)
    generator = torch.Generator().manual_seed(int(options.get("seed", 0)))
    if setup is not None:
        options = setup(model, loss_fn, theta, options)
    for index, batch in enumerate(tqdm(stream, total=total_batches, desc=desc, disable=not progress)):
        batch = to_device(batch, device)
        s = per_batch(model, loss_fn, batch, theta, generator=generator, **options)
        bad = next((n for n, t in s.items() if not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            message = (
                f"batch {index} gave non-finite (NaN or inf) {desc} scores, first in {bad!r}: check that batch for "
                "NaN/inf inputs or labels, and the model for diverged weights"
            )
            if not skip_nonfinite:
                raise NonFiniteScoreError(message + "; pass skip_nonfinite=True to leave such batches out")
            warnings.warn(message + "; left out (skip_nonfinite=True)", RuntimeWarning, stacklevel=2)
            continue
        totals = s if count == 0 else OrderedDict((n, totals[n] + s[n]) for n in totals)
        count += 1
    return totals, count


# --------------------------------------------------------------------------------------------------
# One batch of each criterion: (model, loss_fn, batch, theta, generator, **options) -> Params
# --------------------------------------------------------------------------------------------------
def taylor(model: nn.Module, loss_fn: LossFn, batch: Batch, theta: Params, **_: Any) -> Params:
    g = gradient(model, loss_fn, batch, list(theta))
    return OrderedDict((n, t * g[n]) for n, t in theta.items())


def obd_fisher(
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
        hint = (
            "Criterion 'obd_fisher' with fisher='per_sample' (its default) needs them; change one argument: "
            "score_mode='eval' (prune_structured and the experiments; or model.eval() before oba.score), or the "
            "option fisher='per_batch' (make_scorer('obd_fisher', loss_fn, fisher='per_batch'); in the experiments "
            "criterion_options={'obd_fisher': {'fisher': 'per_batch'}})."
        )
        grads = per_sample_gradients(model, loss_fn, batch, list(theta), chunk_size=chunk_size, hint=hint)
        diag = OrderedDict((n, (g**2).mean(0)) for n, g in grads.items())
    elif fisher == "per_batch":
        diag = OrderedDict((n, g**2) for n, g in gradient(model, loss_fn, batch, list(theta)).items())
    else:
        raise ValueError(f"obd_fisher: fisher must be 'per_sample' or 'per_batch', got {fisher!r}")
    return OrderedDict((n, t**2 * diag[n]) for n, t in theta.items())


def obd_hessian(
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


def oba(
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


def oba_setup(model: nn.Module, loss_fn: LossFn, theta: Params, options: dict[str, Any]) -> dict[str, Any]:
    """With ``terms`` (a part of the decomposition), trace :class:`oba.decompose.HessianDecomposition` once for
    all batches and hand it to :func:`oba` as ``decomposition``."""
    if options.get("terms") is None:
        return options
    return {**options, "decomposition": HessianDecomposition(model, loss_fn, list(theta))}
