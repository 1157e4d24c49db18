r"""One step of structured pruning: rank the units of every DepGraph group, remove the cheapest until the step's
target is met (:func:`prune_step`).

Every group yields one score per unit -- a channel, or a whole attention head when the group holds the q/k/v
projections of an attention layer (``num_heads``), or a key/value head with its query group in grouped-query
attention (groups coupled by hand, which Torch-Pruning 1.6 cannot build: :func:`_gqa_units`) -- and the units are
ranked globally (``global_ranking=True``, scores normalised within their group by the importance) or per group (each
group loses the same fraction of its units). The lowest-ranked units are removed until the step target is met; a
removal never takes a layer below ``1 - max_channel_sparsity`` of its initial channels (nor below one channel or
head), and ``round_to`` keeps widths multiples of it. Every round removes at least one unit and the number of units
is finite, so a step always ends.

FLOPs targets are met without re-counting after every removal: :class:`MacModel` predicts the MACs from one real
count per step (every conv/linear layer's MACs are a product of its input and output widths, an attention module's
own products scale with its query width), the units are taken in rank order until the prediction meets the target,
every group is pruned once, and one real count checks the result (another round follows, recalibrated, in the rare
case it falls short). Parameter and channel targets are measured after every chunk of removals instead.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from oba.group_importance import ParameterScoreImportance
from oba.hf_layers import dense_layer_types, is_conv1d
from oba.prunable import GroupedQueryAttention

__all__ = ["MacModel", "StepContext", "channel_groups", "prune_step", "rank_units", "remove_until"]


@dataclass
class StepContext:
    """What stays fixed from step to step of one pruning run."""

    dg: tp.DependencyGraph
    names: Mapping[nn.Module, str]  # module -> qualified name
    ignored: list[nn.Module]  # layers whose output channels stay
    root_types: tuple[type, ...]  # module types that root a group
    initial_width: Mapping[nn.Module, int]  # root -> channels at the start (the floor is a fraction of it)
    num_heads: dict[nn.Module, int]  # q/k/v projection -> heads (updated as heads go)
    max_sparsity: float
    global_ranking: bool
    kind: str  # "flops", "params" or "channels"
    dense_total: float  # the dense model's MACs, parameters or channels
    head_parts: dict[nn.Module, int] = field(default_factory=dict)  # fused [q | k | v] projection -> 3
    head_sync: dict[nn.Module, Callable[[int], None]] = field(default_factory=dict)  # projection -> set head count
    # projection -> drop the per-head tensors (Swin's bias table) of the heads at these root positions
    head_drop: dict[nn.Module, Callable[[list[int]], None]] = field(default_factory=dict)
    # grouped-query attention modules whose key/value heads prune (hand-coupled groups: _gqa_units)
    gqa: list[GroupedQueryAttention] = field(default_factory=list)
    # the groups found while building the context (oba.depgraph.prunable_groups): the first ranking's, as the model
    # has not changed since; used once (later steps search the pruned model's groups)
    traced_groups: list[Any] | None = None


def prune_step(
    ctx: StepContext,
    importance: Callable[[Any], Tensor | None],
    step_target: float,
    kept: Callable[[], float],
    round_to: int | None,
    macs: Mapping[str, int],
) -> int:
    """Remove the lowest-ranked units of the model of ``ctx.dg`` until ``kept() <= step_target`` (or nothing
    removable is left); returns the channels removed. ``macs``: MACs per module of the current model (``kind ==
    "flops"``), for the predicted cost of each unit."""
    groups, units = rank_units(ctx, importance)
    predicted = MacModel(ctx, macs, groups) if ctx.kind == "flops" else None
    return remove_until(
        ctx.dg, groups, units, ctx.num_heads, round_to, step_target, kept, predicted, ctx.head_sync, ctx.head_drop
    )


@dataclass
class _Group:
    """One prunable group of the current step: its root, the root channels still alive, and its units."""

    root: nn.Module
    handler: Callable
    alive: list[int]  # root channel indices (numbering at step start) still present
    min_channels: int  # the root may not go below this
    unit_size: int  # 1 for channels, head width for heads, the number of channel groups for grouped layers
    heads_of: list[nn.Module] = field(default_factory=list)  # q/k/v layers when units are heads
    # (layer, its output dimension?, channels it loses per root channel) for the layers of the group
    dims: list[tuple[nn.Module, bool, float]] = field(default_factory=list)
    # prunes root channels (current positions) of a group coupled by hand (grouped-query attention), instead of
    # Torch-Pruning's dg.get_pruning_group(root, handler, positions)
    prune: Callable[[list[int]], None] | None = None


@dataclass(order=True)
class _Unit:
    key: float
    group: int = field(compare=False)
    channels: tuple[int, ...] = field(compare=False)
    cost: float = field(compare=False, default=0.0)  # predicted drop of the kept fraction when it goes


def _unit_cost(dg: tp.DependencyGraph, group: Any, kind: str) -> float:
    """Predicted parameters (``kind="params"``) or channels (``"channels"``) one root channel of ``group`` carries:
    each parameter of a member layer loses one slice along the pruned dimension (a conv/linear bias only with its
    output). A prediction only: the loop measures the real cost after every chunk. (MACs: :class:`MacModel`.)"""
    if kind != "params":
        return 1.0
    total = 0.0
    for dep, _ in group:
        layer, out = dep.target.module, dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(layer, nn.Parameter):
            total += layer.numel() / layer.shape[dep.target.pruning_dim]
            continue
        dense_layer = isinstance(layer, (nn.modules.conv._ConvNd, *dense_layer_types()))
        for pname, p in layer.named_parameters(recurse=False):
            if dense_layer and not out and pname == "bias":
                continue
            dim = 0 if out or p.dim() == 1 else 1
            if is_conv1d(layer) and p.dim() == 2:  # a Conv1D's weight is [in, out]
                dim = 1 - dim
            total += p.numel() / p.shape[dim]
    return total


def _attention_own_macs(q: nn.Module, macs: Mapping[str, int], names: Mapping[nn.Module, str]) -> float:
    """MACs of the attention module holding projection ``q`` outside its children (the ``QK^T``, ``AV`` products)."""
    attn = names[q].rpartition(".")[0]
    children = sum(v for k, v in macs.items() if k.startswith(attn + ".") and "." not in k[len(attn) + 1 :])
    return max(0, macs.get(attn, 0) - children)


def rank_units(ctx: StepContext, importance: Callable[[Any], Tensor | None]) -> tuple[list[_Group], list[_Unit]]:
    """Every prunable group of the current model with its units (channels or whole heads), and all units in
    removal order: by normalised score (global ranking) or by rank within their group (``global_ranking=False``),
    each with its predicted cost (fraction of the dense total) and the floor its group may not go below. Root channels
    Torch-Pruning removes together (GhostNet's, :func:`_tied_units`) form one unit, scored by their mean. An importance
    with ``observe_groups(groups, units)`` is first shown every group and its units (tuples of root channels) at once
    (:class:`oba.block_taylor.BlockTaylorImportance` draws its probes jointly)."""
    groups: list[_Group] = []
    units: list[_Unit] = []
    found = ctx.traced_groups
    if found is None:
        found = ctx.dg.get_all_groups(ignored_layers=ctx.ignored, root_module_types=ctx.root_types)
    ctx.traced_groups = None
    layouts = [(group, _layout(ctx, group)) for group in found]
    observe = getattr(importance, "observe_groups", None)
    if observe is not None:
        observe([group for group, _ in layouts], [layout.channels for _, layout in layouts])
    for group, layout in layouts:
        imp = importance(group)
        if imp is None:
            continue
        root, handler = group[0].dep.target.module, group[0].dep.handler
        n = len(group[0].idxs)
        if len(imp) != n:
            raise RuntimeError(f"the importance returned {len(imp)} scores for a group of {n} channels")
        _check_finite(imp, root, ctx.names)
        parts, d = layout.parts, layout.d
        scores = imp.detach().double().reshape(parts, -1, d).mean((0, 2))  # per channel, comparable across units
        if layout.tied is not None:
            scores = torch.stack([scores[members].mean() for members in layout.tied])
        min_channels = _floor(ctx.initial_width.get(root, n), parts * d, ctx.max_sparsity)
        cost = _unit_cost(ctx.dg, group, ctx.kind) / ctx.dense_total  # per root channel
        gi = len(groups)
        dims = _dims(ctx.dg, group, n)
        groups.append(_Group(root, handler, list(range(n)), min_channels, parts * d, layout.heads_of, dims))
        _add_units(units, gi, scores, layout.channels, cost, ctx.global_ranking)
    _gqa_units(ctx, importance, groups, units)
    units.sort(key=_by_key)  # stable: equal keys keep group order
    return groups, units


@dataclass
class _Layout:
    """How a group's root channels form units: ``d`` channels of each of ``parts`` equal parts of the channels (the
    same ``d`` in every part), merged where Torch-Pruning ties units together (``tied``: unit indices that go as
    one); ``channels``: every unit's root channels; ``heads_of``: the q/k/v layers when units are heads."""

    heads_of: list[nn.Module]
    parts: int
    d: int
    channels: list[tuple[int, ...]]
    tied: list[list[int]] | None = None


