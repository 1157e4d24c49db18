"""Tests of oba.group_importance: per-parameter scores reduced onto DepGraph groups, driving Torch-Pruning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import Tensor, nn

from oba.group_importance import (
    DEFAULT_NORMALIZER,
    ParameterScoreImportance,
    StaleScoresError,
    head_scores,
)
from oba.prune import group_scores


# ----------------------------------------------------------------------------- models
def make_cnn() -> nn.Sequential:
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Linear on [B, 3, 8, 8]; the flatten couples 4 inputs per channel."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return _randomize_norms(model).eval()


def make_resnet18() -> nn.Module:
    return _randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Distinct BN affine values; running_mean tags each channel with its index (a buffer, never scored)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.copy_(torch.arange(m.num_features, dtype=torch.float32))
    return model


class ConvZoo(nn.Module):
    """GroupNorm, PReLU, depthwise conv, grouped conv, transposed conv and a concatenation, on [B, 3, 4, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.PReLU(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.side = nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.dw(self.act(self.gn(self.stem(x)))))
        u = self.up(self.gconv(h))
        side = self.side(F.interpolate(x, scale_factor=2.0))
        return self.head(torch.cat([u, side], 1).mean((2, 3)))


class TokenZoo(nn.Module):
    """Embedding + unwrapped positional Parameter, LayerNorm, nn.MultiheadAttention, MLP, on [B, 5] tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.ln = nn.LayerNorm(8)
        self.mha = nn.MultiheadAttention(8, 1, batch_first=True, add_bias_kv=True)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens) + self.pos
        h = self.ln(x)
        x = x + self.mha(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


class ResidualLinear(nn.Module):
    """``h = a(x); y = head(h + f(h))``: f's inputs and outputs are coupled, so W_f[c, c] is in both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.f, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.head(h + self.f(h))


CNN_INPUT = (2, 3, 8, 8)
RESNET_INPUT = (1, 3, 32, 32)


def abs_scores(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().abs() for n, p in model.named_parameters()}


def random_scores(model: nn.Module, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    return {n: torch.randn(p.shape, dtype=dtype) for n, p in model.named_parameters()}


def all_groups(model: nn.Module, example_inputs) -> list:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    return list(dg.get_all_groups())


# ----------------------------------------------------------- 1. = tp magnitude importance
@pytest.mark.parametrize("make, shape", [(make_cnn, CNN_INPUT), (make_resnet18, RESNET_INPUT)], ids=["cnn", "resnet18"])
def test_abs_weights_give_tp_group_magnitude(make, shape):
    model = make()
    scores = abs_scores(model)
    ours = ParameterScoreImportance(model, scores, normalizer=None, group_reduction="sum")
    # Torch-Pruning leaves biases (conv/linear bias, BN beta) out unless bias=True; ours sums them in,
    # so without the bias scores we match its default and with them its bias=True.
    no_bias = ParameterScoreImportance(
        model, {n: s for n, s in scores.items() if not n.endswith("bias")}, normalizer=None, group_reduction="sum"
    )
    tp_bias = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="sum", bias=True)
    tp_default = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="sum")
    groups = all_groups(model, torch.randn(shape))
    assert len(groups) >= 3
    for group in groups:
        torch.testing.assert_close(ours(group), tp_bias(group))
        torch.testing.assert_close(no_bias(group), tp_default(group))


