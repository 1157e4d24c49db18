r"""Structured pruning to a FLOPs / parameter / channel target: :func:`prune_structured`.

Torch-Pruning's DepGraph finds which layers must lose the same channels (a *group*); this module decides
*which* channels go and *how many*, step by step:

1. the target :math:`r` (fraction of MACs, parameters or prunable channels **kept**) is reached in ``steps``
   steps, with per-step targets :math:`r_s = r^{s/S}` (``schedule="exponential"``) or
   :math:`r_s = 1 - (1 - r)\,s/S` (``"linear"``), :math:`s = 1..S`;
2. at every step the model is re-scored on the next ``batches_per_step`` batches (a new importance:
   OBA, Taylor, K-FAC, ... computed on the *current* pruned model), in the chosen ``score_mode``;
3. every group yields one score per unit -- a channel, or a whole attention head when the group holds the
   q/k/v projections of an attention layer (``num_heads``) -- and the units are ranked globally
   (``global_ranking=True``, scores normalised within their group by the importance) or per group (each
   group loses the same fraction of its units);
4. the lowest-ranked units are removed in chunks, re-counting the cost after each chunk, until the step
   target is met; a chunk never takes a layer below ``1 - max_channel_sparsity`` of its initial channels
   (nor below one channel or head), and ``round_to`` keeps widths multiples of it.

A target that cannot be reached (everything left is capped or ignored) raises
:class:`TargetNotReachedError` with the fraction reached and the history so far; the loop always ends,
since every chunk removes at least one unit and the number of units is finite.

Cost: MACs of one forward pass of ``example_inputs`` counted by :func:`oba.flops.count_flops` on the meta
device (the literature's "FLOPs"; element-wise work not counted).

Ignored layers (their output channels are never pruned): by default the model's own
``pruning_ignored_layers()`` when it defines one (the CIFAR ResNets: residual streams and classifier, see
:meth:`oba.models.cifar_resnet.CifarResNet.pruning_ignored_layers`); for torchvision's ``VisionTransformer``
the patch embedding, the classifier and every layer writing into the residual stream (attention output
projection, second MLP layer), so that whole heads and MLP hidden units prune
(:func:`oba.models.torchvision_models.vit_pruning_ignored_layers`); else the last ``nn.Linear`` (the classifier).

Saving: :func:`save_pruned` writes a registry name, its arguments, every layer's width and the
``state_dict`` -- tensors and plain containers only, so :func:`load_pruned` reads it with
``torch.load(weights_only=True)`` and rebuilds the architecture by resizing a fresh model's layers.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from oba.curvature import Batch, LossFn
from oba.flops import count_flops, count_params, macs_by_module
from oba.group_importance import Normalizer, ParameterScoreImportance
from oba.importance import CRITERIA, score
from oba.kfac import KronImportance, kfac_factors

__all__ = [
    "PRUNED_FORMAT",
    "STRUCTURED_CRITERIA",
    "TargetNotReachedError",
    "default_ignored_layers",
    "layer_widths",
    "load_pruned",
    "make_scorer",
    "prune_structured",
    "resize_to_state_dict",
    "save_pruned",
]

STRUCTURED_CRITERIA: tuple[str, ...] = (*CRITERIA, "kron_obd", "kron_obs", "eigendamage")
"""Criteria names :func:`make_scorer` accepts: those of :func:`oba.score`, the K-FAC ones (:mod:`oba.kfac`) and
``"eigendamage"`` (:mod:`oba.eigendamage`; only for a model reparametrised by
:func:`oba.eigendamage.to_eigenbasis`)."""

PRUNED_FORMAT = "oba.pruned/1"

Scorer = Callable[[nn.Module, Sequence[Batch]], Callable[[Any], Tensor | None]]
"""``scorer(model, batches) -> importance``: a Torch-Pruning importance for the *current* model."""


class TargetNotReachedError(RuntimeError):
    """The pruning target cannot be reached; ``reached`` is the fraction kept when pruning stopped."""

    def __init__(self, message: str, reached: float, history: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.reached = reached
        self.history = history


# ------------------------------------------------------------------------------------------ scoring
def make_scorer(
    criterion: str,
    loss_fn: LossFn | None = None,
    *,
    normalizer: Normalizer = "mean",
    group_reduction: str = "sum",
    progress: bool = False,
    score_fn: Callable[..., Any] = score,
    factor_fn: Callable[..., Any] = kfac_factors,
    **options: Any,
) -> Scorer:
    """A scorer for a named criterion: per-parameter scores (:func:`oba.score`) or K-FAC costs.

    Args:
        criterion: one of :data:`STRUCTURED_CRITERIA`.
        loss_fn: the mean batch loss (not needed by ``magnitude``).
        normalizer, group_reduction: how channel scores are formed
            (:class:`oba.group_importance.ParameterScoreImportance`).
        options: passed to :func:`oba.score` (e.g. ``terms=("series", "parallel")`` for the published OBA
            criterion, ``fisher="per_batch"``), or for the K-FAC criteria ``damping`` (default 1e-3) and
            ``sampled`` (labels sampled from the model, default False); ``"eigendamage"`` takes those of
            :func:`oba.eigendamage.make_eigendamage_scorer` (``sampled=True``, ``damping=0`` by default).
        score_fn, factor_fn: compute the per-parameter scores and the K-FAC factors, called as :func:`oba.score`
            and :func:`oba.kfac.kfac_factors` (the defaults); :func:`oba.distributed.distributed_scorer` passes
            their all-reducing versions.
    """
    if criterion not in STRUCTURED_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(STRUCTURED_CRITERIA)}")
    if criterion != "magnitude" and loss_fn is None:
        raise ValueError(f"criterion {criterion!r} needs a loss_fn")
    if criterion == "eigendamage":
        from oba.eigendamage import make_eigendamage_scorer

        return make_eigendamage_scorer(
            loss_fn, normalizer=normalizer, group_reduction=group_reduction, progress=progress, factor_fn=factor_fn,
            **options,
        )  # fmt: skip

    def scorer(model: nn.Module, batches: Sequence[Batch]) -> Callable[[Any], Tensor | None]:
        if criterion in ("kron_obd", "kron_obs"):
            damping = options.get("damping", 1e-3)
            factors = factor_fn(model, loss_fn, batches, sampled=options.get("sampled", False), progress=progress)
            kind = criterion.removeprefix("kron_")
            return KronImportance(
                model, factors, kind, damping=damping, group_reduction=group_reduction, normalizer=normalizer
            )
        scores = score_fn(model, loss_fn, batches, criterion, progress=progress, **options)
        return ParameterScoreImportance(model, scores, group_reduction=group_reduction, normalizer=normalizer)

    scorer.criterion = criterion  # type: ignore[attr-defined]
    return scorer


def _as_scorer(importance: str | Scorer | Callable[[Any], Tensor | None], loss_fn: LossFn | None) -> Scorer:
    if isinstance(importance, str):
        return make_scorer(importance, loss_fn)
    if isinstance(importance, tp.importance.Importance):  # a fixed, data-free importance (e.g. magnitude)
        return lambda model, batches: importance
    if callable(importance):
        return importance  # type: ignore[return-value]
    raise TypeError(
        "importance must be a criterion name, a Torch-Pruning Importance, or a scorer(model, batches) -> "
        f"importance; got {type(importance).__name__}"
    )


class _BatchStream:
    """Hands out the next ``k`` batches, starting a new pass over ``batches`` when one ends."""

    def __init__(self, batches: Iterable[Batch] | None) -> None:
        self.batches = batches
        self._it: Iterator[Batch] | None = None

    def take(self, k: int) -> list[Batch]:
        if self.batches is None:
            return []
        out: list[Batch] = []
        restarted = False
        while len(out) < k:
            if self._it is None:
                self._it = iter(self.batches)
            try:
                out.append(next(self._it))
                restarted = False
            except StopIteration:
                if restarted:  # empty iterable
                    break
                self._it, restarted = None, True
        return out


# ------------------------------------------------------------------------------------------ layers
def default_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """``model.pruning_ignored_layers()`` if the model defines it; for a torchvision ``VisionTransformer``
    :func:`oba.models.torchvision_models.vit_pruning_ignored_layers` (patch embedding, classifier and the layers
    writing into the residual stream: only heads and MLP hidden units prune); else the last ``nn.Linear`` (the
    classifier)."""
    own = getattr(model, "pruning_ignored_layers", None)
    if callable(own):
        return list(own())
    # torchvision ViT (oba.models.torchvision_models) ------------------------------------------------
    import torchvision

    if isinstance(model, torchvision.models.VisionTransformer):
        from oba.models.torchvision_models import vit_pruning_ignored_layers

        return vit_pruning_ignored_layers(model)
    # -------------------------------------------------------------------------------------------------
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _default_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    from oba.models.vit import Attention

    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, Attention):
            heads.update({m.q: m.num_heads, m.k: m.num_heads, m.v: m.num_heads})
    return heads


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv / linear / norm layer (``out_channels``, ``out_features``, ...), by name; a
    layer reparametrised by :func:`oba.eigendamage.to_eigenbasis` has its output width under its own name, and
    its three parts their widths under theirs."""
    from oba.eigendamage import EigenbasisLayer

    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, EigenbasisLayer):
            widths[name] = int(m.rotate_out.weight.shape[0])
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            widths[name] = int(m.weight.shape[1] if getattr(m, "transposed", False) else m.weight.shape[0])
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            widths[name] = int(m.weight.shape[0] if m.weight.dim() else 1)
    return widths


