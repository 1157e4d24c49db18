r"""The registry of importance criteria: one record per criterion, read by every route that scores.

A :class:`Criterion` says what a criterion is (``name``, ``summary``), what it needs (:data:`NEEDS`), which
options it takes, and how each route computes it:

* **parameter scores** -- :func:`score` (``oba.score``): one tensor per parameter, the mean over batches of a
  per-batch formula of :mod:`oba.importance` (``per_batch``), or a data-free one (``data_free``);
* **structured** -- :func:`make_scorer` / :func:`oba.prune_structured`: a Torch-Pruning importance of the
  current model's groups (``structured``), and, for criteria that rewrite the model first (EigenDamage), a
  :class:`Preparation` the pruner runs before the first step;
* **unstructured** -- :func:`oba.unstructured.prune_unstructured`: a score per single weight (``weights``);
* the experiment runners (:mod:`oba.experiments`) take the same names.

==================  ==================================================  ========================================
name                what                                                routes
==================  ==================================================  ========================================
``magnitude``       :math:`|\theta|^p`                                    parameter, structured, unstructured
``taylor``          :math:`\theta \odot g`                                parameter, structured, unstructured
``obd_fisher``      :math:`\theta^2 \odot \mathrm{diag}(F)`               parameter, structured, unstructured
``obd_hessian``     :math:`\theta^2 \odot \mathrm{diag}(H)`               parameter, structured, unstructured
``oba``             :math:`\delta\theta \odot H\delta\theta` (exact)      parameter, structured, unstructured
``oba_two_term``    ``oba`` with the series + parallel terms of H only     parameter, structured
                    (the published code's criterion)
``oba_published``   the published code's single-weight score,             unstructured
                    :math:`|s|/\max|s| + |\theta|` per layer
``woodfisher``      :math:`\theta_q^2 / (2[F_\lambda^{-1}]_{qq})`         unstructured
``kron_obd``        K-FAC diagonal cost of a channel                      structured
``kron_obs``        K-FAC OBS cost of a channel (compensated)             structured
``eigendamage``     OBD in the K-FAC eigenbasis of reparametrised layers  structured
``block_taylor``    the loss change of removing one unit (or weight)      parameter, structured, unstructured
                    alone: :math:`g^\top\delta_u + \frac12\delta_u^\top H_{uu}\delta_u`
                    (:mod:`oba.block_taylor`)
==================  ==================================================  ========================================

Adding a criterion is one record in :data:`REGISTRY` (plus, for a new formula, its function in
:mod:`oba.importance`, :mod:`oba.kfac` or a module of its own).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch
import torch_pruning as tp
from torch import Tensor, nn

from oba import importance
from oba.block_taylor import BlockTaylorImportance, weight_values
from oba.curvature import Batch, LossFn, Params, flatten_params, unflatten_params
from oba.eigendamage import EigenbasisPreparation, eigendamage_importance
from oba.empirical_fisher import woodfisher_scores
from oba.group_importance import DEFAULT_NORMALIZER, Normalizer, ParameterScoreImportance
from oba.kfac import KronImportance, kfac_factors
from oba.masks import current_weights, fisher_blocks, weight_name

__all__ = [
    "NEEDS",
    "REGISTRY",
    "Criterion",
    "CriterionScorer",
    "Preparation",
    "Scorer",
    "as_scorer",
    "get",
    "make_scorer",
    "names",
    "score",
    "score_sums",
]

NEEDS = ("data", "per_sample_gradients", "kfac_factors", "reparametrisation")
"""What a criterion may need: data (``loss_fn`` and batches), per-sample gradients (no train-mode BatchNorm),
K-FAC factors of conv/linear layers, a reparametrised model (a :class:`Preparation`)."""

Importance = Callable[[Any], Tensor | None]
"""A Torch-Pruning importance: ``importance(group) -> Tensor[K] | None``."""


class Preparation(Protocol):
    """A criterion's rewrite of the model before structured pruning (EigenDamage's eigenbasis), as a plug-in of
    the pruner: it prepares the model, names the layers it rewrote (saved with a pruned model, rebuilt on load)
    and reports widths under the original layer names."""

    name: str

    def prepare(
        self, model: nn.Module, ignored_layers: Sequence[nn.Module] | None, **options: Any
    ) -> list[nn.Module]: ...

    def prepared_layers(self, model: nn.Module) -> list[str]: ...

    def restore(self, model: nn.Module, names: Sequence[str]) -> None: ...

    def split_widths(self, model: nn.Module, widths: Mapping[str, int]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Criterion:
    """One registered criterion (module docstring). Routes it does not support are ``None``.

    Attributes:
        per_batch: one batch's per-parameter scores (:data:`oba.importance.PerBatchScore`); ``setup`` runs once
            before the first batch.
        data_free: per-parameter scores without data, ``data_free(model, params, **options)``.
        fixed: options always passed to the formula (a named variant: ``oba_two_term`` is ``oba`` with
            ``terms=("series", "parallel")``).
        structured: ``structured(scorer, model, batches) -> importance`` for the pruner.
        weights: ``weights(model, layers, loss_fn, batches, max_batches, progress, options) -> {name.weight: score}``
            for unstructured pruning (``layers``: ``{name: module}``).
        preparation: rewrites the model before structured pruning (:class:`Preparation`).
        preparation_options: the options that go to ``preparation.prepare`` rather than to ``structured``.
    """

    name: str
    summary: str
    needs: frozenset[str] = frozenset({"data"})
    options: frozenset[str] = frozenset()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    per_batch: importance.PerBatchScore | None = None
    setup: Callable[..., dict[str, Any]] | None = None
    data_free: Callable[..., Params] | None = None
    structured: Callable[[CriterionScorer, nn.Module, Sequence[Batch]], Importance] | None = None
    weights: Callable[..., OrderedDict[str, Tensor]] | None = None
    preparation: Preparation | None = None
    preparation_options: frozenset[str] = frozenset()

    @property
    def needs_data(self) -> bool:
        return "data" in self.needs

    def check_options(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - self.options
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise TypeError(f"criterion {self.name!r} takes no option(s) {sorted(unknown)}; its options: {allowed}")


# ------------------------------------------------------------------------------------------ the routes
def _parameter_importance(s: CriterionScorer, model: nn.Module, batches: Sequence[Batch]) -> Importance:
    """Per-parameter scores summed over each group's coupled channels (:mod:`oba.group_importance`)."""
    scores = s.score_fn(model, s.loss_fn, batches, s.criterion.name, progress=s.progress, **s.options)
    return ParameterScoreImportance(model, scores, group_reduction=s.group_reduction, normalizer=s.normalizer)