def _layout(ctx: StepContext, group: Any) -> _Layout:
    """The units of ``group``: whole heads where its layers hold heads, else channels (one slot of every channel group
    of a grouped convolution), merged where Torch-Pruning ties them (:func:`_tied_units`)."""
    n = len(group[0].idxs)
    heads_of = [
        d.target.module
        for d, _ in group
        if d.target.module in ctx.num_heads and ctx.dg.is_out_channel_pruning_fn(d.handler)
    ]
    if heads_of:  # a whole head: of each part ([q | k | v] of a fused projection, else one), the same head
        parts = ctx.head_parts.get(heads_of[0], 1)
        d = n // parts // ctx.num_heads[heads_of[0]]
    else:  # a channel; with grouped convolutions or GroupNorm, the same slot of every channel group
        parts, d = channel_groups(ctx.dg, group), 1
    size = parts * d
    channels = (
        [(u,) for u in range(n)] if size == 1 else [_unit_channels(u, d, n // parts, parts) for u in range(n // size)]
    )
    layout = _Layout(heads_of, parts, d, channels)
    if _may_tie(group):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        tied = _tied_units(ctx.dg, root, handler, channels)
        if len(tied) < len(channels):
            layout.tied = tied
            layout.channels = [tuple(c for u in members for c in channels[u]) for members in tied]
    return layout


_by_key = operator.attrgetter("key")


def _floor(initial: int, size: int, max_sparsity: float) -> int:
    """Root channels a group of ``initial`` channels in units of ``size`` keeps at least: at least one unit, and
    no more than ``max_sparsity`` of its initial units removed."""
    return size * max(1, math.ceil(initial // size * (1 - max_sparsity)))


def _add_units(
    units: list[_Unit], gi: int, scores: Tensor, channels: list[tuple[int, ...]], cost: float, global_ranking: bool
) -> None:
    """Append group ``gi``'s units (root ``channels[u]``, score ``scores[u]``) in its own order: keyed by score for
    a global ranking, else by rank within the group (``(rank + 1) / units``); each costs ``cost`` per channel."""
    keys, order = scores.tolist(), torch.argsort(scores).tolist()
    for rank, t in enumerate(order):
        key = keys[t] if global_ranking else (rank + 1) / len(order)
        units.append(_Unit(key, gi, channels[t], cost * len(channels[t])))  # as many as it holds


def _may_tie(group: Any) -> bool:
    """Whether ``group`` may tie root channels to one another (:func:`_tied_units`): only through a concatenation,
    which can bring two root channels onto one channel of a member (GhostNet's ``cat([x1, dwconv(x1)])``); without
    one, every member maps root channels one to one (or one to many: a flatten), and the probes are skipped."""
    return any(isinstance(dep.target.module, tp.ops._ConcatOp) for dep, _ in group)


def _check_finite(imp: Tensor, root: nn.Module, names: Mapping[nn.Module, str]) -> None:
    if not bool(torch.isfinite(imp).all()):
        raise ValueError(
            f"the importance of the group rooted at {names.get(root, type(root).__name__)!r} holds NaN or inf: "
            "ranking by it would prune at random; check the scoring data and the model for NaN/inf"
        )


def _gqa_units(
    ctx: StepContext, importance: Callable[[Any], Tensor | None], groups: list[_Group], units: list[_Unit]
) -> None:
    """Append every grouped-query attention module of ``ctx.gqa`` as a group of its own, coupled by hand
    (Torch-Pruning 1.6 cannot couple it: :class:`oba.prunable.GroupedQueryAttention`), with its units, whole key/value
    heads (:meth:`~oba.prunable.GroupedQueryAttention.prune` removes them). Root channels: ``k``'s outputs, ``d``
    (head_dim) per unit; each scored by :meth:`~oba.group_importance.ParameterScoreImportance.coupled_linear` (its
    rows of ``k``, ``v``, ``q`` and columns of ``o``), a unit by the mean of its ``d``, as a head of a Torch-Pruning
    group. An importance that is not a ParameterScoreImportance (a Torch-Pruning ``Importance`` of one's own)
    cannot score these layers: the modules stay whole."""
    if not isinstance(importance, ParameterScoreImportance):
        return
    for a in ctx.gqa:
        n, d, g = a.k.out_features, a.head_dim, float(a.group_size)
        imp = importance.coupled_linear(a.coupling(), n)
        if imp is None:
            continue
        _check_finite(imp, a.k, ctx.names)
        scores = imp.detach().double().reshape(-1, d).mean(1)
        min_channels = _floor(ctx.initial_width.get(a.k, n), d, ctx.max_sparsity)
        dims = [(a.q, True, g), (a.k, True, 1.0), (a.v, True, 1.0), (a.o, False, g)]
        gi = len(groups)
        groups.append(_Group(a.k, tp.prune_linear_out_channels, list(range(n)), min_channels, d, [], dims, a.prune))
        cost = (_linear_cost(dims) if ctx.kind == "params" else 1.0) / ctx.dense_total  # per root channel
        heads = [tuple(range(j * d, (j + 1) * d)) for j in range(n // d)]
        _add_units(units, gi, scores, heads, cost, ctx.global_ranking)


def _linear_cost(dims: list[tuple[nn.Module, bool, float]]) -> float:
    """Parameters of linear layers per root channel: ``ratio`` rows (with their bias entries) or columns each."""
    return sum(
        r * (layer.in_features + (layer.bias is not None) if out else layer.out_features) for layer, out, r in dims
    )


def _tied_units(
    dg: tp.DependencyGraph, root: nn.Module, handler: Callable, units: list[tuple[int, ...]]
) -> list[list[int]]:
    """The units (tuples of root channels) that Torch-Pruning removes together, as lists of unit indices.

    A group may tie root channels to each other: GhostNet's ``cat([x1, dwconv(x1)])`` feeding a residual ties
    channel ``k`` of the sum to channel ``k + C`` (both are ``x1``'s channel ``k``: a depthwise conv keeps its inputs
    and outputs together), and pruning either makes Torch-Pruning prune both. Such units must go as one, or the
    group's bookkeeping and its floor count half the channels that really go.

    Probes (``dg.get_pruning_group`` on a set of units, which units it reaches): the first and last unit tell
    whether the group ties anything. If so, ``2 ceil(log2 U)`` probes -- the units with bit ``b`` of their index
    set, and those without -- give each unit's partner when units tie in pairs (a unit reached from the side it is
    not on differs from its partner in bit ``b``); the pairs must explain every probe, else (ties of three or more)
    every unit is probed on its own."""
    where = {c: u for u, channels in enumerate(units) for c in channels}
    n = len(units)

    def reached(us: set[int]) -> set[int]:
        channels = sorted(c for u in us for c in units[u])
        return {where[c] for c in dg.get_pruning_group(root, handler, channels)[0].idxs if c in where}

    if reached({0, n - 1}) <= {0, n - 1}:
        return [[u] for u in range(n)]
    partner, probes = list(range(n)), []
    for b in range((n - 1).bit_length()):
        ones = {u for u in range(n) if u >> b & 1}
        for side in (ones, set(range(n)) - ones):
            probes.append((side, reached(side)))
            for u in probes[-1][1] - side:
                partner[u] ^= 1 << b
    if all(v < n for v in partner):
        tied = _classes(n, enumerate(partner))
        class_of = {u: i for i, members in enumerate(tied) for u in members}
        if all({u for s in side for u in tied[class_of[s]]} == got for side, got in probes):
            return tied
    return _classes(n, ((u, v) for u in range(n) for v in reached({u})))


def _classes(n: int, pairs: Any) -> list[list[int]]:
    """The connected classes of ``range(n)`` under the ``(u, v)`` pairs (union-find), each sorted."""
    parent = list(range(n))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for u, v in pairs:
        parent[find(v)] = find(u)
    classes: dict[int, list[int]] = {}
    for u in range(n):
        classes.setdefault(find(u), []).append(u)
    return list(classes.values())


def _unit_channels(u: int, d: int, width: int, parts: int) -> tuple[int, ...]:
    """Root channels of unit ``u``: ``[p * width + u * d, p * width + (u + 1) * d)`` for each part ``p``."""
    return tuple(p * width + u * d + j for p in range(parts) for j in range(d))


def _dims(dg: tp.DependencyGraph, group: Any, n: int) -> list[tuple[nn.Module, bool, float]]:
    """The conv/linear dimensions a group prunes: ``(layer, output dimension?, channels lost per root channel)``."""
    found: dict[tuple[nn.Module, bool], float] = {}
    for dep, idxs in group:
        layer = dep.target.module
        if isinstance(layer, (nn.modules.conv._ConvNd, *dense_layer_types())):
            out = dg.is_out_channel_pruning_fn(dep.handler)
            width = (dg.get_out_channels if out else dg.get_in_channels)(layer) or 0
            found[layer, out] = len({i for i in idxs if i < width}) / n  # beyond the width: a no-op (GPT-2's c_attn)
    return [(layer, out, ratio) for (layer, out), ratio in found.items()]


class MacModel:
    r"""Predicted MACs of the model as units go, from the real per-module count at the start of a step.

    A conv or linear layer's MACs are :math:`c_L\, (C_{in}/g)\, C_{out}` (:math:`c_L` fixed by its kernel, stride
    and input size, known from the count; a depthwise conv's :math:`C_{in}/g` stays 1); an attention module's own
    products (:math:`QK^\top`, :math:`AV`) scale with its query width; the rest of the model's MACs stay. Removing
    :math:`r` root channels of a group takes :math:`r \cdot` ratio channels off each of its layers' dimensions.
    A group whose layers no other group of ``groups`` (the step's) touches, each through one dimension, changes the
    MACs linearly: :math:`r` times its per-channel rate, found once; the others recompute their layers' MACs at every
    removal.
    """

    def __init__(self, ctx: StepContext, macs: Mapping[str, int], groups: list[_Group]) -> None:
        self.ctx = ctx
        self.width: dict[tuple[nn.Module, bool], float] = {}
        self.coef: dict[nn.Module, float] = {}
        modelled = 0.0
        for name, layer in ctx.dg.model.named_modules():
            traced = layer in ctx.dg.module2node  # else left out of the graph (Swin V2's cpb_mlp): its MACs stay
            if isinstance(layer, (nn.modules.conv._ConvNd, *dense_layer_types())) and macs.get(name) and traced:
                cin, cout = ctx.dg.get_in_channels(layer), ctx.dg.get_out_channels(layer)
                self.width[layer, False], self.width[layer, True] = cin, cout
                self.coef[layer] = macs[name] / (self._fan_in(layer, cin) * cout)
                modelled += macs[name]
        self.attention: dict[nn.Module, tuple[float, float]] = {}  # q layer -> (own MACs, query width at start)
        seen: set[str] = set()
        # q, k and v of an attention module: its own MACs go with the first (grouped-query attention: with q)
        for q in [*ctx.num_heads, *(a.q for a in ctx.gqa)]:
            parent = ctx.names.get(q, "").rpartition(".")[0]
            if parent in seen or (q, True) not in self.width:
                continue
            seen.add(parent)
            extra = _attention_own_macs(q, macs, ctx.names)
            self.attention[q] = (extra, self.width[q, True])
            modelled += extra
        self.fixed = macs.get("", 0) - modelled
        self.total = float(macs.get("", 0))
        self.current = {layer: self._macs(layer) for layer in self.coef}  # each modelled layer's MACs now
        self.touches = dict.fromkeys(self.coef, 0)  # (group, dimension) pairs of the step per modelled layer
        for g in groups:
            for layer, _, _ in g.dims:
                if layer in self.touches:
                    self.touches[layer] += 1
        # id(group) -> (its modelled layers, their dimensions and ratios, MACs per root channel if linear else None)
        self._plans: dict[int, tuple[list[nn.Module], list[tuple[tuple[nn.Module, bool], float]], float | None]] = {}

    @staticmethod
    def _fan_in(layer: nn.Module, cin: float) -> float:
        groups = getattr(layer, "groups", 1)
        return 1.0 if groups > 1 and layer.in_channels == groups else cin / groups

    def _macs(self, layer: nn.Module) -> float:
        cin, cout = self.width[layer, False], self.width[layer, True]
        own = self.coef[layer] * self._fan_in(layer, cin) * cout
        if layer in self.attention:
            extra, start = self.attention[layer]
            own += extra * cout / start
        return own

    def remove(self, group: _Group, channels: int) -> None:
        """Predict the removal of ``channels`` root channels of ``group`` (updates :attr:`total`)."""
        touched, dims, rate = self._plans.get(id(group)) or self._plan(group)
        if rate is not None:  # no other group reads these widths: they need no update
            self.total -= channels * rate
            return
        for key, ratio in dims:
            self.width[key] -= channels * ratio
        for layer in touched:
            now = self._macs(layer)
            self.total += now - self.current[layer]
            self.current[layer] = now

    def _plan(self, group: _Group) -> tuple[list[nn.Module], list[tuple[tuple[nn.Module, bool], float]], float | None]:
        """The group's modelled layers and dimensions, and its MACs per root channel when they change linearly
        (each layer touched by this group alone, through one dimension), found once per step."""
        touched = list(dict.fromkeys(layer for layer, _, _ in group.dims if layer in self.coef))
        dims = [((layer, out), ratio) for layer, out, ratio in group.dims if (layer, out) in self.width]
        rate = None
        if all(self.touches[layer] == 1 for layer in touched):
            for key, ratio in dims:
                self.width[key] -= ratio
            rate = sum(self.current[layer] - self._macs(layer) for layer in touched)
            for key, ratio in dims:
                self.width[key] += ratio
        self._plans[id(group)] = plan = (touched, dims, rate)
        return plan

    def kept(self) -> float:
        return self.total / self.ctx.dense_total


def _still_alive(groups: list[_Group], units: list[_Unit]) -> list[_Unit]:
    """The units none of whose channels went (rounding may take a few channels beyond those chosen)."""
    alive = [set(g.alive) for g in groups]
    return [u for u in units if alive[u.group].issuperset(u.channels)]


def _apply(
    dg: tp.DependencyGraph,
    groups: list[_Group],
    chosen: dict[int, list[tuple[int, ...]]],
    rest: list[_Unit],
    heads: dict[nn.Module, int],
    round_to: int | None,
    sync: Mapping[nn.Module, Callable[[int], None]],
    drop: Mapping[nn.Module, Callable[[list[int]], None]] | None = None,
) -> int:
    """Prune the ``chosen`` units (tuples of root channels) of each group (one Torch-Pruning group each, or the
    group's own ``prune`` when it is coupled by hand; head counts updated, and told to their modules through ``sync``;
    the per-head tensors Torch-Pruning does not hold, as a Swin bias table, lose the same heads through ``drop``,
    once per attention module); the channels removed."""
    removed, drop = 0, drop or {}
    pending_of: dict[int, list[tuple[int, ...]]] = {}
    for u in rest:
        pending_of.setdefault(u.group, []).append(u.channels)
    for gi, units in chosen.items():
        g = groups[gi]
        channels = [c for unit in _round_removal(g, units, pending_of.get(gi, []), round_to) for c in unit]
        if not channels:
            continue
        gone = set(channels)
        position = {c: i for i, c in enumerate(g.alive)}
        at = sorted(position[c] for c in channels)
        if g.root in g.heads_of:  # positions in a projection's layout: which heads go
            for fn in {drop[layer] for layer in g.heads_of if layer in drop}:  # once per attention module
                fn(at)
        if g.prune is not None:
            g.prune(at)
        else:
            dg.get_pruning_group(g.root, g.handler, at).prune()
        g.alive = [c for c in g.alive if c not in gone]
        for layer in g.heads_of:
            heads[layer] -= len(channels) // g.unit_size
            if layer in sync:
                sync[layer](heads[layer])
        removed += len(channels)
    return removed


def channel_groups(dg: tp.DependencyGraph, group: Any) -> int:
    """How many channel groups the layers of ``group`` split their channels into (grouped convolutions, GroupNorm;
    depthwise convolutions, whose every channel is its own group, do not count): a unit of such a group is one
    channel slot of every channel group, so that the groups stay equal (as Torch-Pruning's ``MetaPruner`` does)."""
    found = [1]
    for dep, _ in group:
        layer = dep.target.module
        pruner = dg.get_pruner_of_module(layer)
        if pruner is None or isinstance(layer, nn.Parameter):
            continue
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == layer.out_channels:
            continue  # depthwise
        out = dg.is_out_channel_pruning_fn(dep.handler)
        found.append(pruner.get_out_channel_groups(layer) if out else pruner.get_in_channel_groups(layer))
    return max(found)


def _round_removal(
    group: _Group, chosen: list[tuple[int, ...]], pending: list[tuple[int, ...]], round_to: int | None
) -> list[tuple[int, ...]]:
    """Adjust ``chosen`` (units to drop, each a tuple of root channels that go together) so the group's width stays
    a multiple of ``round_to``: add the group's next-ranked ``pending`` units, or, where that would cross the group's
    floor (or no whole units fit), drop the last chosen ones; units are never split (a channel tied to another,
    :func:`_tied_units`, would take its partner along)."""
    if not round_to or group.unit_size > 1:
        return chosen
    left = remaining = len(group.alive) - sum(len(unit) for unit in chosen)
    grown = list(chosen)
    for unit in pending:
        if left % round_to == 0 or left - len(unit) < group.min_channels:
            break
        grown.append(unit)
        left -= len(unit)
    if left % round_to == 0:
        return grown
    left, kept = remaining, list(chosen)
    while kept and left % round_to:
        left += len(kept.pop())
    return kept


def remove_until(
    dg: tp.DependencyGraph,
    groups: list[_Group],
    units: list[_Unit],
    heads: dict[nn.Module, int],
    round_to: int | None,
    step_target: float,
    kept: Callable[[], float],
    model: MacModel | None = None,
    sync: Mapping[nn.Module, Callable[[int], None]] | None = None,
    drop: Mapping[nn.Module, Callable[[list[int]], None]] | None = None,
) -> int:
    """Remove the lowest-ranked units until ``kept() <= step_target``; returns the channels removed.

    Each round takes units in rank order, prunes every group once and measures. With a :class:`MacModel` a round
    takes units until the model predicts the target (recalibrated on the real count first), so one round
    usually ends the step; without one, a round takes units until their predicted cost covers 70 % of the
    remaining gap (at least one unit), approaching the target from above. A unit that would take its group below
    the floor is skipped for the rest of the step.
    """
    removed, queue, sync = 0, list(units), sync or {}
    value = kept()
    while value > step_target + 1e-12 and queue:
        if model is not None:
            model.total += (value - model.kept()) * model.ctx.dense_total  # calibrate on the real count
            chosen, rest = _choose_predicted(groups, queue, model, step_target)
        else:
            chosen, rest = _choose_budget(groups, queue, 0.7 * (value - step_target))
        if not any(chosen.values()):
            break
        removed += _apply(dg, groups, chosen, rest, heads, round_to, sync, drop)
        queue = _still_alive(groups, rest)
        value = kept()
    return removed


def _fits(group: _Group, taken: int, unit: _Unit) -> bool:
    """Whether ``unit`` may go from ``group``, which loses ``taken`` root channels already."""
    return len(group.alive) - taken - len(unit.channels) >= group.min_channels


def _choose_predicted(
    groups: list[_Group], queue: list[_Unit], model: MacModel, step_target: float
) -> tuple[dict[int, list[tuple[int, ...]]], list[_Unit]]:
    """Units in rank order until ``model`` predicts ``step_target``: ``({group: units' root channels}, units
    left)``."""
    chosen: dict[int, list[tuple[int, ...]]] = {}
    taken: dict[int, int] = {}
    rest: list[_Unit] = []
    for unit in queue:
        gi = unit.group
        if model.kept() <= step_target + 1e-12:
            rest.append(unit)
        elif _fits(groups[gi], taken.get(gi, 0), unit):  # else blocked by the floor, now and later
            chosen.setdefault(gi, []).append(unit.channels)
            taken[gi] = taken.get(gi, 0) + len(unit.channels)
            model.remove(groups[gi], len(unit.channels))
    return chosen, rest


def _choose_budget(
    groups: list[_Group], queue: list[_Unit], budget: float
) -> tuple[dict[int, list[tuple[int, ...]]], list[_Unit]]:
    """Units in rank order until their predicted cost covers ``budget`` (at least one)."""
    chosen: dict[int, list[tuple[int, ...]]] = {}
    taken: dict[int, int] = {}
    spent, rest = 0.0, []
    for unit in queue:
        gi = unit.group
        if not _fits(groups[gi], taken.get(gi, 0), unit):
            continue  # blocked by the floor, now and later (groups only shrink)
        if spent == 0.0 or spent + unit.cost <= budget:
            chosen.setdefault(gi, []).append(unit.channels)
            taken[gi] = taken.get(gi, 0) + len(unit.channels)
            spent += max(unit.cost, 1e-12)
        else:
            rest.append(unit)
    return chosen, rest
