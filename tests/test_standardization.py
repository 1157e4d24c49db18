"""Closed-form derivatives of standardisation (oba.standardization) against dense autograd oracles (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import rel_err
from torch import nn
from torch.autograd.functional import hessian

from oba.decompose import decomposed_hvp
from oba.standardization import BatchNormTrain, closed_form_batch_norm, standardization_hvp, standardize

TOL = 1e-10
GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def test_standardization_hvp_is_the_dense_second_derivative():
    """∂²⟨G̃, x̂(x)⟩/∂x² · dx, with the [M, M] Hessian formed by autograd, per channel of a [N, C, H, W] input."""
    x, g_hat, dx = randn(3, 2, 2, 2), randn(3, 2, 2, 2), randn(3, 2, 2, 2)
    dims, eps = [0, 2, 3], 1e-3
    xhat, inv_std = standardize(x, dims, eps)
    closed = standardization_hvp(g_hat, xhat, inv_std, dx, dims)
    dense = hessian(lambda t: (g_hat * standardize(t, dims, eps)[0]).sum(), x).reshape(x.numel(), x.numel())
    assert rel_err(closed.reshape(-1), dense @ dx.reshape(-1)) < TOL


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train_double_backward_matches_pytorch(affine):
    """Values, gradients and every second derivative (via double backward) equal F.batch_norm's."""
    x = randn(4, 3, 2, 2).requires_grad_()
    w, b = randn(3).requires_grad_(), randn(3).requires_grad_()
    g, u, a, c = randn(4, 3, 2, 2), randn(4, 3, 2, 2), randn(3), randn(3)

    def derivatives(fn):
        ins = (x, w, b) if affine else (x,)
        y = fn(x, w, b) if affine else fn(x, None, None)
        first = torch.autograd.grad(y, ins, g, create_graph=True)
        seeds = (u, a, c)[: len(first)]
        second = torch.autograd.grad(first, ins, seeds, allow_unused=True, materialize_grads=True)
        return [y.detach(), *[t.detach() for t in first], *second]

    ours = derivatives(lambda t, w_, b_: _closed_form(t, w_, b_))
    reference = derivatives(lambda t, w_, b_: F.batch_norm(t, None, None, w_, b_, True, 0.1, 1e-3))
    for mine, ref in zip(ours, reference, strict=True):
        assert rel_err(mine, ref) < TOL


def _closed_form(x, w, b):
    with closed_form_batch_norm():
        return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-3)


def test_batch_norm_train_refuses_a_third_derivative():
    x = randn(4, 3).requires_grad_()
    y = BatchNormTrain.apply(x, torch.ones(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype), 1e-5)
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="cannot be differentiated again"):
        torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)


class LinearNormLinear(nn.Module):
    """z = W2 norm(W1 x), norm a train-mode BatchNorm1d or a LayerNorm with weight γ and bias β."""

    def __init__(self, norm: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)
        self.norm = nn.BatchNorm1d(4) if norm == "batch" else nn.LayerNorm(4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_normalization_sources_against_a_dense_op_hessian(norm):
    """With h = W1 x, G = ∂L/∂norm(h), and the dense blocks of f(h, γ) = ⟨G, norm(h; γ, β)⟩ from autograd:
    v on W1 only: nonlinear[W1] = (H_hh dh) pulled back to W1 (dh = x dW1ᵀ), series[γ] = H_γh dh;
    v on γ only:  series[W1] = (H_hγ dγ) pulled back to W1, nonlinear = 0."""
    torch.manual_seed(1)
    model = LinearNormLinear(norm).double().train()
    with torch.no_grad():
        model.norm.weight.copy_(randn(4))
        model.norm.bias.copy_(randn(4))
    x, y = randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    w1, w2, gamma, beta = (p.detach() for p in (model.fc1.weight, model.fc2.weight, model.norm.weight, model.norm.bias))
    h = x @ w1.T
    z = model(x).detach()
    G = ((torch.softmax(z, 1) - F.one_hot(y, 2)) / len(y)) @ w2

    def normalized(h_, g_):
        if norm == "batch":
            return F.batch_norm(h_, None, None, g_, beta, True, 0.1, model.norm.eps)
        return F.layer_norm(h_, (4,), g_, beta, model.norm.eps)

    blocks = hessian(lambda h_, g_: (G * normalized(h_, g_)).sum(), (h, gamma))
    h_hh, h_hg, h_gh = blocks[0][0].reshape(20, 20), blocks[0][1].reshape(20, 4), blocks[1][0].reshape(4, 20)
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}

    d_w1 = randn(4, 3)
    parts = decomposed_hvp(model, F.cross_entropy, (x, y), {**zero, "fc1.weight": d_w1})
    dh = (x @ d_w1.T).reshape(-1)
    assert rel_err(parts["nonlinear"]["fc1.weight"], (h_hh @ dh).reshape(5, 4).T @ x) < TOL
    assert rel_err(parts["series"]["norm.weight"], h_gh @ dh) < TOL
    assert all(parts["nonlinear"][n].abs().max() == 0 for n in ("fc2.weight", "norm.weight", "norm.bias"))

    d_gamma = randn(4)
    parts = decomposed_hvp(model, F.cross_entropy, (x, y), {**zero, "norm.weight": d_gamma})
    assert rel_err(parts["series"]["fc1.weight"], (h_hg @ d_gamma).reshape(5, 4).T @ x) < TOL
    assert all(t.abs().max() == 0 for t in parts["nonlinear"].values())
