r"""Structured pruning to a FLOPs / parameter / channel target: :func:`prune_structured`, the step loop.

Torch-Pruning's DepGraph finds which layers must lose the same channels (a *group*); this package decides
*which* channels go and *how many*, step by step. The parts, each in its module:

* the target and its schedule -- :class:`oba.target.PruningTarget`;
* the criterion -- a :class:`oba.criteria.Scorer` (a registered name, or the user's own), which may rewrite the
  model once before the first step (:class:`oba.criteria.Preparation`, EigenDamage);
* one step -- :func:`oba.prune_step.prune_step`: rank the units of every group, remove the cheapest until the
  step's target is met;
* this loop: re-score the model on the next ``batches_per_step`` batches before every step (in the chosen
  ``score_mode``), prune one step, measure and record it;
* saving and loading the pruned model -- :mod:`oba.pruned_io`; the layers that prune -- :mod:`oba.prunable`.

A target that cannot be reached (everything left is capped or ignored) raises
:class:`~oba.target.TargetNotReachedError` with the fraction reached and the history so far.

Cost: MACs of one forward pass of ``example_inputs`` as :func:`oba.flops.count_flops` counts them (the
literature's "FLOPs"; element-wise work not counted); the loop counts by running the model itself once per step
(:func:`oba.flops.macs_by_module` with ``in_place=True``, eval mode, no gradients), which is much cheaper than a
copy on the meta device for large models and gives the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oba.arguments import check_whole_number
from oba.batches import check_example_inputs, check_example_type, check_inputs_like, modes_restored
from oba.cached_shapes import cached_shapes, sync_cached_shapes
from oba.criteria import Scorer, as_scorer, make_scorer
from oba.curvature import Batch, LossFn
from oba.depgraph import build_graph, prunable_groups
from oba.flops import FlopCount, count_params, counted_forward, macs_by_module
from oba.group_importance import ParameterScoreImportance
from oba.hf_layers import conv1d_type, customized_pruners
from oba.prunable import (
    attention_heads,
    default_ignored_layers,
    default_num_heads,
    grouped_query_attention,
    layer_widths,
    per_head_tensors,
)
from oba.prune_step import StepContext, prune_step
from oba.pruned_io import PRUNED_FORMAT, load_pruned, resize_to_state_dict, save_pruned
from oba.target import PruningTarget, TargetNotReachedError

__all__ = [
    "PRUNED_FORMAT",
    "TargetNotReachedError",
    "UnsupportedModelError",
    "default_ignored_layers",
    "group_scores",
    "layer_widths",
    "load_pruned",
    "make_scorer",
    "prune_structured",
    "resize_to_state_dict",
    "save_pruned",
]


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


class _Measure:
    """The current model's cost against the dense one: the target quantity alone (:meth:`kept`, after every
    round of removals) or the whole record of a step (:meth:`record`). The MACs come from one counter run per
    model state (keyed by the parameters' shapes), which also gives the per-module MACs the next step predicts
    with (:meth:`macs`). A CPU model of at least :attr:`META_ABOVE` MACs is counted on a ``meta`` replica, a pass
    over shapes alone, cheaper than its real compute (the same count); should that pass fail (code that reads
    values), the model itself runs from then on."""

    META_ABOVE = 10**9

    def __init__(self, model: nn.Module, example_inputs: Any, ctx: StepContext, dense: Any, total_channels: int):
        self.model, self.example_inputs, self.ctx = model, example_inputs, ctx
        self.dense, self.total_channels = dense, total_channels
        self._counted: tuple[tuple, dict[str, int]] | None = None
        self.shapes = cached_shapes(model)  # view shapes modules cache from their tensors (PoolFormer's Scale)
        cpu = all(p.device.type == "cpu" for p in model.parameters())
        self.on_meta = cpu and dense.macs >= self.META_ABOVE

    def _state(self) -> tuple:
        return tuple(tuple(p.shape) for p in self.model.parameters())

    def macs(self) -> dict[str, int]:
        """MACs per module of the model as it is now (``""``: the total), counted once per state."""
        if self._counted is None or self._counted[0] != self._state():
            sync_cached_shapes(self.shapes)  # the model runs next: its cached shapes follow the pruned widths
            self.seed(self._count())
        return self._counted[1]

    def _count(self) -> dict[str, int]:
        if self.on_meta:
            try:
                return macs_by_module(self.model, self.example_inputs)  # on a meta replica
            except Exception:  # the model's code needs values: it runs itself (an error of its own shows there)
                self.on_meta = False
        return macs_by_module(self.model, self.example_inputs, in_place=True)

    def seed(self, macs: dict[str, int]) -> None:
        """``macs`` (of :func:`macs_by_module`) is the count of the model as it is now."""
        self._counted = (self._state(), macs)

    def channels(self) -> int:
        """Prunable channels left: the output widths of the groups' root layers (what ``len(group[0].idxs)`` of
        ``get_all_groups`` sums to, without re-tracing every group)."""
        return sum(self.ctx.dg.get_out_channels(root) or 0 for root in self.ctx.initial_width)

    def kept(self) -> float:
        if self.ctx.kind == "flops":
            return self.macs()[""] / self.dense.macs
        if self.ctx.kind == "params":
            return count_params(self.model) / self.dense.params
        return self.channels() / self.total_channels

    def _gqa_heads(self) -> dict[str, int]:
        """Heads of grouped-query attention's projections: query heads of ``q``, key/value heads of ``k`` and ``v``."""
        names = self.ctx.names
        return {names[p]: p.out_features // a.head_dim for a in self.ctx.gqa for p in (a.q, a.k, a.v)}

    def record(self) -> dict[str, Any]:
        macs, params = self.macs()[""], count_params(self.model)
        heads = self.ctx.num_heads
        return {
            "macs": macs,
            "params": params,
            "flops_kept": macs / self.dense.macs,
            "params_kept": params / self.dense.params,
            "channels_kept": self.channels() / self.total_channels,
            "widths": layer_widths(self.model),
            "heads": {name: heads[m] for name, m in self.model.named_modules() if m in heads} | self._gqa_heads(),
        }


def _check_options(target: PruningTarget, reference, score_mode, max_channel_sparsity, scorer, batches) -> None:
    if isinstance(batches, (str, bytes)) or (batches is not None and not isinstance(batches, Iterable)):
        raise TypeError(f"batches must be an iterable of (inputs, targets), got {type(batches).__name__}")
    if reference is not None and target.kind == "channels":
        raise ValueError("reference applies to keep_flops / keep_params only")
    if not 0 <= max_channel_sparsity <= 1:
        raise ValueError(f"max_channel_sparsity must be in [0, 1], got {max_channel_sparsity}")
    if score_mode not in ("train", "eval", None):
        raise ValueError(f"score_mode must be 'train', 'eval' or None, got {score_mode!r}")
    if scorer.needs_data and batches is None:
        raise ValueError("this importance scores on data: pass batches (and loss_fn for a criterion name)")


def _check_model(model: nn.Module) -> None:
    """Refuse, before anything changes, models the pruner would leave half-done: ``torch.nn.utils.prune`` masks
    (the pruned ``weight`` would sit beside the old ``weight_orig``/``weight_mask``) and recurrent layers
    Torch-Pruning cannot prune (``nn.GRU``, ``nn.RNN``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if hasattr(m, "weight_orig") or hasattr(m, "weight_mask"):
            raise ValueError(
                f"layer {name!r} carries torch.nn.utils.prune masks (weight_orig/weight_mask): make them permanent "
                "with oba.unstructured.remove_masks(model) (torch.nn.utils.prune.remove) before structured pruning"
            )
        if isinstance(m, (nn.GRU, nn.RNN)):
            raise ValueError(
                f"layer {name!r} is an nn.{type(m).__name__}, which Torch-Pruning cannot prune (it prunes nn.LSTM "
                "only); structured pruning of this model is not supported: prune its other parts separately, or "
                "use unstructured pruning (oba.unstructured.prune_unstructured)"
            )


def _resolve_layers(model: nn.Module, layers: Sequence[nn.Module | str] | None) -> list[nn.Module] | None:
    """``ignored_layers`` as modules of ``model``: modules, or their names in ``model.named_modules()``."""
    if layers is None:
        return None
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    names = {m: n for n, m in model.named_modules()}
    resolved = []
    for layer in layers:
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(
                    f"ignored_layers names {layer!r}, which is not a module of the model; names are those of "
                    f"model.named_modules(), e.g. {list(names.values())[1:4]}"
                ) from None
        elif not isinstance(layer, nn.Module) or layer not in names:
            raise ValueError(
                f"ignored_layers holds {layer!r}, which is not a module of the model: pass its modules "
                "(e.g. model.fc) or their names"
            )
        resolved.append(layer)
    return resolved


def _check_batches(batches: list[Batch], example_inputs: Any, step: int) -> None:
    """Each scoring batch's inputs must match ``example_inputs`` (the model was traced with them) but for the
    batch size. (Scoring itself runs the first batch through the model and the loss: :func:`check_batch`.)"""
    for i, batch in enumerate(batches):
        if isinstance(batch, (tuple, list)) and batch:  # a user's scorer may take batches of its own kind
            check_inputs_like(batch[0], example_inputs, f"batch {i} of step {step}")


@contextlib.contextmanager
def _restored_on_failure(model: nn.Module, copy_values: bool = True):
    """Leave ``model`` exactly as it was when the block raises (any exception, ``TargetNotReachedError`` and
    ``KeyboardInterrupt`` included): every module of the caller's tree gets back its attributes (sizes, head
    counts, its parameter, buffer and child dicts) and every original parameter and buffer its values. The
    snapshot is shallow: pruning puts new tensors in place of the old ones, which stay untouched. ``copy_values``:
    also copy every tensor's values, against in-place writes (a scorer that may write, :attr:`Scorer.writes_tensors`);
    without it, a tensor written in place all the same (its version counter moved) is named in a note on the
    exception."""
    modules = list(model.modules())
    attributes = {m: _shallow_state(m) for m in modules}
    tensors = [t for m in modules for t in [*m._parameters.values(), *m._buffers.values()] if t is not None]
    values = [(t, t.detach().clone()) for t in tensors] if copy_values else []
    versions = [(t, t._version) for t in tensors]
    try:
        yield
    except BaseException as err:
        with torch.no_grad():
            for tensor, saved in values:
                tensor.data = saved
        for m, state in attributes.items():
            m.__dict__.clear()
            m.__dict__.update(state)
        if not copy_values and (written := sum(t._version != v for t, v in versions)):
            err.add_note(
                f"{written} of the model's tensors were written in place during the run and keep their new values"
            )
        raise


def _shallow_state(module: nn.Module) -> dict[str, Any]:
    """``module.__dict__`` with its parameter, buffer and child dicts (and any other dict or list) copied."""
    return {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in module.__dict__.items()}


def _score(
    scorer: Scorer, model: nn.Module, batches: list[Batch], score_mode: str | None, given: Mapping[nn.Module, bool]
) -> Any:
    """The scorer's importance of the current model, computed in ``score_mode`` (``None``: every module in the mode
    it had when the call began, ``given``; Torch-Pruning's tracing switches to eval); every module's mode restored."""
    with modes_restored(model):
        if score_mode is not None:
            model.train(score_mode == "train")
        else:
            for m in model.modules():
                m.training = given.get(m, m.training)
        return scorer(model, batches)


# long function: the public entry point's signature and its documented arguments; the body is ~15 lines
def prune_structured(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    importance: str | Scorer | Callable[..., Any] = "oba",
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
    score_mode: str | None = None,
    global_ranking: bool = True,
    max_channel_sparsity: float = 1.0,
    ignored_layers: Sequence[nn.Module | str] | None = None,
    round_to: int | None = None,
    num_heads: Mapping[nn.Module, int] | None = None,
    root_module_types: Sequence[type] = (nn.modules.conv._ConvNd, nn.Linear),
    progress: bool = True,
    on_step: Callable[[nn.Module, dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Prune ``model``'s channels (and attention heads) in place until the target is met (module docstring).

    Args:
        model: the network (pruned in place and returned).
        example_inputs: an input batch for DepGraph tracing and MAC counting (its size sets the MAC count).
        importance: a criterion name (``oba.criteria.names("structured")``, scored with ``loss_fn`` on
            ``batches``), a :class:`oba.criteria.Scorer` (:func:`oba.criteria.make_scorer` for options such as
            ``fisher="per_batch"``), a function ``scorer(model, batches) -> importance``, or a fixed
            Torch-Pruning ``Importance`` (data-free). A criterion that rewrites the model first (``"eigendamage"``)
            does so before the first step, and the targets are measured against the model as given.
        keep_flops, keep_params, keep_channels: the target, exactly one of them: the fraction of MACs,
            parameters, or prunable channels (units of the groups at the start) KEPT, in ``(0, 1]``.
        loss_fn, batches: data for scoring; each step takes the next ``batches_per_step`` batches (a new
            pass over ``batches`` starts when one ends, so a shuffling DataLoader gives fresh batches).
        steps, schedule: the number of pruning steps and the per-step targets (``"exponential"`` or
            ``"linear"``, :class:`oba.target.PruningTarget`); the model is re-scored before every step.
        step_targets: explicit per-step targets (decreasing, the last one the target), instead of
            ``steps``/``schedule``; e.g. ``[0.8, 0.6, 0.4]`` to stop (and evaluate, via ``on_step``) at each.
        reference: measure ``keep_flops``/``keep_params`` against this model (e.g. the dense model when
            ``model`` was pruned before, in iterative pruning) instead of ``model`` as given.
        score_mode: the rule: scores are computed in the mode the model is in (``None``, the default: call
            ``model.eval()`` or ``model.train()`` first to choose), unless a mode is named: ``"train"`` (batch
            statistics in BatchNorm, the published OBA code's protocol; running statistics are never updated) or
            ``"eval"`` (running statistics). The model's modes are restored afterwards. A criterion that cannot
            run in that mode fails before anything changes, naming the argument to change (``obd_fisher``'s
            per-sample Fisher in train mode: ``score_mode="eval"`` or ``fisher="per_batch"``).
        global_ranking: rank units across all groups (True) or prune each group by the same fraction.
        max_channel_sparsity: no layer loses more than this fraction of its initial channels (or heads).
        ignored_layers: layers whose output channels stay, as modules or names in ``model.named_modules()``
            (default :func:`oba.prunable.default_ignored_layers`). Groups Torch-Pruning cannot prune through (a
            channel slice or split fixed in the model's code, a reshape of another dimension it mis-traces, an
            operation it cannot map channels through, such as ShuffleNet's channel shuffle) are kept whole as well,
            named in a ``UserWarning`` (:mod:`oba.depgraph`). Grouped-query attention
            (:class:`oba.prunable.GroupedQueryAttention`) loses whole key/value heads with their query groups unless
            its ``q_proj``, ``k_proj`` or ``v_proj`` is listed (and only with a criterion's importance, a
            :class:`oba.group_importance.ParameterScoreImportance`: with a Torch-Pruning ``Importance`` it stays).
        round_to: keep channel counts multiples of this.
        num_heads: ``{q/k/v projection: heads}`` of attention layers whose whole heads are pruned (default:
            those of :class:`oba.models.vit.Attention` modules, found automatically).
        on_step: called as ``on_step(model, record)`` after each step (e.g. to save a checkpoint).

    Returns:
        ``(model, history)``: the history has one record per step (and a step-0 record of the dense model):
        ``step``, ``target``, ``macs``, ``params``, ``flops_kept``, ``params_kept``, ``channels_kept``,
        ``removed`` (channels in this step), ``widths`` ({layer: width}), ``heads`` ({layer: heads}),
        ``score_seconds``, ``prune_seconds``.

    Either it succeeds, or the caller's model is left exactly as it was: arguments and the model are checked
    before anything changes (``torch.nn.utils.prune`` masks, ``nn.GRU``/``nn.RNN``, batches unlike
    ``example_inputs``), and on any exception during the run (``TargetNotReachedError`` and ``KeyboardInterrupt``
    included) every module gets back its attributes and its original parameter and buffer objects with their
    values, as taken at the start. The snapshot copies the tensors' values only for a scorer that may write into
    them (your own function or Torch-Pruning importance); the registered criteria never do (tested).

    Raises:
        ValueError, TypeError: no target, several targets, or a target outside ``(0, 1]``; bad options; a masked
            model, a GRU; batches that do not match ``example_inputs``; NaN/inf in a group's importance.
        oba.importance.NonFiniteScoreError: a scoring batch gave NaN/inf scores (named, with the parameter).
        TargetNotReachedError: everything left is capped or ignored before the target was met.
        UnsupportedModelError: Torch-Pruning cannot trace the model's channel dependencies (its trace of the
            forward fails; the error names the module that was running).
    """
    target = PruningTarget.from_arguments(
        keep_flops, keep_params, keep_channels, steps=steps, schedule=schedule, step_targets=step_targets
    )
    check_whole_number("batches_per_step", batches_per_step)
    scorer = as_scorer(importance, loss_fn)
    _check_options(target, reference, score_mode, max_channel_sparsity, scorer, batches)
    _check_model(model)
    if reference is None and getattr(scorer, "preparation", None) is None:
        # Torch-Pruning's tracing pass checks example_inputs and counts the dense model's MACs (_context)
        check_example_type(example_inputs)
        dense_macs = None
    else:  # counted (the model as given, before a criterion rewrites it) or checked here
        count = None if reference is not None else lambda: macs_by_module(model, example_inputs, in_place=True)
        dense_macs = check_example_inputs(model, example_inputs, count)
    ignored_layers = _resolve_layers(model, ignored_layers)
    with _restored_on_failure(model, scorer.writes_tensors), modes_restored(model):  # tracing switches to eval
        return _run(
            model, example_inputs, scorer, target, batches, batches_per_step, reference, score_mode, global_ranking,
            max_channel_sparsity, ignored_layers, round_to, num_heads, root_module_types, progress, on_step,
            dense_macs,
        )  # fmt: skip