def _kron_importance(kind: str) -> Callable[[CriterionScorer, nn.Module, Sequence[Batch]], Importance]:
    def structured(s: CriterionScorer, model: nn.Module, batches: Sequence[Batch]) -> Importance:
        factors = s.factor_fn(model, s.loss_fn, batches, sampled=s.options.get("sampled", False), progress=s.progress)
        return KronImportance(
            model, factors, kind, damping=s.options.get("damping", 1e-3), group_reduction=s.group_reduction,
            normalizer=s.normalizer,
        )  # fmt: skip

    return structured


def _block_taylor(s: CriterionScorer, model: nn.Module, batches: Sequence[Batch]) -> Importance:
    """Loss changes on one scale, signed: ranked raw (the scorer's normaliser and group reduction do not apply)."""
    return BlockTaylorImportance(model, s.loss_fn, batches, progress=s.progress, **s.options)


def _eigendamage(s: CriterionScorer, model: nn.Module, batches: Sequence[Batch]) -> Importance:
    return eigendamage_importance(
        model, s.loss_fn, batches, **s.options, normalizer=s.normalizer, group_reduction=s.group_reduction,
        progress=s.progress, factor_fn=s.factor_fn,
    )  # fmt: skip


def _parameter_weights(
    c: Criterion, model: nn.Module, layers: Mapping[str, nn.Module], loss_fn, batches, max_batches, progress, options
) -> OrderedDict[str, Tensor]:
    """:math:`|s|` of each chosen layer's weight (``weight_orig`` once masked), keyed ``<module>.weight``."""
    params = [f"{n}.{weight_name(m)}" for n, m in layers.items()]
    s = score(
        model, loss_fn, batches, c.name, params=params, max_batches=max_batches, absolute=True, progress=progress,
        **options,
    )  # fmt: skip
    return OrderedDict(zip([f"{n}.weight" for n in layers], s.values(), strict=True))


