"""Woodbury Fisher blocks, WoodFisher, the multi-weight OBS update and CBS swap bookkeeping (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba
from oba.cbs import SwapSearch, cbs_select, cbs_update, magnitude_set, rmp_start
from oba.empirical_fisher import (
    DenseGradients,
    EmpiricalFisher,
    LinearGradients,
    block_fishers,
    linear_gradient_factors,
    make_blocks,
    obs_update,
    woodfisher_scores,
    woodfisher_update,
)


def _grads(n=12, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _dense_fisher(gmat, damp):
    return gmat.T @ gmat / gmat.shape[0] + damp * torch.eye(gmat.shape[1], dtype=gmat.dtype)


@pytest.mark.parametrize("n,d", [(12, 40), (40, 12)])
def test_woodbury_inverse_matches_dense(n, d):
    gmat, damp = _grads(n, d), 0.05
    dense_inv = torch.linalg.inv(_dense_fisher(gmat, damp))
    fisher = EmpiricalFisher(gmat, damp, chunk=7)
    assert fisher.method == ("woodbury" if d > n else "dense")
    q = torch.tensor([3, 0, 11, 5])
    v = torch.randn(d, 3, dtype=torch.float64)
    torch.testing.assert_close(fisher.inverse_diagonal(), dense_inv.diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher.inverse_submatrix(q), dense_inv[q][:, q], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher.inverse_matvec(v), dense_inv @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher.dense_inverse(), dense_inv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher.matvec(v), _dense_fisher(gmat, damp) @ v)
    torch.testing.assert_close(fisher.diagonal(), _dense_fisher(gmat, damp).diagonal())


def test_woodbury_never_forms_d_by_d(monkeypatch):
    # a 30,000-weight block with 20 gradients: everything must go through the 20 x 20 core
    gmat = _grads(20, 30_000).float()
    fisher = EmpiricalFisher(DenseGradients(gmat), 1e-3)
    assert fisher._chol.shape == (20, 20)
    diag = fisher.inverse_diagonal()
    assert diag.shape == (30_000,) and bool((diag > 0).all()) and bool((diag <= 1e3 * (1 + 1e-9)).all())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)).double()


def test_factored_linear_gradients_match_per_sample_gradients():
    model = _mlp()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    fact = linear_gradient_factors(model, F.cross_entropy, batches, ["0", "2"], 9)
    per = oba.per_sample_gradients(model, F.cross_entropy, (x, y), ["0.weight", "2.weight"])
    gmat = torch.cat([g.reshape(9, -1) for g in per.values()], 1)
    dense = DenseGradients(gmat)
    torch.testing.assert_close(fact.gram(), dense.gram())
    v, u = torch.randn(fact.d, 2, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    torch.testing.assert_close(fact.matvec(v), gmat @ v)
    torch.testing.assert_close(fact.rmatvec(u), gmat.T @ u)
    idx = torch.tensor([0, 29, 31, 44, 7])
    torch.testing.assert_close(fact.columns(idx), gmat[:, idx])
    torch.testing.assert_close(fact.column_sq_norms(), gmat.square().sum(0))


def test_factored_rejects_conv_and_bias():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with pytest.raises(ValueError, match="bias"):
        linear_gradient_factors(model, F.cross_entropy, [], ["0"], 1)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        linear_gradient_factors(model, F.cross_entropy, [], ["1"], 1)


def _kkt_update(f, theta, pruned):
    # min 1/2 dᵀFd s.t. d_Q = -θ_Q, solved as one KKT system [[F, E], [Eᵀ, 0]]
    q = pruned.nonzero().squeeze(1)
    d, m = f.shape[0], q.numel()
    e = torch.zeros(d, m, dtype=f.dtype)
    e[q, torch.arange(m)] = 1.0
    kkt = torch.cat([torch.cat([f, e], 1), torch.cat([e.T, torch.zeros(m, m, dtype=f.dtype)], 1)])
    rhs = torch.cat([torch.zeros(d, dtype=f.dtype), -theta[q]])
    return torch.linalg.solve(kkt, rhs)[:d]


@pytest.mark.parametrize("form", ["auto", "primal", "primal_woodbury", "dual"])
def test_multi_weight_obs_update_matches_constrained_least_squares(form):
    gmat, damp = _grads(15, 50, seed=1), 0.1
    theta = torch.randn(50, dtype=torch.float64)
    pruned = torch.zeros(50, dtype=torch.bool)
    pruned[torch.randperm(50)[:30]] = True
    fisher = EmpiricalFisher(gmat, damp)
    delta = obs_update(fisher, theta, pruned, form=form)
    torch.testing.assert_close(delta, _kkt_update(_dense_fisher(gmat, damp), theta, pruned), rtol=1e-9, atol=1e-11)
    assert torch.equal((theta + delta)[pruned], torch.zeros(30, dtype=torch.float64))


def test_obs_update_dense_block_and_single_weight_formula():
    gmat, damp = _grads(30, 10, seed=2), 0.01
    theta = torch.randn(10, dtype=torch.float64)
    fisher = EmpiricalFisher(gmat, damp)
    assert fisher.method == "dense"
    pruned = torch.zeros(10, dtype=torch.bool)
    pruned[4] = True
    inv = torch.linalg.inv(_dense_fisher(gmat, damp))
    expected = -theta[4] / inv[4, 4] * inv[:, 4]  # Hassibi & Stork, one weight
    torch.testing.assert_close(obs_update(fisher, theta, pruned), expected, rtol=1e-9, atol=1e-12)


def test_woodfisher_scores_and_update_are_sums_of_single_obs():
    gmat, damp = _grads(8, 25, seed=3), 0.02
    theta = torch.randn(25, dtype=torch.float64)
    fisher = EmpiricalFisher(gmat, damp)
    inv = torch.linalg.inv(_dense_fisher(gmat, damp))
    torch.testing.assert_close(woodfisher_scores(fisher, theta), theta**2 / (2 * inv.diagonal()))
    pruned = torch.zeros(25, dtype=torch.bool)
    pruned[[1, 5, 9]] = True
    expected = sum(-theta[q] / inv[q, q] * inv[:, q] for q in (1, 5, 9))
    got = woodfisher_update(fisher, theta, pruned)
    torch.testing.assert_close(got[~pruned], expected[~pruned], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[pruned], -theta[pruned])


def test_blocks_structure_and_block_fishers():
    shapes = {"a.weight": (4, 5), "b.weight": (3, 2)}
    assert [(b.start, b.stop) for b in make_blocks(shapes, "layer")] == [(0, 20), (20, 26)]
    assert [(b.start, b.stop) for b in make_blocks(shapes, "joint")] == [(0, 26)]
    assert [(b.start, b.stop) for b in make_blocks(shapes, 8)] == [(0, 8), (8, 16), (16, 20), (20, 26)]
    with pytest.raises(ValueError, match="block structure"):
        make_blocks(shapes, "rows")
    gmat = _grads(5, 26)
    fishers = block_fishers(DenseGradients(gmat), make_blocks(shapes, 8), 0.1)
    torch.testing.assert_close(fishers[1].dense_inverse(), torch.linalg.inv(_dense_fisher(gmat[:, 8:16], 0.1)))


def _objective(f, theta, pruned):
    t = torch.where(pruned, theta, torch.zeros_like(theta))
    return float(t @ f @ t)


def test_swap_bookkeeping_matches_recomputation_from_scratch():
    gmat, damp = _grads(10, 30, seed=4), 0.05
    theta = torch.randn(30, dtype=torch.float64)
    blocks = make_blocks({"a": (18,), "b": (12,)}, "layer")
    fishers = block_fishers(DenseGradients(gmat), blocks, damp)
    dense = torch.block_diag(_dense_fisher(gmat[:, :18], damp), _dense_fisher(gmat[:, 18:], damp))
    search = SwapSearch(fishers, blocks, theta, magnitude_set(theta, 12))
    assert search.objective == pytest.approx(_objective(dense, theta, search.pruned), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):  # random swaps, within and across blocks
        pruned, kept = search.pruned.nonzero().squeeze(1), (~search.pruned).nonzero().squeeze(1)
        i = int(pruned[torch.randint(len(pruned), (1,), generator=gen)])
        j = int(kept[torch.randint(len(kept), (1,), generator=gen)])
        before = _objective(dense, theta, search.pruned)
        change = search.swap(i, j)
        after = _objective(dense, theta, search.pruned)
        assert change == pytest.approx(after - before, rel=1e-9, abs=1e-12)
        assert search.objective == pytest.approx(after, rel=1e-9)
        torch.testing.assert_close(search.u, dense @ torch.where(search.pruned, theta, torch.zeros_like(theta)))
    assert search.objective_from_scratch() == pytest.approx(search.objective, rel=1e-9)
    # a sweep never increases the objective and keeps the set size
    before, size = search.objective, int(search.pruned.sum())
    search.sweep(eps=0.0, rho=5, tau=5)
    assert search.objective <= before + 1e-12 and int(search.pruned.sum()) == size
    assert search.objective == pytest.approx(_objective(dense, theta, search.pruned), rel=1e-9)


def test_cbs_select_finds_cancelling_pair_and_is_deterministic():
    # two strongly anti-correlated directions: pruning weights 0 and 1 together costs ~nothing,
    # although each alone is expensive (the point of CBS)
    n = 50
    g = torch.Generator().manual_seed(5)
    gmat = torch.randn(n, 6, generator=g, dtype=torch.float64)
    gmat[:, :2] *= 0.05
    common = torch.randn(n, generator=g, dtype=torch.float64)
    gmat[:, 0] += 3 * common
    gmat[:, 1] += 3 * common
    theta = torch.tensor([0.5, -0.52, 0.9, 0.45, 1.0, 1.1], dtype=torch.float64)
    blocks = make_blocks({"w": (6,)}, "joint")
    fishers = block_fishers(DenseGradients(gmat), blocks, 1e-3)
    dense = _dense_fisher(gmat, 1e-3)

    def quad_loss(pruned):
        return _objective(dense, theta, pruned)

    results = [cbs_select(fishers, blocks, theta, 2, quad_loss, trials=1, rho=6, tau=6, progress=False) for _ in "ab"]
    assert torch.equal(results[0].pruned, results[1].pruned)
    # magnitude prunes {0, 3}; pruning 0 alone is expensive, but 0 and 1 cancel: one swap 3 -> 1 finds it
    assert magnitude_set(theta, 2).nonzero().squeeze(1).tolist() == [0, 3]
    assert results[0].pruned.nonzero().squeeze(1).tolist() == [0, 1]
    assert quad_loss(results[0].pruned) < 0.1 * quad_loss(magnitude_set(theta, 2))
    # start heuristic: trial 0 is global magnitude
    _, losses = rmp_start(theta, 2, quad_loss, trials=4, seed=1)
    assert losses[0] == pytest.approx(quad_loss(magnitude_set(theta, 2)))
    new = cbs_update(fishers, blocks, theta, results[0].pruned)
    assert torch.equal(new[:2], torch.zeros(2, dtype=torch.float64))


def test_rmp_rejects_bad_k():
    with pytest.raises(ValueError, match="prune"):
        rmp_start(torch.ones(4), 4, lambda p: 0.0)


def test_linear_gradients_validates_shapes():
    with pytest.raises(ValueError, match="same N"):
        LinearGradients([(torch.zeros(3, 2), torch.zeros(4, 5))])