def _run(
    model, example_inputs, scorer, target, batches, batches_per_step, reference, score_mode, global_ranking,
    max_channel_sparsity, ignored_layers, round_to, num_heads, root_module_types, progress, on_step, dense_macs,
) -> tuple[nn.Module, list[dict[str, Any]]]:  # fmt: skip
    """:func:`prune_structured` after its arguments are checked (same arguments; ``dense_macs``: the model's
    per-module MACs, counted with the check before a criterion's preparation, or ``None``: when ``reference`` sets
    the targets, or when the tracing pass counts them)."""
    given = {m: m.training for m in model.modules()}  # the modes scoring uses when score_mode is None
    traced = dense_macs is None and reference is None  # no preparation: the model is counted as it is traced
    if not traced:
        dense, dense_macs = _dense_cost(model, reference, example_inputs, dense_macs)  # before any preparation
    prepared = scorer.prepare(model, ignored_layers)  # in place; the layers the criterion ignores, if it says
    ignored = list(default_ignored_layers(model) if prepared is None else prepared)
    ctx, counted = _context(
        model, example_inputs, ignored, root_module_types, num_heads, max_channel_sparsity, global_ranking
    )
    if traced:
        dense, dense_macs = _dense_cost(model, None, example_inputs, counted)
    total_channels = sum(ctx.initial_width.values())
    ctx.kind = target.kind
    ctx.dense_total = {"flops": dense.macs, "params": dense.params, "channels": total_channels}[target.kind]
    measure = _Measure(model, example_inputs, ctx, dense, total_channels)
    if traced:
        measure.seed(dense_macs)  # the model as counted: no second count for the step-0 record
    stream = _BatchStream(batches)
    history: list[dict[str, Any]] = [{"step": 0, "target": 1.0, "removed": 0, **measure.record()}]
    targets = target.step_targets()
    for step, step_target in enumerate(tqdm(targets, desc="prune steps", disable=not progress), start=1):
        start = time.perf_counter()
        step_batches = stream.take(batches_per_step) if scorer.needs_data else []
        _check_batches(step_batches, example_inputs, step)
        imp = _score(scorer, model, step_batches, score_mode, given)
        scored = time.perf_counter()
        macs = measure.macs() if target.kind == "flops" else {}
        removed = prune_step(ctx, imp, step_target, measure.kept, round_to, macs)
        record = {"step": step, "target": step_target, "removed": removed, **measure.record()}
        # scoring an importance did once shown the groups (oba.block_taylor), inside prune_step's time
        late = getattr(imp, "scoring_seconds", 0.0)
        record.update(score_seconds=scored - start + late, prune_seconds=time.perf_counter() - scored - late)
        history.append(record)
        if on_step is not None:
            on_step(model, record)
        if record[f"{target.kind}_kept"] > step_target + 1e-9:
            raise _not_reached(target, step, step_target, record, max_channel_sparsity, round_to, history)
    return model, history


