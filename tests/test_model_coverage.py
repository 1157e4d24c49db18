"""Models users bring (#13): torchvision, timm and Hugging Face transformers, random init, small inputs.

The fast subset of ``benchmarks/model_coverage.py`` (which runs every torchvision model): one model per family,
pruned to 0.6 of its MACs in 2 steps; each must run afterwards, meet the target, and load its pruned weights
into a model rebuilt to the pruned widths. Whole attention heads: the pruned model computes exactly what the dense
one computes with the removed heads' output silenced (so q, k, v and the output projection lost the same heads).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba
import oba.models
from oba.flops import count_flops
from oba.prunable import Logits, attention_heads

timm = pytest.importorskip("timm", reason="timm is in the 'models' extra (scripts/env.sh installs it)")
transformers = pytest.importorskip("transformers", reason="transformers is in the 'models' extra")

KEEP = 0.6


def data(shape: tuple[int, ...], classes: int = 10, n: int = 2, batch: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)
    ]


def prune_and_check(model: nn.Module, example, batches, criterion: str = "magnitude") -> dict:
    dense = count_flops(model, example)
    _, history = oba.prune_structured(
        model, example, criterion, keep_flops=KEEP, steps=2, batches_per_step=1, loss_fn=F.cross_entropy,
        batches=batches, progress=False,
    )  # fmt: skip
    pruned = count_flops(model, example)
    assert 0.5 < pruned.macs / dense.macs <= KEEP + 1e-9
    assert history[-1]["macs"] == pruned.macs
    with torch.no_grad():
        out = model(batches[0][0])
    assert torch.isfinite(out).all() and out.shape[-1] == classes_of(out, batches)
    return history[-1]


def classes_of(out, batches) -> int:
    """The number of outputs the model had before pruning (the classifier is never pruned)."""
    return 3 if isinstance(batches[0][0], dict) else 10


TORCHVISION = {  # one per family; grouped convs, squeeze-excitation with hardsigmoid, depthwise, concatenation
    "resnet18": 64, "resnext50_32x4d": 64, "regnet_x_400mf": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64,
    "densenet121": 64, "convnext_tiny": 64, "squeezenet1_1": 64, "vgg11_bn": 64, "googlenet": 64, "vit_b_32": 224,
}  # fmt: skip


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_families_prune_to_the_target_and_run(name):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    side = TORCHVISION[name]
    prune_and_check(model, torch.randn(1, 3, side, side), data((3, side, side)))


def shufflenet() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()


def reaching_the_shuffle(model: nn.Module) -> set[str]:
    """The layers of torchvision's ShuffleNetV2 whose output channels reach a channel shuffle (``view``,
    ``transpose``, ``view``), which Torch-Pruning cannot map: the last conv of every branch (a block's output is
    shuffled) and the depthwise conv of the next stage's first block (it takes the shuffled channels as they are)."""
    last = {n for n, _ in model.named_modules() if n.endswith((".branch2.5", ".0.branch1.2"))}
    return last | {"stage3.0.branch1.0", "stage4.0.branch1.0"}


