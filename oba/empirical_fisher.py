r"""Empirical Fisher blocks without d x d matrices, WoodFisher and the multi-weight OBS update.

Notation. N gradients (per-sample or per-mini-batch) of d weights are the rows of
:math:`G \in \mathbb{R}^{N\times d}`; the damped empirical Fisher of one block is

.. math::  F_\lambda = \tfrac1N G^\top G + \lambda I .

When :math:`N < d` every quantity involving :math:`F_\lambda^{-1}` goes through the Woodbury identity
with the N x N *core* :math:`K = N\lambda I + GG^\top = LL^\top` (factorised once, by Cholesky):

.. math::  F_\lambda^{-1} = \lambda^{-1}\big[I - G^\top K^{-1} G\big]

* diagonal:   :math:`[F_\lambda^{-1}]_{qq} = \lambda^{-1}(1 - \lVert L^{-1} g_{:q}\rVert^2)`, by chunks of columns
* sub-block:  :math:`(F_\lambda^{-1})_{QQ} = \lambda^{-1}(I - W^\top W)`, :math:`W = L^{-1} G_{:Q}`
* product:    :math:`F_\lambda^{-1} v = \lambda^{-1}(v - G^\top K^{-1} G v)`

so the cost is :math:`O(N^2 d + N^3)` time and :math:`O(N^2 + N c)` memory (c columns at a time), never
:math:`O(d^2)`. When :math:`d \le N` the block is small and :class:`EmpiricalFisher` forms
:math:`F_\lambda` densely instead.

Where the gradients come from (:class:`GradientMatrix`):

* :class:`DenseGradients` holds G itself (``[N, d]``; any layer type, e.g. from
  :func:`oba.curvature.per_sample_gradients`).
* :class:`LinearGradients` holds, for bias-free ``nn.Linear`` layers and batch-1 gradients, the factors
  :math:`g_n = \mathrm{vec}(\delta_n a_n^\top)` (:math:`a_n` the layer input, :math:`\delta_n` the loss
  gradient w.r.t. the layer output): :math:`GG^\top = \sum_l (\Delta_l\Delta_l^\top)\odot(A_lA_l^\top)` and
  :math:`G^\top u = \Delta_l^\top \mathrm{diag}(u) A_l` per layer. For the MNIST MLPNet and N = 10,000 the
  factors take 66 MB where G would take 1.3 GB (float32).

OBS (Hassibi & Stork) removes a set Q of weights (:math:`\delta\theta_Q = -\theta_Q`) and moves the others to
minimise :math:`\tfrac12\delta\theta^\top F\delta\theta`; the optimum and its cost, in two equivalent forms
(R = the weights kept):

.. math::  \delta\theta^* = -F^{-1}E_Q\,[(F^{-1})_{QQ}]^{-1}\theta_Q
           \quad\Longleftrightarrow\quad
           \delta\theta^*_R = F_{RR}^{-1} F_{RQ}\,\theta_Q ,

:func:`obs_update` picks the cheaper. WoodFisher (Singh & Alistarh 2020) ranks single weights by
:math:`\rho_q = \theta_q^2 / (2[F_\lambda^{-1}]_{qq})` (:func:`woodfisher_scores`) and updates by the sum of
single-weight OBS updates (:func:`woodfisher_update`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from oba.batches import to_device
from oba.curvature import Batch, LossFn, gradient, per_sample_gradients

__all__ = [
    "Block",
    "DenseGradients",
    "EmpiricalFisher",
    "GradientMatrix",
    "LinearGradients",
    "block_fishers",
    "collect_gradients",
    "linear_gradient_factors",
    "make_blocks",
    "obs_update",
    "woodfisher_scores",
    "woodfisher_update",
]


# --------------------------------------------------------------------------------------------------
# Gradient matrices
# --------------------------------------------------------------------------------------------------
class GradientMatrix:
    """The N x d matrix G of gradients (rows), accessed only through products and column slices.

    Subclasses implement :meth:`gram`, :meth:`matvec`, :meth:`rmatvec`, :meth:`columns` and
    :meth:`column_sq_norms`; every result is in ``self.dtype`` (the computing precision).
    """

    n: int
    d: int
    dtype: torch.dtype

    def gram(self) -> Tensor:
        """:math:`GG^\\top`, ``[N, N]``."""
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Gv`: ``v`` is ``[d]`` or ``[d, k]``; returns ``[N]`` or ``[N, k]``."""
        raise NotImplementedError

    def rmatvec(self, u: Tensor) -> Tensor:
        """:math:`G^\\top u`: ``u`` is ``[N]`` or ``[N, k]``; returns ``[d]`` or ``[d, k]``."""
        raise NotImplementedError

    def columns(self, idx: Tensor) -> Tensor:
        """:math:`G_{:,Q}` for the flat indices ``idx`` (``[|Q|]``), returns ``[N, |Q|]``."""
        raise NotImplementedError

    def column_sq_norms(self) -> Tensor:
        """:math:`\\sum_n G_{nq}^2` for every q, ``[d]``."""
        raise NotImplementedError

    def column_chunks(self, chunk: int) -> Iterator[tuple[slice, Tensor]]:
        """``(slice, G[:, slice])`` for consecutive chunks of ``chunk`` columns."""
        for start in range(0, self.d, chunk):
            stop = min(start + chunk, self.d)
            yield slice(start, stop), self.columns(torch.arange(start, stop))

    def restrict(self, idx: Tensor) -> DenseGradients:
        """The columns ``idx`` as a :class:`DenseGradients` (``[N, |idx|]``, materialised)."""
        return DenseGradients(self.columns(idx), dtype=self.dtype)


