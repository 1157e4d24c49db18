r"""The Combinatorial Brain Surgeon (Yu et al., ICML 2022): choose the pruned set jointly, then update.

Weights are one flat vector :math:`\theta \in \mathbb{R}^d` split into Fisher blocks
(:class:`oba.empirical_fisher.Block`, each with its :class:`oba.empirical_fisher.EmpiricalFisher` :math:`F`;
F is block-diagonal).

**Selection (CBS-S).** Without a weight update, pruning the set P (``|P| = k``) costs, to second order,

.. math::  f(P) = \theta_P^\top F_{PP}\,\theta_P
           = \sum_{q,m\in P}\theta_q F_{qm}\theta_m ,

which is *not* the sum of single costs :math:`\theta_q^2F_{qq}`: weights whose contributions cancel
(:math:`\theta_qF_{qm}\theta_m < 0`) are cheaper to remove together. :func:`cbs_select`

1. starts from the best of ``trials`` random-chunk magnitude prunings ("RMP": the weights are split into
   random chunks and the same fraction is pruned by magnitude inside each; trial 0 is global magnitude),
   judged by the *real* loss after masking, on training data;
2. improves it by swaps, pruned i <-> kept j. With :math:`u = F_{:,P}\theta_P` kept up to date,

   .. math::  f(P - i + j) - f(P) = -\alpha_i + \beta_j - \gamma_{ij},\quad
              \alpha_i = 2\theta_iu_i - \theta_i^2F_{ii},\ \beta_j = 2\theta_ju_j + \theta_j^2F_{jj},\
              \gamma_{ij} = 2\theta_i\theta_jF_{ij}

   (:class:`SwapSearch`; an accepted swap updates u by :math:`\theta_jF_{:,j} - \theta_iF_{:,i}`, one product
   with :math:`G^\top`, exactly). A *sweep* walks through the pruned weights in decreasing α, ``rho`` at a
   time, pairs them with the ``rho`` kept weights of lowest β, and makes the best of those swaps when it
   lowers f by at least ``eps``·f; it ends after ``tau`` windows in a row without a swap
   (:meth:`SwapSearch.sweep`). At most ``max_sweeps`` sweeps, fewer when a sweep swaps nothing;
3. picks, among the start and the set after each sweep, the one with the lowest real training loss.

**Update (CBS-U).** The exact multi-weight OBS update for the chosen set, per block
(:func:`oba.empirical_fisher.obs_update`).

Everything is deterministic given ``seed``; the test set is never touched here (the caller's ``real_loss``
should evaluate on training data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from oba.empirical_fisher import Block, EmpiricalFisher, obs_update

__all__ = ["CBSResult", "SwapSearch", "cbs_select", "cbs_update", "rmp_start"]

RealLoss = Callable[[Tensor], float]
"""``real_loss(pruned)``: the loss with the weights of the boolean ``[d]`` mask ``pruned`` set to zero."""


def _check_k(k: int, d: int) -> None:
    if not 0 <= k < d:
        raise ValueError(f"number of weights to prune must be in [0, {d}), got {k}")


def magnitude_set(theta: Tensor, k: int) -> Tensor:
    """Boolean ``[d]``: the k weights of smallest :math:`|\\theta|` (ties broken by index, stable)."""
    pruned = torch.zeros(theta.numel(), dtype=torch.bool)
    pruned[torch.argsort(theta.abs(), stable=True)[:k]] = True
    return pruned


def rmp_start(
    theta: Tensor,
    k: int,
    real_loss: RealLoss,
    *,
    trials: int = 50,
    chunks: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Tensor, list[float]]:
    """Best of ``trials`` random-chunk magnitude prunings (trial 0: global magnitude), by ``real_loss``.

    Trial t > 0 splits the d weights into ``chunks`` random chunks of (nearly) equal size and prunes, inside
    each, the fraction k/d of smallest magnitude (rounded so that exactly k are pruned in all).
    Returns the best boolean ``[d]`` set and the loss of every trial.
    """
    d = theta.numel()
    _check_k(k, d)
    gen = torch.Generator().manual_seed(seed)
    best, best_loss, losses = None, math.inf, []
    for t in tqdm(range(trials), desc="CBS start (RMP)", disable=not progress):
        if t == 0:
            pruned = magnitude_set(theta, k)
        else:
            perm = torch.randperm(d, generator=gen)
            parts = torch.tensor_split(perm, chunks)
            quota = [len(p) * k // d for p in parts]
            for i in range(k - sum(quota)):  # hand out the remainder one by one
                quota[i % len(parts)] += 1
            pruned = torch.zeros(d, dtype=torch.bool)
            for part, q in zip(parts, quota, strict=True):
                pruned[part[torch.argsort(theta[part].abs(), stable=True)[:q]]] = True
        loss = float(real_loss(pruned))
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = pruned, loss
    assert best is not None
    return best, losses


class SwapSearch:
    r"""Swap local search on :math:`f(P) = \sum_{\text{blocks}} \theta_P^\top F\theta_P` with exact bookkeeping.

    Args:
        fishers: one :class:`EmpiricalFisher` per block.
        blocks: the blocks (ranges of the flat weights), covering ``theta``.
        theta: the flat weights ``[d]``.
        pruned: the starting pruned set, boolean ``[d]`` (copied).

    Attributes:
        pruned: the current set; ``u`` (:math:`F_{:,P}\theta_P`, ``[d]``); ``objective`` (f, float);
        ``fdiag`` (:math:`F_{qq}`).
    """

    def __init__(
        self, fishers: Sequence[EmpiricalFisher], blocks: Sequence[Block], theta: Tensor, pruned: Tensor
    ) -> None:
        if len(fishers) != len(blocks):
            raise ValueError(f"{len(fishers)} Fisher blocks for {len(blocks)} blocks")
        dtype = fishers[0].dtype
        self.fishers, self.blocks = list(fishers), list(blocks)
        self.theta = theta.detach().reshape(-1).to(dtype)
        self.pruned = pruned.clone().to(torch.bool)
        d = self.theta.numel()
        if self.pruned.shape != (d,) or sum(b.size for b in blocks) != d:
            raise ValueError(f"theta ({d}), pruned {tuple(pruned.shape)} and blocks must cover the same weights")
        self.block_of = torch.empty(d, dtype=torch.int64)
        for i, b in enumerate(blocks):
            self.block_of[b.slice] = i
        self.fdiag = torch.cat([f.diagonal() for f in fishers])
        self.u = self._u_from_scratch()
        self.objective = float(self.theta[self.pruned] @ self.u[self.pruned])

    def _u_from_scratch(self) -> Tensor:
        masked = torch.where(self.pruned, self.theta, torch.zeros_like(self.theta))
        return torch.cat([f.matvec(masked[b.slice]) for f, b in zip(self.fishers, self.blocks, strict=True)])

    def objective_from_scratch(self) -> float:
        """f(P) recomputed with fresh products (a check on the incremental bookkeeping)."""
        u = self._u_from_scratch()
        return float(self.theta[self.pruned] @ u[self.pruned])

    def alpha(self, idx: Tensor) -> Tensor:
        """Decrease of f when pruned weights ``idx`` are put back (one at a time)."""
        t = self.theta[idx]
        return 2 * t * self.u[idx] - t * t * self.fdiag[idx]

    def beta(self, idx: Tensor) -> Tensor:
        """Increase of f when kept weights ``idx`` are pruned (one at a time)."""
        t = self.theta[idx]
        return 2 * t * self.u[idx] + t * t * self.fdiag[idx]

    def _add_column(self, q: int, coef: float) -> None:
        """u += coef · F_{:,q} (within q's block)."""
        bi = int(self.block_of[q])
        b, f = self.blocks[bi], self.fishers[bi]
        col = f.grads.rmatvec(f.grads.columns(torch.tensor([q - b.start]))[:, 0]) / f.n
        col[q - b.start] += f.damp
        self.u[b.slice] += coef * col

    def swap(self, i: int, j: int) -> float:
        """Put pruned i back and prune kept j; returns the change of f (exact)."""
        if not self.pruned[i] or self.pruned[j]:
            raise ValueError(f"swap needs i pruned and j kept (i={i}, j={j})")
        change = float(
            -self.alpha(torch.tensor([i]))[0]
            + self.beta(torch.tensor([j]))[0]
            - self.gammas(torch.tensor([i]), torch.tensor([j]))[0, 0]
        )
        self._add_column(i, -float(self.theta[i]))
        self._add_column(j, float(self.theta[j]))
        self.pruned[i], self.pruned[j] = False, True
        self.objective += change
        return change

    def gammas(self, i_idx: Tensor, j_idx: Tensor) -> Tensor:
        r""":math:`\gamma_{ij} = 2\theta_i\theta_jF_{ij}` for every pair, ``[|i|, |j|]`` (0 across blocks, i != j)."""
        out = torch.zeros(len(i_idx), len(j_idx), dtype=self.theta.dtype)
        bi, bj = self.block_of[i_idx], self.block_of[j_idx]
        for blk in torch.unique(bi).tolist():
            rows, cols = (bi == blk).nonzero().squeeze(1), (bj == blk).nonzero().squeeze(1)
            if not len(cols):
                continue
            b, f = self.blocks[blk], self.fishers[blk]
            g = f.grads.columns(torch.cat([i_idx[rows], j_idx[cols]]) - b.start)
            f_ij = g[:, : len(rows)].T @ g[:, len(rows) :] / f.n
            t_i, t_j = self.theta[i_idx[rows]], self.theta[j_idx[cols]]
            out[rows[:, None], cols[None, :]] = 2 * t_i[:, None] * t_j[None, :] * f_ij
        return out

    def sweep(self, *, eps: float = 1e-4, rho: int = 10, tau: int = 20, threads: int | None = 1) -> int:
        """One sweep (see the module docstring); returns the number of swaps made.

        The pruned weights are ordered by decreasing α once, at the start. A window of ``rho`` consecutive
        pruned weights of that order is paired with the ``rho`` kept weights of lowest current β; the best of
        these ``rho**2`` swaps is made if it lowers f by at least ``eps``·f (the window then stays, its swapped
        weight replaced by the next one), otherwise the window moves on by ``rho`` and counts as a failure. The
        sweep ends after ``tau`` failures in a row or at the end of the order.

        The loop is made of many small tensor operations, which run faster on ``threads`` threads (default 1)
        than on several contended ones; the previous thread count is restored afterwards (``None``: unchanged).
        """
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return self._sweep(eps, rho, tau)
        finally:
            torch.set_num_threads(previous)

    def _sweep(self, eps: float, rho: int, tau: int) -> int:
        order = self.pruned.nonzero().squeeze(1)
        order = order[torch.argsort(self.alpha(order), descending=True, stable=True)].tolist()
        swaps = fails = pos = 0
        while fails < tau and pos < len(order):
            window = [i for i in order[pos : pos + rho] if self.pruned[i]]
            if not window:
                pos += rho
                continue
            i_idx = torch.tensor(window)
            kept = (~self.pruned).nonzero().squeeze(1)
            beta = self.beta(kept)
            top = torch.argsort(beta, stable=True)[:rho]
            j_idx = kept[top]
            change = -self.alpha(i_idx)[:, None] + beta[top][None, :] - self.gammas(i_idx, j_idx)
            best = int(torch.argmin(change))
            a, b = divmod(best, change.shape[1])
            if change[a, b] < -eps * abs(self.objective):
                self.swap(int(i_idx[a]), int(j_idx[b]))
                order.remove(int(i_idx[a]))
                swaps, fails = swaps + 1, 0
            else:
                pos, fails = pos + rho, fails + 1
        return swaps


@dataclass
class CBSResult:
    """What :func:`cbs_select` found.

    ``pruned``: the chosen boolean ``[d]`` set; ``start_losses``: real loss of each RMP trial;
    ``sweep_objectives``/``sweep_losses``/``sweep_swaps``: f, real loss and swaps after the start (entry 0)
    and each sweep; ``chosen_sweep``: the entry picked; ``sweep_seconds``: wall time per sweep.
    """

    pruned: Tensor
    start_losses: list[float] = field(default_factory=list)
    sweep_objectives: list[float] = field(default_factory=list)
    sweep_losses: list[float] = field(default_factory=list)
    sweep_swaps: list[int] = field(default_factory=list)
    sweep_seconds: list[float] = field(default_factory=list)
    chosen_sweep: int = 0


def cbs_select(
    fishers: Sequence[EmpiricalFisher],
    blocks: Sequence[Block],
    theta: Tensor,
    k: int,
    real_loss: RealLoss,
    *,
    trials: int = 50,
    chunks: int = 10,
    eps: float = 1e-4,
    rho: int = 10,
    tau: int = 20,
    max_sweeps: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> CBSResult:
    """CBS-S: choose k weights to prune (RMP start, swap sweeps, final sweep by real loss)."""
    import time

    theta = theta.detach().reshape(-1)
    start, start_losses = rmp_start(theta, k, real_loss, trials=trials, chunks=chunks, seed=seed, progress=progress)
    search = SwapSearch(fishers, blocks, theta, start)
    result = CBSResult(start, start_losses, [search.objective], [min(start_losses)], [0])
    snapshots = [start.clone()]
    for _ in tqdm(range(max_sweeps), desc="CBS sweeps", disable=not progress):
        clock = time.perf_counter()
        swaps = search.sweep(eps=eps, rho=rho, tau=tau)
        result.sweep_seconds.append(time.perf_counter() - clock)
        if swaps == 0:
            break
        snapshots.append(search.pruned.clone())
        result.sweep_objectives.append(search.objective)
        result.sweep_losses.append(float(real_loss(search.pruned)))
        result.sweep_swaps.append(swaps)
    result.chosen_sweep = min(range(len(snapshots)), key=lambda s: (result.sweep_losses[s], s))
    result.pruned = snapshots[result.chosen_sweep]
    return result


def cbs_update(
    fishers: Sequence[EmpiricalFisher], blocks: Sequence[Block], theta: Tensor, pruned: Tensor, **kwargs
) -> Tensor:
    """CBS-U: the exact multi-weight OBS update of every block for the set ``pruned`` (boolean ``[d]``).

    Returns the new flat weights ``theta + δθ`` (pruned ones exactly 0). ``kwargs`` go to
    :func:`oba.empirical_fisher.obs_update` (``form``, ``max_dense``).
    """
    theta = theta.detach().reshape(-1)
    out = theta.clone().to(fishers[0].dtype)
    for f, b in zip(fishers, blocks, strict=True):
        out[b.slice] += obs_update(f, theta[b.slice], pruned[b.slice], **kwargs)
    out[pruned] = 0.0
    return out.to(theta.dtype)