def _dense_cost(
    model: nn.Module, reference: nn.Module | None, example_inputs: Any, counted: dict[str, int] | None
) -> tuple[FlopCount, dict[str, int]]:
    """MACs and parameters the targets are fractions of: ``reference``'s (counted on a copy), else the model's own
    (``counted``: the per-module MACs of running it once); and the per-module MACs of that count."""
    measured = model if reference is None else reference
    macs = counted if reference is None else macs_by_module(reference, example_inputs)
    return FlopCount(macs=macs[""], flops=2 * macs[""], params=count_params(measured)), macs


def _context(
    model: nn.Module,
    example_inputs: Any,
    ignored: list[nn.Module],
    root_module_types: Sequence[type],
    num_heads: Mapping[nn.Module, int] | None,
    max_channel_sparsity: float,
    global_ranking: bool,
) -> tuple[StepContext, dict[str, int]]:
    """The dependency graph of ``model`` and what stays fixed over the run (``kind`` and ``dense_total`` are set
    by the caller, which knows the target and the total of prunable channels found here), and the model's MACs per
    module, counted in the tracing pass (:func:`oba.flops.counted_forward`)."""
    root_types = _with_conv1d(tuple(root_module_types))
    counted: dict[str, int] = {}

    def forward(m: nn.Module, inputs: Any) -> Any:  # Torch-Pruning's one pass of the model, counted
        out, macs = counted_forward(m, inputs)
        counted.update(macs)
        return out

    found = attention_heads(model)
    try:
        params, layers = per_head_tensors(model, found)  # pruned with the heads by oba, not coupled by Torch-Pruning
        dg, unmapped = build_graph(  # operations it cannot map channels through: kept whole by prunable_groups
            model, example_inputs, forward_fn=forward, ignored_layers=layers, ignored_params=params, verbose=False,
            customized_pruners=customized_pruners(),  # Hugging Face Conv1D (GPT-2): oba.hf_layers
        )  # fmt: skip
    except Exception as err:  # Torch-Pruning's tracing of the channel dependencies
        check_example_inputs(model, example_inputs)  # a BadBatchError if the model fails on the inputs themselves
        raise _untraceable(model, err) from err
    names = {m: n for n, m in model.named_modules()}
    # grouped-query attention: coupled by hand, outside Torch-Pruning's groups (oba.prunable.GroupedQueryAttention);
    # one whose q, k or v is ignored stays whole
    gqa, given = grouped_query_attention(model), set(ignored)
    ignored = [*ignored, *(p for a in gqa for p in (a.q, a.k, a.v, a.o) if p not in given)]
    gqa = [a for a in gqa if not {a.q, a.k, a.v} & given]
    splits = [a.projections[0] for a in found if a.split_by_width]  # GPT-2's c_attn
    unprunable, groups = prunable_groups(dg, ignored, root_types, names, splits, unmapped)  # slices, splits...
    initial_width = {root: len(group[0].idxs) for root, group in groups.items()}
    ignored = [*ignored, *unprunable]
    initial_width.update({a.k: a.k.out_features for a in gqa})
    if sum(initial_width.values()) == 0:
        raise ValueError("no prunable group: every layer is ignored or unsupported")
    heads = dict(default_num_heads(model) if num_heads is None else num_heads)
    layouts = {p: a for a in found for p in a.projections}
    ctx = StepContext(
        dg, names, ignored, root_types, initial_width, heads, max_channel_sparsity, global_ranking, "flops", 0.0,
        head_parts={p: a.parts for p, a in layouts.items() if p in heads},
        head_sync={p: a.sync for p, a in layouts.items() if p in heads},
        head_drop={p: a.drop_heads_at for p, a in layouts.items() if p in heads and a.per_head}, gqa=gqa,
        traced_groups=list(groups.values()),
    )  # fmt: skip
    return ctx, counted