# ------------------------------------------------------------------------------------------ units
@dataclass
class _Group:
    """One prunable group of the current step: its root, the root channels still alive, and its units."""

    root: nn.Module
    handler: Callable
    alive: list[int]  # root channel indices (numbering at step start) still present
    min_channels: int  # the root may not go below this
    unit_size: int  # 1 for channels, head width for heads
    heads_of: list[nn.Module] = field(default_factory=list)  # q/k/v layers when units are heads


@dataclass(order=True)
class _Unit:
    key: float
    group: int = field(compare=False)
    channels: tuple[int, ...] = field(compare=False)
    cost: float = field(compare=False, default=0.0)  # predicted drop of the kept fraction when it goes


def _channel_cost(
    dg: tp.DependencyGraph, group: Any, kind: str, macs: Mapping[str, int], names: Mapping[nn.Module, str]
) -> float:
    """Predicted MACs (``kind="flops"``) or parameters (``"params"``) one root channel of ``group`` carries.

    MACs: each conv/linear of the group loses ``macs(layer) / width`` along the pruned dimension; parameters:
    each parameter of a member layer loses one slice along it (a conv/linear bias only with its output).
    A prediction only: the loop measures the real cost after every chunk.
    """
    total = 0.0
    for dep, _ in group:
        layer, out = dep.target.module, dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(layer, nn.Parameter):
            total += layer.numel() / layer.shape[dep.target.pruning_dim] if kind == "params" else 0.0
            continue
        dense_layer = isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear))
        if kind == "flops":
            if dense_layer:
                width = dg.get_out_channels(layer) if out else dg.get_in_channels(layer)
                total += macs.get(names.get(layer, ""), 0) / max(1, width or 1)
            continue
        for pname, p in layer.named_parameters(recurse=False):
            if dense_layer and not out and pname == "bias":
                continue
            dim = 0 if out or p.dim() == 1 else 1
            total += p.numel() / p.shape[dim]
    return total


