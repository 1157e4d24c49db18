r"""Unstructured (single-weight) pruning with ``torch.nn.utils.prune`` masks.

Conventions
    * **sparsity is the fraction of weights REMOVED** (0.9 keeps 10 %), everywhere in this package, always
      checked to lie in [0, 1). (The published OBA script's ``--pruning_ratio`` is the fraction *kept*.)
    * Masks are ``torch.nn.utils.prune`` re-parametrisations: a pruned module holds ``weight_orig`` (the
      parameter) and a ``weight_mask`` buffer, and ``weight = weight_orig * weight_mask`` is recomputed by a
      forward pre-hook; :func:`remove_masks` (``prune.remove``) makes the pruning permanent. Pruning a module
      twice multiplies the masks, as ``torch.nn.utils.prune`` does.
    * ``scope="global"`` ranks all chosen weights together; ``scope="layer"`` removes the same fraction from
      every layer. Ties are broken by position (stable sort), so masks are deterministic.
    * ``layers`` chooses the modules: ``None`` (every ``nn.Linear`` and ``nn.Conv*``), a regular expression
      matched (``re.fullmatch``) against module names, or a list of modules or module names.

Criteria (:data:`CRITERIA`; a larger score means more important, the lowest-scored weights are removed):
``magnitude``, ``taylor``, ``obd_fisher``, ``obd_hessian`` and ``oba`` are :func:`oba.score` with
``absolute=True``; ``oba_published`` is the published OBA code's unstructured score, per layer
:math:`|s|/\max|s| + |\theta|` with :math:`s` the two-term (series + parallel) OBA score;
``woodfisher`` is :math:`\theta_q^2/(2[F_\lambda^{-1}]_{qq})` (:mod:`oba.empirical_fisher`). CBS chooses the set jointly
instead of scoring single weights: :func:`oba.unstructured.cbs_prune`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn
from torch.func import functional_call

from oba.batches import to_device
from oba.cbs import CBSResult, cbs_select, cbs_update
from oba.curvature import Batch, LossFn, flatten_params, unflatten_params
from oba.empirical_fisher import (
    DenseGradients,
    EmpiricalFisher,
    GradientMatrix,
    block_fishers,
    collect_gradients,
    linear_gradient_factors,
    make_blocks,
    woodfisher_scores,
    woodfisher_update,
)
from oba.importance import score

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

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CRITERIA = ("magnitude", "taylor", "obd_fisher", "obd_hessian", "oba", "oba_published", "woodfisher")


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` (the fraction REMOVED) as a float, or a ``ValueError`` unless 0 <= sparsity < 1."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number (the fraction of weights removed), got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise ValueError(
            f"sparsity is the fraction of weights REMOVED and must satisfy 0 <= sparsity < 1, got {sparsity!r}"
            " (to keep 10 % of the weights, pass sparsity=0.9)"
        )
    return s


def prunable_layers(
    model: nn.Module, layers: str | Iterable[nn.Module | str] | None = None
) -> OrderedDict[str, nn.Module]:
    """The chosen modules, ``name -> module`` in model order (see the module docstring for ``layers``)."""
    named = OrderedDict((n, m) for n, m in model.named_modules() if n)
    if layers is None:
        chosen = [n for n, m in named.items() if isinstance(m, PRUNABLE)]
    elif isinstance(layers, str):
        pattern = re.compile(layers)
        chosen = [n for n in named if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(f"no module name matches {layers!r}; modules: {', '.join(list(named)[:30])}")
    else:
        by_id = {id(m): n for n, m in named.items()}
        chosen = []
        for item in layers:
            name = item if isinstance(item, str) else by_id.get(id(item))
            if name is None or name not in named:
                raise ValueError(f"{item!r} is not a (named) submodule of {type(model).__name__}")
            chosen.append(name)
    for n in chosen:
        if not isinstance(named[n], PRUNABLE):
            raise ValueError(
                f"module {n!r} ({type(named[n]).__name__}) is not supported for unstructured pruning; "
                f"supported: {', '.join(c.__name__ for c in PRUNABLE)}"
            )
    order = {n: i for i, n in enumerate(named)}
    return OrderedDict((n, named[n]) for n in sorted(set(chosen), key=order.__getitem__))


def _weight_name(module: nn.Module) -> str:
    """The parameter holding the weight: ``weight_orig`` once pruned, else ``weight``."""
    return "weight_orig" if hasattr(module, "weight_orig") else "weight"


def current_weights(model: nn.Module, layers: Mapping[str, nn.Module]) -> OrderedDict[str, Tensor]:
    """The effective weights, ``<module>.weight -> tensor`` (``weight_orig * weight_mask`` when pruned), detached."""
    return OrderedDict((f"{n}.weight", m.weight.detach()) for n, m in layers.items())


def masks_from_scores(scores: Mapping[str, Tensor], sparsity: float, scope: str = "global") -> OrderedDict[str, Tensor]:
    """Keep-masks (1 = kept, 0 = removed; the scores' dtype) removing the lowest-scored fraction ``sparsity``.

    ``scope="global"``: ``round(sparsity * total)`` weights over all tensors; ``"layer"``:
    ``round(sparsity * numel)`` in each tensor.
    """
    sparsity = check_sparsity(sparsity)
    if scope == "layer":
        return OrderedDict((n, masks_from_scores({n: s}, sparsity)[n]) for n, s in scores.items())
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN")
    k = round(sparsity * flat.numel())
    keep = torch.ones_like(flat)
    keep[torch.argsort(flat, stable=True)[:k]] = 0.0
    pieces = keep.split([s.numel() for s in scores.values()])
    return OrderedDict((n, m.reshape(s.shape).to(s.dtype)) for (n, s), m in zip(scores.items(), pieces, strict=True))


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Attach keep-masks with ``prune.custom_from_mask`` (keys: module names or ``<module>.weight``)."""
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if name not in modules:
            raise KeyError(f"no module {name!r} in the model")
        prune.custom_from_mask(modules[name], "weight", mask.to(modules[name].weight.device))


def remove_masks(model: nn.Module) -> list[str]:
    """Make every mask permanent (``prune.remove``); returns the module names that had one."""
    done = []
    for n, m in model.named_modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
            done.append(n)
    return done


def sparsity_report(model: nn.Module, layers=None) -> OrderedDict[str, float]:
    """Fraction of zero weights per layer and ``"total"`` (the effective weights, masks applied)."""
    chosen = prunable_layers(model, layers)
    out, zeros, total = OrderedDict(), 0, 0
    for n, m in chosen.items():
        w = m.weight.detach()
        out[n] = float((w == 0).float().mean())
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    out["total"] = zeros / max(total, 1)
    return out


def apply_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Write new weights (keys ``<module>.weight``) into the model, into ``weight_orig`` when pruned;
    positions where the mask is 0 are set to 0 so that they stay zero after :func:`remove_masks`."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in weights.items():
            m = modules[key[: -len(".weight")]]
            target = getattr(m, _weight_name(m))
            target.copy_(value.to(target))
            if hasattr(m, "weight_mask"):
                target.mul_(m.weight_mask)
                m.weight = target * m.weight_mask  # refresh the derived attribute now, not at the next forward


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
    chosen = prunable_layers(model, layers)
    names = [f"{n}.{_weight_name(m)}" for n, m in chosen.items()]
    out_names = [f"{n}.weight" for n in chosen]
    if criterion in ("magnitude", "taylor", "obd_fisher", "obd_hessian", "oba"):
        s = score(
            model,
            loss_fn,
            batches,
            criterion,
            params=names,
            max_batches=max_batches,
            absolute=True,
            progress=progress,
            **options,
        )
        return OrderedDict(zip(out_names, s.values(), strict=True))
    if criterion == "oba_published":
        options.setdefault("terms", ("series", "parallel"))
        s = score(
            model,
            loss_fn,
            batches,
            "oba",
            params=names,
            max_batches=max_batches,
            absolute=True,
            progress=progress,
            **options,
        )
        theta = current_weights(model, chosen)
        return OrderedDict(
            (o, v / v.max().clamp_min(torch.finfo(v.dtype).tiny) + theta[o].abs())
            for o, v in zip(out_names, s.values(), strict=True)
        )
    if criterion == "woodfisher":
        fishers, blocks, _ = fisher_blocks(model, loss_fn, batches, layers=layers, progress=progress, **options)
        theta = flatten_params(current_weights(model, chosen))
        flat = torch.cat([woodfisher_scores(f, theta[b.slice]) for f, b in zip(fishers, blocks, strict=True)])
        return unflatten_params(flat.to(theta.dtype), current_weights(model, chosen))
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)} (or use cbs_prune)")


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
def fisher_blocks(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    layers=None,
    num_grads: int = 1000,
    damp: float = 1e-3,
    blocks: str | int = "layer",
    grad_mode: str = "auto",
    progress: bool = True,
) -> tuple[list[EmpiricalFisher], list, GradientMatrix]:
    """Empirical Fisher blocks of the chosen layers' weights from ``num_grads`` gradients.

    ``grad_mode``: ``"factored"`` (bias-free ``nn.Linear`` only: :class:`oba.empirical_fisher.LinearGradients`, G never
    stored), ``"per_sample"`` or ``"per_batch"`` (G stored, float32), ``"auto"`` (factored when possible,
    else per-sample). ``blocks``: ``"layer"``, ``"joint"`` or a chunk size (:func:`oba.empirical_fisher.make_blocks`).
    Returns ``(fishers, blocks, grads)``.
    """
    chosen = prunable_layers(model, layers)
    for n, m in chosen.items():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            raise ValueError(f"{n} is already masked: Fisher blocks are built on an unmasked model")
    linear_ok = all(isinstance(m, nn.Linear) and m.bias is None for m in chosen.values())
    if grad_mode == "auto":
        grad_mode = "factored" if linear_ok else "per_sample"
    if grad_mode == "factored":
        grads: GradientMatrix = linear_gradient_factors(model, loss_fn, batches, list(chosen), num_grads)
    else:
        names = [f"{n}.weight" for n in chosen]
        grads = DenseGradients(collect_gradients(model, loss_fn, batches, names, num_grads, mode=grad_mode))
    shapes = OrderedDict((f"{n}.weight", m.weight.shape) for n, m in chosen.items())
    block_list = make_blocks(shapes, blocks)
    return block_fishers(grads, block_list, damp), block_list, grads


@torch.no_grad()
def masked_loss(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], names: Sequence[str]
) -> Callable[[Tensor], float]:
    """``f(flat_weights) -> mean loss`` over the fixed ``batches`` with the named weights replaced.

    ``flat_weights`` is the concatenation (:func:`oba.curvature.flatten_params` order) of the weights
    ``names``; the model itself is not changed. Used to judge CBS candidates by their real loss.
    """
    params = OrderedDict((n, p.detach()) for n, p in model.named_parameters() if n in set(names))
    device = next(model.parameters()).device
    batches = [to_device(tuple(b[:2]), device) for b in batches]

    @torch.no_grad()  # the decorator above covers only this setup, not later calls of the closure
    def loss(flat: Tensor) -> float:
        new = unflatten_params(flat.to(device, next(iter(params.values())).dtype), params)
        total = count = 0.0
        for x, y in batches:
            total += float(loss_fn(functional_call(model, new, (x,)), y)) * y.shape[0]
            count += y.shape[0]
        return total / count

    return loss


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
    names = [f"{n}.{_weight_name(m)}" for n, m in chosen.items()]
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