def test_shufflenet_prunes_its_branches_and_keeps_the_shuffled_channels_whole():
    model = shufflenet()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    before = {n: m.out_channels for n, m in convs.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_and_check(model, torch.randn(1, 3, 64, 64), data((3, 64, 64)))  # runs, meets the target
    said = [str(w.message) for w in caught if "groups of channels are not pruned" in str(w.message)]
    shuffle = r"'stage4\.3\.branch2\.5'.* reach ViewBackward0: Torch-Pruning could not map channels through it \(Zero"
    assert len(said) == 1 and said[0].count("ViewBackward0") == 3 and re.search(shuffle, said[0]), said  # one a stage
    after = {n: m.out_channels for n, m in convs.items()}
    assert {n: after[n] for n in reaching_the_shuffle(model)} == {n: before[n] for n in reaching_the_shuffle(model)}
    inner = [n for n in convs if n.endswith(".branch2.0")]
    assert sum(after[n] for n in inner) < sum(before[n] for n in inner)


def test_the_layers_kept_whole_in_shufflenet_are_exactly_those_reaching_a_channel_shuffle():
    from oba.depgraph import build_graph, prunable_groups

    model = shufflenet()
    dg, unmapped = build_graph(model, torch.randn(1, 3, 64, 64), verbose=False)
    assert [type(n.module).__name__ for n in unmapped] == ["_ReshapeOp"] * 3  # one failing view a stage
    names = {m: n for n, m in model.named_modules()}
    with pytest.warns(UserWarning, match="could not map channels"):
        kept, groups = prunable_groups(dg, [model.fc], (nn.Conv2d, nn.Linear), names, unmapped=unmapped)
    assert {names[m] for m in kept} == reaching_the_shuffle(model)
    assert len(groups) == 16 + 2  # each block's inner branch width, the stem and the last conv


def test_a_shufflenet_branch_loses_one_channel_exactly():
    """One channel of a branch's inner width goes (``branch2.0``'s output, the depthwise ``branch2.3``, an input of
    ``branch2.5``): the pruned model computes what the dense one computes without that input of ``branch2.5``."""
    model = shufflenet()
    branch, c = model.stage3[1].branch2, 5
    prefix = {m: n for n, m in model.named_modules()}[branch]
    scores = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for name in (f"{prefix}.{i}.{kind}" for i in (0, 1, 3, 4) for kind in ("weight", "bias")):
        if name in scores:
            scores[name][c] = 1e-9
    scores[f"{prefix}.5.weight"][:, c] = 1e-9
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.stage3[1].branch2[5].weight[:, c] = 0
    imp = oba.group_importance.ParameterScoreImportance(model, scores)
    others = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m not in (branch[0], branch[3])]
    width, x = branch[0].out_channels, torch.randn(2, 3, 64, 64)
    oba.prune_structured(
        model, x[:1], lambda m, b: imp, keep_channels=(width - 1) / width, steps=1, batches=[None],
        ignored_layers=others, progress=False,
    )  # fmt: skip
    assert (branch[0].out_channels, branch[3].out_channels, branch[5].in_channels) == (width - 1,) * 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_a_flatten_beyond_torch_pruning_recursion_limit_keeps_the_layers_reaching_it_whole():
    """600 element-wise operations between ``conv2`` and the flatten before ``fc``: Torch-Pruning's search for the
    flattened channels stops at its recursion limit and leaves the flatten unmapped, which would prune one input of
    ``fc`` for each channel of ``conv2`` (not its 16 positions). ``conv2`` is kept whole instead; ``conv1`` prunes."""

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv2(self.conv1(x).relu())
            for _ in range(600):
                x = x.relu()
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    model = Deep().eval()
    says = r"'conv2' reach ViewBackward0: Torch-Pruning could not map channels through it \(a channel search stops"
    with pytest.warns(UserWarning, match=says):
        oba.prune_structured(model, torch.randn(1, 3, 4, 4), "magnitude", keep_flops=0.8, progress=False)
    assert (model.conv1.out_channels < 8, model.conv2.out_channels, model.fc.in_features) == (True, 4, 64)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 10)


def test_a_model_torch_pruning_cannot_trace_is_refused_by_name_and_left_as_it_was():
    """Torch-Pruning's trace of the forward fails (its hook reads ``.shape`` of a layer's output, here a dict): the
    error names the layer that was running, and the model keeps its weights and has no hook left."""

    class TaggedLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": super().forward(x)}

    class Tagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.head = TaggedLinear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean((2, 3)))["logits"]

    from oba.prune import UnsupportedModelError

    torch.manual_seed(0)
    model = Tagged().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    says = r"Tagged: AttributeError in its _record_grad_fn while running 'head' \(TaggedLinear\).*nothing was changed"
    with pytest.raises(UnsupportedModelError, match=says):
        oba.prune_structured(model, torch.randn(1, 3, 8, 8), "magnitude", keep_flops=0.6, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m._forward_hooks for m in model.modules())
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x0_5"])
def test_exact_oba_scores_torchvision_models_with_hardsigmoid_grouped_convs_and_a_channel_shuffle(name):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    prune_and_check(model, torch.randn(1, 3, 32, 32), data((3, 32, 32)), criterion="oba")