class DenseGradients(GradientMatrix):
    """G stored as a tensor ``[N, d]`` (any dtype; computations cast column chunks to ``dtype``).

    Args:
        grads: ``[N, d]`` gradients, one per row.
        dtype: computing precision (default float64).
        chunk: columns cast at a time in :meth:`gram` and :meth:`column_sq_norms` (memory bound).
    """

    def __init__(self, grads: Tensor, *, dtype: torch.dtype = torch.float64, chunk: int = 4096) -> None:
        if grads.dim() != 2:
            raise ValueError(f"gradients must be a matrix [N, d], got shape {tuple(grads.shape)}")
        self.g = grads
        self.n, self.d = grads.shape
        self.dtype = dtype
        self.chunk = chunk

    def gram(self) -> Tensor:
        out = torch.zeros(self.n, self.n, dtype=self.dtype)
        for start in range(0, self.d, self.chunk):
            c = self.g[:, start : start + self.chunk].to(self.dtype)
            out.addmm_(c, c.T)
        return out

    def matvec(self, v: Tensor) -> Tensor:
        return self.g.to(self.dtype) @ v.to(self.dtype) if self.g.dtype == self.dtype else self._chunked_matvec(v)

    def _chunked_matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        out = torch.zeros((self.n, *v.shape[1:]), dtype=self.dtype)
        for start in range(0, self.d, self.chunk):
            out += self.g[:, start : start + self.chunk].to(self.dtype) @ v[start : start + self.chunk]
        return out

    def rmatvec(self, u: Tensor) -> Tensor:
        u = u.to(self.dtype)
        return torch.cat(
            [self.g[:, s : s + self.chunk].to(self.dtype).T @ u for s in range(0, self.d, self.chunk)], dim=0
        )

    def columns(self, idx: Tensor) -> Tensor:
        return self.g[:, idx].to(self.dtype)

    def column_sq_norms(self) -> Tensor:
        return torch.cat(
            [self.g[:, s : s + self.chunk].to(self.dtype).square().sum(0) for s in range(0, self.d, self.chunk)]
        )


