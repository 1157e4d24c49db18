"""Models users bring (#13): torchvision, timm and Hugging Face transformers, random init, small inputs.

The fast subset of ``benchmarks/model_coverage.py`` (which runs every torchvision model): one model per family,
pruned to 0.6 of its MACs in 2 steps; each must run afterwards, meet the target, and load its pruned weights
into a model rebuilt to the pruned widths. Whole attention heads: the pruned model computes exactly what the dense
one computes with the removed heads' output silenced (so q, k, v and the output projection lost the same heads).
"""

from __future__ import annotations

import copy

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


def test_a_model_torch_pruning_cannot_trace_is_refused_by_name_and_left_as_it_was():
    import torchvision

    from oba.prune import UnsupportedModelError

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    says = r"ShuffleNetV2.*channel shuffle.*nothing was changed.*unstructured"
    with pytest.raises(UnsupportedModelError, match=says):
        oba.prune_structured(model, torch.randn(1, 3, 64, 64), "magnitude", keep_flops=0.6, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_x_400mf"])
def test_exact_oba_scores_torchvision_models_with_hardsigmoid_and_grouped_convs(name):
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