TIMM = {
    "resnet18": dict(), "efficientnet_b0": dict(), "mobilenetv3_small_100": dict(), "regnety_002": dict(),
    "convnext_atto": dict(), "deit_tiny_patch16_224": dict(img_size=32, patch_size=8),
}  # fmt: skip


@pytest.mark.parametrize("name", TIMM)
def test_timm_families_prune_to_the_target_and_run(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **TIMM[name]).eval()
    prune_and_check(model, torch.randn(1, 3, 32, 32), data((3, 32, 32)))


def _silence_heads_and_compare(model: nn.Module, attn: nn.Module, out_proj: nn.Linear, head_dim: int, x, run):
    """Make two heads of ``attn`` cost nothing, prune, and compare with the dense model whose output projection
    ignores those heads' channels: exactly equal if q, k, v and the output projection lost the same heads."""
    heads = next(a for a in attention_heads(model) if a.module is attn)
    scores = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    names = {m: n for n, m in model.named_modules()}
    doomed = (1, 2)
    for layer in heads.projections:
        width = layer.out_features // heads.parts
        for part in range(heads.parts):
            for h in doomed:
                rows = slice(part * width + h * head_dim, part * width + (h + 1) * head_dim)
                scores[names[layer] + ".weight"][rows] = 1e-9
                scores[names[layer] + ".bias"][rows] = 1e-9
    reference = copy.deepcopy(model)
    ref_proj = dict(reference.named_modules())[names[out_proj]]
    with torch.no_grad():
        for h in doomed:
            ref_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
    imp = oba.group_importance.ParameterScoreImportance(model, scores)
    before = heads.heads
    others = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in heads.projections]
    oba.prune_structured(
        model, x, lambda m, b: imp, keep_channels=0.5, steps=1, batches=[None], ignored_layers=others, progress=False
    )  # only this attention's heads may go: half of them, the two silenced ones
    after = next(a for a in attention_heads(model) if a.module is attn)
    assert after.heads == before - 2
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-6)


def test_timm_fused_qkv_loses_whole_heads_consistently():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=2, num_heads=4,
        embed_dim=64, mlp_ratio=1.0,
    ).eval()  # fmt: skip
    attn = model.blocks[0].attn
    x = torch.randn(2, 3, 32, 32)
    _silence_heads_and_compare(model, attn, attn.proj, attn.head_dim, x[:1], lambda m: m(x))
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * attn.head_dim == 3 * attn.attn_dim


def _bert(**overrides) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        num_labels=3, attn_implementation="eager", **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_hugging_face_bert_loses_whole_heads_consistently():
    bert = _bert()
    model = Logits(bert)
    attn = bert.bert.encoder.layer[0].attention
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    _silence_heads_and_compare(model, attn.self, attn.output.dense, 8, {"input_ids": ids[:1]}, lambda m: m(ids))
    assert attn.self.num_attention_heads == 2 and attn.self.all_head_size == 16 == attn.self.query.out_features


def test_hugging_face_bert_and_vit_prune_to_the_target_with_exact_oba():
    bert = _bert()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    batches = [({"input_ids": ids}, torch.tensor([0, 2])), ({"input_ids": ids.flip(1)}, torch.tensor([1, 1]))]
    last = prune_and_check(Logits(bert), {"input_ids": ids[:1]}, batches, criterion="oba")
    assert any(v < 4 for k, v in last["heads"].items()) or last["widths"]
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=10, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(cfg).eval()
    prune_and_check(Logits(vit), torch.randn(1, 3, 32, 32), data((3, 32, 32)), criterion="oba")