def _signed_weights(
    c: Criterion, model: nn.Module, layers: Mapping[str, nn.Module], loss_fn, batches, max_batches, progress, options
) -> OrderedDict[str, Tensor]:
    """The signed per-weight scores (a predicted loss change: the lowest, possibly negative, go first)."""
    params = [f"{n}.{weight_name(m)}" for n, m in layers.items()]
    s = score(model, loss_fn, batches, c.name, params=params, max_batches=max_batches, progress=progress, **options)
    return OrderedDict(zip([f"{n}.weight" for n in layers], s.values(), strict=True))


def _published_weights(
    c: Criterion, model: nn.Module, layers: Mapping[str, nn.Module], loss_fn, batches, max_batches, progress, options
) -> OrderedDict[str, Tensor]:
    """The published code's score, :math:`|s|/\\max|s| + |\\theta|` per layer, :math:`s` the two-term OBA score."""
    options = {"terms": ("series", "parallel"), **options}
    s = _parameter_weights(REGISTRY["oba"], model, layers, loss_fn, batches, max_batches, progress, options)
    theta = current_weights(model, layers)
    return OrderedDict((o, v / v.max().clamp_min(torch.finfo(v.dtype).tiny) + theta[o].abs()) for o, v in s.items())


def _woodfisher_weights(
    c: Criterion, model: nn.Module, layers: Mapping[str, nn.Module], loss_fn, batches, max_batches, progress, options
) -> OrderedDict[str, Tensor]:
    r"""WoodFisher's :math:`\theta_q^2 / (2[F_\lambda^{-1}]_{qq})` from the empirical Fisher blocks."""
    fishers, blocks, _ = fisher_blocks(model, loss_fn, batches, layers=list(layers), progress=progress, **options)
    theta = flatten_params(current_weights(model, layers))
    flat = torch.cat([woodfisher_scores(f, theta[b.slice]) for f, b in zip(fishers, blocks, strict=True)])
    return unflatten_params(flat.to(theta.dtype), current_weights(model, layers))


# ------------------------------------------------------------------------------------------ the registry
_OBA_OPTIONS = frozenset({"delta", "first_order", "terms", "hvp_method"})
_SCORED = {"structured": _parameter_importance, "weights": _parameter_weights}  # both routes of oba.score's criteria