class LinearGradients(GradientMatrix):
    r"""G of bias-free linear layers from per-sample factors, never materialised.

    For a layer ``W`` of shape ``[out, in]`` and batch-1 gradients, :math:`\nabla_W \ell_n = \delta_n a_n^\top`
    (flattened row-major, as ``W.reshape(-1)``). Layers are concatenated in the order given.

    Args:
        factors: per layer ``(delta [N, out], act [N, in])``.
        dtype: computing precision (the factors are cast to it once).
        chunk: rows (in :meth:`gram`) or right-hand sides (in products) at a time.
    """

    def __init__(
        self, factors: Sequence[tuple[Tensor, Tensor]], *, dtype: torch.dtype = torch.float64, chunk: int = 256
    ) -> None:
        if not factors:
            raise ValueError("LinearGradients needs at least one (delta, act) pair")
        n = factors[0][0].shape[0]
        for delta, act in factors:
            if delta.dim() != 2 or act.dim() != 2 or delta.shape[0] != n or act.shape[0] != n:
                raise ValueError(
                    f"each factor pair must be (delta [N, out], act [N, in]) with the same N={n}; "
                    f"got {tuple(delta.shape)} and {tuple(act.shape)}"
                )
        # stored transposed (row-major [out, N] and [in, N]): single columns of G are fast row gathers;
        # self.factors gives the [N, out] / [N, in] views without copies
        self._delta_t = [d.T.to(dtype).contiguous() for d, _ in factors]
        self._act_t = [a.T.to(dtype).contiguous() for _, a in factors]
        self.factors = [(dt.T, at.T) for dt, at in zip(self._delta_t, self._act_t, strict=True)]
        self.shapes = [(d.shape[1], a.shape[1]) for d, a in self.factors]
        sizes = [o * i for o, i in self.shapes]
        self.offsets = [0, *itertools.accumulate(sizes)]
        self.n, self.d = n, self.offsets[-1]
        self.dtype = dtype
        self.chunk = chunk

    def gram(self) -> Tensor:
        out = torch.empty(self.n, self.n, dtype=self.dtype)
        for start in range(0, self.n, self.chunk):
            rows = slice(start, min(start + self.chunk, self.n))
            block = out[rows]
            block.zero_()
            for delta, act in self.factors:
                block.addcmul_(delta[rows] @ delta.T, act[rows] @ act.T)
        return out

    def _layer_views(self, v: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for (delta, act), (o, i), start in zip(self.factors, self.shapes, self.offsets, strict=False):
            yield delta, act, v[start : start + o * i].reshape(o, i, *v.shape[1:])

    def matvec(self, v: Tensor) -> Tensor:
        vec = v.dim() == 1
        v = v.to(self.dtype).reshape(self.d, -1)
        out = torch.zeros(self.n, v.shape[1], dtype=self.dtype)
        for delta, act, vl in self._layer_views(v):  # vl [out, in, k]
            for s in range(0, v.shape[1], 16):
                part = torch.einsum("ni,oik->nok", act, vl[:, :, s : s + 16])
                out[:, s : s + 16] += (part * delta[:, :, None]).sum(1)
        return out[:, 0] if vec else out

    def rmatvec(self, u: Tensor) -> Tensor:
        vec = u.dim() == 1
        u = u.to(self.dtype).reshape(self.n, -1)
        k = u.shape[1]
        if k == 1:  # one vector: Δᵀ diag(u) A per layer, from the row-major Δᵀ
            pairs = zip(self._delta_t, self.factors, strict=True)
            out = torch.cat([((dt * u[:, 0]) @ act).reshape(-1) for dt, (_, act) in pairs])
            return out if vec else out[:, None]
        pieces = []
        for delta, act in self.factors:
            o = delta.shape[1]
            layer = torch.empty(o, act.shape[1], k, dtype=self.dtype)
            for s in range(0, k, 16):
                us = u[:, s : s + 16]
                weighted = (delta[:, :, None] * us[:, None, :]).reshape(self.n, -1)  # [N, out*ks]
                layer[:, :, s : s + 16] = (weighted.T @ act).reshape(o, us.shape[1], -1).permute(0, 2, 1)
            pieces.append(layer.reshape(-1, k))
        out = torch.cat(pieces)
        return out[:, 0] if vec else out

    def columns(self, idx: Tensor) -> Tensor:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if idx.numel() == 0:
            return torch.empty(self.n, 0, dtype=self.dtype)
        lo, hi = int(idx.min()), int(idx.max())
        rows = []
        for layer, ((o, i), start) in enumerate(zip(self.shapes, self.offsets, strict=False)):
            stop = start + o * i
            if hi < start or lo >= stop:
                continue
            if lo >= start and hi < stop:  # the common case: all in one layer
                local = idx - start
                return (self._delta_t[layer][local // i] * self._act_t[layer][local % i]).T
            rows.append(layer)
        out = torch.empty(idx.numel(), self.n, dtype=self.dtype)
        for layer in rows:
            (o, i), start = self.shapes[layer], self.offsets[layer]
            where = ((idx >= start) & (idx < start + o * i)).nonzero().squeeze(1)
            local = idx[where] - start
            out[where] = self._delta_t[layer][local // i] * self._act_t[layer][local % i]
        return out.T

    def column_sq_norms(self) -> Tensor:
        return torch.cat([(delta.square().T @ act.square()).reshape(-1) for delta, act in self.factors])


# --------------------------------------------------------------------------------------------------
# Collecting gradients
# --------------------------------------------------------------------------------------------------
def _take(batches: Iterable[Batch], n: int) -> Iterator[Batch]:
    """Batches until ``n`` samples are reached (the last one cut)."""
    seen = 0
    for x, y, *_ in batches:
        if seen >= n:
            return
        take = min(n - seen, y.shape[0])
        seen += take
        yield x[:take], y[:take]
    if seen < n:
        raise ValueError(f"the batches hold only {seen} samples, fewer than the {n} gradients asked for")


def collect_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    params: Sequence[str],
    n: int,
    *,
    mode: str = "per_sample",
    storage: torch.dtype = torch.float32,
    chunk_size: int | None = 64,
) -> Tensor:
    """N gradients of the named parameters as rows of a ``[N, d]`` matrix (``params`` order, flattened).

    ``mode="per_sample"``: the first ``n`` samples of ``batches``, one gradient each
    (:func:`oba.curvature.per_sample_gradients`; eval-mode BatchNorm required). ``mode="per_batch"``:
    the mean-loss gradient of each of the first ``n`` batches.
    """
    device = next(model.parameters()).device
    rows: list[Tensor] = []
    if mode == "per_sample":
        for batch in _take(batches, n):
            g = per_sample_gradients(model, loss_fn, to_device(batch, device), list(params), chunk_size=chunk_size)
            rows.append(torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], 1).to(storage).cpu())
    elif mode == "per_batch":
        for i, batch in enumerate(batches):
            if i >= n:
                break
            g = gradient(model, loss_fn, to_device(tuple(batch[:2]), device), list(params))
            rows.append(torch.cat([t.reshape(1, -1) for t in g.values()], 1).to(storage).cpu())
        if len(rows) < n:
            raise ValueError(f"only {len(rows)} batches available, fewer than the {n} gradients asked for")
    else:
        raise ValueError(f"mode must be 'per_sample' or 'per_batch', got {mode!r}")
    return torch.cat(rows)


def linear_gradient_factors(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    layers: Sequence[str],
    n: int,
    *,
    dtype: torch.dtype = torch.float64,
) -> LinearGradients:
    r"""The factored per-sample gradients (:class:`LinearGradients`) of bias-free ``nn.Linear`` layers.

    One forward and one backward per batch with hooks recording each layer's input :math:`a_n` and output
    gradient. ``loss_fn`` must be a mean over the batch (the recorded output gradients are multiplied by the
    batch size to give the per-sample :math:`\delta_n`). Every sample must reach the layer as one row
    (no weight sharing over positions), as in an MLP.
    """
    modules = dict(model.named_modules())
    for name in layers:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear layer of the model (factored gradients need Linear)")
        if m.bias is not None and m.bias.requires_grad:
            raise ValueError(f"{name!r} has a bias: factored gradients cover bias-free layers only")
    device = next(model.parameters()).device
    acts: dict[str, list[Tensor]] = {n_: [] for n_ in layers}
    deltas: dict[str, list[Tensor]] = {n_: [] for n_ in layers}
    current: dict[str, Tensor] = {}

    def forward_hook(name):
        def hook(module, inputs, output):
            if inputs[0].dim() != 2:
                raise ValueError(f"{name}: input of shape {tuple(inputs[0].shape)}; factored gradients need [B, in]")
            acts[name].append(inputs[0].detach().to(dtype).cpu())
            output.register_hook(lambda grad: deltas[name].append(grad.detach().to(dtype).cpu() * grad.shape[0]))
            current[name] = output

        return hook

    handles = [modules[name].register_forward_hook(forward_hook(name)) for name in layers]
    try:
        for x, y in _take(batches, n):
            x, y = to_device((x, y), device)
            with torch.enable_grad():
                out = model(x)
                loss = loss_fn(out, y)
                torch.autograd.grad(loss, [current[name] for name in layers])
    finally:
        for h in handles:
            h.remove()
    return LinearGradients([(torch.cat(deltas[name]), torch.cat(acts[name])) for name in layers], dtype=dtype)


# --------------------------------------------------------------------------------------------------
# The damped empirical Fisher of one block
# --------------------------------------------------------------------------------------------------
class EmpiricalFisher:
    r""":math:`F_\lambda = G^\top G/N + \lambda I` of one block, with exact inverse quantities.

    ``method="auto"`` uses the Woodbury form when :math:`d > N` (the N x N core, Cholesky-factorised in
    place) and a dense d x d :math:`F_\lambda` otherwise; ``"woodbury"`` or ``"dense"`` forces one.

    Args:
        grads: a :class:`GradientMatrix` (or a ``[N, d]`` tensor, wrapped in :class:`DenseGradients`).
        damp: :math:`\lambda > 0`.
        chunk: columns per chunk in :meth:`inverse_diagonal`.
    """

    def __init__(self, grads: GradientMatrix | Tensor, damp: float, *, method: str = "auto", chunk: int = 256):
        if isinstance(grads, Tensor):
            grads = DenseGradients(grads)
        if not damp > 0:
            raise ValueError(f"damping must be > 0, got {damp}")
        if method == "auto":
            method = "woodbury" if grads.d > grads.n else "dense"
        if method not in ("woodbury", "dense"):
            raise ValueError(f"method must be 'auto', 'woodbury' or 'dense', got {method!r}")
        self.grads, self.damp, self.method, self.chunk = grads, float(damp), method, chunk
        self.n, self.d, self.dtype = grads.n, grads.d, grads.dtype
        self._inv_diag: Tensor | None = None
        if method == "woodbury":
            core = grads.gram()
            core.diagonal().add_(self.n * self.damp)
            # Cholesky in place: an F-contiguous output aliasing the input makes torch factorise without a copy
            self._chol = core.mT
            torch.linalg.cholesky(self._chol, out=self._chol)
        else:
            dense = grads.rmatvec(torch.eye(self.n, dtype=self.dtype)) if self.d > 0 else None
            f = dense @ dense.T / self.n
            f.diagonal().add_(self.damp)
            self._dense = f
            self._dense_inv = torch.cholesky_inverse(torch.linalg.cholesky(f))

    # -- F itself -----------------------------------------------------------------------------------
    def diagonal(self) -> Tensor:
        """:math:`\\mathrm{diag}(F_\\lambda)`, ``[d]``."""
        return self.grads.column_sq_norms() / self.n + self.damp

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`F_\\lambda v` (``[d]`` or ``[d, k]``)."""
        v = v.to(self.dtype)
        return self.grads.rmatvec(self.grads.matvec(v)) / self.n + self.damp * v

    def submatrix(self, rows: Tensor, cols: Tensor | None = None) -> Tensor:
        """:math:`(F_\\lambda)_{RC}` (dense, ``[|R|, |C|]``; C = R by default)."""
        gr = self.grads.columns(rows)
        if cols is None:
            out = gr.T @ gr / self.n
            out.diagonal().add_(self.damp)
            return out
        out = gr.T @ self.grads.columns(cols) / self.n
        same = rows[:, None] == cols[None, :]
        return out + self.damp * same.to(self.dtype)

    # -- the inverse --------------------------------------------------------------------------------
    def _core_solve(self, b: Tensor) -> Tensor:
        return torch.cholesky_solve(b, self._chol)

    def inverse_diagonal(self) -> Tensor:
        """:math:`\\mathrm{diag}(F_\\lambda^{-1})`, ``[d]`` (chunks of ``chunk`` columns; computed once, cached)."""
        if self._inv_diag is None:
            if self.method == "dense":
                self._inv_diag = self._dense_inv.diagonal().clone()
            else:
                out = torch.empty(self.d, dtype=self.dtype)
                for where, cols in self.grads.column_chunks(self.chunk):
                    w = torch.linalg.solve_triangular(self._chol, cols, upper=False)
                    out[where] = (1.0 - w.square().sum(0)) / self.damp
                self._inv_diag = out
        return self._inv_diag.clone()

    def inverse_matvec(self, v: Tensor) -> Tensor:
        """:math:`F_\\lambda^{-1} v` (``[d]`` or ``[d, k]``)."""
        v = v.to(self.dtype)
        if self.method == "dense":
            return self._dense_inv @ v
        return (
            v
            - self.grads.rmatvec(
                self._core_solve(self.grads.matvec(v).reshape(self.n, -1)).reshape((self.n, *v.shape[1:]))
            )
        ) / self.damp

    def inverse_submatrix(self, idx: Tensor) -> Tensor:
        """:math:`(F_\\lambda^{-1})_{QQ}`, ``[|Q|, |Q|]``."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        if self.method == "dense":
            return self._dense_inv[idx][:, idx]
        w = torch.linalg.solve_triangular(self._chol, self.grads.columns(idx), upper=False)
        out = -(w.T @ w)
        out.diagonal().add_(1.0)
        return out / self.damp

    def dense_inverse(self) -> Tensor:
        """The whole :math:`F_\\lambda^{-1}` (d x d; for tests and small blocks only)."""
        if self.method == "dense":
            return self._dense_inv.clone()
        return self.inverse_matvec(torch.eye(self.d, dtype=self.dtype))


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """A Fisher block: the range ``[start, stop)`` of the flattened weights (all scored parameters
    concatenated in order, as :func:`oba.curvature.flatten_params`), with a label for reports."""

    start: int
    stop: int
    label: str = ""

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


def make_blocks(shapes: Mapping[str, Sequence[int]], structure: str | int = "layer") -> list[Block]:
    """Blocks over parameters of the given shapes (in order).

    ``structure``: ``"layer"`` (one block per parameter), ``"joint"`` (one block over all: the MLPNet
    setup of WoodFisher/CBS), or an int c (chunks of at most c consecutive weights within each parameter).
    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    offsets = dict(zip(sizes, [0, *itertools.accumulate(sizes.values())], strict=False))
    if structure == "joint":
        return [Block(0, sum(sizes.values()), "+".join(sizes))]
    if structure == "layer":
        return [Block(offsets[n], offsets[n] + s, n) for n, s in sizes.items()]
    if isinstance(structure, int) and not isinstance(structure, bool) and structure >= 1:
        return [
            Block(offsets[n] + a, offsets[n] + min(a + structure, s), f"{n}[{a}:{min(a + structure, s)}]")
            for n, s in sizes.items()
            for a in range(0, s, structure)
        ]
    raise ValueError(f"block structure must be 'layer', 'joint' or a chunk size >= 1, got {structure!r}")


def block_fishers(grads: GradientMatrix, blocks: Sequence[Block], damp: float, **kwargs) -> list[EmpiricalFisher]:
    """One :class:`EmpiricalFisher` per block, from gradients of all the weights (``grads.d`` columns)."""
    total = max(b.stop for b in blocks)
    if total != grads.d:
        raise ValueError(f"the blocks cover {total} weights but the gradients have {grads.d} columns")
    out = []
    for b in blocks:
        g = grads if (b.start, b.stop) == (0, grads.d) else grads.restrict(torch.arange(b.start, b.stop))
        out.append(EmpiricalFisher(g, damp, **kwargs))
    return out


# --------------------------------------------------------------------------------------------------
# WoodFisher and OBS updates
# --------------------------------------------------------------------------------------------------
def woodfisher_scores(fisher: EmpiricalFisher, theta: Tensor) -> Tensor:
    r"""WoodFisher saliency :math:`\rho_q = \theta_q^2 / (2[F_\lambda^{-1}]_{qq})` of every weight of a block.

    ``theta``: the block's weights, flat ``[d]``. Returns ``[d]`` (computing dtype).
    """
    return theta.to(fisher.dtype).square() / (2 * fisher.inverse_diagonal())


def woodfisher_update(fisher: EmpiricalFisher, theta: Tensor, pruned: Tensor, *, scale: float = 1.0) -> Tensor:
    r"""WoodFisher's weight change: the sum of single-weight OBS updates of the pruned weights.

    .. math::  \delta\theta = -\,\mathrm{scale}\cdot F_\lambda^{-1} \sum_{q\in Q}
               \frac{\theta_q}{[F_\lambda^{-1}]_{qq}} e_q

    computed as ONE product with :math:`F_\lambda^{-1}`. The pruned weights are then set to exactly
    :math:`-\theta_q` (so they become zero). ``pruned``: boolean ``[d]``. Returns ``δθ`` ``[d]``.
    """
    theta = theta.to(fisher.dtype)
    coef = torch.where(pruned, theta / fisher.inverse_diagonal(), torch.zeros_like(theta))
    delta = -scale * fisher.inverse_matvec(coef)
    delta[pruned] = -theta[pruned]
    return delta


def obs_update(
    fisher: EmpiricalFisher,
    theta: Tensor,
    pruned: Tensor,
    *,
    form: str = "auto",
    max_dense: int = 8192,
) -> Tensor:
    r"""The exact multi-weight OBS update for removing the set Q (``pruned``, boolean ``[d]``).

    Minimises :math:`\tfrac12\delta\theta^\top F_\lambda\delta\theta` subject to
    :math:`\delta\theta_Q = -\theta_Q`. Forms (``form``):

    * ``"dual"``: :math:`\delta\theta = -F_\lambda^{-1}E_Q[(F_\lambda^{-1})_{QQ}]^{-1}\theta_Q`
      (a dense :math:`|Q|\times|Q|` solve);
    * ``"primal"``: :math:`\delta\theta_R = (F_\lambda)_{RR}^{-1} (F_\lambda)_{RQ}\theta_Q` on the kept set R
      (a dense :math:`|R|\times|R|` solve);
    * ``"primal_woodbury"``: the same with :math:`(F_\lambda)_{RR} = G_R^\top G_R/N + \lambda I` inverted through
      its own N x N Woodbury core (no :math:`|R|^2` matrix);
    * ``"auto"``: the cheapest by operation count among those whose dense matrix has at most
      ``max_dense`` rows.

    Weights already at zero that are neither in Q nor meant to move should be put in Q (with θ = 0 they cost
    nothing and stay zero). Returns ``δθ`` ``[d]`` with :math:`\delta\theta_Q = -\theta_Q` exactly.
    """
    theta = theta.to(fisher.dtype)
    pruned = pruned.to(torch.bool)
    q_idx, r_idx = pruned.nonzero().squeeze(1), (~pruned).nonzero().squeeze(1)
    nq, nr, n = q_idx.numel(), r_idx.numel(), fisher.n
    delta = torch.zeros_like(theta)
    delta[q_idx] = -theta[q_idx]
    if nq == 0 or nr == 0:
        return delta
    if form == "auto":
        costs = {"primal_woodbury": n * n * nr + n**3 / 3 + n * nq}
        if nr <= max_dense:
            costs["primal"] = n * nr * nr + nr**3 / 3 + n * (nq + nr)
        if nq <= max_dense and fisher.method == "woodbury":
            costs["dual"] = n * n * nq + n * nq * nq + nq**3 / 3 + n * n * fisher.d
        if fisher.method == "dense":
            costs = {"dense_primal": 0}
        form = min(costs, key=costs.__getitem__)
    gq_theta = fisher.grads.matvec(_scatter(theta, q_idx, fisher.d))  # G_Q θ_Q, [N]
    if form == "dense_primal":
        f = fisher._dense
        delta[r_idx] = torch.linalg.solve(f[r_idx][:, r_idx], f[r_idx][:, q_idx] @ theta[q_idx])
    elif form == "primal":
        f_rr = fisher.submatrix(r_idx)
        rhs = fisher.grads.columns(r_idx).T @ gq_theta / n  # F_RQ θ_Q (no λ: R and Q are disjoint)
        delta[r_idx] = torch.cholesky_solve(rhs[:, None], torch.linalg.cholesky(f_rr))[:, 0]
    elif form == "primal_woodbury":
        sub = EmpiricalFisher(fisher.grads.restrict(r_idx), fisher.damp, method="woodbury", chunk=fisher.chunk)
        rhs = sub.grads.rmatvec(gq_theta) / n
        delta[r_idx] = sub.inverse_matvec(rhs)
    elif form == "dual":
        lam = torch.linalg.solve(fisher.inverse_submatrix(q_idx), theta[q_idx])
        full = -fisher.inverse_matvec(_scatter(lam, q_idx, fisher.d, values_given=True))
        delta[r_idx] = full[r_idx]
    else:
        raise ValueError(f"form must be 'auto', 'primal', 'primal_woodbury' or 'dual', got {form!r}")
    return delta


def _scatter(values: Tensor, idx: Tensor, d: int, *, values_given: bool = False) -> Tensor:
    """A ``[d]`` vector that is ``values[idx]`` (or ``values`` itself when ``values_given``) on ``idx``, else 0."""
    out = torch.zeros(d, dtype=values.dtype)
    out[idx] = values if values_given else values[idx]
    return out
