"""oba.block_taylor: the loss change of removing one unit alone, against dense Hessians on the toy matrix."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

import oba
from oba.block_taylor import block_taylor
from oba.curvature import flatten_params, ggn_vp, gradient, hessian, select_params, unflatten_params
from oba.group_importance import ParameterScoreImportance
from oba.toynets import make_case

# conv/linear nets whose Torch-Pruning groups exist (the classifier ignored); the attention toys have no prunable
# group Torch-Pruning can build without its head handling
CASES = ["mlp_relu", "mlp_gelu", "cnn_bn_eval", "cnn_bn_train", "residual", "residual_bn_train"]


def _groups(case):
    model = case.model
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    dg = tp.DependencyGraph().build_dependency(model, case.batch[0])
    groups = list(dg.get_all_groups(ignored_layers=[last], root_module_types=(nn.Conv2d, nn.Linear)))
    assert groups
    return groups


def _units(case, groups):
    """Every unit's flat perturbation delta_u = -theta * m_u, per group: [Tensor[K, P]]."""
    rule = ParameterScoreImportance(case.model)
    theta = select_params(case.model)
    flat = flatten_params(theta)
    out = []
    for g in groups:
        k = len(g[0].idxs)
        rows = []
        for j in range(k):
            spread = rule.spread(g, torch.eye(k, dtype=torch.float64)[j])
            m = flatten_params({n: spread.get(n, torch.zeros_like(t)) for n, t in theta.items()})
            assert set(m.unique().tolist()) <= {0.0, 1.0}  # each owned entry once
            rows.append(-flat * m)
        out.append(torch.stack(rows))
    return out


def _dense(case):
    method = "loop" if case.has_normalization else "vmap"
    return hessian(case.model, case.loss_fn, case.batch, method=method)


@pytest.mark.parametrize("name", CASES)
def test_spread_is_the_adjoint_of_the_sum_rule(name):
    """m_k^T S equals channel k's signed "sum" score of any per-parameter S: the unit the criterion perturbs is the
    unit every other criterion scores."""
    case = make_case(name)
    groups = _groups(case)
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in case.model.named_parameters()}
    imp = ParameterScoreImportance(case.model, scores, normalizer=None, absolute=False)
    for g, deltas in zip(groups, _units(case, groups), strict=True):
        theta = flatten_params(select_params(case.model))
        masks = (deltas / -theta).nan_to_num()
        torch.testing.assert_close(masks @ flatten_params(scores), imp(g).double())


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("first_order", [True, False])
def test_exact_equals_the_own_block_of_the_dense_hessian(name, first_order):
    case = make_case(name)
    groups = _groups(case)
    h = _dense(case)
    g = flatten_params(gradient(case.model, case.loss_fn, case.batch))
    got = block_taylor(case.model, case.loss_fn, [case.batch], groups, probes=None, first_order=first_order)
    for deltas, value in zip(_units(case, groups), got, strict=True):
        expected = 0.5 * torch.einsum("kp,pq,kq->k", deltas, h, deltas) + (deltas @ g if first_order else 0)
        torch.testing.assert_close(value, expected, rtol=1e-8, atol=1e-10)


def test_gauss_newton_variant_uses_the_ggn():
    case = make_case("cnn_bn_eval")
    groups = _groups(case)
    theta = select_params(case.model)
    flat = flatten_params(theta)
    basis = torch.eye(flat.numel(), dtype=torch.float64)
    cols = []
    for e in basis:
        parts = unflatten_params(e, theta)
        cols.append(flatten_params(ggn_vp(case.model, case.loss_fn, case.batch, parts)))
    ggn = torch.stack(cols, 1)
    got = block_taylor(
        case.model, case.loss_fn, [case.batch], groups, probes=None, curvature="gauss_newton", first_order=False
    )
    for deltas, value in zip(_units(case, groups), got, strict=True):
        torch.testing.assert_close(value, 0.5 * torch.einsum("kp,pq,kq->k", deltas, ggn, deltas))
        assert bool((value >= -1e-12).all())  # G is PSD for the cross-entropy