REGISTRY: Mapping[str, Criterion] = MappingProxyType(
    {
        c.name: c
        for c in (
            Criterion(
                "magnitude", "|theta|^p (p = 1 or 2); no data", frozenset(), frozenset({"p"}),
                data_free=importance.magnitude, **_SCORED,
            ),
            Criterion("taylor", "theta * g (first order)", per_batch=importance.taylor, **_SCORED),
            Criterion(
                "obd_fisher", "theta^2 * diag(empirical Fisher)", frozenset({"data", "per_sample_gradients"}),
                frozenset({"fisher", "chunk_size"}), per_batch=importance.obd_fisher, **_SCORED,
            ),
            Criterion(
                "obd_hessian", "theta^2 * diag(H), exact or Hutchinson", options=frozenset(
                    {"method", "samples", "max_exact", "seed"}
                ), per_batch=importance.obd_hessian, **_SCORED,
            ),
            Criterion(
                "oba", "delta * (H delta), delta = -theta: exact OBA, one HVP per batch", options=_OBA_OPTIONS,
                per_batch=importance.oba, setup=importance.oba_setup, **_SCORED,
            ),
            Criterion(
                "oba_two_term", "OBA with the series + parallel terms of the decomposition (the published code)",
                options=_OBA_OPTIONS - {"terms"}, fixed=MappingProxyType({"terms": ("series", "parallel")}),
                per_batch=importance.oba, setup=importance.oba_setup, structured=_parameter_importance,
            ),
            Criterion(
                "oba_published", "|s| / max|s| + |theta| per layer, s the two-term OBA score (published code)",
                options=_OBA_OPTIONS, weights=_published_weights,
            ),
            Criterion(
                "woodfisher", "theta_q^2 / (2 [F^-1]_qq), the empirical Fisher through Woodbury",
                frozenset({"data", "per_sample_gradients"}), frozenset({"num_grads", "damp", "blocks", "grad_mode"}),
                weights=_woodfisher_weights,
            ),
            Criterion(
                "kron_obd", "K-FAC diagonal cost of a channel", frozenset({"data", "kfac_factors"}),
                frozenset({"damping", "sampled"}), structured=_kron_importance("obd"),
            ),
            Criterion(
                "kron_obs", "K-FAC OBS cost of a channel, compensated inside the layer",
                frozenset({"data", "kfac_factors"}), frozenset({"damping", "sampled"}),
                structured=_kron_importance("obs"),
            ),
            Criterion(
                "eigendamage", "OBD in the K-FAC eigenbasis of reparametrised layers (true Fisher by default)",
                frozenset({"data", "kfac_factors", "reparametrisation"}),
                frozenset({"sampled", "damping", "seed", "layers"}), structured=_eigendamage,
                preparation=EigenbasisPreparation(), preparation_options=frozenset({"layers"}),
            ),
            Criterion(
                "block_taylor", "g.delta_u + 1/2 delta_u^T H_uu delta_u: the loss change of removing unit u alone "
                "(exact, or K sign probes per batch)", options=frozenset(
                    {"probes", "curvature", "first_order", "seed", "hvp_method"}
                ), per_batch=weight_values, structured=_block_taylor, weights=_signed_weights,
            ),
        )
    }
)  # fmt: skip
"""Every criterion, by name (read-only)."""

ROUTES = ("parameter", "structured", "unstructured")


