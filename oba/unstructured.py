r"""Unstructured (single-weight) pruning with ``torch.nn.utils.prune`` masks: by a criterion, WoodFisher, CBS.

The conventions (sparsity = fraction REMOVED, masks, ``scope``, ``layers``) are those of :mod:`oba.masks`, whose
functions are re-exported here.

Criteria (those of the registry :mod:`oba.criteria` with an unstructured route, :data:`CRITERIA`; a larger score
means more important, the lowest-scored weights are removed): ``magnitude``, ``taylor``, ``obd_fisher``,
``obd_hessian`` and ``oba`` are :func:`oba.score` with ``absolute=True``; ``oba_published`` is the published OBA
code's unstructured score, per layer :math:`|s|/\max|s| + |\theta|` with :math:`s` the two-term (series +
parallel) OBA score; ``woodfisher`` is :math:`\theta_q^2/(2[F_\lambda^{-1}]_{qq})` (:mod:`oba.empirical_fisher`).
CBS chooses the set jointly instead of scoring single weights: :func:`oba.unstructured.cbs_prune`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from oba import criteria
from oba.cbs import CBSResult, cbs_select, cbs_update
from oba.curvature import Batch, LossFn, flatten_params, unflatten_params
from oba.empirical_fisher import woodfisher_scores, woodfisher_update
from oba.masks import (
    PRUNABLE,
    apply_masks,
    apply_weights,
    check_sparsity,
    current_weights,
    fisher_blocks,
    masked_loss,
    masks_from_scores,
    prunable_layers,
    remove_masks,
    sparsity_report,
    weight_name,
)

__all__ = [
    "CRITERIA",
    "PRUNABLE",
    "apply_masks",
    "apply_weights",
    "cbs_prune",
    "check_sparsity",
    "criterion_scores",
    "current_weights",
    "fisher_blocks",
    "masked_loss",
    "masks_from_scores",
    "prunable_layers",
    "prune_unstructured",
    "remove_masks",
    "sparsity_report",
    "woodfisher_prune",
]

CRITERIA: tuple[str, ...] = criteria.names("unstructured")
"""The criteria :func:`prune_unstructured` accepts (a view of the registry :mod:`oba.criteria`)."""


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
def criterion_scores(
    model: nn.Module,
    criterion: str,
    *,
    layers=None,
    loss_fn: LossFn | None = None,
    batches: Iterable[Batch] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    **options: Any,
) -> OrderedDict[str, Tensor]:
    """Per-weight importance (``<module>.weight -> tensor``, larger = more important) under ``criterion``.

    ``options`` go to :func:`oba.score` (e.g. ``samples`` for ``obd_hessian``; ``terms`` for
    ``oba_published``, default ``("series", "parallel")``) or, for ``woodfisher``, to :func:`fisher_blocks`
    (``num_grads``, ``damp``, ``blocks``, ``grad_mode``).
    """
    c = criteria.get(criterion)
    if c.weights is None:
        raise ValueError(
            f"criterion {criterion!r} does not score single weights; choose one of {', '.join(CRITERIA)} "
            "(or use cbs_prune)"
        )
    c.check_options(options)
    chosen = prunable_layers(model, layers)
    return c.weights(c, model, chosen, loss_fn, batches, max_batches, progress, options)


def prune_unstructured(
    model: nn.Module,
    scores: Mapping[str, Tensor] | None = None,
    *,
    criterion: str | None = None,
    sparsity: float,
    scope: str = "global",
    layers=None,
    **score_options: Any,
) -> OrderedDict[str, Tensor]:
    """Mask the fraction ``sparsity`` (REMOVED) of the chosen layers' weights with the lowest scores.

    Pass either ``scores`` (``<module>.weight -> tensor``, larger = more important) or a ``criterion`` of
    :data:`CRITERIA` with its ``score_options`` (``loss_fn``, ``batches``, ``max_batches``, ...; see
    :func:`criterion_scores`). Masks are attached with ``torch.nn.utils.prune``; already-masked weights get
    the lowest score so they are counted among the removed. Returns the keep-masks.
    """
    sparsity = check_sparsity(sparsity)
    chosen = prunable_layers(model, layers)
    if (scores is None) == (criterion is None):
        raise ValueError("pass exactly one of scores= or criterion=")
    if scores is None:
        scores = criterion_scores(model, criterion, layers=list(chosen), **score_options)
    keys = [f"{n}.weight" for n in chosen]
    missing = [k for k in keys if k not in scores]
    if missing:
        raise KeyError(f"scores are missing for {missing}")
    ranked = OrderedDict()
    for n, m in chosen.items():
        s = scores[f"{n}.weight"].detach().to(m.weight.device).float()
        if s.shape != m.weight.shape:
            raise ValueError(f"scores for {n}.weight have shape {tuple(s.shape)}, the weight {tuple(m.weight.shape)}")
        if hasattr(m, "weight_mask"):
            s = torch.where(m.weight_mask.bool(), s, torch.full_like(s, -torch.inf))
        ranked[f"{n}.weight"] = s
    masks = masks_from_scores(ranked, sparsity, scope)
    apply_masks(model, masks)
    return masks


# --------------------------------------------------------------------------------------------------
# WoodFisher and CBS on a model
# --------------------------------------------------------------------------------------------------


def _fisher_setup(model, loss_fn, batches, sparsity, layers, fishers, progress, fisher_options):
    """Shared start of :func:`woodfisher_prune` and :func:`cbs_prune`: checks, Fisher blocks, flat weights."""
    check_sparsity(sparsity)
    chosen = prunable_layers(model, layers)
    if fishers is None:
        fishers = fisher_blocks(model, loss_fn, batches, layers=list(chosen), progress=progress, **fisher_options)[:2]
    fs, blocks = fishers
    like = current_weights(model, chosen)
    return chosen, fs, blocks, like, flatten_params(like)


def woodfisher_prune(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    sparsity: float,
    *,
    layers=None,
    update: bool = True,
    scale: float = 1.0,
    fishers=None,
    progress: bool = True,
    **fisher_options: Any,
) -> OrderedDict[str, Tensor]:
    """WoodFisher: global threshold on :math:`\\theta_q^2/(2[F^{-1}]_{qq})`, masks, and (``update=True``) the
    sum of single-weight OBS updates per block (scaled by ``scale``). ``fishers`` may be
    ``(fishers, blocks)`` from :func:`fisher_blocks` to reuse them. Returns the keep-masks."""
    chosen, fs, blocks, like, theta = _fisher_setup(
        model, loss_fn, batches, sparsity, layers, fishers, progress, fisher_options
    )
    flat_scores = torch.cat([woodfisher_scores(f, theta[b.slice]) for f, b in zip(fs, blocks, strict=True)])
    masks = masks_from_scores(unflatten_params(flat_scores.float(), like), sparsity, "global")
    if update:
        pruned = flatten_params(masks) == 0
        new = theta.to(fs[0].dtype).clone()
        for f, b in zip(fs, blocks, strict=True):
            new[b.slice] += woodfisher_update(f, theta[b.slice], pruned[b.slice], scale=scale)
        apply_weights(model, unflatten_params(new.to(theta.dtype), like))
    apply_masks(model, masks)
    return masks


def cbs_prune(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    sparsity: float,
    *,
    selection_batches: Sequence[Batch],
    layers=None,
    update: bool = True,
    fishers=None,
    progress: bool = True,
    search: Mapping[str, Any] | None = None,
    **fisher_options: Any,
) -> tuple[OrderedDict[str, Tensor], CBSResult]:
    """The Combinatorial Brain Surgeon on a model: CBS-S selection and (``update=True``) CBS-U update.

    ``batches`` give the gradients of the Fisher (or pass ``fishers=(fishers, blocks)``);
    ``selection_batches`` (training data) judge candidate sets by their real loss; ``search`` holds
    :func:`oba.cbs.cbs_select`'s options (``trials``, ``chunks``, ``eps``, ``rho``, ``tau``, ``max_sweeps``,
    ``seed``). Returns the keep-masks and the search record.
    """
    chosen, fs, blocks, like, theta = _fisher_setup(
        model, loss_fn, batches, sparsity, layers, fishers, progress, fisher_options
    )
    names = [f"{n}.{weight_name(m)}" for n, m in chosen.items()]
    loss_of = masked_loss(model, loss_fn, selection_batches, names)

    def real_loss(pruned: Tensor) -> float:
        return loss_of(torch.where(pruned, torch.zeros_like(theta), theta))

    k = round(sparsity * theta.numel())
    result = cbs_select(fs, blocks, theta, k, real_loss, progress=progress, **dict(search or {}))
    masks = unflatten_params((~result.pruned).to(theta.dtype), like)
    if update:
        apply_weights(model, unflatten_params(cbs_update(fs, blocks, theta, result.pruned), like))
    apply_masks(model, masks)
    return masks, result
