r"""Structured (channel / head) importance from per-parameter scores, for Torch-Pruning's pruners.

Any per-parameter criterion (magnitude :math:`|\theta|`, Taylor :math:`\theta \odot g`, OBD, OBA's
:math:`\theta \odot H\theta`, ... see :mod:`oba.importance`) gives a dict ``scores: {name: tensor}`` keyed
like ``model.named_parameters()``, each tensor shaped like its parameter. :class:`ParameterScoreImportance`
turns it into the per-channel importance that Torch-Pruning's pruners (``tp.pruner.MetaPruner``,
``tp.pruner.BasePruner``) rank, so they run unchanged with ``importance=ParameterScoreImportance(model, scores)``.

The rule
--------
A DepGraph group couples the layers that must lose the same channels. Its root has :math:`K` channels;
each dependency :math:`d` of the group prunes one layer along one dimension, and removing root channel
:math:`k` removes the set :math:`P_d(k)` of parameter entries of that layer. With :math:`S_p` the score
tensor of parameter :math:`p`,

.. math::

    s_d(k) = \sum_{(p, i) \in P_d(k)} S_p[i], \qquad
    I(k) = \Bigl|\, \mathop{R}_{d} \; s_d(k) \Bigr|, \qquad
    \text{importance} = \mathrm{normalize}(I),

i.e. the *signed* scores of everything the channel owns are added up first and the absolute value is
taken last, so contributions of opposite sign cancel (``absolute=False`` keeps the sign, for analysis).
:math:`R` is the ``group_reduction``: ``"sum"`` (default, :math:`\sum_d s_d(k)`, the score of the whole
structure), ``"mean"`` (the sum over the number of contributing dependencies, as Torch-Pruning counts them),
``"max"`` (the :math:`s_d(k)` of largest magnitude), ``"first"`` (the first contributing dependency, usually
the root layer). Parameters missing from ``scores`` contribute nothing; a group none of whose parameters is
scored gets ``None``, which the pruners take as "do not prune this group".

What each layer contributes to channel :math:`c` (:math:`W` weight, :math:`b` bias, :math:`g` conv groups):

==================================  ======================================================================
Conv, out-channel pruning           :math:`\sum W[c, :, \dots] + b[c]`
Conv, in-channel pruning            :math:`\sum W[\text{filters of } c\text{'s group}, c \bmod (C_\text{in}/g), \dots]`:
                                    the whole column :math:`W[:, c]` of a plain conv, only the filters that
                                    read :math:`c` in a grouped conv. Transposed convs swap the roles of the
                                    first two weight dimensions; their bias belongs to the output channel.
depthwise conv (groups = C_out)     :math:`\sum W[c, \dots] + b[c]` (Torch-Pruning prunes its input and
                                    output together, in one dependency)
Linear                              out: :math:`\sum_j W[c, j] + b[c]`; in: :math:`\sum_i W[i, c]`
Hugging Face ``Conv1D`` (GPT-2)     as Linear, its weight ``[in, out]`` transposed first
BatchNorm, GroupNorm, InstanceNorm  :math:`\gamma[c] + \beta[c]` when affine; running statistics are
                                    buffers, not parameters, and carry no score
LayerNorm                           :math:`\gamma, \beta` summed over every dimension but the pruned one
PReLU                               :math:`\alpha[c]`; a single shared :math:`\alpha` is never pruned
Embedding                           :math:`\sum_v E[v, c]` (the embedding dimension is pruned)
unwrapped ``nn.Parameter``          (``cls_token``, ``pos_embed``, ...) the sum over every dimension but
                                    the pruning dimension Torch-Pruning assigned to it
MultiheadAttention                  (packed ``in_proj_weight``) rows :math:`c, E+c, 2E+c` and column
                                    :math:`c` of ``in_proj_weight``, the three ``in_proj_bias`` entries,
                                    ``bias_k``/``bias_v`` at :math:`c`, row and column :math:`c` of
                                    ``out_proj.weight``, ``out_proj.bias[c]``; each entry counted once
                                    (the row/column crossings are subtracted)
==================================  ======================================================================

Biases and BatchNorm affine parameters belong to the channel: removing the channel deletes them, so
their scores are summed in like the weights'. Torch-Pruning's own importances differ here: its
``GroupMagnitudeImportance`` and ``GroupTaylorImportance`` leave biases (and BatchNorm's
:math:`\beta`) out unless ``bias=True``, both skip depthwise convs, GroupNorm and PReLU, the Taylor one
(1.6) skips BatchNorm too, and for a grouped conv both score input channel :math:`c` with column
:math:`c \bmod (C_\text{in}/g)` of *all* filters. Parameter-free nodes of the graph (additions,
concatenations, reshapes, activations) contribute nothing. Layers Torch-Pruning prunes but this module
does not score -- ``nn.LSTM``, ``nn.MultiheadAttention`` with separate ``q/k/v_proj_weight``, layers with
a customised pruner -- are skipped with a ``UserWarning`` and contribute nothing.

Every removed entry is counted once. When a group prunes the same conv/linear weight along both
dimensions (a square ``Linear`` inside ``x + f(x)``, whose inputs and outputs are coupled), the entries
:math:`W[c, c]` that are both in the row and in the column of channel :math:`c` are taken off once in the
``"sum"`` and ``"mean"`` reductions (Torch-Pruning's importances count them twice); ``"max"`` and
``"first"`` compare whole per-dependency sums and keep them.

Channel scores index the root's channels in ``group[0].idxs`` order: ``group[i].root_idxs`` maps each
dependency's layer indices back to them (concatenations, splits, flattening all go through it), so
groups built for a subset of channels work too. Attention *heads* are ranked by the pruners from these
channel scores (``prune_num_heads=True`` averages the channel scores of each head); :func:`head_scores`
gives the signed-sum-then-absolute score of each head instead, for analysis.

A coupling Torch-Pruning does not build is scored by the same rule with :meth:`ParameterScoreImportance.coupled_linear`
(grouped-query attention, whose key/value heads leave with their query groups: the rows of ``k_proj``, ``v_proj`` and
``q_proj`` and the columns of ``o_proj`` each root channel owns, :class:`oba.prunable.GroupedQueryAttention`).

Pruning changes the shapes of the parameters and makes the scores stale: every score is checked against
its parameter's current shape and a mismatch raises :class:`StaleScoresError`. Re-score the pruned model
and call :meth:`ParameterScoreImportance.set_scores` before the next pruning step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.pruner import function as tpf

from oba.hf_layers import Conv1DPruner, is_conv1d

__all__ = ["DEFAULT_NORMALIZER", "ParameterScoreImportance", "StaleScoresError", "head_scores"]

Scores = Mapping[str, Tensor]
Normalizer = str | Callable[[Tensor], Tensor] | None

GROUP_REDUCTIONS = ("sum", "mean", "max", "first")
NORMALIZERS = (None, "sum", "mean", "max", "standarization", "gaussian")

# Torch-Pruning's pruning functions (handlers of the dependencies), compared with ==
_CONV_LINEAR_OUT = (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels)
_CONV_LINEAR_IN = (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels)
_PER_CHANNEL_AFFINE = (  # weight [C] and bias [C]; their in- and out-pruning functions are the same
    tpf.prune_batchnorm_out_channels,
    tpf.prune_groupnorm_out_channels,
    tpf.prune_instancenorm_out_channels,
)


DEFAULT_NORMALIZER: Normalizer = "mean"
"""The one default of every pruning route (a criterion by name, :class:`ParameterScoreImportance`, the K-FAC and
EigenDamage importances): each group's channel scores divided by their mean, as Torch-Pruning's importances do, so
groups of different fan-in and fan-out compete on one scale in a global ranking."""


class StaleScoresError(RuntimeError):
    """A score tensor no longer matches its parameter's shape (the model was pruned after scoring)."""


