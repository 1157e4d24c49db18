r"""The loss change of removing one structured unit alone, to second order, with the unit's own Hessian block.

A unit :math:`u` -- a root channel of a dependency group with every parameter entry the group removes with it --
owns the entries :math:`P(u)`, with 0/1 indicator :math:`m_u`
(:meth:`oba.group_importance.ParameterScoreImportance.spread` gives it from the same rule the other criteria's channel
scores use). Removing :math:`u` alone moves the
parameters by :math:`\delta_u = -\theta \odot m_u` and the mean batch loss by

.. math::

    \Delta\hat L_u = g^\top \delta_u + \tfrac12\, \delta_u^\top H \delta_u
                   = g_u^\top \delta_u + \tfrac12\, \delta_u^\top H_{uu}\, \delta_u ,

the unit's own block :math:`H_{uu}` alone. OBA's score of the same unit, :math:`\delta_u^\top (H\delta)` with
:math:`\delta = -\theta` (every unit at once), is :math:`\sum_w \delta_u^\top H \delta_w`: the own block plus the
cross-curvature with every other unit, as if all of them left together.

* **Exact** (``probes=None``): one Hessian-vector product per unit, :math:`h = H\delta_u`, then
  :math:`\delta_u^\top h`. The reference, for small models.
* **Estimated** (``probes=K``): per batch, :math:`K` draws of one independent sign :math:`s_u \in \{\pm 1\}` per unit
  of every group, :math:`v = \sum_u s_u \delta_u` (an entry two units own, e.g. a weight's row of one group and
  column of another, gets both signs), one HVP :math:`h = Hv`, and :math:`\hat q_u = s_u\, \delta_u^\top h
  = \sum_w s_u s_w\, \delta_u^\top H \delta_w`. Since :math:`E[s_u s_w] = [u = w]`, :math:`E[\hat q_u] =
  \delta_u^\top H_{uu} \delta_u` (unbiased), with variance per draw :math:`\sum_{w \ne u} (\delta_u^\top H
  \delta_w)^2` -- the squared cross terms OBA adds up -- and that over :math:`K` for the mean of :math:`K` draws
  (``tests/test_block_taylor.py`` checks both). Cost: :math:`K` HVPs per batch, whatever the number of units.
* ``curvature="gauss_newton"``: the generalised Gauss-Newton :math:`G` in place of :math:`H`
  (:func:`oba.curvature.ggn_vp`; positive semi-definite for a convex loss, so the quadratic part is :math:`\ge 0`).

A unit of one weight is the diagonal case: :math:`g_i \delta_i + \tfrac12 H_{ii} \delta_i^2`, OBD with its
first-order term, and the estimator becomes Hutchinson's diagonal estimate: :func:`weight_values`, the criterion's
per-parameter and unstructured routes (``oba.score(..., "block_taylor")``, ranked by the signed value).

Units are the pruner's: a channel, or several channels that go together -- an attention head, the same slot of every
group of a grouped convolution, GhostNet's tied pairs -- whose channels share one sign and whose values add up to the
union's :math:`\Delta\hat L_u` (:meth:`BlockTaylorImportance.observe_groups`; the pruner ranks a unit by the mean over
its channels). Grouped-query attention, which oba couples by hand outside Torch-Pruning's groups, stays whole under
this criterion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from oba.batches import modes_restored
from oba.curvature import Batch, LossFn, Params, ggn_vp, gradient, hessian_diagonal, hvp, select_params
from oba.group_importance import ParameterScoreImportance
from oba.importance import NonFiniteScoreError

__all__ = ["CURVATURES", "BlockTaylorImportance", "block_taylor", "weight_values"]

CURVATURES = ("hessian", "gauss_newton")


def block_taylor(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    groups: Sequence[Any],
    *,
    units: Sequence[Sequence[tuple[int, ...]]] | None = None,
    probes: int | None = 4,
    curvature: str = "hessian",
    first_order: bool = True,
    seed: int = 0,
    hvp_method: str = "rev_rev",
    progress: bool = False,
) -> list[Tensor | None]:
    r""":math:`\Delta\hat L_u` (module docstring) of every unit of every group, averaged over ``batches``, as a value
    per root channel: channel :math:`c` of unit :math:`u` gets its share :math:`g^\top\delta_c +
    \frac12\delta_c^\top H\delta_u`, so the channels of a unit add up to the unit's value (a channel that is its own
    unit gets the unit's value).

    Args:
        model: the network (its parameters with ``requires_grad`` are the scored ones); not changed.
        loss_fn: the mean batch loss ``loss_fn(outputs, targets)``.
        batches: ``(inputs, targets)`` pairs.
        groups: Torch-Pruning groups of ``model`` (``dg.get_all_groups(...)``), each rooted at its channels
            ``group[0].idxs``.
        units: per group, its units as tuples of positions in ``group[0].idxs`` (heads: a head's channels); default
            every channel its own unit. The channels of a unit must not share a parameter entry.
        probes: sign draws per batch (the estimate), or ``None`` for the exact value (one HVP per unit).
        curvature: ``"hessian"`` (exact :math:`H`) or ``"gauss_newton"`` (:math:`G`).
        first_order: add :math:`g^\top\delta_u` (default); ``False`` gives :math:`\frac12 \delta_u^\top H_{uu}\delta_u`.
        seed: the signs' generator seed (draws differ between batches).
        hvp_method: as :func:`oba.curvature.hvp`.
        progress: a progress bar over the batches.

    Returns:
        One float64 ``Tensor[len(group[0].idxs)]`` per group (``None`` for a group that owns no scored parameter).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise ValueError(f"probes must be a positive int (sign draws per batch) or None (exact), got {probes!r}")
    sums = _BlockTaylor(model, loss_fn, groups, units, curvature, hvp_method)
    generator = torch.Generator().manual_seed(seed)
    for batch in tqdm(batches, desc="score [block_taylor]", disable=not progress):
        sums.add(batch, probes, generator, first_order)
    return sums.values()


class _BlockTaylor:
    """The per-channel sums of :func:`block_taylor` over batches: :meth:`add` one batch, :meth:`values` the means."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        groups: Sequence[Any],
        units: Sequence[Sequence[tuple[int, ...]]] | None,
        curvature: str,
        hvp_method: str,
    ) -> None:
        self.model, self.loss_fn, self.groups = model, loss_fn, list(groups)
        self.curvature, self.hvp_method = curvature, hvp_method
        self.theta = {n: p.detach() for n, p in select_params(model).items()}
        self.rule = ParameterScoreImportance(model, {n: torch.zeros_like(t) for n, t in self.theta.items()})
        sizes = [len(g[0].idxs) for g in self.groups]
        self.units = [[(c,) for c in range(k)] for k in sizes] if units is None else [list(u) for u in units]
        if len(self.units) != len(self.groups):
            raise ValueError(f"units: one list per group expected, got {len(self.units)} for {len(self.groups)}")
        ones = {n: torch.ones_like(t) for n, t in self.theta.items()}
        owned = [self._per_channel(g, ones) for g in self.groups]  # None: the group owns no scored parameter
        self.totals = [None if o is None else torch.zeros_like(o) for o in owned]
        self.batches = 0

    def _per_channel(self, group: Any, scores: Params) -> Tensor | None:
        """:math:`m_c^\top S` for every root channel :math:`c` (``None``: the group owns no scored parameter)."""
        self.rule.set_scores(scores)
        out = self.rule.signed(group)
        return None if out is None else out.double()

    def _delta(self, values: list[Tensor | None]) -> Params:
        r""":math:`-\theta \odot \sum_G \sum_c \text{values}_G[c]\, m_c`: the units' perturbations, weighted."""
        pairs = [(group, v) for group, v in zip(self.groups, values, strict=True) if v is not None]
        spread = self.rule.spread_many(pairs)
        return {n: -t * spread[n].to(t.dtype) if n in spread else torch.zeros_like(t) for n, t in self.theta.items()}

    def _times(self, batch: Batch, v: Params) -> Params:
        r""":math:`-\theta \odot (Cv)` with :math:`C` the curvature: a per-parameter score whose channel sums are
        :math:`\delta_c^\top C v`."""
        if self.curvature == "gauss_newton":
            h = ggn_vp(self.model, self.loss_fn, batch, v)
        else:
            h = hvp(self.model, self.loss_fn, batch, v, method=self.hvp_method)
        return {n: -t * h[n] for n, t in self.theta.items()}

    def _quadratic(self, batch: Batch, probes: int | None, generator: torch.Generator) -> list[Tensor]:
        r"""Per channel :math:`\delta_c^\top C \delta_{u(c)}`: exact (one product per unit) or its estimate."""
        quad = [torch.zeros(len(g[0].idxs), dtype=torch.float64) for g in self.groups]
        if probes is None:
            for gi, (group, units) in enumerate(zip(self.groups, self.units, strict=True)):
                if self.totals[gi] is None:
                    continue
                for unit in units:
                    values: list[Tensor | None] = [None] * len(self.groups)
                    values[gi] = torch.zeros_like(quad[gi])
                    values[gi][list(unit)] = 1.0
                    q = self._per_channel(group, self._times(batch, self._delta(values)))
                    quad[gi][list(unit)] = q[list(unit)]
            return quad
        for _ in range(probes):
            signs = [self._signs(gi, generator) for gi in range(len(self.groups))]
            r = self._times(batch, self._delta(signs))
            for gi, group in enumerate(self.groups):
                if self.totals[gi] is not None:
                    quad[gi] += signs[gi] * self._per_channel(group, r) / probes
        return quad

    def _signs(self, gi: int, generator: torch.Generator) -> Tensor:
        """One random sign per unit of group ``gi``, given to each of the unit's channels."""
        units = self.units[gi]
        draw = torch.randint(0, 2, (len(units),), generator=generator).double() * 2 - 1
        signs = torch.zeros(len(self.groups[gi][0].idxs), dtype=torch.float64)
        for s, unit in zip(draw, units, strict=True):
            signs[list(unit)] = s
        return signs

    def add(self, batch: Batch, probes: int | None, generator: torch.Generator, first_order: bool) -> None:
        quad = self._quadratic(batch, probes, generator)
        linear = None
        if first_order:
            g = gradient(self.model, self.loss_fn, batch)
            linear = {n: -t * g[n] for n, t in self.theta.items()}
        for gi, group in enumerate(self.groups):
            if self.totals[gi] is None:
                continue
            value = 0.5 * quad[gi] + (self._per_channel(group, linear) if linear is not None else 0.0)
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteScoreError(
                    f"batch {self.batches} gave a NaN/inf block-Taylor value for the group rooted at "
                    f"{type(group[0].dep.target.module).__name__}: check the data and the model for NaN/inf"
                )
            self.totals[gi] += value
        self.batches += 1

    def values(self) -> list[Tensor | None]:
        if self.batches == 0:
            raise ValueError("batches is empty: no data to score with")
        return [None if t is None else t / self.batches for t in self.totals]


class BlockTaylorImportance(tp.importance.Importance):
    r"""A Torch-Pruning importance ranking each root channel by its share of :math:`\Delta\hat L_u`
    (:func:`block_taylor`): the units whose removal alone raises the loss least go first. The values are loss changes,
    on one scale across groups, and signed (a removal can lower the loss), so no normaliser and no absolute value are
    applied.

    :func:`oba.prune_structured` shows it every group of a step and its units at once (:meth:`observe_groups`), so the
    estimate's signs are drawn jointly over all units: ``probes`` HVPs per batch in all, and a head's channels share
    one sign. Called on a group it has not seen, it scores that group alone, channel by channel (signs over its
    channels only: still unbiased). It scores with every module in the mode it had when the importance was created
    (the pruner's ``score_mode``), although that work happens when the groups are shown, and counts its time in
    :attr:`scoring_seconds`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], **options: Any) -> None:
        self.model, self.loss_fn, self.batches, self.options = model, loss_fn, list(batches), options
        self._values: dict[tuple[nn.Module, Callable], Tensor | None] = {}
        self.modes = {m: m.training for m in model.modules()}  # the pruner's score_mode, set while it is created
        self.scoring_seconds = 0.0  # spent scoring (the pruner adds it to its step's scoring time)

    def _scores(self, groups: Sequence[Any], units: Sequence[Sequence[tuple[int, ...]]] | None) -> list[Tensor | None]:
        """:func:`block_taylor` of ``groups``, every module in the mode it had when this importance was created."""
        start = time.perf_counter()
        with modes_restored(self.model):
            for m, training in self.modes.items():
                m.training = training
            values = block_taylor(self.model, self.loss_fn, self.batches, groups, units=units, **self.options)
        self.scoring_seconds += time.perf_counter() - start
        return values

    @staticmethod
    def _key(group: Any) -> tuple[nn.Module, Callable]:
        return group[0].dep.target.module, group[0].dep.handler

    def observe_groups(self, groups: Sequence[Any], units: Sequence[Sequence[tuple[int, ...]]] | None = None) -> None:
        """Score every group of the current model together (one joint draw of signs per probe)."""
        self._values = {self._key(g): v for g, v in zip(groups, self._scores(groups, units), strict=True)}

    def __call__(self, group: Any) -> Tensor | None:
        key = self._key(group)
        if key not in self._values:
            self._values[key] = self._scores([group], None)[0]
        return self._values[key]


def weight_values(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    theta: Params,
    *,
    generator: torch.Generator,
    probes: int | None = 4,
    curvature: str = "hessian",
    first_order: bool = True,
    max_exact: int = 2_000,
    **_: Any,
) -> Params:
    r"""One batch of the single-weight case (:data:`oba.importance.PerBatchScore`): per weight
    :math:`-\theta_i g_i + \tfrac12 \theta_i^2 C_{ii}`, with :math:`C_{ii}` the exact Hessian diagonal
    (``probes=None``, models of at most ``max_exact`` scored parameters) or ``probes`` Rademacher probes
    :math:`z \odot Cz` (Hutchinson; for ``curvature="gauss_newton"`` the GGN's, probes only)."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if curvature == "hessian":
        method = "exact" if probes is None else "hutchinson"
        diag = hessian_diagonal(
            model, loss_fn, batch, list(theta), method=method, samples=probes or 1, max_exact=max_exact,
            generator=generator,
        )  # fmt: skip
    elif probes is None:
        raise ValueError("block_taylor per weight with curvature='gauss_newton' estimates the diagonal: pass probes")
    else:
        diag = {n: torch.zeros_like(t) for n, t in theta.items()}
        for _ in range(probes):
            z = {n: (torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t) for n, t in theta.items()}
            gz = ggn_vp(model, loss_fn, batch, z, list(theta))
            diag = {n: diag[n] + z[n] * gz[n] / probes for n in theta}
    out = {n: 0.5 * t**2 * diag[n] for n, t in theta.items()}
    if first_order:
        g = gradient(model, loss_fn, batch, list(theta))
        out = {n: v - theta[n] * g[n] for n, v in out.items()}
    return out
