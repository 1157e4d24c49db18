"""Independent dense oracles for the curvature tests (first-order derivatives and plain formulas only)."""

from __future__ import annotations

from collections import OrderedDict

import torch

import oba
from oba.curvature import finite_difference_hvp, flatten_params, select_params, unflatten_params


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def random_vector(like, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict((n, torch.randn(p.shape, generator=gen, dtype=p.dtype)) for n, p in like.items())


def fd_hessian(case) -> torch.Tensor:
    """Dense Hessian by central finite differences of the gradient, column by column."""
    primals = select_params(case.model)
    size = sum(p.numel() for p in primals.values())
    eye = torch.eye(size, dtype=torch.float64)
    cols = [
        flatten_params(finite_difference_hvp(case.model, case.loss_fn, case.batch, unflatten_params(eye[i], primals)))
        for i in range(size)
    ]
    return torch.stack(cols, dim=1)


def dense_ggn(case) -> torch.Tensor:
    """J^T H_z J with J from a first-order Jacobian and H_z of the loss in output space (double backward)."""
    primals = select_params(case.model)
    x, y = case.batch

    def out(t):
        with oba.curvature_context(case.model):
            return torch.func.functional_call(case.model, unflatten_params(t, primals), (x,))

    theta = flatten_params(primals)
    z = out(theta)
    J = torch.autograd.functional.jacobian(out, theta).reshape(z.numel(), -1)
    Hz = torch.autograd.functional.hessian(lambda zz: case.loss_fn(zz.view_as(z), y), z.reshape(-1))
    return J.T @ Hz @ J