# -------------------------------------------------------------- 2. = tp Taylor importance
def test_taylor_scores_against_tp_group_taylor():
    model = make_cnn()
    x, y = torch.randn(CNN_INPUT), torch.randint(0, 10, (CNN_INPUT[0],))
    F.cross_entropy(model(x), y).backward()
    taylor = {n: (p * p.grad).detach() for n, p in model.named_parameters()}
    groups = all_groups(model, torch.randn(CNN_INPUT))

    # tp (multivariable=False) sums |theta*g| per weight entry; it leaves out biases and, in tp 1.6,
    # BatchNorm layers too (its norm branch tests the GroupNorm handler): match it with those scores only.
    weight_only = {n: s.abs() for n, s in taylor.items() if n.endswith("weight") and n not in ("1.weight", "4.weight")}
    ours = ParameterScoreImportance(model, weight_only, normalizer=None, group_reduction="sum")
    ref = tp.importance.GroupTaylorImportance(normalizer=None, group_reduction="sum")
    for group in groups:
        torch.testing.assert_close(ours(group), ref(group))

    # Ours on the signed theta*g of every parameter: |sum of the signed scores the channel owns|.
    signed = ParameterScoreImportance(model, taylor, normalizer=None, group_reduction="sum")
    conv1_group = next(g for g in groups if g[0].dep.target.module is model[0])
    by_hand = (
        taylor["0.weight"].sum((1, 2, 3))
        + taylor["0.bias"]
        + taylor["1.weight"]
        + taylor["1.bias"]
        + taylor["3.weight"].sum((0, 2, 3))
    ).abs()
    torch.testing.assert_close(signed(conv1_group), by_hand)
    conv2_group = next(g for g in groups if g[0].dep.target.module is model[3])
    fc_per_channel = taylor["8.weight"].reshape(10, 16, 4).sum((0, 2))  # flatten: 4 inputs per channel
    by_hand = (
        taylor["3.weight"].sum((1, 2, 3)) + taylor["3.bias"] + taylor["4.weight"] + taylor["4.bias"] + fc_per_channel
    ).abs()
    torch.testing.assert_close(signed(conv2_group), by_hand)


# ---------------------------------------------------------------------- 3. MLP by hand
def test_mlp_hidden_unit_by_hand():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    scores = random_scores(model)
    (group,) = [g for g in all_groups(model, torch.randn(2, 5)) if g[0].dep.target.module is model[0]]
    imp = ParameterScoreImportance(model, scores, normalizer=None)(group)
    by_hand = (scores["0.weight"].sum(1) + scores["0.bias"] + scores["2.weight"].sum(0)).abs()
    assert imp.shape == (7,)
    torch.testing.assert_close(imp, by_hand)

    signed = ParameterScoreImportance(model, scores, normalizer=None, absolute=False)(group)
    torch.testing.assert_close(signed.abs(), imp)
    # Groups for a subset of channels (tp's own importances need the full index range here).
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 5), verbose=False)
    subset = dg.get_pruning_group(model[0], tp.prune_linear_out_channels, [5, 1, 3])
    raw = ParameterScoreImportance(model, scores, normalizer=None)
    torch.testing.assert_close(raw(subset), by_hand[[5, 1, 3]])
    torch.testing.assert_close(head_scores(signed, 1), signed.sum().abs().reshape(1))
    torch.testing.assert_close(head_scores(signed, 7), imp)


# ----------------------------------------------------- 6. signed cancellation
def test_signed_scores_cancel_before_the_absolute_value():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    scores = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    scores["0.weight"][:, 0] = torch.tensor([2.0, 2.0, 2.0])  # every hidden unit gets +2 from layer 1
    scores["2.weight"][:, 1] = torch.tensor([-1.0, -1.0])  # unit 1 gets -2 from layer 2: cancels
    (group,) = [g for g in all_groups(model, torch.randn(1, 4)) if g[0].dep.target.module is model[0]]
    raw = ParameterScoreImportance(model, scores, normalizer=None)
    torch.testing.assert_close(raw(group), torch.tensor([2.0, 0.0, 2.0]))
    imp_max = ParameterScoreImportance(model, scores, normalizer=None, group_reduction="max", absolute=False)(group)
    torch.testing.assert_close(imp_max, torch.tensor([2.0, 2.0, 2.0]))  # largest |s_d| per unit, signed