@pytest.mark.parametrize("name", ["mlp_gelu", "residual_bn_train"])
def test_estimate_is_unbiased_with_the_documented_variance(name):
    """Single-draw estimates over many seeds: their mean is the own block, their variance sum_{w != u} B_uw^2 with
    B = D H D^T over every unit of every group (draws are joint); the K-draw mean converges at 1/sqrt(K)."""
    case = make_case(name)
    groups = _groups(case)
    h = _dense(case)
    deltas = torch.cat(_units(case, groups))
    block = deltas @ h @ deltas.T
    own = block.diagonal()
    variance = (block**2).sum(1) - own**2
    draws = torch.stack(
        [
            torch.cat(block_taylor(case.model, case.loss_fn, [case.batch], groups, probes=1, first_order=False, seed=s))
            for s in range(300)
        ]
    )
    quad = 2 * draws  # the values are 1/2 q
    sem = (variance / len(draws)).sqrt()
    assert bool(((quad.mean(0) - own).abs() <= 5 * sem + 1e-12).all())
    ratio = quad.var(0)[variance > 0] / variance[variance > 0]
    assert 0.6 < float(ratio.median()) < 1.6
    many = 2 * torch.cat(block_taylor(case.model, case.loss_fn, [case.batch], groups, probes=64, first_order=False))
    assert bool(((many - own).abs() <= 5 * (variance / 64).sqrt() + 1e-12).all())


def test_prunes_a_toy_model_to_its_target_and_rejects_bad_options():
    case = make_case("cnn_bn_eval")
    model = case.model
    pruned, history = oba.prune_structured(
        model, case.batch[0], "block_taylor", keep_flops=0.7, steps=2, batches=[case.batch], loss_fn=case.loss_fn,
        ignored_layers=[model[-1]], progress=False,
    )  # fmt: skip
    assert history[-1]["flops_kept"] <= 0.7
    assert torch.isfinite(pruned(case.batch[0])).all()
    with pytest.raises(ValueError, match="probes"):
        block_taylor(model, case.loss_fn, [case.batch], _groups(make_case("cnn_bn_eval")), probes=0)
    with pytest.raises(ValueError, match="curvature"):
        block_taylor(model, case.loss_fn, [case.batch], [], curvature="fisher")