def _head_extra_macs(q: nn.Module, macs: Mapping[str, int], names: Mapping[nn.Module, str], heads: int) -> float:
    """MACs per head of an attention module outside its projections (the ``QK^T`` and ``AV`` products)."""
    attn = names[q].rpartition(".")[0]
    children = sum(v for k, v in macs.items() if k.startswith(attn + ".") and "." not in k[len(attn) + 1 :])
    return max(0, macs.get(attn, 0) - children) / heads


def _collect(
    dg: tp.DependencyGraph,
    importance: Callable[[Any], Tensor | None],
    names: Mapping[nn.Module, str],
    ignored: list[nn.Module],
    root_types: tuple[type, ...],
    initial_width: Mapping[nn.Module, int],
    num_heads: dict[nn.Module, int],
    max_sparsity: float,
    global_ranking: bool,
    kind: str,
    dense_total: float,
    macs: Mapping[str, int],
) -> tuple[list[_Group], list[_Unit]]:
    groups: list[_Group] = []
    units: list[_Unit] = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=root_types):
        imp = importance(group)
        if imp is None:
            continue
        root, handler = group[0].dep.target.module, group[0].dep.handler
        n = len(group[0].idxs)
        if len(imp) != n:
            raise RuntimeError(f"the importance returned {len(imp)} scores for a group of {n} channels")
        heads_of = [
            d.target.module
            for d, _ in group
            if d.target.module in num_heads and dg.is_out_channel_pruning_fn(d.handler)
        ]
        init = initial_width.get(root, n)
        if heads_of:
            h = num_heads[heads_of[0]]
            size = n // h
            scores = imp.detach().double().reshape(h, size).mean(1)  # per channel, comparable with channel units
            min_channels = size * max(1, math.ceil(init // size * (1 - max_sparsity)))
            extra = _head_extra_macs(heads_of[0], macs, names, h) if kind == "flops" else 0.0
        else:
            size = 1
            scores = imp.detach().double()
            min_channels = max(1, math.ceil(init * (1 - max_sparsity)))
            extra = 0.0
        per_channel = 1.0 if kind == "channels" else _channel_cost(dg, group, kind, macs, names)
        cost = (size * per_channel + extra) / dense_total
        gi = len(groups)
        groups.append(_Group(root, handler, list(range(n)), min_channels, size, heads_of))
        order = torch.argsort(scores)
        for rank, u in enumerate(order.tolist()):
            key = float(scores[u]) if global_ranking else (rank + 1) / len(order)
            units.append(_Unit(key, gi, tuple(range(u * size, (u + 1) * size)), cost))
    units.sort()
    return groups, units


def _round_removal(group: _Group, chosen: list[int], pending: list[int], round_to: int | None) -> list[int]:
    """Adjust ``chosen`` (root channels to drop) so the group's width stays a multiple of ``round_to``: add the
    group's next-ranked ``pending`` channels, or, where that would cross the group's floor, drop fewer."""
    if not round_to or group.unit_size > 1:
        return chosen
    extra = (len(group.alive) - len(chosen)) % round_to
    grown = chosen + pending[:extra]
    if len(grown) == len(chosen) + extra and len(group.alive) - len(grown) >= group.min_channels:
        return grown
    return chosen[: max(0, len(chosen) - (round_to - extra))]


# ------------------------------------------------------------------------------------------ main loop
def prune_structured(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    importance: str | Scorer | Callable[[Any], Tensor | None] = "oba",
    *,
    keep_flops: float | None = None,
    keep_params: float | None = None,
    keep_channels: float | None = None,
    loss_fn: LossFn | None = None,
    batches: Iterable[Batch] | None = None,
    batches_per_step: int = 20,
    steps: int = 1,
    schedule: str = "exponential",
    step_targets: Sequence[float] | None = None,
    reference: nn.Module | None = None,
    score_mode: str | None = "train",
    global_ranking: bool = True,
    max_channel_sparsity: float = 1.0,
    ignored_layers: Sequence[nn.Module] | None = None,
    round_to: int | None = None,
    num_heads: Mapping[nn.Module, int] | None = None,
    root_module_types: Sequence[type] = (nn.modules.conv._ConvNd, nn.Linear),
    progress: bool = True,
    on_step: Callable[[nn.Module, dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Prune ``model``'s channels (and attention heads) in place until the target is met.

    Args:
        model: the network (pruned in place and returned).
        example_inputs: an input batch for DepGraph tracing and MAC counting (its size sets the MAC count).
        importance: a criterion name (:data:`STRUCTURED_CRITERIA`, scored with ``loss_fn`` on ``batches``),
            a scorer ``scorer(model, batches) -> importance`` (:func:`make_scorer` for options such as
            ``terms=("series", "parallel")``), or a fixed Torch-Pruning ``Importance`` (data-free).
        keep_flops, keep_params, keep_channels: the target, exactly one of them: the fraction of MACs,
            parameters, or prunable channels (units of the groups at the start) KEPT, in ``(0, 1]``.
        loss_fn, batches: data for scoring; each step takes the next ``batches_per_step`` batches (a new
            pass over ``batches`` starts when one ends, so a shuffling DataLoader gives fresh batches).
        steps, schedule: the number of pruning steps and the per-step targets (``"exponential"`` or
            ``"linear"``, module docstring); the model is re-scored before every step.
        step_targets: explicit per-step targets (decreasing, the last one the target), instead of
            ``steps``/``schedule``; e.g. ``[0.8, 0.6, 0.4]`` to stop (and evaluate, via ``on_step``) at each.
        reference: measure ``keep_flops``/``keep_params`` against this model (e.g. the dense model when
            ``model`` was pruned before, in iterative pruning) instead of ``model`` as given.
        score_mode: ``"train"`` (batch statistics in BatchNorm, as the published OBA code; running
            statistics are never updated), ``"eval"``, or ``None`` (the model's current mode). The model's
            modes are restored afterwards.
        global_ranking: rank units across all groups (True) or prune each group by the same fraction.
        max_channel_sparsity: no layer loses more than this fraction of its initial channels (or heads).
        ignored_layers: layers whose output channels stay (default :func:`default_ignored_layers`).
        round_to: keep channel counts multiples of this.
        num_heads: ``{q/k/v projection: heads}`` of attention layers whose whole heads are pruned (default:
            those of :class:`oba.models.vit.Attention` modules, found automatically).
        on_step: called as ``on_step(model, record)`` after each step (e.g. to save a checkpoint).

    Returns:
        ``(model, history)``: the history has one record per step (and a step-0 record of the dense model):
        ``step``, ``target``, ``macs``, ``params``, ``flops_kept``, ``params_kept``, ``channels_kept``,
        ``removed`` (channels in this step), ``widths`` ({layer: width}), ``heads`` ({layer: heads}),
        ``score_seconds``, ``prune_seconds``.

    Raises:
        ValueError: no target, several targets, or a target outside ``(0, 1]``; bad options.
        TargetNotReachedError: everything left is capped or ignored before the target was met.
    """
    given = {
        k: v for k, v in (("flops", keep_flops), ("params", keep_params), ("channels", keep_channels)) if v is not None
    }
    if len(given) != 1:
        raise ValueError("give exactly one target: keep_flops, keep_params or keep_channels (fractions kept)")
    ((kind, target),) = given.items()
    if not 0 < target <= 1:
        raise ValueError(f"keep_{kind} is the fraction KEPT and must be in (0, 1], got {target}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if step_targets is not None:
        step_targets = [float(t) for t in step_targets]
        increasing = any(b > a for a, b in zip(step_targets, step_targets[1:], strict=False))
        if not step_targets or step_targets[-1] != target or increasing:
            raise ValueError(f"step_targets must be non-increasing and end at keep_{kind}={target}, got {step_targets}")
    if reference is not None and kind == "channels":
        raise ValueError("reference applies to keep_flops / keep_params only")
    if schedule not in ("exponential", "linear"):
        raise ValueError(f"schedule must be 'exponential' or 'linear', got {schedule!r}")
    if not 0 <= max_channel_sparsity <= 1:
        raise ValueError(f"max_channel_sparsity must be in [0, 1], got {max_channel_sparsity}")
    if score_mode not in ("train", "eval", None):
        raise ValueError(f"score_mode must be 'train', 'eval' or None, got {score_mode!r}")
    scorer = _as_scorer(importance, loss_fn)
    needs_data = (
        not isinstance(importance, tp.importance.Importance) and getattr(scorer, "criterion", "") != "magnitude"
    )
    if needs_data and batches is None:
        raise ValueError("this importance scores on data: pass batches (and loss_fn for a criterion name)")

    ignored = list(default_ignored_layers(model) if ignored_layers is None else ignored_layers)
    heads = dict(_default_num_heads(model) if num_heads is None else num_heads)
    root_types = tuple(root_module_types)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    initial_width = {g[0].dep.target.module: len(g[0].idxs) for g in dg.get_all_groups(ignored, root_types)}
    total_channels = sum(initial_width.values())
    if total_channels == 0:
        raise ValueError("no prunable group: every layer is ignored or unsupported")
    dense = count_flops(model if reference is None else reference, example_inputs)
    dense_total = {"flops": dense.macs, "params": dense.params, "channels": total_channels}[kind]
    names = {m: n for n, m in model.named_modules()}

    def measure() -> dict[str, Any]:
        cost = count_flops(model, example_inputs)
        channels = sum(len(g[0].idxs) for g in dg.get_all_groups(ignored, root_types))
        return {
            "macs": cost.macs,
            "params": cost.params,
            "flops_kept": cost.macs / dense.macs,
            "params_kept": cost.params / dense.params,
            "channels_kept": channels / total_channels,
            "widths": layer_widths(model),
            "heads": {name: heads[m] for name, m in model.named_modules() if m in heads},
        }

    def fraction(m: Mapping[str, Any]) -> float:
        return m[f"{kind}_kept"]

    def kept() -> float:  # the target quantity alone, cheaper than measure()
        if kind == "flops":
            return count_flops(model, example_inputs).macs / dense.macs
        if kind == "params":
            return count_params(model) / dense.params
        return sum(len(g[0].idxs) for g in dg.get_all_groups(ignored, root_types)) / total_channels

    stream = _BatchStream(batches)
    targets = step_targets or [
        target ** (s / steps) if schedule == "exponential" else 1 - (1 - target) * s / steps
        for s in range(1, steps + 1)
    ]
    history: list[dict[str, Any]] = [{"step": 0, "target": 1.0, "removed": 0, **measure()}]
    modes = {m: m.training for m in model.modules()}
    try:
        for step, step_target in enumerate(tqdm(targets, desc="prune steps", disable=not progress), start=1):
            start = time.perf_counter()
            if score_mode is not None:
                model.train(score_mode == "train")
            imp = scorer(model, stream.take(batches_per_step) if needs_data else [])
            for m, training in modes.items():
                m.training = training
            scored = time.perf_counter()
            macs = macs_by_module(model, example_inputs) if kind == "flops" else {}
            groups, units = _collect(
                dg,
                imp,
                names,
                ignored,
                root_types,
                initial_width,
                heads,
                max_channel_sparsity,
                global_ranking,
                kind,
                dense_total,
                macs,
            )
            removed = _remove_until(dg, groups, units, heads, round_to, step_target, kept)
            record = {"step": step, "target": step_target, "removed": removed, **measure()}
            record.update(score_seconds=scored - start, prune_seconds=time.perf_counter() - scored)
            history.append(record)
            if on_step is not None:
                on_step(model, record)
            if fraction(record) > step_target + 1e-9:
                raise TargetNotReachedError(
                    f"could not prune to keep_{kind}={step_target:.4f} at step {step}/{steps}: reached "
                    f"{fraction(record):.4f} of the dense model's {kind} and every remaining channel is capped by "
                    f"max_channel_sparsity={max_channel_sparsity} or in an ignored layer. Lower the target, raise "
                    "max_channel_sparsity, or ignore fewer layers.",
                    fraction(record),
                    history,
                )
    finally:
        for m, training in modes.items():
            m.training = training
    return model, history


def _remove_until(
    dg: tp.DependencyGraph,
    groups: list[_Group],
    units: list[_Unit],
    heads: dict[nn.Module, int],
    round_to: int | None,
    step_target: float,
    kept: Callable[[], float],
) -> int:
    """Remove the lowest-ranked units in chunks until ``kept() <= step_target``; returns the channels removed.

    Each chunk takes units in rank order until their predicted cost covers 70 % of the remaining gap (at
    least one unit), so the target is approached from above with a few real measurements; a unit that
    would take its group below the floor is skipped for the rest of the step.
    """
    removed = 0
    value = kept()
    queue = list(units)
    while value > step_target + 1e-12 and queue:
        budget = 0.7 * (value - step_target)
        chosen: dict[int, list[int]] = {}
        spent, rest = 0.0, []
        for unit in queue:
            g = groups[unit.group]
            picked = chosen.setdefault(unit.group, [])
            if len(g.alive) - len(picked) - len(unit.channels) < g.min_channels:
                continue  # blocked by the floor, now and later (groups only shrink)
            if spent == 0.0 or spent + unit.cost <= budget:
                picked.extend(unit.channels)
                spent += max(unit.cost, 1e-12)
            else:
                rest.append(unit)
        if spent == 0.0:
            break
        for gi, channels in chosen.items():
            g = groups[gi]
            pending = [c for u in rest if u.group == gi for c in u.channels]
            channels = _round_removal(g, channels, pending, round_to)
            if not channels:
                continue
            gone = set(channels)
            rest = [u for u in rest if not (u.group == gi and gone.intersection(u.channels))]
            position = {c: i for i, c in enumerate(g.alive)}
            dg.get_pruning_group(g.root, g.handler, sorted(position[c] for c in channels)).prune()
            g.alive = [c for c in g.alive if c not in gone]
            for layer in g.heads_of:
                heads[layer] -= len(channels) // g.unit_size
            removed += len(channels)
        queue = rest
        value = kept()
    return removed


# ------------------------------------------------------------------------------------------ saving
def save_pruned(
    model: nn.Module, path: str | os.PathLike, arch: str, arch_kwargs: Mapping[str, Any] | None = None
) -> None:
    """Write a pruned model as ``{format, arch, arch_kwargs, widths, state_dict}`` (atomic; no pickled code),
    plus ``eigenbasis_layers`` (their names) when layers were reparametrised by
    :func:`oba.eigendamage.to_eigenbasis`, so that :func:`load_pruned` rebuilds that structure.

    Args:
        arch: the :mod:`oba.models` registry name the model was created from (e.g. ``"resnet32"``).
        arch_kwargs: the arguments it was created with (plain values only).
    """
    payload = {
        "format": PRUNED_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "widths": layer_widths(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    from oba.eigendamage import eigenbasis_layers

    if eigen := list(eigenbasis_layers(model)):
        payload["eigenbasis_layers"] = eigen
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_pruned(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Read a file of :func:`save_pruned`: a fresh ``oba.models.create(arch, **arch_kwargs)`` (or ``model``),
    resized to the saved widths, with the saved weights; the layers listed under ``eigenbasis_layers`` are first
    reparametrised (:func:`oba.eigendamage.to_eigenbasis`, identity rotations, then the saved weights). Uses
    ``torch.load(weights_only=True)``.

    Raises:
        ValueError: the file is not a pruned-model file of this format.
    """
    from oba.models import create

    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        raise ValueError(
            f"{path} is not a pruned model written by oba.prune.save_pruned (expected format {PRUNED_FORMAT!r}); "
            "plain state_dicts load with model.load_state_dict, training checkpoints with oba.train.load_checkpoint"
        )
    model = create(payload["arch"], **payload["arch_kwargs"]) if model is None else model
    if payload.get("eigenbasis_layers"):
        from oba.eigendamage import to_eigenbasis

        to_eigenbasis(model, layers=[model.get_submodule(name) for name in payload["eigenbasis_layers"]])
    resize_to_state_dict(model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Give every parameter and buffer of ``model`` the shape it has in ``state_dict`` and update the layers'
    size attributes (``in_channels``/``out_channels``, ``in_features``/``out_features``, ``num_features``,
    ``normalized_shape``, ``num_channels``). Values are left uninitialised: load the state dict next.
    """
    for prefix, module in model.named_modules():
        changed = False
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                key = f"{prefix}.{name}" if prefix else name
                if t is None or key not in state_dict or state_dict[key].shape == t.shape:
                    continue
                new = torch.empty(state_dict[key].shape, dtype=t.dtype, device=t.device)
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                changed = True
        if changed:
            _update_size_attributes(module)
    return model


def _update_size_attributes(m: nn.Module) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        a, b = m.weight.shape[:2]
        out_ch, in_per_group = (b * m.groups, a) if m.transposed else (a, b)
        if depthwise:
            m.groups = out_ch
        m.out_channels = out_ch if not m.transposed else b * m.groups
        m.in_channels = in_per_group * m.groups if not m.transposed else a
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = (m.weight if m.weight is not None else m.running_mean).shape[0]
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = tuple(m.weight.shape)
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = m.weight.shape[0]
    else:
        raise TypeError(
            f"cannot resize a {type(m).__name__} to a pruned state_dict: only conv, linear and normalisation layers "
            "are supported"
        )
