"""Importance criteria against their formulas computed from dense quantities (float64 toy nets)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import oba
from oba.batches import BadBatchError
from oba.curvature import flatten_params, ggn_vp, gradient, hessian, hessian_diagonal, hvp, select_params
from oba.toynets import make_case


def two_batches(case):
    x, y = case.batch
    gen = torch.Generator().manual_seed(7)
    x2 = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    y2 = torch.randint(0, 3, y.shape, generator=gen)
    return [(x, y), (x2, y2)]


def assert_dicts_close(a, b, rtol=1e-10, atol=1e-12):
    assert list(a) == list(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude(p):
    case = make_case("mlp_relu")
    s = oba.score(case.model, None, None, "magnitude", p=p)
    assert_dicts_close(s, {n: t.detach().abs() ** p for n, t in case.model.named_parameters()})


def test_taylor_is_theta_times_mean_gradient():
    case = make_case("cnn_bn_eval")
    batches = two_batches(case)
    s = oba.score(case.model, case.loss_fn, batches, "taylor", progress=False)
    g = [gradient(case.model, case.loss_fn, b) for b in batches]
    theta = select_params(case.model)
    assert_dicts_close(s, {n: t * (g[0][n] + g[1][n]) / 2 for n, t in theta.items()})
    s_abs = oba.score(case.model, case.loss_fn, batches, "taylor", absolute=True, progress=False)
    assert_dicts_close(s_abs, {n: t.abs() for n, t in s.items()})


@pytest.mark.parametrize("name", ["mlp_gelu", "cnn_bn_train", "residual_bn_train", "attention_layernorm"])
def test_oba_is_theta_times_dense_hessian_theta(name):
    case = make_case(name)
    batches = two_batches(case)
    s = oba.score(case.model, case.loss_fn, batches, "oba", progress=False)
    theta = flatten_params(select_params(case.model))
    H = sum(hessian(case.model, case.loss_fn, b) for b in batches) / 2
    expected = theta * (H @ theta)
    flat = flatten_params(s)
    torch.testing.assert_close(flat, expected, rtol=1e-9, atol=1e-12)
    # the scores split the quadratic form, cross terms included
    torch.testing.assert_close(flat.sum(), theta @ H @ theta, rtol=1e-10, atol=0)
    # ... which OBD's diagonal does not
    assert not torch.allclose(flat, theta**2 * H.diagonal(), rtol=1e-3)


def test_oba_custom_delta_and_first_order():
    case = make_case("mlp_gelu")
    theta = select_params(case.model)
    delta = OrderedDict((n, -t * (torch.arange(t.numel()).view_as(t) % 2)) for n, t in theta.items())  # half removed
    H = hessian(case.model, case.loss_fn, case.batch)
    d = flatten_params(delta)
    g = flatten_params(gradient(case.model, case.loss_fn, case.batch))
    s = flatten_params(oba.score(case.model, case.loss_fn, [case.batch], "oba", delta=delta, progress=False))
    torch.testing.assert_close(s, d * (H @ d), rtol=1e-10, atol=1e-12)
    s1 = oba.score(case.model, case.loss_fn, [case.batch], "oba", delta=delta, first_order=True, progress=False)
    s1 = flatten_params(s1)
    torch.testing.assert_close(s1, g * d + 0.5 * d * (H @ d), rtol=1e-10, atol=1e-12)
    # the first-order score sums to the second-order Taylor estimate of the loss change
    torch.testing.assert_close(s1.sum(), g @ d + 0.5 * d @ H @ d, rtol=1e-10, atol=0)


def test_obd_fisher_per_sample_and_per_batch():
    case = make_case("cnn_bn_eval")
    batches = two_batches(case)
    theta = select_params(case.model)
    s = oba.score(case.model, case.loss_fn, batches, "obd_fisher", progress=False)
    diag = {n: torch.zeros_like(t) for n, t in theta.items()}
    for x, y in batches:
        for i in range(len(y)):
            gi = gradient(case.model, case.loss_fn, (x[i : i + 1], y[i : i + 1]))
            for n in diag:
                diag[n] += gi[n] ** 2 / len(y) / len(batches)
    assert_dicts_close(s, {n: t**2 * diag[n] for n, t in theta.items()})
    sb = oba.score(case.model, case.loss_fn, batches, "obd_fisher", fisher="per_batch", progress=False)
    gb = [gradient(case.model, case.loss_fn, b) for b in batches]
    assert_dicts_close(sb, {n: t**2 * (gb[0][n] ** 2 + gb[1][n] ** 2) / 2 for n, t in theta.items()})


def test_obd_fisher_per_sample_refuses_train_mode_batchnorm():
    case = make_case("cnn_bn_train")
    with pytest.raises(ValueError, match="model.eval"):
        oba.score(case.model, case.loss_fn, [case.batch], "obd_fisher", progress=False)
    oba.score(case.model, case.loss_fn, [case.batch], "obd_fisher", fisher="per_batch", progress=False)


def test_obd_hessian_exact():
    case = make_case("attention_layernorm")
    s = oba.score(case.model, case.loss_fn, [case.batch], "obd_hessian", progress=False)
    theta = flatten_params(select_params(case.model))
    H = hessian(case.model, case.loss_fn, case.batch)
    torch.testing.assert_close(flatten_params(s), theta**2 * H.diagonal(), rtol=1e-10, atol=1e-12)


def test_hutchinson_single_probe_identity_and_convergence():
    """z ⊙ Hz = diag(H) + (offdiag(H) z) ⊙ z exactly; the mean over probes converges to diag(H)."""
    case = make_case("mlp_gelu")
    H = hessian(case.model, case.loss_fn, case.batch)
    gen = torch.Generator().manual_seed(3)
    est = flatten_params(
        hessian_diagonal(case.model, case.loss_fn, case.batch, method="hutchinson", samples=1, generator=gen)
    )
    z = torch.randint(0, 2, (H.shape[0],), generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    # the probe is drawn parameter by parameter in order, so the same generator seed reproduces it
    torch.testing.assert_close(est, H.diagonal() + ((H - torch.diag(H.diagonal())) @ z) * z, rtol=1e-10, atol=1e-12)
    many = flatten_params(
        hessian_diagonal(case.model, case.loss_fn, case.batch, method="hutchinson", samples=400, generator=gen)
    )
    off = (H - torch.diag(H.diagonal())).pow(2).sum(1).sqrt()  # std of a single probe's error per entry
    assert ((many - H.diagonal()).abs() <= 5 * off / 400**0.5 + 1e-12).all()


def test_euler_homogeneity_of_bias_free_relu_net():
    """Logits of a bias-free 3-layer ReLU net are homogeneous of degree 3 in θ: (H - H_GN) θ = 2 g."""
    case = make_case("mlp_relu_nobias")
    theta = select_params(case.model)
    h = flatten_params(hvp(case.model, case.loss_fn, case.batch, theta))
    gn = flatten_params(ggn_vp(case.model, case.loss_fn, case.batch, theta))
    g = flatten_params(gradient(case.model, case.loss_fn, case.batch))
    torch.testing.assert_close(h - gn, 2 * g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("criterion", oba.CRITERIA)
def test_scoring_leaves_the_model_alone(criterion):
    case = make_case("cnn_bn_train")
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    options = {"fisher": "per_batch"} if criterion == "obd_fisher" else {}
    s = oba.score(case.model, case.loss_fn, two_batches(case), criterion, progress=False, **options)
    assert set(s) == {n for n, _ in case.model.named_parameters()}
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in case.model.parameters())
    assert case.model.training
    assert not any(m._forward_hooks or m._backward_hooks for m in case.model.modules())


def test_parameter_subset_and_max_batches():
    case = make_case("mlp_gelu")
    batches = two_batches(case)
    s = oba.score(case.model, case.loss_fn, batches, "taylor", params=["1.weight"], max_batches=1, progress=False)
    assert list(s) == ["1.weight"]
    g = gradient(case.model, case.loss_fn, batches[0])
    torch.testing.assert_close(s["1.weight"], case.model[1].weight.detach() * g["1.weight"])


def test_clear_errors():
    case = make_case("mlp_relu")
    with pytest.raises(ValueError, match="unknown criterion"):
        oba.score(case.model, case.loss_fn, [case.batch], "obs")
    with pytest.raises(TypeError, match="options: delta, first_order"):
        oba.score(case.model, case.loss_fn, [case.batch], "oba", p=2)
    with pytest.raises(ValueError, match="needs data"):
        oba.score(case.model, case.loss_fn, None, "taylor")
    with pytest.raises(ValueError, match="empty"):
        oba.score(case.model, case.loss_fn, [], "taylor", progress=False)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        oba.score(case.model, None, None, "magnitude", p=3)
    with pytest.raises(BadBatchError, match="pairs"):
        oba.score(case.model, case.loss_fn, [case.batch[0]], "taylor", progress=False)


def test_works_on_a_dataloader_with_progress_bar():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = torch.utils.data.TensorDataset(torch.randn(20, 3, 2, 2), torch.randint(0, 3, (20,)))
    dl = torch.utils.data.DataLoader(data, batch_size=8)
    s = oba.score(model, nn.functional.cross_entropy, dl, "oba", progress=True)
    assert s["1.weight"].shape == (3, 12) and s["1.weight"].dtype == torch.float32


def test_oba_with_a_subset_of_terms():
    from oba.decompose import term_hvp

    case = make_case("residual_bn_train")
    theta = select_params(case.model)
    s = oba.score(case.model, case.loss_fn, [case.batch], "oba", terms=("series", "parallel"), progress=False)
    two = term_hvp(case.model, case.loss_fn, case.batch, theta, terms=("series", "parallel"))
    assert_dicts_close(s, {n: t * two[n] for n, t in theta.items()})
    exact = oba.score(case.model, case.loss_fn, [case.batch], "oba", progress=False)
    all_four = oba.score(
        case.model,
        case.loss_fn,
        [case.batch],
        "oba",
        terms=("gauss_newton", "series", "parallel", "nonlinear"),
        progress=False,
    )
    assert_dicts_close(all_four, exact)
    # on a conv-BN(train)-ReLU residual block the two-term score is far from the exact one
    a, b = flatten_params(s), flatten_params(exact)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.9
