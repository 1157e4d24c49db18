"""Tests of oba.eigendamage: the KFE reparametrisation, the EigenDamage costs, pruning eigen-channels to a
FLOPs target of the dense model, saving/loading, and the experiment presets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import oba.models
from oba.criteria import make_scorer
from oba.eigendamage import (
    EigenbasisLayer,
    channel_input_factor,
    eigenbasis_ignored_layers,
    eigenbasis_layers,
    eigendamage_costs,
    to_eigenbasis,
)
from oba.experiments import ResultLog, prune_and_fine_tune, structured_sweep
from oba.flops import count_flops
from oba.kfac import kfac_factors
from oba.prune import layer_widths, load_pruned, prune_structured, save_pruned
from oba.toynets import make_case

SMALL = (3, 8, 8)  # CIFAR ResNets run at any resolution; 8x8 keeps these tests fast


def resnet20(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = oba.models.create("resnet20").to(dtype)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # BatchNorm away from its initial values, so eval mode is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = (torch.rand(m.weight.shape, generator=g) + 0.5).to(dtype)
            m.bias.data = (0.1 * torch.randn(m.bias.shape, generator=g)).to(dtype)
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def batches(n: int, size: int = 8, shape: tuple[int, ...] = SMALL, seed: int = 0, dtype=torch.float32) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *shape, generator=g, dtype=dtype), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def single_conv(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=bias)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(5 * 3 * 3, 4)).double()


def single_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in model.modules()
    )


def cases() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)

    def images(n: int, *shape: int) -> torch.Tensor:
        return torch.randn(n, *shape, generator=g, dtype=torch.float64)

    out = {
        "linear": (single_linear(), (images(7, 6), torch.randint(0, 3, (7,), generator=g))),
        "conv_bias": (single_conv(True), (images(6, 3, 5, 5), torch.randint(0, 4, (6,), generator=g))),
        "conv_nobias": (single_conv(False), (images(6, 3, 5, 5), torch.randint(0, 4, (6,), generator=g))),
        "resnet20": (resnet20(torch.float64), batches(1, 6, dtype=torch.float64)[0]),
    }
    for name in ("cnn_bn_eval", "cnn_bn_train", "residual_bn_train", "mlp_relu"):
        case = make_case(name, batch_size=6)
        out[name] = (case.model, case.batch)
    return out


CASES = cases()


# ------------------------------------------------------------------------------------------ reparametrisation
@pytest.mark.parametrize("name", list(CASES))
def test_the_eigenbasis_model_computes_the_same_function_and_diagonalises_the_factors(name):
    model, (x, y) = CASES[name]
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]  # all but the classifier
    factors = kfac_factors(model, F.cross_entropy, [(x, y)], layers=layers, sampled=True, progress=False)
    with torch.no_grad():
        before = model(x)
    kfe = to_eigenbasis(model, factors)
    with torch.no_grad():
        after = kfe(x)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    assert len(eigenbasis_layers(kfe)) == len(layers)
    rotations = [e.rotate_in.weight.flatten(1) for e in eigenbasis_layers(kfe).values()]
    assert any((r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max() > 1e-3 for r in rotations)  # really rotated
    for r in rotations:  # orthogonal
        torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0], dtype=r.dtype), rtol=0, atol=1e-10)
    # in the new basis the factors of every core, recomputed on the same batch, are diagonal
    cores = [e.core for e in eigenbasis_layers(kfe).values()]
    again = kfac_factors(kfe, F.cross_entropy, [(x, y)], layers=cores, sampled=True, progress=False)
    for core in cores:
        for f in (channel_input_factor(again[core]), again[core].S):
            off = f - torch.diag(f.diagonal())
            assert off.abs().max() <= 1e-9 * f.abs().max()
    # calling it again changes nothing
    n = len(list(kfe.modules()))
    to_eigenbasis(kfe)
    assert len(list(kfe.modules())) == n


def test_identity_structure_keeps_the_function_and_the_layer_modes():
    model = make_case("cnn_bn_train").model
    x = make_case("cnn_bn_train").batch[0]
    kfe = to_eigenbasis(copy.deepcopy(model))
    torch.testing.assert_close(kfe(x), model(x), rtol=1e-12, atol=1e-12)
    assert all(e.training for e in eigenbasis_layers(kfe).values())
    assert isinstance(kfe[-1], nn.Linear)  # the classifier stays a plain layer


# ------------------------------------------------------------------------------------------ costs
def test_the_importance_is_half_w_squared_times_the_eigenvalues_of_the_dense_factors():
    model, (x, y) = CASES["cnn_bn_eval"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    dense = kfac_factors(model, F.cross_entropy, [(x, y)], layers=convs, sampled=True, progress=False)
    kfe = to_eigenbasis(copy.deepcopy(model))  # identity rotations: the scorer rotates into the KFE
    imp = make_scorer("eigendamage", F.cross_entropy, normalizer=None)(kfe, [(x, y)])
    dg = tp.DependencyGraph().build_dependency(kfe, example_inputs=x)
    scores = {}
    for group in dg.get_all_groups(eigenbasis_ignored_layers(kfe), (nn.Conv2d, nn.Linear)):
        scores[group[0].dep.target.module] = imp(group)
    for conv, e in zip(convs, eigenbasis_layers(kfe).values(), strict=True):
        f = dense[conv]
        k = conv.weight[0, 0].numel()
        c = conv.in_channels
        A = f.A[: c * k, : c * k]  # bias row/column dropped; then the mean over taps of the diagonal tap blocks
        A_ch = sum(A[t::k, t::k] for t in range(k)) / k
        a, q_a = torch.linalg.eigh(A_ch)
        s, q_s = torch.linalg.eigh(f.S)
        w = torch.stack([q_s.T @ conv.weight.detach()[:, :, u, v] @ q_a for u in range(3) for v in range(3)], -1)
        entry = 0.5 * w**2 * s[:, None, None] * a[None, :, None]  # [out, in, taps]
        out_cost, in_cost = entry.sum((1, 2)), entry.sum((0, 2))
        torch.testing.assert_close(scores[e.core].sort().values, out_cost.sort().values, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(scores[e.rotate_in].sort().values, in_cost.sort().values, rtol=1e-8, atol=1e-12)
        # after scoring, the layer is in that basis: the reference formula gives the same numbers, in order
        a2, s2 = a.clamp_min(0), s.clamp_min(0)
        torch.testing.assert_close(eigendamage_costs(e, a2, s2, out=True), scores[e.core], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(eigendamage_costs(e, a2, s2, out=False), scores[e.rotate_in], rtol=1e-8, atol=1e-12)
    # only eigen-channel groups are scored: every scored group's root is a rotate_in or a core
    inner = {m for e in eigenbasis_layers(kfe).values() for m in (e.rotate_in, e.core)}
    assert set(scores) == inner


def test_scoring_keeps_the_function_batchnorm_statistics_and_leaves_no_hooks():
    model, (x, y) = CASES["residual_bn_train"]
    kfe = to_eigenbasis(copy.deepcopy(model)).train()
    stats = {k: v.clone() for k, v in kfe.state_dict().items() if "running" in k or "num_batches" in k}
    kfe.eval()
    before = kfe(x)
    kfe.train()
    make_scorer("eigendamage", F.cross_entropy)(kfe, [(x, y)])
    assert all(torch.equal(kfe.state_dict()[k], v) for k, v in stats.items())
    assert no_hooks(kfe)
    kfe.eval()
    torch.testing.assert_close(kfe(x), before, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ pruning
def test_resnet20_prunes_eigen_channels_to_60_percent_of_the_dense_flops_and_reloads(tmp_path):
    dense = resnet20()
    example = torch.zeros(1, *SMALL)
    model, history = prune_structured(
        copy.deepcopy(dense), example, "eigendamage", loss_fn=F.cross_entropy, batches=batches(1), keep_flops=0.6,
        steps=1, batches_per_step=1, progress=False,
    )  # fmt: skip
    assert count_flops(model, example).macs > 0
    kept = count_flops(model, example).macs / count_flops(dense, example).macs
    assert history[0]["flops_kept"] > 1.1  # the KFE model starts above the dense FLOPs
    assert 0.5 < kept <= 0.6 + 1e-9 and history[-1]["flops_kept"] == pytest.approx(kept)
    assert no_hooks(model)
    # outer channels untouched: every dense layer keeps its width, under its own name
    dense_widths, widths = layer_widths(dense), layer_widths(model)
    assert {k: widths[k] for k in dense_widths} == dense_widths
    kfe = eigenbasis_layers(model)
    assert len(kfe) == 19  # every conv; the classifier stays plain
    originals = dict(dense.named_modules())
    for name, e in kfe.items():
        assert e.rotate_in.weight.shape[1] == originals[name].in_channels
        assert e.rotate_out.weight.shape[0] == originals[name].out_channels
    assert sum(min(e.inner_widths) < e.rotate_out.weight.shape[0] for e in kfe.values()) >= 5
    x = batches(1, 4)[0][0]
    path = tmp_path / "ed.pt"
    save_pruned(model, path, "resnet20")
    assert torch.load(path, weights_only=True)["prepared"] == {"eigenbasis_layers": list(kfe)}
    loaded = load_pruned(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert [e.inner_widths for e in eigenbasis_layers(loaded).values()] == [e.inner_widths for e in kfe.values()]


def test_unsupported_layers_and_plain_models_fail_with_what_to_do():
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="layers="):
        to_eigenbasis(depthwise)
    to_eigenbasis(depthwise, layers=[])  # nothing requested: fine
    with pytest.raises(ValueError, match="no K-FAC factors"):
        to_eigenbasis(single_linear(), {})
    with pytest.raises(ValueError, match="to_eigenbasis"):
        make_scorer("eigendamage", F.cross_entropy)(single_linear(), [])
    with pytest.raises(ValueError, match="ignored_layers"):
        prune_structured(single_linear(), torch.zeros(1, 6, dtype=torch.float64), "eigendamage",
                         loss_fn=F.cross_entropy, batches=[], keep_flops=0.5, ignored_layers=[])  # fmt: skip
    layer = EigenbasisLayer.from_layer(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="current model"):
        layer.rotate_(torch.eye(4), torch.eye(2))


# ------------------------------------------------------------------------------------------ experiments
def test_the_eigendamage_preset_runs_in_the_sweep_and_in_prune_and_fine_tune(tmp_path):
    dense = resnet20()
    example = torch.zeros(1, *SMALL)
    log = ResultLog(tmp_path / "sweep.jsonl")
    rows = structured_sweep(
        dense, example, ["eigendamage"], [0.6], score_batches=batches(1), eval_loaders={"val": batches(1, 4)},
        log=log, batches_per_step=1, progress=False,
    )  # fmt: skip
    assert [r["keep_flops"] for r in rows] == [0.6]
    assert 0.5 < rows[0]["flops_kept"] <= 0.6 + 1e-9  # of the dense model's FLOPs
    assert rows[0]["widths"] == layer_widths(dense)  # outer widths, under the dense names
    assert min(rows[0]["inner_widths"].values()) >= 1 and "layer1.0.conv1.core" in rows[0]["inner_widths"]
    assert not eigenbasis_layers(dense)  # the given model is left alone
    model, record = prune_and_fine_tune(
        dense, example, "eigendamage", 0.6, arch="resnet20", score_batches=batches(1), train_loader=batches(1, 4),
        eval_loaders={"val": batches(1, 4)}, out_dir=tmp_path, log=ResultLog(tmp_path / "ft.jsonl"),
        fine_tune_options={"epochs": 1, "lr": 1e-3, "seed": 0}, batches_per_step=1, progress=False,
    )  # fmt: skip
    assert 0.5 < record["flops_kept"] <= 0.6 + 1e-9
    final = load_pruned(tmp_path / "eigendamage_0.6_final.pt")
    assert len(eigenbasis_layers(final)) == 19
    x = batches(1, 4)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(final.eval()(x), model.eval()(x))
    # a reparametrised model given again (a later stage of the iterative protocol) is not reparametrised twice
    again, _ = prune_and_fine_tune(
        final, example, "eigendamage", 0.5, reference=dense, arch="resnet20", score_batches=batches(1),
        train_loader=batches(1, 4), eval_loaders={"val": batches(1, 4)}, out_dir=tmp_path, tag="stage2_",
        log=ResultLog(tmp_path / "ft.jsonl"), fine_tune_options={"epochs": 0, "lr": 1e-3}, batches_per_step=1,
        progress=False,
    )  # fmt: skip
    assert len(eigenbasis_layers(again)) == 19
    assert count_flops(again, example).macs / count_flops(dense, example).macs <= 0.5 + 1e-9