def test_multi_channel_units_add_up_to_the_units_own_block():
    """Units of two channels (as a head's): the channel shares add up to the union's exact own block, and the
    estimate, whose channels of a unit share one sign, is unbiased for the union."""
    case = make_case("mlp_gelu")
    groups = _groups(case)
    units = [[(2 * j, 2 * j + 1) for j in range(len(g[0].idxs) // 2)] for g in groups]
    h = _dense(case)
    got = block_taylor(case.model, case.loss_fn, [case.batch], groups, units=units, probes=None, first_order=False)
    many = block_taylor(case.model, case.loss_fn, [case.batch], groups, units=units, probes=400, first_order=False)
    unions = []
    for deltas, value, est, us in zip(_units(case, groups), got, many, units, strict=True):
        for u in us:
            d = deltas[list(u)].sum(0)  # the union's perturbation (the channels own disjoint entries)
            torch.testing.assert_close(value[list(u)].sum(), 0.5 * d @ h @ d)
            unions.append((d, float(est[list(u)].sum())))
    all_units = torch.stack([d for d, _ in unions])
    block = all_units @ h @ all_units.T
    sd = ((block**2).sum(1) - block.diagonal() ** 2).sqrt() / 400**0.5
    est = 2 * torch.tensor([e for _, e in unions], dtype=torch.float64)
    assert bool(((est - block.diagonal()).abs() <= 5 * sd + 1e-12).all())


def test_the_pruner_shows_every_group_and_its_head_units_at_once():
    from oba.block_taylor import BlockTaylorImportance
    from oba.models.vit import vit_cifar

    torch.manual_seed(0)
    model = vit_cifar(dim=24, depth=1, num_heads=3, mlp_dim=32, image_size=16)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    seen = []

    class Recording(BlockTaylorImportance):
        def observe_groups(self, groups, units=None):
            seen.append((len(groups), units))
            super().observe_groups(groups, units)

    class Scorer(oba.criteria.Scorer):
        def __call__(self, model, batches):
            return Recording(model, nn.functional.cross_entropy, batches, probes=2)

    oba.prune_structured(model, x, Scorer(), keep_flops=0.8, steps=1, batches=[(x, y)], progress=False)
    ((count, units),) = seen
    assert count == len(units) > 1
    head_units = [us for us in units if any(len(u) > 1 for u in us)]
    assert head_units, "no group was handed over with multi-channel (head) units"
    for us in head_units:
        assert len(us) == 3 and len({len(u) for u in us}) == 1  # 3 heads of equal width


def test_single_weights_are_the_diagonal_case():
    """A unit of one weight: -theta g + 1/2 theta^2 H_ii, exact with probes=None; Hutchinson's estimate (and the GGN's)
    converges to it; the unstructured route masks the lowest signed values."""
    from oba.unstructured import prune_unstructured

    case = make_case("mlp_gelu")
    theta = select_params(case.model)
    flat, h = flatten_params(theta), _dense(case)
    g = flatten_params(gradient(case.model, case.loss_fn, case.batch))
    expected = -flat * g + 0.5 * flat**2 * h.diagonal()
    exact = flatten_params(
        oba.score(case.model, case.loss_fn, [case.batch], "block_taylor", probes=None, progress=False)
    )
    torch.testing.assert_close(exact, expected)
    probed = flatten_params(
        oba.score(case.model, case.loss_fn, [case.batch] * 20, "block_taylor", probes=20, progress=False)
    )
    sd = 0.5 * flat**2 * (((h**2).sum(1) - h.diagonal() ** 2) / 400).sqrt()  # Hutchinson's, 400 probes
    assert bool(((probed - expected).abs() <= 5 * sd + 1e-12).all())
    with pytest.raises(ValueError, match="probes"):
        oba.score(case.model, case.loss_fn, [case.batch], "block_taylor", probes=None, curvature="gauss_newton")
    basis = torch.eye(flat.numel(), dtype=torch.float64)
    ggn = torch.stack(
        [flatten_params(ggn_vp(case.model, case.loss_fn, case.batch, unflatten_params(e, theta))) for e in basis]
    )
    gn = oba.score(
        case.model, case.loss_fn, [case.batch] * 20, "block_taylor", probes=20, curvature="gauss_newton",
        first_order=False, progress=False,
    )  # fmt: skip
    sd = 0.5 * flat**2 * (((ggn**2).sum(1) - ggn.diagonal() ** 2) / 400).sqrt()
    assert bool(((flatten_params(gn) - 0.5 * flat**2 * ggn.diagonal()).abs() <= 5 * sd + 1e-12).all())
    masks = prune_unstructured(
        case.model, criterion="block_taylor", sparsity=0.3, loss_fn=case.loss_fn, batches=[case.batch], probes=None,
        progress=False,
    )  # fmt: skip
    layer, mask = next(iter(masks.items()))
    values = oba.score(case.model, case.loss_fn, [case.batch], "block_taylor", probes=None, progress=False)
    assert mask.float().mean() < 1 and values[layer.replace("weight", "weight_orig")][~mask.bool()].numel() > 0


@pytest.mark.parametrize("score_mode", ["train", "eval"])
def test_the_pruner_scores_in_its_score_mode_and_counts_the_time_as_scoring(score_mode, monkeypatch):
    """The work happens when rank_units shows the groups, after the pruner restored the modes: the importance applies
    the modes it was created in, and reports its time as the step's scoring time."""
    import oba.block_taylor as bt

    case = make_case("cnn_bn_eval")
    model = case.model.eval()
    seen = []
    original = bt.block_taylor

    def spy(m, *args, **kwargs):
        seen.append({mod.training for mod in m.modules()})
        return original(m, *args, **kwargs)

    monkeypatch.setattr(bt, "block_taylor", spy)
    _, history = oba.prune_structured(
        model, case.batch[0], "block_taylor", keep_flops=0.8, steps=1, batches=[case.batch], loss_fn=case.loss_fn,
        ignored_layers=[model[-1]], score_mode=score_mode, progress=False,
    )  # fmt: skip
    assert seen == [{score_mode == "train"}]
    assert not model.training  # restored
    assert history[-1]["score_seconds"] > 0 and history[-1]["prune_seconds"] > 0
