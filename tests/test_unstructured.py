"""Unstructured masks (torch.nn.utils.prune conventions), criteria, WoodFisher and CBS on models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oba.unstructured import (
    cbs_prune,
    check_sparsity,
    criterion_scores,
    masked_loss,
    masks_from_scores,
    prunable_layers,
    prune_unstructured,
    remove_masks,
    sparsity_report,
    woodfisher_prune,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8, bias=False),
        nn.ReLU(),
        nn.Linear(8, 3, bias=False),
    ).double()


def _batches(n=3, b=6):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(b, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half", None])
def test_sparsity_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="fraction of weights"):
        check_sparsity(bad)


def test_layer_selection():
    model = _net()
    assert list(prunable_layers(model)) == ["0", "3", "5"]
    assert list(prunable_layers(model, r"[35]")) == ["3", "5"]
    assert list(prunable_layers(model, [model[5], "0"])) == ["0", "5"]
    with pytest.raises(ValueError, match="not supported"):
        prunable_layers(model, ["1"])
    with pytest.raises(ValueError, match="no module name matches"):
        prunable_layers(model, "fc.*")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_survive_remove(scope):
    model = _net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune_unstructured(model, criterion="magnitude", sparsity=0.6, scope=scope)
    assert hasattr(model[3], "weight_orig") and hasattr(model[3], "weight_mask")
    x = _batches(1)[0][0]
    out_masked = model(x)
    report = sparsity_report(model)
    total = sum(m.numel() for m in masks.values())
    assert report["total"] == pytest.approx(round(0.6 * total) / total if scope == "global" else report["total"])
    if scope == "layer":
        for n in ("0", "3", "5"):
            assert report[n] == pytest.approx(
                round(0.6 * model.get_submodule(n).weight.numel()) / model.get_submodule(n).weight.numel()
            )
    assert remove_masks(model) == ["0", "3", "5"]
    assert not hasattr(model[3], "weight_orig") and isinstance(model[3].weight, nn.Parameter)
    torch.testing.assert_close(model(x), out_masked)
    for n, m in (("0", model[0]), ("3", model[3]), ("5", model[5])):
        kept = masks[f"{n}.weight"].bool()
        assert torch.equal(m.weight[~kept], torch.zeros_like(m.weight[~kept]))
        assert torch.equal(m.weight[kept], before[f"{n}.weight"][kept])
    # the global rule keeps the largest magnitudes
    w = torch.cat([before[f"{n}.weight"].abs().reshape(-1) for n in "035"])
    keep = torch.cat([masks[f"{n}.weight"].reshape(-1) for n in "035"]).bool()
    if scope == "global":
        assert w[keep].min() >= w[~keep].max()


def test_masks_from_scores_counts_and_ties():
    scores = {"a": torch.tensor([1.0, 1.0, 1.0, 2.0]), "b": torch.tensor([0.5, 3.0])}
    m = masks_from_scores(scores, 0.5)
    assert m["a"].tolist() == [0.0, 0.0, 1.0, 1.0] and m["b"].tolist() == [0.0, 1.0]
    assert masks_from_scores(scores, 0.0)["a"].sum() == 4


def test_pruning_twice_composes_and_counts_old_zeros():
    model = _net()
    prune_unstructured(model, criterion="magnitude", sparsity=0.5)
    prune_unstructured(model, criterion="magnitude", sparsity=0.8)
    total = sum(model.get_submodule(n).weight.numel() for n in "035")
    assert sparsity_report(model)["total"] == pytest.approx(round(0.8 * total) / total)


@pytest.mark.parametrize("criterion", ["taylor", "obd_fisher", "oba", "oba_published", "woodfisher"])
def test_data_criteria_give_scores_shaped_like_weights(criterion):
    model = _net()
    opts = {"num_grads": 12, "damp": 1e-2} if criterion == "woodfisher" else {}
    s = criterion_scores(model, criterion, loss_fn=F.cross_entropy, batches=_batches(), **opts)
    assert list(s) == ["0.weight", "3.weight", "5.weight"]
    for n, v in s.items():
        assert v.shape == model.get_submodule(n[:-7]).weight.shape and bool((v >= 0).all())
    if criterion == "oba_published":  # per-layer max-normalised |score| + |θ|
        for n, v in s.items():
            excess = v - model.get_submodule(n[:-7]).weight.detach().abs()
            assert float(excess.max()) == pytest.approx(1.0)


def test_woodfisher_prune_updates_and_keeps_zeros():
    model = _net()
    batches = _batches(4)
    before = model(batches[0][0]).detach()
    masks = woodfisher_prune(model, F.cross_entropy, batches, 0.5, num_grads=20, damp=1e-2, blocks="layer")
    for n in "035":
        m = model.get_submodule(n)
        dead = ~masks[f"{n}.weight"].bool()
        assert torch.equal(m.weight_orig[dead], torch.zeros_like(m.weight_orig[dead]))
    assert not torch.allclose(model(batches[0][0]), before)
    remove_masks(model)
    assert sparsity_report(model)["total"] == pytest.approx(0.5, abs=0.01)


def test_masked_loss_runs_without_autograd_and_leaves_the_model_alone():
    model = _net()
    batches = _batches(2)
    names = ["3.weight", "5.weight"]
    seen = []

    def loss_fn(logits, y):
        seen.append(torch.is_grad_enabled())
        return F.cross_entropy(logits, y)

    loss_of = masked_loss(model, loss_fn, batches, names)
    theta = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    zero_first = theta.clone()
    zero_first[:10] = 0
    with torch.enable_grad():  # later calls happen outside the decorated setup
        value = loss_of(zero_first)
    assert seen and not any(seen)
    with torch.no_grad():
        model[3].weight.view(-1)[:10] = 0
        expected = sum(F.cross_entropy(model(x), y).item() * len(y) for x, y in batches) / sum(
            len(y) for _, y in batches
        )
    assert value == pytest.approx(expected, rel=1e-12)
    assert loss_of(theta) != pytest.approx(value)
    for k, v in state.items():
        if k != "3.weight":
            assert torch.equal(model.state_dict()[k], v)


def test_cbs_prune_on_mlp_with_factored_gradients_is_deterministic():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(36, 10, bias=False), nn.ReLU(), nn.Linear(10, 3, bias=False)
        ).double()
        batches = _batches(4)
        masks, result = cbs_prune(
            model,
            F.cross_entropy,
            batches,
            0.7,
            selection_batches=batches[:2],
            blocks="joint",
            num_grads=24,
            damp=1e-2,
            search={"trials": 3, "max_sweeps": 3, "rho": 4, "tau": 4},
            progress=False,
        )
        return model, masks, result

    (m1, masks1, r1), (_, masks2, _) = run(), run()
    for n in masks1:
        assert torch.equal(masks1[n], masks2[n])
    assert r1.sweep_losses[r1.chosen_sweep] == min(r1.sweep_losses)
    remove_masks(m1)
    assert sparsity_report(m1)["total"] == pytest.approx(round(0.7 * 390) / 390)


def test_mlpnet_factored_gradients_on_real_data(require_data):
    require_data("checkpoints/mnist_25_epoch_93.97.ckpt")
    require_data("mnist/train-images-idx3-ubyte.gz")
    import oba.data
    import oba.models
    from oba.curvature import per_sample_gradients
    from oba.empirical_fisher import DenseGradients, linear_gradient_factors

    model = oba.models.load_pretrained("mlpnet").double()
    ds = oba.data.subset(oba.data.mnist("train"), 16, seed=0)
    x = torch.stack([ds[i][0] for i in range(16)]).double()
    y = torch.tensor([ds[i][1] for i in range(16)])
    fact = linear_gradient_factors(model, F.cross_entropy, [(x, y)], ["fc1", "fc2", "fc3"], 16)
    per = per_sample_gradients(model, F.cross_entropy, (x, y))
    dense = DenseGradients(torch.cat([g.reshape(16, -1) for g in per.values()], 1))
    assert fact.d == 32_360
    torch.testing.assert_close(fact.gram(), dense.gram())
