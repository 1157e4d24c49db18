"""Tests of oba.kfac: K-FAC factors and the Kron-OBD / Kron-OBS costs against dense computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oba.curvature import per_sample_gradients
from oba.kfac import KronImportance, kfac_factors, kron_obd_cost, kron_obs_cost


def vec_cols(W: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec (the convention of A ⊗ S)."""
    return W.T.reshape(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_one_sample_kronecker_factors_equal_the_empirical_fisher_of_a_linear_layer(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([2])
    f = kfac_factors(model, F.cross_entropy, [(x, y)], progress=False)[model[0]]
    grads = per_sample_gradients(model, F.cross_entropy, (x, y), ["0.weight", "0.bias"] if bias else ["0.weight"])
    G = grads["0.weight"][0]
    if bias:
        G = torch.cat([G, grads["0.bias"][0][:, None]], 1)
    g = vec_cols(G)
    torch.testing.assert_close(torch.kron(f.A, f.S), torch.outer(g, g))


def test_conv_factors_are_means_over_positions_and_samples():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    f = kfac_factors(model, F.cross_entropy, [(x[:2], y[:2]), (x[2:], y[2:])], progress=False)[conv]
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(f.A, patches.T @ patches / len(patches))
    out = conv(x).detach().requires_grad_()
    loss = F.cross_entropy(model[2](model[1](out)), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, out)
    g = g.flatten(2)  # [B, C, T]
    torch.testing.assert_close(f.S, torch.einsum("bit,bjt->ij", g, g) / 5)


def random_factors(conv: nn.Conv2d):
    torch.manual_seed(1)
    x = torch.randn(6, conv.in_channels, 5, 5, dtype=torch.float64)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).double()
    model(x)
    return kfac_factors(model, F.cross_entropy, [(x, torch.randint(0, 3, (6,)))], progress=False)[conv]


def constrained_cost(F_: torch.Tensor, w: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """min ½ δᵀFδ s.t. δ_removed = -w_removed (KKT solve, dense)."""
    q = removed.nonzero().squeeze(1)
    Finv = torch.linalg.inv(F_)
    return 0.5 * w[q] @ torch.linalg.solve(Finv[q][:, q], w[q])


@pytest.mark.parametrize("out", [True, False])
def test_kron_obs_cost_is_the_constrained_quadratic_minimum(out):
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    f = random_factors(conv)
    damping = 1e-2
    eps = damping**0.5
    A = f.A + eps * torch.eye(len(f.A), dtype=torch.float64)
    S = f.S + eps * torch.eye(len(f.S), dtype=torch.float64)
    W = f.weight_matrix(conv)  # [4, 3*9 + 1]
    dense = torch.kron(A, S)
    costs = kron_obs_cost(conv, f, out=out, damping=damping)
    n = 4 if out else 3
    for c in range(n):
        mask = torch.zeros_like(W, dtype=torch.bool)
        if out:
            mask[c] = True
        else:
            mask[:, c * 9 : (c + 1) * 9] = True
        torch.testing.assert_close(costs[c], constrained_cost(dense, vec_cols(W), vec_cols(mask)))


@pytest.mark.parametrize("out", [True, False])
def test_kron_obd_cost_sums_the_diagonal_saliencies(out):
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    f = random_factors(conv)
    W = f.weight_matrix(conv)
    diag = torch.kron(f.A, f.S).diagonal()
    entry = (0.5 * vec_cols(W) ** 2 * diag).reshape(W.shape[1], W.shape[0]).T  # back to [out, in]
    costs = kron_obd_cost(conv, f, out=out)
    expected = entry.sum(1) if out else entry[:, :27].reshape(4, 3, 9).sum((0, 2))
    torch.testing.assert_close(costs, expected)


def test_factors_leave_no_hooks_no_grads_and_no_running_stat_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).train()
    x = torch.randn(4, 3, 6, 6)
    model(x)
    stats = model[1].running_mean.clone()
    kfac_factors(model, F.cross_entropy, [(x, torch.tensor([0, 1, 0, 1]))], sampled=True, progress=False)
    assert torch.equal(model[1].running_mean, stats)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_stale_factors_are_reported():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    factors = kfac_factors(model, F.cross_entropy, [(x, torch.tensor([0, 1, 0]))], progress=False)
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = dg.get_pruning_group(model[0], tp.prune_linear_out_channels, [0])
    imp = KronImportance(model, factors, "obs")
    assert imp(dg.get_pruning_group(model[0], tp.prune_linear_out_channels, list(range(6)))).shape == (6,)
    group.prune()
    with pytest.raises(RuntimeError, match="recompute"):
        imp(dg.get_pruning_group(model[0], tp.prune_linear_out_channels, list(range(5))))
