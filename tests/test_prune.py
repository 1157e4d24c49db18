"""Tests of oba.prune.prune_structured: targets, schedules, caps, heads, modes, hooks, saving."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import oba
import oba.models
from oba.flops import count_flops
from oba.group_importance import ParameterScoreImportance
from oba.prune import (
    TargetNotReachedError,
    default_ignored_layers,
    load_pruned,
    make_scorer,
    prune_structured,
    save_pruned,
)


def batches(n: int = 3, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return oba.models.create("resnet20").eval()


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return oba.models.create("vit_cifar", dim=32, depth=2, num_heads=4, mlp_dim=48).eval()


EXAMPLE = torch.randn(1, 3, 32, 32)


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("kind", ["flops", "params", "channels"])
def test_each_target_kind_is_met_closely_and_the_model_runs(kind):
    model = resnet20()
    _, history = prune_structured(model, EXAMPLE, "magnitude", **{f"keep_{kind}": 0.6}, steps=2, progress=False)
    final = history[-1][f"{kind}_kept"]
    assert final <= 0.6 + 1e-9
    assert final > 0.55, f"overshot the target: {final}"
    assert [h["step"] for h in history] == [0, 1, 2]
    assert all(a[f"{kind}_kept"] >= b[f"{kind}_kept"] for a, b in zip(history, history[1:], strict=False))
    assert history[-1]["macs"] == count_flops(model, EXAMPLE).macs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_schedule_sets_the_per_step_targets(schedule):
    _, history = prune_structured(
        resnet20(), EXAMPLE, "magnitude", keep_flops=0.5, steps=3, schedule=schedule, progress=False
    )
    expected = [0.5 ** (s / 3) if schedule == "exponential" else 1 - 0.5 * s / 3 for s in (1, 2, 3)]
    assert [h["target"] for h in history[1:]] == pytest.approx(expected)
    for h in history[1:]:
        assert h["flops_kept"] <= h["target"] + 1e-9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one target"),
        ({"keep_flops": 0.5, "keep_params": 0.5}, "exactly one target"),
        ({"keep_flops": 0.0}, "KEPT"),
        ({"keep_flops": 1.5}, "KEPT"),
        ({"keep_flops": 0.5, "schedule": "cosine"}, "schedule"),
        ({"keep_flops": 0.5, "steps": 0}, "steps"),
        ({"keep_flops": 0.5, "max_channel_sparsity": 1.2}, "max_channel_sparsity"),
        ({"keep_flops": 0.5, "score_mode": "test"}, "score_mode"),
    ],
)
def test_bad_arguments_are_reported(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_structured(resnet20(), EXAMPLE, "magnitude", progress=False, **kwargs)


def test_data_criteria_need_batches_and_unknown_criteria_are_named():
    with pytest.raises(ValueError, match="batches"):
        prune_structured(resnet20(), EXAMPLE, "taylor", loss_fn=F.cross_entropy, keep_flops=0.5, progress=False)
    with pytest.raises(ValueError, match="kron_obs"):
        make_scorer("kron", F.cross_entropy)


def test_unreachable_target_raises_with_how_far_it_got():
    with pytest.raises(TargetNotReachedError) as info:
        prune_structured(resnet20(), EXAMPLE, "magnitude", keep_flops=0.05, max_channel_sparsity=0.5, progress=False)
    err = info.value
    assert err.reached > 0.05 and f"{err.reached:.4f}" in str(err)
    assert err.history[-1]["flops_kept"] == err.reached


# ----------------------------------------------------------------------------- layers and caps
def test_resnet_residual_streams_and_classifier_are_kept():
    model = resnet20()
    ignored = default_ignored_layers(model)
    widths = {id(m): m.weight.shape[0] for m in ignored}
    prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.5, progress=False)
    assert all(m.weight.shape[0] == widths[id(m)] for m in ignored)
    inner = [b.conv1.out_channels for s in (model.layer1, model.layer2, model.layer3) for b in s]
    assert sum(inner) < (16 + 32 + 64) * 3


def test_max_channel_sparsity_and_round_to():
    model = resnet20()
    before = {n: m.out_channels for n, m in model.named_modules() if n.endswith(".conv1")}
    prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.75, max_channel_sparsity=0.5, round_to=4, progress=False)
    after = {n: m.out_channels for n, m in model.named_modules() if n.endswith(".conv1")}
    assert any(after[n] < before[n] for n in before)
    for n in before:
        assert after[n] >= math.ceil(before[n] * 0.5)
        assert after[n] % 4 == 0


def test_local_ranking_prunes_every_group_alike():
    model = resnet20()
    before = {n: m.out_channels for n, m in model.named_modules() if n.endswith(".conv1")}
    prune_structured(model, EXAMPLE, "magnitude", keep_channels=0.5, global_ranking=False, progress=False)
    kept = [m.out_channels / before[n] for n, m in model.named_modules() if n.endswith(".conv1")]
    assert max(kept) - min(kept) <= 1 / 16 + 1e-9  # one channel of the narrowest group


def test_global_ranking_removes_the_lowest_scored_channels_first():
    model = resnet20()
    target = model.layer2[0].conv1
    names = {m: n for n, m in model.named_modules()}
    scores = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    even = torch.arange(0, 32, 2)  # the even channels of one group are worthless: filter, BN, next conv's column
    scores[names[target] + ".weight"][even] = 1e-6
    scores["layer2.0.bn1.weight"][even] = scores["layer2.0.bn1.bias"][even] = 1e-6
    scores["layer2.0.conv2.weight"][:, even] = 1e-6
    imp = ParameterScoreImportance(model, scores, normalizer=None)
    prune_structured(model, EXAMPLE, lambda m, b: imp, keep_channels=1 - 16 / 336, batches=[None], progress=False)
    assert target.out_channels == 16
    assert all(b.conv1.out_channels == b.conv1.weight.shape[0] for s in (model.layer1, model.layer3) for b in s)


# ----------------------------------------------------------------------------- scoring per step
def test_each_step_rescores_on_fresh_batches_in_the_chosen_mode():
    model = resnet20()
    data = batches(5)
    seen, modes = [], []

    def scorer(m, step_batches):
        seen.append([id(b) for b in step_batches])
        modes.append(m.training)
        return tp.importance.GroupMagnitudeImportance()

    prune_structured(
        model,
        EXAMPLE,
        scorer,
        keep_flops=0.6,
        batches=data,
        batches_per_step=2,
        steps=3,
        score_mode="train",
        progress=False,
    )
    ids = [id(b) for b in data]
    assert seen == [ids[0:2], ids[2:4], [ids[4], ids[0]]]  # a new pass starts when one ends
    assert modes == [True, True, True]
    assert not model.training  # restored


@pytest.mark.parametrize("criterion", ["taylor", "oba", "kron_obs"])
def test_scoring_in_train_mode_keeps_running_stats_and_leaves_no_hooks(criterion):
    model = resnet20()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    stem = model.bn1.running_mean.clone()  # ignored layer: its channels stay, so must its statistics
    kept_blocks = model.layer1[0].bn2.running_var.clone()
    prune_structured(
        model,
        EXAMPLE,
        criterion,
        loss_fn=F.cross_entropy,
        batches=batches(2),
        batches_per_step=1,
        keep_flops=0.8,
        score_mode="train",
        progress=False,
    )
    assert torch.equal(model.bn1.running_mean, stem)
    assert torch.equal(model.layer1[0].bn2.running_var, kept_blocks)
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("criterion", oba.criteria.names("structured"))
def test_registered_criteria_never_write_into_the_models_tensors(criterion):
    """The failure snapshot copies no tensor values for registered criteria (``writes_tensors`` is False): that is
    only sound if scoring and pruning leave every original parameter and buffer untouched (pruning puts new tensors
    in their place). Their version counters prove it, in train mode (BatchNorm on batch statistics) too."""
    scorer = make_scorer(criterion, F.cross_entropy)
    assert scorer.writes_tensors == (scorer.preparation is not None)
    if scorer.writes_tensors:
        return  # EigenDamage rewrites the model first: the snapshot copies the values
    model = resnet20()
    originals = [(t, t._version) for t in [*model.parameters(), *model.buffers()]]
    mode = "eval" if criterion == "obd_fisher" else "train"  # its per-sample Fisher needs eval mode
    prune_structured(
        model, EXAMPLE, scorer, keep_flops=0.8, batches=batches(1, size=4), batches_per_step=1, score_mode=mode,
        progress=False,
    )  # fmt: skip
    assert [t._version for t, _ in originals] == [v for _, v in originals]


def test_a_scorer_of_your_own_that_writes_in_place_and_fails_leaves_the_model_as_it_was():
    model = resnet20()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def scorer(m, b):  # writes into the weights, then fails at the second step
        calls.append(1)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.5)
        if len(calls) == 2:
            raise RuntimeError("scorer failed")
        return tp.importance.GroupMagnitudeImportance()

    with pytest.raises(RuntimeError, match="scorer failed"):
        prune_structured(model, EXAMPLE, scorer, keep_flops=0.5, steps=2, batches=[None], progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------- one rule, one default
def test_scores_are_computed_in_the_models_own_mode_unless_one_is_named():
    seen = []

    def scorer(m, step_batches):
        seen.append(m.training)
        return tp.importance.GroupMagnitudeImportance()

    for mode in (False, True):
        model = resnet20().train(mode)
        prune_structured(model, EXAMPLE, scorer, keep_flops=0.8, batches=batches(1), progress=False)
        prune_structured(model, EXAMPLE, scorer, keep_flops=0.7, batches=batches(1), score_mode="train", progress=False)
        assert model.training == mode  # restored
    assert seen == [False, True, True, True]


def test_a_criterion_that_cannot_run_in_the_mode_names_the_argument_to_change():
    model = resnet20()  # eval mode: the per-sample Fisher is defined
    widths = prune_structured(
        copy.deepcopy(model), EXAMPLE, "obd_fisher", keep_flops=0.8, loss_fn=F.cross_entropy, batches=batches(1),
        progress=False,
    )[1][-1]["widths"]  # fmt: skip
    explicit = prune_structured(
        copy.deepcopy(model), EXAMPLE, "obd_fisher", keep_flops=0.8, loss_fn=F.cross_entropy, batches=batches(1),
        score_mode="eval", progress=False,
    )[1][-1]["widths"]  # fmt: skip
    assert widths == explicit
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"score_mode='eval'.*fisher='per_batch'"):
        prune_structured(
            model, EXAMPLE, "obd_fisher", keep_flops=0.8, loss_fn=F.cross_entropy, batches=batches(1),
            score_mode="train", progress=False,
        )  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("criterion", ["taylor", "oba"])
def test_a_criterion_by_name_and_through_the_importance_class_prune_alike(criterion):
    """One normaliser default (per group, by the mean) whichever route a criterion takes."""
    data = batches(2)
    by_name, by_class = resnet20(), resnet20()
    _, h1 = prune_structured(
        by_name, EXAMPLE, criterion, keep_flops=0.6, loss_fn=F.cross_entropy, batches=data, batches_per_step=2,
        progress=False,
    )  # fmt: skip
    scores = oba.score(by_class, F.cross_entropy, data, criterion, progress=False)
    _, h2 = prune_structured(by_class, EXAMPLE, ParameterScoreImportance(by_class, scores), keep_flops=0.6,
                             progress=False)  # fmt: skip
    assert h1[-1]["widths"] == h2[-1]["widths"]


@pytest.mark.parametrize("criterion", ["magnitude", "oba"])
def test_grouped_convolutions_and_group_norm_lose_the_same_slots_in_every_group(criterion):
    """ResNeXt / RegNet style: a grouped 3x3 conv between 1x1 convs, GroupNorm; units are one channel slot of every
    channel group (before: uneven groups and "Invalid channel dimensions")."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    _, history = prune_structured(
        model, x, criterion, keep_flops=0.6, steps=2, loss_fn=F.cross_entropy, batches=data, progress=False
    )
    grouped, norm = model[3], model[4]
    assert grouped.groups == 4 and grouped.out_channels % 4 == 0 and grouped.in_channels % 4 == 0
    assert norm.num_channels % norm.num_groups == 0 and norm.num_channels == grouped.out_channels
    assert 0.5 < history[-1]["flops_kept"] <= 0.6 + 1e-9
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_a_flops_target_is_met_with_one_real_count_per_step():
    """The MACs are predicted from one count per step (conv/linear MACs are products of their widths), every
    group is pruned once per step, and one real count checks each step; the dense model is counted in
    Torch-Pruning's tracing pass, which also checks example_inputs: steps + 1 passes of the model in all."""
    model = resnet20()
    passes = []
    hook = model.register_forward_pre_hook(lambda *_: passes.append(1))
    _, history = prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.5, steps=3, progress=False)
    hook.remove()
    assert len(passes) == 3 + 1
    assert [round(h["flops_kept"], 9) <= round(h["target"], 9) for h in history[1:]] == [True] * 3
    assert history[-1]["flops_kept"] > 0.49  # and close: the prediction is exact for convolutions
    assert history[-1]["macs"] == count_flops(model, EXAMPLE).macs