class ParameterScoreImportance(tp.importance.Importance):
    """Channel importance of a DepGraph group from per-parameter scores (module docstring: the rule).

    Args:
        model: the model being pruned (the one given to the pruner); its ``named_parameters()`` names
            are the keys of ``scores``.
        scores: ``{parameter name: tensor shaped like the parameter}``, signed values allowed; may be
            given later with :meth:`set_scores`.
        group_reduction: ``"sum"`` (default), ``"mean"``, ``"max"`` or ``"first"``: how the dependencies
            of a group are combined.
        normalizer: ``"mean"`` (default, :data:`DEFAULT_NORMALIZER`, as for a criterion given by name and as
            Torch-Pruning's own importances), ``"sum"``, ``"max"`` (divide by that statistic of the group),
            ``"standarization"`` (min-max scaling to [0, 1], Torch-Pruning's name), ``"gaussian"`` (zero mean,
            unit std), ``None`` (raw scores, e.g. loss-change estimates) or a callable ``Tensor[K] -> Tensor[K]``.
            With ``None`` and ``global_pruning=True`` mind the scale: raw sums grow with a group's fan-in and
            fan-out, so a whole group can fall under the global threshold, and Torch-Pruning then skips that
            group (it never empties a layer) and prunes far less than asked; ``"mean"`` avoids it.
        absolute: take the absolute value of the reduced signed sum (default). ``False`` keeps the sign;
            the pruners rank by value, so use it for analysis, not for pruning.

    Calling it on a group returns ``Tensor[K]`` (``K = len(group[0].idxs)``) or ``None`` when the group
    holds no scored parameter.

    Example::

        imp = ParameterScoreImportance(model, oba.score(model, "oba", batches, loss_fn))
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                                      iterative_steps=2, ignored_layers=[model.fc])
        pruner.step()
        imp.set_scores(oba.score(model, "oba", batches, loss_fn))  # re-score the pruned model
        pruner.step()
    """

    def __init__(
        self,
        model: nn.Module,
        scores: Scores | None = None,
        *,
        group_reduction: str = "sum",
        normalizer: Normalizer = DEFAULT_NORMALIZER,
        absolute: bool = True,
    ) -> None:
        if group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduction must be one of {GROUP_REDUCTIONS}, got {group_reduction!r}")
        if not callable(normalizer) and normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be a callable or one of {NORMALIZERS}, got {normalizer!r}")
        self.model = model
        self.group_reduction = group_reduction
        self.normalizer = normalizer
        self.absolute = absolute
        self._module_names: dict[nn.Module, str] = {}
        self._scores: dict[str, Tensor] | None = None
        self._warned: set[str] = set()
        # layer -> (its weight's shape, _dense_weight_score) for the current scores: a layer is read by two groups
        self._dense: dict[nn.Module, tuple[tuple[int, ...], Tensor | None]] = {}
        if scores is not None:
            self.set_scores(scores)

    # ------------------------------------------------------------------ scores
    def set_scores(self, scores: Scores) -> None:
        """Replace the per-parameter scores (call after every pruning step, with scores of the pruned model).

        Raises:
            KeyError: a name is not a parameter of the model.
            StaleScoresError: a tensor's shape differs from its parameter's current shape.
        """
        params = dict(self.model.named_parameters())
        unknown = sorted(set(scores) - set(params))
        if unknown:
            raise KeyError(f"scores hold names that are not parameters of the model: {unknown[:5]}")
        for name, s in scores.items():
            self._check_shape(name, s, params[name])
        self._scores = {name: s.detach() for name, s in scores.items()}
        self._dense = {}

    @property
    def scores(self) -> dict[str, Tensor] | None:
        """The current per-parameter scores (read-only view)."""
        return self._scores

    @staticmethod
    def _check_shape(name: str, score: Tensor, param: Tensor) -> None:
        if score.shape != param.shape:
            raise StaleScoresError(
                f"the score of parameter {name!r} has shape {tuple(score.shape)} but the parameter now has "
                f"shape {tuple(param.shape)}: the model was pruned (or changed) after these scores were "
                "computed. Re-score the current model and call set_scores(...) before pruning again."
            )

    def _score(self, name: str, param: Tensor | None) -> Tensor | None:
        """Score tensor of parameter ``name`` (shape-checked against ``param``), or None if unscored."""
        if param is None or self._scores is None or name not in self._scores:
            return None
        s = self._scores[name]
        self._check_shape(name, s, param)
        return s.to(torch.promote_types(s.dtype, torch.float32))

    def _module_name(self, module: nn.Module) -> str:
        if module not in self._module_names:
            self._module_names = {m: n for n, m in self.model.named_modules()}
            if module not in self._module_names:
                raise ValueError(
                    f"{type(module).__name__} module of the pruning group is not part of the model given to "
                    "ParameterScoreImportance: build it with the model that the pruner prunes."
                )
        return self._module_names[module]

    def _param_score(self, module: nn.Module, attr: str) -> Tensor | None:
        """Score of ``module.<attr>`` (attr may be dotted, e.g. ``out_proj.weight``)."""
        prefix = self._module_name(module)
        param = module
        for part in attr.split("."):
            param = getattr(param, part, None)
        return self._score(f"{prefix}.{attr}" if prefix else attr, param)

    def _unwrapped_score(self, param: nn.Parameter) -> Tensor | None:
        # Torch-Pruning replaces the Parameter object when it prunes it: look the name up by identity.
        for name, p in self.model.named_parameters():
            if p is param:
                return self._score(name, p)
        return None

    # --------------------------------------------------------- per-layer rule
    def _channel_scores(self, dep: Any) -> Tensor | None:
        """Signed score of every channel of ``dep``'s layer along the pruned dimension: ``Tensor[C_layer]``.

        ``None`` when the layer has no scored parameter or is not supported.
        """
        layer, fn = dep.target.module, dep.handler
        if isinstance(layer, nn.Parameter):
            s = self._unwrapped_score(layer)
            return None if s is None else _sum_except(s, dep.target.pruning_dim)
        if (end := _dense_end(fn)) is not None:
            return self._conv_linear(layer, is_out=end)
        if fn == tpf.prune_depthwise_conv_out_channels:
            return _add(_sum_except(self._param_score(layer, "weight"), 0), self._param_score(layer, "bias"))
        if fn in _PER_CHANNEL_AFFINE:
            return _add(self._param_score(layer, "weight"), self._param_score(layer, "bias"))
        if fn == tpf.prune_layernorm_out_channels:
            dim = dep.target.pruning_dim
            if len(layer.normalized_shape) < -dim:  # Torch-Pruning leaves such a LayerNorm untouched
                return None
            w, b = self._param_score(layer, "weight"), self._param_score(layer, "bias")
            return _add(_sum_except(w, dim), _sum_except(b, dim))
        if fn == tpf.prune_prelu_out_channels:
            return self._param_score(layer, "weight") if layer.num_parameters > 1 else None
        if fn == tpf.prune_embedding_out_channels:
            return _sum_except(self._param_score(layer, "weight"), 1)
        if fn == tpf.prune_multihead_attention_out_channels and layer._qkv_same_embed_dim:
            return self._multihead_attention(layer)
        if isinstance(layer, nn.Module) and next(layer.parameters(), None) is not None:
            key = type(layer).__name__
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"ParameterScoreImportance does not score {key} layers (pruned by {getattr(fn, '__name__', fn)}); "
                    "their parameters contribute nothing to the channel scores.",
                    stacklevel=3,
                )
        return None

    def _dense_weight_score(self, layer: nn.Module) -> Tensor | None:
        """Kernel-summed weight scores of a conv/linear as a dense ``[C_out, C_in]`` matrix.

        A grouped conv's weight ``[C_out, C_in/g, *k]`` becomes block-diagonal (filters of group ``i`` read
        input channels of group ``i`` only); a transposed conv's ``[C_in, C_out/g, *k]`` and a Hugging Face
        ``Conv1D``'s ``[C_in, C_out]`` are transposed. Kept for the current scores while the weight's shape stays.
        """
        shape = tuple(getattr(getattr(layer, "weight", None), "shape", ()))
        cached = self._dense.get(layer)
        if cached is not None and cached[0] == shape:
            return cached[1]
        w = self._param_score(layer, "weight")
        s = None
        if w is not None:
            s = w.flatten(2).sum(2) if w.dim() > 2 else w
            groups = int(getattr(layer, "groups", 1))
            if groups > 1:
                s = torch.block_diag(*s.reshape(groups, s.shape[0] // groups, s.shape[1]))
            s = s.T if getattr(layer, "transposed", False) or is_conv1d(layer) else s
        self._dense[layer] = (shape, s)
        return s

    def _conv_linear(self, layer: nn.Module, is_out: bool) -> Tensor | None:
        d = self._dense_weight_score(layer)
        if is_out:  # the filter (row) and the bias of each output channel
            return _add(None if d is None else d.sum(1), self._param_score(layer, "bias"))
        return None if d is None else d.sum(0)  # the column of each input channel

    def _multihead_attention(self, layer: nn.MultiheadAttention) -> Tensor | None:
        e = layer.embed_dim
        terms = []
        w_in = self._param_score(layer, "in_proj_weight")  # [3E, E]: rows c, E+c, 2E+c and column c
        if w_in is not None:
            rows = w_in.sum(1).reshape(3, e).sum(0)
            crossings = w_in.reshape(3, e, e).diagonal(dim1=1, dim2=2).sum(0)
            terms.append(rows + w_in.sum(0) - crossings)
        b_in = self._param_score(layer, "in_proj_bias")
        if b_in is not None:
            terms.append(b_in.reshape(3, e).sum(0))
        for name in ("bias_k", "bias_v"):  # [1, 1, E]
            s = self._param_score(layer, name)
            if s is not None:
                terms.append(s.reshape(-1, e).sum(0))
        w_out = self._param_score(layer, "out_proj.weight")  # [E, E]: row c and column c
        if w_out is not None:
            terms.append(w_out.sum(1) + w_out.sum(0) - w_out.diagonal())
        b_out = self._param_score(layer, "out_proj.bias")
        if b_out is not None:
            terms.append(b_out)
        return sum(terms[1:], terms[0]) if terms else None

    # ------------------------------------------------------------------ group
    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        """Importance of each root channel of ``group``: ``Tensor[len(group[0].idxs)]``, or None."""
        imp = self.signed(group)
        return None if imp is None else self._finish(imp)

    def spread(self, group: Any, values: Tensor) -> dict[str, Tensor]:
        r"""The adjoint of the ``"sum"`` rule on ``group``: ``{name: tensor shaped like the parameter}`` holding, at
        each parameter entry, the sum of ``values[k]`` over the root channels :math:`k` that own it (each once; zero
        where none does): :math:`\sum_k \text{values}[k]\, m_k` with :math:`m_k` the 0/1 indicator of
        :math:`P(k) = \bigcup_d P_d(k)`. So :math:`m_k^\top S` is channel :math:`k`'s signed ``"sum"`` score of any
        per-parameter ``S``, and ``spread(group, e_k)`` is the set of entries removing channel :math:`k` deletes (a
        unit's perturbation :math:`\delta_k = -\theta \odot m_k`, :mod:`oba.block_taylor`). Computed by autograd
        through the same rule; only the scored parameters' names (the model's, when no scores are set) appear."""
        return self.spread_many([(group, values)])

    def spread_many(self, pairs: Iterable[tuple[Any, Tensor]]) -> dict[str, Tensor]:
        """:meth:`spread` of several ``(group, values)``, added up: one backward pass for all of them."""
        pairs = list(pairs)
        params = dict(self.model.named_parameters())
        names = params if self._scores is None else self._scores
        dtype = pairs[0][1].dtype if pairs else torch.float64
        probe = {n: torch.zeros_like(params[n], dtype=dtype, requires_grad=True) for n in names}
        rule = ParameterScoreImportance(self.model, group_reduction="sum", normalizer=None, absolute=False)
        rule._scores = probe  # not set_scores, which detaches
        rule._module_names = self._module_names
        total = None
        with torch.enable_grad():
            for group, values in pairs:
                sums = rule.signed(group)
                if sums is not None:
                    total = _add(total, (sums * values.to(sums.dtype)).sum())
        if total is None:
            return {}
        grads = torch.autograd.grad(total, list(probe.values()), allow_unused=True)
        return {n: g for n, g in zip(probe, grads, strict=True) if g is not None}

    def signed(self, group: Any) -> Tensor | None:
        """The signed, reduced, unnormalised channel scores of ``group`` (:meth:`__call__` before ``|.|`` and the
        normaliser), differentiable in the scores; ``None`` when the group holds no scored parameter."""
        self._require_scores()
        root = _root_idxs(group[0])
        position = None if root == list(range(len(root))) else {r: k for k, r in enumerate(root)}  # None: identity
        contributions: list[tuple[Tensor, Tensor]] = []  # (values [n_d], positions [n_d]) per dependency
        conv_linear: dict[nn.Module, dict[bool, tuple[Tensor, Tensor]]] = {}  # layer -> {is_out: (at, pos)}
        for i, (dep, idxs) in enumerate(group):
            root_idxs = _root_idxs(group[i])
            if None in root_idxs:  # index mapping lost the root (e.g. GQA): as Torch-Pruning
                continue
            per_channel = self._channel_scores(dep)
            if per_channel is None:
                continue
            # indices beyond the layer's width remove nothing (GPT-2's fused c_attn: oba.depgraph.prunable_groups)
            width, idxs = len(per_channel), list(idxs)
            if idxs and max(idxs) >= width:
                inside = [k for k, i in enumerate(idxs) if i < width]
                idxs, root_idxs = [idxs[k] for k in inside], [root_idxs[k] for k in inside]
            at = torch.as_tensor(idxs, dtype=torch.long, device=per_channel.device)
            pos = root_idxs if position is None else [position[r] for r in root_idxs]
            pos = torch.as_tensor(pos, dtype=torch.long, device=per_channel.device)
            contributions.append((per_channel[at], pos))
            if (end := _dense_end(dep.handler)) is not None:
                conv_linear.setdefault(dep.target.module, {})[end] = (at, pos)
        if not contributions:
            return None
        crossings = [
            self._crossing(layer, ends[True], ends[False]) for layer, ends in conv_linear.items() if len(ends) == 2
        ]
        return self._reduce(contributions, crossings, len(root))

    @torch.no_grad()
    def coupled_linear(self, members: Sequence[tuple[nn.Module, bool, Sequence[int]]], size: int) -> Tensor | None:
        """Importance of ``size`` root channels that a coupling written by hand removes together, outside
        Torch-Pruning's groups (grouped-query attention: :meth:`oba.prunable.GroupedQueryAttention.coupling`), by the
        rule of :meth:`__call__`: each member ``(linear layer, output side?, root)`` is one dependency whose channel
        ``i`` (a row with its bias entry, or a column) goes with root channel ``root[i]``; the members' signed sums are
        reduced (``group_reduction``), made absolute (``absolute``) and normalised as a group's. ``Tensor[size]``, or
        ``None`` when no member is scored."""
        self._require_scores()
        contributions = []
        for layer, out, root in members:
            handler = tpf.prune_linear_out_channels if out else tpf.prune_linear_in_channels
            dep = SimpleNamespace(target=SimpleNamespace(module=layer), handler=handler)  # what _channel_scores reads
            per_channel = self._channel_scores(dep)
            if per_channel is not None:
                contributions.append((per_channel, torch.as_tensor(list(root), device=per_channel.device)))
        if not contributions:
            return None
        return self._finish(self._reduce(contributions, [], size))

    def _require_scores(self) -> None:
        if self._scores is None:
            raise RuntimeError("no scores: pass them to ParameterScoreImportance(...) or call set_scores(...)")

    def _finish(self, imp: Tensor) -> Tensor:
        """Signed root-channel sums -> the importance: ``|.|`` when ``absolute``, then the normaliser."""
        return _normalize(imp.abs() if self.absolute else imp, self.normalizer)

    def _crossing(
        self, layer: nn.Module, out: tuple[Tensor, Tensor], inp: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Minus the weight entries that one root channel removes twice, as row and as column of ``layer``.

        Happens when the group prunes the layer's inputs and outputs together (a layer inside ``x + f(x)``):
        the out- and in-dependencies both count :math:`W[o, i]` when ``o`` and ``i`` map to the same root.
        Returns ``(values [n_out], positions [n_out])`` to add to the sum.
        """
        (o_at, o_pos), (i_at, i_pos) = out, inp
        d = self._dense_weight_score(layer)
        same_root = o_pos[:, None] == i_pos[None, :]
        return -(d[o_at][:, i_at] * same_root).sum(1), o_pos

    def _reduce(
        self, contributions: list[tuple[Tensor, Tensor]], crossings: list[tuple[Tensor, Tensor]], size: int
    ) -> Tensor:
        """Combine the per-dependency ``(values, positions)`` into ``Tensor[size]`` (signed).

        ``crossings`` (entries counted by two dependencies) are taken off ``"sum"`` and ``"mean"`` only.
        """
        zeros = contributions[0][0].new_zeros(size)

        def scatter(values: Tensor, pos: Tensor) -> Tensor:
            return zeros.index_add(0, pos.to(zeros.device), values.to(zeros.device))

        if self.group_reduction == "first":
            return scatter(*contributions[0])
        if self.group_reduction == "max":  # the signed s_d(k) of largest magnitude
            best = zeros
            for values, pos in contributions:
                s_d = scatter(values, pos)
                best = torch.where(s_d.abs() > best.abs(), s_d, best)
            return best
        total = sum((scatter(values, pos) for values, pos in contributions + crossings), zeros)
        return total / len(contributions) if self.group_reduction == "mean" else total


# ---------------------------------------------------------------------- helpers
def _dense_end(fn: Callable) -> bool | None:
    """``True`` / ``False`` when the pruning function ``fn`` removes output / input channels of a conv, linear or
    Hugging Face ``Conv1D`` layer (:class:`oba.hf_layers.Conv1DPruner`); ``None`` for any other function."""
    if fn in _CONV_LINEAR_OUT or fn in _CONV_LINEAR_IN:
        return fn in _CONV_LINEAR_OUT
    if isinstance(getattr(fn, "__self__", None), Conv1DPruner):
        return getattr(fn, "__func__", None) is Conv1DPruner.prune_out_channels
    return None


def _root_idxs(item: Any) -> list:
    root = getattr(item, "root_idxs", None)
    return list(item.idxs) if root is None else list(root)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b.to(a.device)


def _sum_except(s: Tensor | None, dim: int) -> Tensor | None:
    """Sum ``s`` over every dimension but ``dim``: ``Tensor[s.shape[dim]]``."""
    if s is None:
        return None
    return s.movedim(dim, 0).reshape(s.shape[dim], -1).sum(1)


def _normalize(imp: Tensor, normalizer: Normalizer) -> Tensor:
    """Torch-Pruning's group normalisations (same names and formulas), except that a zero denominator (``"sum"``,
    ``"mean"`` or ``"max"`` of a group whose scores are all zero, or sum to zero) leaves the group unscaled where
    Torch-Pruning would return NaN or inf: ``imp / d`` with ``d = 1`` when ``d == 0``."""
    if normalizer is None:
        return imp
    if callable(normalizer):
        return normalizer(imp)
    if normalizer in ("sum", "mean", "max"):
        d = {"sum": imp.sum, "mean": imp.mean, "max": imp.max}[normalizer]()
        return imp / torch.where(d == 0, torch.ones_like(d), d)
    if normalizer == "standarization":
        return (imp - imp.min()) / (imp.max() - imp.min() + 1e-8)
    if normalizer == "gaussian":
        return (imp - imp.mean()) / (imp.std() + 1e-8)
    raise ValueError(f"unknown normalizer {normalizer!r}")


def head_scores(channel_scores: Tensor, num_heads: int, absolute: bool = True) -> Tensor:
    """Score of each attention head from *signed* channel scores (``absolute=False`` importance).

    Args:
        channel_scores: ``Tensor[num_heads * head_dim]``, heads contiguous (the layout of qkv projections).
    Returns:
        ``Tensor[num_heads]``: the sum of each head's signed channel scores, then its absolute value.
    """
    per_head = channel_scores.reshape(num_heads, -1).sum(1)
    return per_head.abs() if absolute else per_head