def group_scores(
    model: nn.Module,
    example_inputs: Any,
    scores: Mapping[str, Tensor],
    *,
    ignored_layers: Sequence[nn.Module] = (),
    root_module_types: Sequence[type] = (nn.modules.conv._ConvNd, nn.Linear),
    **importance_kwargs: Any,
) -> dict[str, Tensor]:
    """Channel scores of every group :func:`prune_structured` would rank, keyed by the root module's name (analysis).

    The groups are the pruner's: traced by :func:`oba.depgraph.build_graph` (around operations Torch-Pruning cannot
    map channels through) and filtered by :func:`oba.depgraph.prunable_groups` (the layers such operations couple
    stay whole and are left out, with a ``UserWarning``; so are grouped-query attention projections, which oba
    couples by hand). Each group is scored from the per-parameter ``scores`` (``{name: tensor shaped like the
    parameter}``) by :class:`~oba.group_importance.ParameterScoreImportance` (``importance_kwargs``:
    ``group_reduction``, ``absolute`` and ``normalizer`` -- default ``None`` here: raw sums for analysis, not the
    pruning default); groups without a scored parameter are left out. Nothing of ``model`` changes.

    Returns:
        ``{root module name: Tensor[out channels of the root]}``.
    """
    with modes_restored(model):  # Torch-Pruning switches the model to eval for its trace
        ctx, _ = _context(model, example_inputs, list(ignored_layers), root_module_types, None, 1.0, True)
    importance = ParameterScoreImportance(model, scores, **{"normalizer": None, **importance_kwargs})
    result: dict[str, Tensor] = {}
    for group in ctx.traced_groups:
        imp = importance(group)
        if imp is not None:
            result[ctx.names[group[0].dep.target.module]] = imp
    return result


