r"""Closed-form first and second derivatives of standardisation (train-mode BatchNorm, LayerNorm).

Both ops standardise :math:`x` over a set of reduced positions :math:`R` (BatchNorm2d: batch and space,
per channel; LayerNorm: the trailing normalised dims, per sample), :math:`M = |R|`,
:math:`\langle t\rangle = \frac1M \sum_R t` (kept as a broadcastable tensor):

.. math::
    \mu = \langle x\rangle,\quad \sigma = \sqrt{\langle (x-\mu)^2\rangle + \epsilon},\quad
    \hat x = (x-\mu)/\sigma,\quad y = \gamma \odot \hat x + \beta .

With the symmetric operator :math:`P t = t - \langle t\rangle - \hat x \langle t \hat x\rangle` the
Jacobian of the standardisation is :math:`\mathrm{d}\hat x = \sigma^{-1} P\, \mathrm{d}x` (because
:math:`\mathrm{d}\sigma = \langle \hat x\, \mathrm{d}x\rangle`), so for an output cotangent :math:`G` and
the scaled cotangent :math:`\tilde G = \gamma \odot G` of :math:`\hat x`:

.. math::
    \partial_x \langle G, y\rangle = \sigma^{-1} P \tilde G \qquad\text{(first order)}

    \partial^2_{xx} \langle G, y\rangle\, \mathrm{d}x = -\sigma^{-2}\big[\langle \mathrm{d}x\, P\tilde G\rangle\,\hat x
        + \langle \tilde G \hat x\rangle\, P\,\mathrm{d}x + \langle \mathrm{d}x\,\hat x\rangle\, P\tilde G\big]
    \qquad\text{(second order; shape of } x\text{)}

    \partial^2_{x\gamma} \langle G, y\rangle:\quad \mathrm{d}\gamma \mapsto \sigma^{-1} P(\mathrm{d}\gamma \odot G),
    \qquad \mathrm{d}x \mapsto \textstyle\sum_{\gamma\text{'s broadcast}} G \odot \sigma^{-1} P\,\mathrm{d}x .

(The second line: differentiate :math:`\sigma^{-1}\sum \mathrm{d}x\, P\tilde G` in :math:`x`; the
:math:`\sigma^{-1}` gives the first term, the two :math:`\hat x` inside :math:`P` the other two. Shapes:
:math:`x, G, \mathrm{d}x, \hat x` are ``[N, C, H, W]`` for BatchNorm2d and ``[*, D]`` for LayerNorm over
``D``; :math:`\mu, \sigma` are ``[1, C, 1, 1]`` resp. ``[*, 1]``; :math:`\gamma` is ``[C]`` resp. ``[D]``.) No
:math:`M \times M` Jacobian is ever formed: every formula is a few element-wise passes and reductions.

Used by :mod:`oba.decompose` (the ``nonlinear`` and ``series`` sources of BatchNorm/LayerNorm) and by
:func:`oba.curvature.hvp` (``method="rev_rev"``), whose double backward through train-mode BatchNorm
uses :class:`BatchNormTrain` (PyTorch's generic ``batchnorm_double_backward`` costs about as much as all
convolutions of a ResNet together).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "BatchNormTrain",
    "batch_norm_layout",
    "closed_form_batch_norm",
    "project",
    "standardize",
    "standardization_hvp",
    "standardization_vjp",
]

Dims = Sequence[int]


def _mean(t: Tensor, dims: Dims) -> Tensor:
    """:math:`\\langle t\\rangle`, the mean over the reduced ``dims``, kept broadcastable."""
    return t.mean(dim=tuple(dims), keepdim=True)


def standardize(x: Tensor, dims: Dims, eps: float) -> tuple[Tensor, Tensor]:
    """:math:`(\\hat x, \\sigma^{-1})`: ``x`` standardised over ``dims`` (biased variance + ``eps``).

    ``xhat`` has the shape of ``x``; ``inv_std`` is reduced over ``dims`` (keepdim). Differentiable.
    """
    var, mean = torch.var_mean(x, dim=tuple(dims), correction=0, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    return (x - mean) * inv_std, inv_std


def project(t: Tensor, xhat: Tensor, dims: Dims) -> Tensor:
    """:math:`P t = t - \\langle t\\rangle - \\hat x\\langle t\\hat x\\rangle` (shape of ``t``)."""
    return t - _mean(t, dims) - xhat * _mean(t * xhat, dims)


def standardization_vjp(g_hat: Tensor, xhat: Tensor, inv_std: Tensor, dims: Dims) -> Tensor:
    """:math:`\\partial_x \\langle \\tilde G, \\hat x\\rangle = \\sigma^{-1} P \\tilde G`
    (``g_hat`` = :math:`\\tilde G`; shape of x)."""
    return inv_std * project(g_hat, xhat, dims)


def standardization_hvp(
    g_hat: Tensor,
    xhat: Tensor,
    inv_std: Tensor,
    dx: Tensor,
    dims: Dims,
    *,
    p_g_hat: Tensor | None = None,
    p_dx: Tensor | None = None,
) -> Tensor:
    r""":math:`\partial^2_{xx}\langle \tilde G, \hat x(x)\rangle\,\mathrm{d}x`, every tensor shaped like ``x``.

    :math:`= -\sigma^{-2}[\langle \mathrm{d}x\,P\tilde G\rangle \hat x + \langle\tilde G\hat x\rangle P\mathrm{d}x
    + \langle \mathrm{d}x\,\hat x\rangle P\tilde G]`. ``p_g_hat``/``p_dx``: :math:`P\tilde G`,
    :math:`P\,\mathrm{d}x` if already computed.
    """
    p_g_hat = project(g_hat, xhat, dims) if p_g_hat is None else p_g_hat
    p_dx = project(dx, xhat, dims) if p_dx is None else p_dx
    inner = _mean(dx * p_g_hat, dims) * xhat + _mean(g_hat * xhat, dims) * p_dx + _mean(dx * xhat, dims) * p_g_hat
    return -(inv_std * inv_std) * inner


# --------------------------------------------------------------------------------------------------
# Train-mode BatchNorm with a closed-form double backward (for reverse-over-reverse HVPs)
# --------------------------------------------------------------------------------------------------
def batch_norm_layout(x: Tensor) -> tuple[list[int], list[int]]:
    """BatchNorm over ``[N, C, *spatial]``: reduced dims (all but 1) and the per-channel broadcast shape."""
    return [d for d in range(x.dim()) if d != 1], [1, x.shape[1]] + [1] * (x.dim() - 2)


class _BatchNormTrainBackward(torch.autograd.Function):
    r"""``(G, x, γ) -> (∂_x, ∂_γ, ∂_β)`` of :math:`\langle G, \mathrm{BN}(x)\rangle`, with a closed-form backward.

    Forward: PyTorch's fused ``native_batch_norm_backward``. Backward, for cotangents :math:`u` on
    :math:`\partial_x` (shape of x) and :math:`a, b` on :math:`\partial_\gamma, \partial_\beta` (``[C]``),
    with :math:`r = \sigma^{-1}` (all per channel):

    * :math:`\tilde G = \gamma r P u + a\hat x + b`
    * :math:`\tilde x = \partial^2_{xx}\langle\gamma G,\hat x\rangle u + a r P G
      = -\gamma r^2[q\hat x + \langle G\hat x\rangle P u + \langle u\hat x\rangle P G] + a r P G`
      (:func:`standardization_hvp`)
    * :math:`\tilde\gamma = r \sum_R G \odot P u = r M q`, with :math:`q = \langle u P G\rangle
      = \langle uG\rangle - \langle u\rangle\langle G\rangle - \langle u\hat x\rangle\langle G\hat x\rangle`.

    Expanding :math:`P` makes each output :math:`k_u u + k_G G + k_x \hat x + k_0` with per-channel
    coefficients from five channel means (:math:`\langle u\rangle, \langle u\hat x\rangle` from the fused
    kernel, :math:`\langle G\rangle, \langle G\hat x\rangle` saved by the forward, :math:`\langle uG\rangle`):
    a few element-wise passes instead of PyTorch's generic ``batchnorm_double_backward``. Uses the batch
    statistics saved by the forward, so it cannot be differentiated again: with ``create_graph=True`` it raises.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, inv_std: Tensor, eps: float) -> Any:
        d_x, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, inv_std, True, eps, [True, True, True]
        )
        ctx.save_for_backward(g, x, weight, mean, inv_std, sum_g_xhat, sum_g)
        ctx.eps = eps
        return d_x, sum_g_xhat, sum_g

    @staticmethod
    def backward(ctx: Any, u: Tensor, a: Tensor, b: Tensor) -> Any:
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "the closed-form BatchNorm double backward cannot be differentiated again (create_graph=True "
                "at second order); use oba.hvp(method='fwd_rev') for higher derivatives"
            )
        g, x, weight, mean, inv_std, sum_g_xhat, sum_g = ctx.saved_tensors
        dims, channel = batch_norm_layout(x)
        count = x.numel() // x.shape[1]
        _, sum_u_xhat, sum_u = torch.ops.aten.native_batch_norm_backward(
            u, x, weight, None, None, mean, inv_std, True, ctx.eps, [False, True, True]
        )
        m_u, m_ux, m_g, m_gx = (t / count for t in (sum_u, sum_u_xhat, sum_g, sum_g_xhat))
        q = (u * g).sum(dim=dims) / count - m_u * m_g - m_ux * m_gx  # <u P G>, [C]
        gamma, r = weight, inv_std
        # coefficients of u, G, x_hat and 1 in x~ and G~ (all [C])
        x_u, x_g = -gamma * r * r * m_gx, -gamma * r * r * m_ux + a * r
        x_hat = -gamma * r * r * (q - 2 * m_ux * m_gx) - a * r * m_gx
        x_one = gamma * r * r * (m_gx * m_u + m_ux * m_g) - a * r * m_g
        g_u, g_hat, g_one = gamma * r, a - gamma * r * m_ux, b - gamma * r * m_u
        d_x = _combine(x, mean, r, channel, [(x_u, u), (x_g, g)], x_hat, x_one)
        d_g = _combine(x, mean, r, channel, [(g_u, u)], g_hat, g_one)
        return d_g, d_x, r * count * q, None, None, None