@pytest.mark.parametrize("build", [resnet20, small_vit])
def test_counting_on_a_meta_replica_prunes_exactly_as_counting_in_place(build, monkeypatch):
    """Large CPU models are counted on a meta replica (cheaper than their compute): the same counts, so the same
    pruning, step by step; the model itself runs once (the tracing pass)."""
    torch.manual_seed(0)
    dense = build()
    runs = {}
    for threshold in (math.inf, 0):
        monkeypatch.setattr(oba.prune._Measure, "META_ABOVE", threshold)
        model = copy.deepcopy(dense)
        passes = []
        # hooks travel with the replica: count the passes with real tensors
        hook = model.register_forward_pre_hook(lambda m, args, seen=passes: seen.append(args[0].device.type))
        _, history = prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.5, steps=2, progress=False)
        hook.remove()
        runs[threshold] = ([(h["macs"], h["widths"], h["heads"]) for h in history], passes.count("cpu"))
    assert runs[0][0] == runs[math.inf][0]
    assert (runs[math.inf][1], runs[0][1]) == (3, 1)


def test_a_model_that_reads_values_is_counted_by_running_it(monkeypatch):
    """A forward pass that needs values fails on the meta device: the count falls back to running the model."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h.relu() if bool(h.sum() > -1e9) else h)

    monkeypatch.setattr(oba.prune._Measure, "META_ABOVE", 0)
    model = Gated()
    _, history = prune_structured(model, torch.randn(2, 8), "magnitude", keep_flops=0.5, progress=False)
    assert history[-1]["macs"] == 2 * (8 + 4) * model.a.out_features <= history[0]["macs"] // 2


# ----------------------------------------------------------------------------- attention heads
def test_whole_heads_are_pruned_consistently_and_the_model_saves(tmp_path):
    model = small_vit()
    attn = model.blocks[0].attn
    names = {m: n for n, m in model.named_modules()}
    scores = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for layer in (attn.q, attn.k, attn.v):  # heads 1 and 3 of block 0 worthless
        for h in (1, 3):
            scores[names[layer] + ".weight"][h * 8 : (h + 1) * 8] = 1e-6
    imp = ParameterScoreImportance(model, scores, normalizer=None)
    x = torch.randn(2, 3, 32, 32)
    _, history = prune_structured(model, EXAMPLE, lambda m, b: imp, keep_flops=0.85, batches=[None], progress=False)
    assert attn.num_heads == 2 and attn.q.out_features == 16 == attn.proj.in_features
    assert model.blocks[1].attn.num_heads == 4
    assert history[-1]["heads"]["blocks.0.attn.q"] == 2
    out = model(x)
    save_pruned(model, tmp_path / "vit.pt", "vit_cifar", {"dim": 32, "depth": 2, "num_heads": 4, "mlp_dim": 48})
    loaded = load_pruned(tmp_path / "vit.pt").eval()
    assert loaded.blocks[0].attn.num_heads == 2
    torch.testing.assert_close(loaded(x), out)


def test_vit_prunes_to_a_flops_target_with_oba_and_runs():
    model = small_vit()
    prune_structured(
        model,
        EXAMPLE,
        "oba",
        loss_fn=F.cross_entropy,
        batches=batches(1, 4),
        batches_per_step=1,
        keep_flops=0.6,
        steps=2,
        progress=False,
    )
    for block in model.blocks:
        a = block.attn
        assert a.q.out_features == a.k.out_features == a.num_heads * a.head_dim
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ----------------------------------------------------------------------------- saving
def test_save_and_load_a_pruned_resnet(tmp_path):
    model = resnet20()
    prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.5, progress=False)
    path = tmp_path / "pruned.pt"
    save_pruned(model, path, "resnet20")
    payload = torch.load(path, weights_only=True)
    assert payload["widths"]["layer1.0.conv1"] == model.layer1[0].conv1.out_channels
    loaded = load_pruned(path).eval()
    assert loaded.layer1[0].bn1.num_features == model.layer1[0].bn1.num_features
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="save_pruned"):
        load_pruned(tmp_path / "plain.pt")


def test_pruned_model_matches_the_dense_model_when_only_dead_channels_go():
    """Channels whose BN scale and shift are zero contribute nothing: removing them keeps the function."""
    model = resnet20()
    with torch.no_grad():
        for block in (model.layer1[0], model.layer2[1]):
            block.bn1.weight[:4] = 0
            block.bn1.bias[:4] = 0
    dense = copy.deepcopy(model)
    scores = {n: p.detach().abs() + 1 for n, p in model.named_parameters()}
    for block in ("layer1.0", "layer2.1"):
        scores[f"{block}.bn1.weight"][:4] = -1e3  # signed sum very negative -> |.| large; use absolute=False
    imp = ParameterScoreImportance(model, scores, normalizer=None, absolute=False)
    prune_structured(model, EXAMPLE, lambda m, b: imp, keep_channels=1 - 8 / 336, batches=[None], progress=False)
    assert model.layer1[0].conv1.out_channels == 12 and model.layer2[1].conv1.out_channels == 28
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), dense(x))


def test_explicit_step_targets_and_a_dense_reference():
    dense = resnet20()
    model = copy.deepcopy(dense)
    _, history = prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.7, step_targets=[0.9, 0.7], progress=False)
    assert [h["target"] for h in history[1:]] == [0.9, 0.7]
    _, again = prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.5, reference=dense, progress=False)
    assert again[0]["flops_kept"] == pytest.approx(history[-1]["flops_kept"])  # measured against the dense model
    assert 0.45 < again[-1]["flops_kept"] <= 0.5
    with pytest.raises(ValueError, match="step_targets"):
        prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.5, step_targets=[0.6, 0.8, 0.5], progress=False)