# ------------------------------------------- the rule against Torch-Pruning's own pruning
def _removed_score(model: nn.Module, example_inputs, scores: dict[str, Tensor], root: str, channels: list[int]):
    """Oracle: load the scores as parameter values, prune ``channels`` of ``root``'s group, see what vanished."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(scores[name])
    before = sum(p.sum() for p in m.parameters())
    inputs = example_inputs.double() if example_inputs.is_floating_point() else example_inputs
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=inputs, verbose=False)
    module = dict(m.named_modules())[root]
    dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, channels).prune()
    return before - sum(p.sum() for p in m.parameters())


@pytest.mark.parametrize(
    "make, example, channel_sets",
    [
        # grouped layers (GroupNorm, grouped conv) lose the same channel of every group together
        (
            ConvZoo,
            torch.randn(1, 3, 4, 4),
            {"stem": [[0, 4], [3, 7]], "gconv": [[1, 5]], "up": [[0], [5]], "side": [[2]]},
        ),
        (lambda: TokenZoo().eval(), torch.randint(0, 11, (2, 5)), {"fc2": [[0], [6]], "fc1": [[3]], "head": [[2]]}),
        (ResidualLinear, torch.randn(2, 4), {"a": [[0], [2], [5]]}),
    ],
    ids=["convs", "tokens", "residual"],
)
def test_channel_score_is_the_sum_of_the_scores_torch_pruning_removes(make, example, channel_sets):
    torch.manual_seed(1)
    model = make()
    scores = random_scores(model)
    imp = ParameterScoreImportance(model, scores, normalizer=None, absolute=False)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    for root, sets in channel_sets.items():
        module = dict(model.named_modules())[root]
        prune_out = dg.get_pruner_of_module(module).prune_out_channels
        signed = imp(dg.get_pruning_group(module, prune_out, list(range(dg.get_out_channels(module)))))
        for channels in sets:
            expected = _removed_score(model, example, scores, root, channels)
            torch.testing.assert_close(signed[channels].sum(), expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------ reductions, normalizers, helpers
def test_group_reductions_normalizers_and_group_scores():
    model = make_cnn()
    scores = random_scores(model)
    (group,) = [g for g in all_groups(model, torch.randn(CNN_INPUT)) if g[0].dep.target.module is model[0]]
    conv1 = scores["0.weight"].sum((1, 2, 3)) + scores["0.bias"]
    bn1 = scores["1.weight"] + scores["1.bias"]
    conv2_in = scores["3.weight"].sum((0, 2, 3))
    per_dep = torch.stack([conv1, bn1, conv2_in])

    def imp(**kw):
        return ParameterScoreImportance(model, scores, **{"normalizer": None, **kw})(group)

    torch.testing.assert_close(imp(group_reduction="mean"), per_dep.mean(0).abs())
    torch.testing.assert_close(imp(group_reduction="first"), conv1.abs())
    torch.testing.assert_close(imp(group_reduction="max"), per_dep.abs().max(0).values)
    raw = per_dep.sum(0).abs()
    torch.testing.assert_close(imp(normalizer="mean"), raw / raw.mean())
    torch.testing.assert_close(imp(normalizer="max").max(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(imp(normalizer="standarization").min(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(imp(normalizer="gaussian").mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(imp(normalizer=lambda v: 2 * v), 2 * raw)
    assert ParameterScoreImportance(model, scores).normalizer == DEFAULT_NORMALIZER == "mean"  # every route's default
    # a group scored all zero (e.g. units no batch reaches) stays zero where Torch-Pruning's formulas give NaN
    zero = {n: torch.zeros_like(s) for n, s in scores.items()}
    for normalizer in ("sum", "mean", "max"):
        torch.testing.assert_close(ParameterScoreImportance(model, zero, normalizer=normalizer)(group), 0 * raw)
    with pytest.raises(ValueError, match="group_reduction"):
        ParameterScoreImportance(model, scores, group_reduction="prod")

    # Unscored groups give None (the pruners skip them); unknown names and missing scores are errors.
    assert ParameterScoreImportance(model, {"8.bias": scores["8.bias"]})(group) is None
    with pytest.raises(KeyError, match="not parameters"):
        ParameterScoreImportance(model, {"conv.weight": scores["0.weight"]})
    with pytest.raises(RuntimeError, match="set_scores"):
        ParameterScoreImportance(model)(group)

    table = group_scores(model, torch.randn(CNN_INPUT), scores)
    assert set(table) == {"0", "3", "8"}
    torch.testing.assert_close(table["0"], raw)


def test_group_scores_are_the_pruners_groups_where_torch_pruning_cannot_map_channels():
    """ShuffleNetV2's channel shuffle breaks Torch-Pruning's index mapping (a plain ``build_dependency`` raises):
    ``group_scores`` traces as the pruner does, leaves out the layers the shuffle couples (with a warning) and
    scores the groups inside the branches like any other group."""
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    example = torch.randn(1, 3, 64, 64)
    with pytest.raises(ZeroDivisionError):
        tp.DependencyGraph().build_dependency(model, example_inputs=example)
    scores = {n: p.detach().abs() for n, p in model.named_parameters()}
    model.train()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="cannot prune through"):
        table = group_scores(model, example, scores, ignored_layers=[model.fc])
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert "stage4.0.branch2.5" not in table  # its output reaches the shuffle: kept whole
    # channel c of a block's inner group: conv 0's filter, BN 1, the depthwise conv 3's filter (the root), BN 4 and
    # input column c of conv 5
    b = "stage2.0.branch2."
    expected = (
        scores[b + "0.weight"].sum((1, 2, 3))
        + scores[b + "1.weight"]
        + scores[b + "1.bias"]
        + scores[b + "3.weight"].sum((1, 2, 3))
        + scores[b + "4.weight"]
        + scores[b + "4.bias"]
        + scores[b + "5.weight"].sum((0, 2, 3))
    )
    torch.testing.assert_close(table[b + "3"], expected)
    assert len(table) == 18  # the stem, conv5 and every block's inner group


# ---------------------------------------------- 4. drives MetaPruner unchanged
@pytest.mark.parametrize("global_pruning", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("which", ["cnn", "resnet18"])
def test_metapruner_prunes_half_the_channels_lowest_first(which, global_pruning):
    if which == "cnn":
        model, example, out = make_cnn(), torch.randn(CNN_INPUT), (CNN_INPUT[0], 10)
        fc, probe, probe_bn = model[8], model[0], model[1]  # probe: conv1 -> bn1 -> conv2 (in)
    else:
        model, example, out = make_resnet18(), torch.randn(RESNET_INPUT), (1, 10)
        fc, probe, probe_bn = model.fc, model.layer1[0].conv1, model.layer1[0].bn1
    # Global ranking needs scores on one scale: raw sums grow with fan-in and fan-out, so whole groups
    # fall under the global threshold and Torch-Pruning skips them (it never empties a layer).
    imp = ParameterScoreImportance(model, abs_scores(model), normalizer="mean" if global_pruning else None)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, pruning_ratio=0.5, global_pruning=global_pruning, ignored_layers=[fc]
    )
    channels_before = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    probe_group = pruner.DG.get_pruning_group(probe, tp.prune_conv_out_channels, list(range(probe.out_channels)))
    probe_imp = imp(probe_group)

    pruner.step()

    assert model(example).shape == out
    channels_after = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    if global_pruning:
        assert 0.3 * channels_before < channels_after < 0.7 * channels_before
    else:
        assert channels_after == channels_before // 2
    kept = probe_bn.running_mean.long()  # the channel tags survive with their channels
    pruned = torch.ones(len(probe_imp), dtype=torch.bool)
    pruned[kept] = False
    assert pruned.any() and probe_imp[kept].min() >= probe_imp[pruned].max()
    if not global_pruning:
        assert len(kept) == len(probe_imp) // 2


def test_metapruner_runs_on_grouped_and_depthwise_convs():
    model = ConvZoo().eval()
    example = torch.randn(1, 3, 4, 4)
    imp = ParameterScoreImportance(model, abs_scores(model))
    tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.5, ignored_layers=[model.head]).step()
    assert model(example).shape == (1, 5)
    assert (model.stem.out_channels, model.gconv.out_channels, model.up.out_channels) == (4, 4, 3)


# ---------------------------------------------- 5. stale scores, iterative pruning
def test_stale_scores_raise_and_fresh_scores_continue_iterative_pruning():
    model = make_cnn()
    example = torch.randn(CNN_INPUT)
    old = abs_scores(model)
    imp = ParameterScoreImportance(model, old)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model[8]]
    )
    pruner.step()
    assert (model[0].out_channels, model[3].out_channels) == (6, 12)
    with pytest.raises(StaleScoresError, match="re-score|Re-score"):
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers):
            imp(group)
    with pytest.raises(StaleScoresError, match="set_scores"):
        imp.set_scores(old)
    imp.set_scores(abs_scores(model))
    pruner.step()
    assert (model[0].out_channels, model[3].out_channels) == (4, 8)
    assert model(example).shape == (CNN_INPUT[0], 10)