def _with_conv1d(root_types: tuple[type, ...]) -> tuple[type, ...]:
    """``root_types`` plus Hugging Face's ``Conv1D`` (a transposed linear layer) when ``nn.Linear`` roots groups."""
    kind = conv1d_type()
    if kind is None or nn.Linear not in root_types or kind in root_types:
        return root_types
    return (*root_types, kind)


class UnsupportedModelError(ValueError):
    """Torch-Pruning cannot trace which channels of the model are coupled: structured pruning cannot start."""


def _untraceable(model: nn.Module, err: Exception) -> UnsupportedModelError:
    """The error for a model whose channel dependencies Torch-Pruning cannot trace: it names the function that
    raised ``err`` and the innermost module of ``model`` that was running then (none: outside its submodules)."""
    tb = traceback.extract_tb(err.__traceback__)
    where = tb[-1].name if tb else "?"
    names = {m: n for n, m in model.named_modules()}
    owners = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(err.__traceback__)]
    inner = [m for m in owners if isinstance(m, nn.Module) and names.get(m)]
    running = f" while running {names[inner[-1]]!r} ({type(inner[-1]).__name__})" if inner else ""
    return UnsupportedModelError(
        f"Torch-Pruning could not trace the channel dependencies of {type(model).__name__}: {type(err).__name__} "
        f"in its {where}{running}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}. Structured "
        "pruning of this model is not supported; nothing was changed. Unstructured pruning "
        "(oba.unstructured.prune_unstructured) works on any model."
    )


def _not_reached(
    target: PruningTarget,
    step: int,
    step_target: float,
    record: Mapping[str, Any],
    max_sparsity: float,
    round_to: int | None,
    history: list[dict[str, Any]],
) -> TargetNotReachedError:
    reached = record[f"{target.kind}_kept"]
    rounding = f", kept by round_to={round_to}" if round_to else ""
    return TargetNotReachedError(
        f"could not prune to keep_{target.kind}={step_target:.4f} at step {step}/{len(target.step_targets())}: "
        f"reached {reached:.4f} of the dense model's {target.kind} and every remaining channel is capped by "
        f"max_channel_sparsity={max_sparsity}{rounding} or in an ignored layer. Lower the target, raise "
        f"max_channel_sparsity{', lower round_to' if round_to else ''}, or ignore fewer layers.",
        reached,
        history,
    )