@pytest.mark.parametrize(
    "arch, kwargs, side",
    [
        ("torchvision:resnext50_32x4d", {"num_classes": 10}, 64),
        ("torchvision:mnasnet0_5", {"num_classes": 10}, 64),  # its loading reads the state dict's version
        ("timm:vit_tiny_patch16_224", {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 2}, 32),
    ],
)
def test_a_pruned_torchvision_or_timm_model_saves_and_loads(tmp_path, arch, kwargs, side):
    torch.manual_seed(0)
    model = oba.models.create(arch, **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    oba.prune_structured(model, x[:1], "magnitude", keep_flops=0.6, steps=2, progress=False)
    oba.save_pruned(model, tmp_path / "pruned.pt", arch, kwargs)
    loaded = oba.load_pruned(tmp_path / "pruned.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert [a.heads for a in attention_heads(loaded)] == [a.heads for a in attention_heads(model)]
    with pytest.raises(ValueError, match="'timm:<name>'"):
        oba.save_pruned(model, tmp_path / "x.pt", "timm:no_such_model")


def test_logits_turns_off_the_key_value_cache_of_a_decoder_so_it_traces():
    """GPT-2 builds a key/value cache by default (``use_cache=True``), a concatenation Torch-Pruning cannot trace;
    ``Logits`` asks for none (the caller may still pass ``use_cache``), and the decoder prunes."""
    cfg = transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    gpt2 = transformers.GPT2ForSequenceClassification(cfg).eval()
    assert gpt2.config.use_cache
    ids = torch.randint(2, 50, (1, 8), generator=torch.Generator().manual_seed(4))
    _, history = oba.prune_structured(Logits(gpt2), {"input_ids": ids}, "magnitude", keep_flops=0.6, progress=False)
    assert history[-1]["flops_kept"] <= 0.6 + 1e-9
    with torch.no_grad():
        assert Logits(gpt2)({"input_ids": ids}).shape == (1, 3)
        assert gpt2(input_ids=ids, use_cache=True).past_key_values is not None  # still the caller's choice


@pytest.mark.parametrize(
    "source, name, side, kwargs",
    [
        ("torchvision", "resnet18", 32, {}),
        ("torchvision", "densenet121", 32, {}),
        ("torchvision", "shufflenet_v2_x0_5", 64, {}),  # unmapped reshapes
        ("timm", "rexnet_100", 32, {"width_mult": 0.5}),  # channel slices
        ("timm", "cspresnet50", 32, {}),  # channel splits
        ("timm", "ghostnet_050", 32, {}),  # tied channels, a no-op slice
        ("timm", "mixer_s16_224", 32, {"img_size": 32}),  # a mis-traced transpose
    ],
)
def test_the_first_step_ranks_the_groups_a_fresh_search_would_find(source, name, side, kwargs):
    """The first step ranks the groups found while building the context (no second search of the unchanged
    model): the same groups, members and indices as ``get_all_groups`` with every layer kept whole ignored."""
    from oba.depgraph import build_graph, prunable_groups
    from oba.prunable import default_ignored_layers

    model = oba.models.create(f"{source}:{name}", num_classes=10, **kwargs).eval()
    dg, unmapped = build_graph(model, torch.randn(1, 3, side, side), verbose=False)
    names = {m: n for n, m in model.named_modules()}
    ignored, roots = default_ignored_layers(model), (nn.modules.conv._ConvNd, nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept, groups = prunable_groups(dg, ignored, roots, names, unmapped=unmapped)
    fresh = list(dg.get_all_groups(ignored_layers=[*ignored, *kept], root_module_types=roots))

    def described(group) -> list:
        return [(repr(dep), list(idxs)) for dep, idxs in group]

    assert len(groups) > 0
    assert [described(g) for g in groups.values()] == [described(g) for g in fresh]