def get(name: str) -> Criterion:
    """The registered criterion ``name`` (``ValueError`` naming the choices otherwise)."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names(route: str) -> tuple[str, ...]:
    """Names of the criteria with a ``route``: ``"parameter"`` (:func:`score`), ``"structured"`` or
    ``"unstructured"``."""
    has = {
        "parameter": lambda c: c.per_batch is not None or c.data_free is not None,
        "structured": lambda c: c.structured is not None,
        "unstructured": lambda c: c.weights is not None,
    }
    if route not in has:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    return tuple(n for n, c in REGISTRY.items() if has[route](c))


def _parameter_criterion(name: str, options: Mapping[str, Any]) -> Criterion:
    c = get(name)
    if c.per_batch is None and c.data_free is None:
        raise ValueError(
            f"criterion {name!r} has no per-parameter scores; oba.score takes {', '.join(names('parameter'))}"
        )
    c.check_options(options)
    return c


# ------------------------------------------------------------------------------------------ parameter scores
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
    skip_nonfinite: bool = False,
    **options: Any,
) -> Params:
    """Importance of every selected parameter under ``criterion``, averaged over ``batches`` (``oba.score``).

    Args:
        model: the network; parameters are addressed by their names in ``named_parameters()``.
        loss_fn: ``loss_fn(outputs, targets)``, the mean mini-batch loss (unused by ``magnitude``).
        batches: an iterable of ``(inputs, targets)`` (e.g. a DataLoader); moved to the model's device.
        criterion: one of ``names("parameter")`` (formulas: :mod:`oba.importance`).
        params: which parameters to score (names or parameters; default all with ``requires_grad``).
        max_batches: use at most this many batches.
        absolute: return ``|s|`` per parameter instead of the signed score.
        progress: a tqdm progress bar over the batches.
        skip_nonfinite: leave out batches whose scores are NaN/inf (with a warning) instead of raising
            :class:`oba.importance.NonFiniteScoreError` (which names the batch and the first affected parameter).
        options: per criterion -- ``magnitude``: ``p`` (1 or 2, default 1); ``obd_fisher``: ``fisher``
            (``"per_sample"`` default, or ``"per_batch"``), ``chunk_size``; ``obd_hessian``: ``method``
            (``"auto"``, ``"exact"``, ``"hutchinson"``), ``samples`` (probes per batch, default 16),
            ``max_exact``, ``seed``; ``oba``: ``delta`` (a dict shaped like the parameters, the change
            removal makes; default ``-θ``), ``first_order`` (default False), ``terms`` (a subset of
            :data:`oba.decompose.TERMS`: replace H by those terms of its decomposition;
            ``("series", "parallel")`` is the published OBA code's criterion, ``oba_two_term``; default all four,
            exactly H), ``hvp_method`` (``"rev_rev"``, default: double backward, the faster on CPU; or
            ``"fwd_rev"``, see :func:`oba.curvature.hvp`); ``oba_two_term``: those of ``oba`` but ``terms``.

    Returns:
        dict name -> tensor shaped like the parameter (detached, the parameter's dtype and device).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    c = _parameter_criterion(criterion, options)
    if c.data_free is not None:
        return c.data_free(model, params, **options)
    totals, count = score_sums(
        model, loss_fn, batches, criterion, params=params, max_batches=max_batches, progress=progress,
        skip_nonfinite=skip_nonfinite, **options,
    )  # fmt: skip
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
    skip_nonfinite: bool = False,
    **options: Any,
) -> tuple[Params, int]:
    r"""The sum over ``batches`` of the per-batch scores of a data-dependent criterion, and the number of batches.

    :func:`score` is ``sums / count`` (then ``|.|`` with ``absolute=True``); the sums add up over disjoint shards
    of the batches (:func:`oba.importance.accumulate`), which :mod:`oba.distributed` all-reduces. Empty
    ``batches`` give zeros and a count of 0 (no error). Arguments as for :func:`score`; ``magnitude`` needs no
    data and has no sums.
    """
    c = _parameter_criterion(criterion, options)
    if c.per_batch is None:
        raise ValueError(f"{criterion} needs no data and has no per-batch sums: use score(..., {criterion!r})")
    if batches is None or loss_fn is None:
        raise ValueError(f"criterion {criterion!r} needs data: pass loss_fn and batches (an iterable of (x, y))")
    return importance.accumulate(
        model, loss_fn, batches, c.per_batch, params=params, max_batches=max_batches, progress=progress,
        desc=f"score [{criterion}]", setup=c.setup, skip_nonfinite=skip_nonfinite, **options, **c.fixed,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ structured scorers
class Scorer:
    """``scorer(model, batches) -> importance``: a Torch-Pruning importance of the *current* model, what
    :func:`oba.prune_structured` calls before every step. ``needs_data`` says whether it scores on batches;
    :meth:`prepare` runs once before the first step (a no-op but for criteria with a :class:`Preparation`).
    ``writes_tensors`` says whether scoring (or the preparation) may write into the model's parameters or buffers in
    place: ``True`` unless known otherwise, and then :func:`oba.prune_structured`'s failure snapshot copies their
    values first."""

    needs_data: bool = True
    preparation: Preparation | None = None
    writes_tensors: bool = True

    def __call__(self, model: nn.Module, batches: Sequence[Batch]) -> Importance:
        raise NotImplementedError

    def prepare(self, model: nn.Module, ignored_layers: Sequence[nn.Module] | None) -> Sequence[nn.Module] | None:
        """Rewrite ``model`` for this criterion (in place); returns the layers the pruner must ignore (``None``: the
        pruner's defaults, :func:`oba.prunable.default_ignored_layers`)."""
        return ignored_layers


class CriterionScorer(Scorer):
    """A registered criterion as a :class:`Scorer` (:func:`make_scorer` builds it; arguments there)."""

    def __init__(
        self,
        criterion: str,
        loss_fn: LossFn | None = None,
        *,
        normalizer: Normalizer = DEFAULT_NORMALIZER,
        group_reduction: str = "sum",
        progress: bool = False,
        score_fn: Callable[..., Params] | None = None,
        factor_fn: Callable[..., Any] = kfac_factors,
        **options: Any,
    ) -> None:
        self.criterion = get(criterion)
        if self.criterion.structured is None:
            raise ValueError(
                f"criterion {criterion!r} has no structured route; choose one of {', '.join(names('structured'))}"
            )
        self.criterion.check_options(options)
        if self.criterion.needs_data and loss_fn is None:
            raise ValueError(f"criterion {criterion!r} needs a loss_fn")
        self.needs_data = self.criterion.needs_data
        self.preparation = self.criterion.preparation
        # the registered scores read the model only (tests/test_prune.py checks every tensor's version counter)
        self.writes_tensors = score_fn is not None or self.preparation is not None
        self.loss_fn, self.progress = loss_fn, progress
        self.normalizer, self.group_reduction = normalizer, group_reduction
        self.score_fn = score if score_fn is None else score_fn
        self.factor_fn = factor_fn
        prep = self.criterion.preparation_options
        self.options = {k: v for k, v in options.items() if k not in prep}
        self.preparation_options = {k: v for k, v in options.items() if k in prep}

    def __call__(self, model: nn.Module, batches: Sequence[Batch]) -> Importance:
        return self.criterion.structured(self, model, batches)

    def prepare(self, model: nn.Module, ignored_layers: Sequence[nn.Module] | None) -> Sequence[nn.Module] | None:
        if self.preparation is None:
            return ignored_layers
        return self.preparation.prepare(model, ignored_layers, **self.preparation_options)


def make_scorer(criterion: str, loss_fn: LossFn | None = None, **kwargs: Any) -> CriterionScorer:
    """A :class:`Scorer` for a registered criterion with a structured route (``names("structured")``).

    Args:
        criterion: the criterion's name.
        loss_fn: the mean batch loss (not needed by ``magnitude``).
        normalizer, group_reduction: how channel scores are formed (default ``"mean"``, ``"sum"``;
            :class:`oba.group_importance.ParameterScoreImportance`).
        progress: progress bars while scoring.
        options: the criterion's options: those of :func:`score` (e.g. ``fisher="per_batch"``), for the K-FAC
            criteria ``damping`` (default 1e-3) and ``sampled`` (labels sampled from the model, default False);
            for ``"eigendamage"`` ``sampled`` (default True), ``damping`` (default 0), ``seed`` and ``layers`` (the
            layers to reparametrise, default every conv/linear layer but the classifier).
        score_fn, factor_fn: compute the per-parameter scores and the K-FAC factors, called as :func:`score` and
            :func:`oba.kfac.kfac_factors` (the defaults); :func:`oba.distributed.distributed_scorer` passes
            their all-reducing versions.
    """
    return CriterionScorer(criterion, loss_fn, **kwargs)


class _FixedScorer(Scorer):
    """A fixed, data-free Torch-Pruning importance (e.g. its magnitude importance) as a :class:`Scorer`."""

    needs_data = False

    def __init__(self, imp: tp.importance.Importance) -> None:
        self.imp = imp

    def __call__(self, model: nn.Module, batches: Sequence[Batch]) -> Importance:
        return self.imp


class _FunctionScorer(Scorer):
    """A user's ``scorer(model, batches) -> importance`` function as a :class:`Scorer` (scores on data)."""

    def __init__(self, fn: Callable[[nn.Module, Sequence[Batch]], Importance]) -> None:
        self.fn = fn

    def __call__(self, model: nn.Module, batches: Sequence[Batch]) -> Importance:
        return self.fn(model, batches)


def as_scorer(importance: str | Scorer | Callable[..., Any], loss_fn: LossFn | None = None) -> Scorer:
    """A :class:`Scorer` from a criterion name (with ``loss_fn``), a :class:`Scorer`, a fixed Torch-Pruning
    ``Importance`` (data-free) or a function ``scorer(model, batches) -> importance`` (scored on data)."""
    if isinstance(importance, str):
        return make_scorer(importance, loss_fn)
    if isinstance(importance, Scorer):
        return importance
    if isinstance(importance, tp.importance.Importance):
        return _FixedScorer(importance)
    if callable(importance):
        return _FunctionScorer(importance)
    raise TypeError(
        "importance must be a criterion name, a Torch-Pruning Importance, or a scorer(model, batches) -> "
        f"importance; got {type(importance).__name__}"
    )