def _combine(
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    channel: list[int],
    terms: list[tuple[Tensor, Tensor]],
    k_hat: Tensor,
    k_one: Tensor,
) -> Tensor:
    r""":math:`\sum_t k_t \odot t + k_{\hat x}\hat x + k_1` with per-channel ``[C]`` coefficients, using
    :math:`\hat x = (x-\mu) r`: one pass per term (``addcmul``), ``x_hat`` never materialised."""
    k_x = k_hat * inv_std
    out = torch.addcmul((k_one - k_x * mean).view(channel), k_x.view(channel), x)
    for k, t in terms:
        out = out.addcmul_(k.view(channel), t)
    return out


class BatchNormTrain(torch.autograd.Function):
    """Train-mode batch normalisation (batch statistics, no running statistics) whose backward is
    :class:`_BatchNormTrainBackward`: the same values and gradients as ``F.batch_norm``, and an exact,
    cheaper double backward. ``weight`` and ``bias`` are ``[C]`` tensors (ones and zeros if the module has none).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, inv_std = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:
        x, weight, mean, inv_std = ctx.saved_tensors
        d_x, d_weight, d_bias = _BatchNormTrainBackward.apply(g, x, weight, mean, inv_std, ctx.eps)
        return d_x, d_weight, d_bias, None


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


class _ClosedFormBatchNormMode(TorchFunctionMode):
    """Routes ``F.batch_norm`` in train mode without running statistics to :class:`BatchNormTrain`."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = {**_BATCH_NORM_DEFAULTS, **dict(zip(_BATCH_NORM_ARGS, args, strict=False)), **kwargs}
            x = bound["input"]
            if bound["training"] and bound["running_mean"] is None and bound["running_var"] is None and x.dim() > 1:
                ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
                weight = ones if bound["weight"] is None else bound["weight"]
                bias = torch.zeros_like(ones) if bound["bias"] is None else bound["bias"]
                return BatchNormTrain.apply(x, weight, bias, bound["eps"])
        return func(*args, **kwargs)


@contextlib.contextmanager
def closed_form_batch_norm() -> Iterator[None]:
    """Inside: train-mode ``F.batch_norm`` without running statistics runs as :class:`BatchNormTrain`
    (same values and first derivatives; a closed-form second derivative). Nothing stays changed after."""
    with _ClosedFormBatchNormMode():
        yield
