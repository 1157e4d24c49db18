"""torchvision ResNet-50 / ViT-B/16 (oba.models.torchvision_models) under structured pruning.

The ViT's ``nn.MultiheadAttention`` is split into q/k/v/proj linears (same function, float64); with the default
ignored layers only whole heads and MLP hidden units prune, the residual width never; pruned models save and
load back. Small configurations of the same torchvision classes keep this fast; the full-size models are
pruned and scored in ``benchmarks/imagenet_memory.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import nn

import oba.models
from oba.flops import count_flops, macs_by_module
from oba.models.torchvision_models import (
    SplitMultiheadAttention,
    split_vit_attention,
    vit_pruning_ignored_layers,
    vit_widths,
)
from oba.prune import default_ignored_layers, layer_widths, load_pruned, prune_structured, save_pruned

VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4, "hidden_dim": 32, "mlp_dim": 64}
RESNET = {"layers": [1, 1, 1, 1], "width_per_group": 4}  # Bottleneck stages of 4-32 inner channels
CRITERIA = ["oba", "magnitude", "taylor", "kron_obs"]


def small_vit(num_classes: int = 10, **kwargs) -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    model = oba.models.create("vit_b_16", **VIT, num_classes=num_classes, **kwargs)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the classifier
    return model.eval()


def small_resnet() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return oba.models.create("resnet50", **RESNET, num_classes=10).eval()


def batches(size: int, n: int = 1, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.encoder.layers)


# ----------------------------------------------------------------------------- split attention
def test_split_attention_computes_the_same_function():
    reference = small_vit(split_attention=False).double()
    model = split_vit_attention(copy.deepcopy(reference))
    assert all(isinstance(b.self_attention, nn.MultiheadAttention) for b in blocks(reference))
    assert all(isinstance(b.self_attention, SplitMultiheadAttention) for b in blocks(model))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for train in (False, True):
        reference.train(train), model.train(train)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-10)
    # the module alone, as nn.MultiheadAttention is called, attention weights included
    mha, split = blocks(reference)[0].self_attention.eval(), blocks(model)[0].self_attention.eval()
    tokens = torch.randn(2, 17, 32, dtype=torch.float64)
    for average in (True, False):
        want = mha(tokens, tokens, tokens, need_weights=True, average_attn_weights=average)
        got = split(tokens, tokens, tokens, need_weights=True, average_attn_weights=average)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    out, weights = split(tokens, tokens, tokens, need_weights=False)
    assert weights is None and out.shape == tokens.shape
    with pytest.raises(NotImplementedError, match="mask"):
        split(tokens, tokens, tokens, attn_mask=torch.zeros(17, 17))
    assert split.num_heads == 4 and split.head_dim == 8


def test_pretrained_weights_load_in_torchvision_layout_then_split(monkeypatch):
    with torch.device("meta"):  # the full-size layout, without allocating it
        assert isinstance(oba.models.create("vit_b_16").encoder.layers[0].self_attention, SplitMultiheadAttention)
    reference = small_vit(1000, split_attention=False)  # ImageNet's classes
    monkeypatch.setattr(
        "torchvision.models.WeightsEnum.get_state_dict", lambda self, *args, **kwargs: reference.state_dict()
    )
    monkeypatch.setattr(  # torchvision's builder at the small size (the weights' 224 x 224 replaced)
        "torchvision.models.vit_b_16",
        lambda weights=None, **kwargs: torchvision.models.VisionTransformer(**{**kwargs, **VIT}),
    )
    model = oba.models.load_pretrained("vit_b_16")
    assert not model.training
    attn, mha = model.encoder.layers[1].self_attention, reference.encoder.layers[1].self_attention
    assert isinstance(attn, SplitMultiheadAttention)
    torch.testing.assert_close(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]), mha.in_proj_weight)
    torch.testing.assert_close(attn.proj.bias, mha.out_proj.bias)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))
    with pytest.raises(ValueError, match="num_layers"):
        oba.models.torchvision_models.vit_b_16(pretrained=True, num_layers=2)


def test_split_vit_b_16_flops_match_torchvision():
    with torch.device("meta"):
        split, plain = oba.models.create("vit_b_16"), oba.models.create("vit_b_16", split_attention=False)
    count = count_flops(split, (1, 3, 224, 224))
    assert count.macs == count_flops(plain, (1, 3, 224, 224)).macs == pytest.approx(17.6e9, rel=0.01)
    macs = macs_by_module(split, (1, 3, 224, 224))
    attn = "encoder.layers.encoder_layer_0.self_attention"
    products = macs[attn] - sum(macs[f"{attn}.{p}"] for p in ("q", "k", "v", "proj"))
    assert products == 2 * 197 * 197 * 768  # Q K^T and A V of all heads


# ----------------------------------------------------------------------------- what prunes
def test_vit_groups_are_whole_heads_and_mlp_hidden_units():
    model = small_vit()
    assert default_ignored_layers(model) == vit_pruning_ignored_layers(model)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32), verbose=False)
    names = {m: n for n, m in model.named_modules()}
    found = set()
    for group in dg.get_all_groups(default_ignored_layers(model), (nn.Conv2d, nn.Linear)):
        layers = {
            (names[d.target.module].removeprefix("encoder.layers."), dg.is_out_channel_pruning_fn(d.handler))
            for d, _ in group
            if d.target.module in names
        }
        found.add(frozenset(layers))
    expected = set()
    for i in range(2):
        block = f"encoder_layer_{i}"
        attn = {(f"{block}.self_attention.{p}", True) for p in "qkv"} | {(f"{block}.self_attention.proj", False)}
        expected |= {frozenset(attn), frozenset({(f"{block}.mlp.0", True), (f"{block}.mlp.3", False)})}
    assert found == expected
    # torchvision's own layout: the fused attention is ignored whole, the MLP hidden units still prune
    plain = small_vit(split_attention=False)
    dg = tp.DependencyGraph().build_dependency(plain, example_inputs=torch.randn(1, 3, 32, 32), verbose=False)
    roots = [g[0].dep.target.module for g in dg.get_all_groups(default_ignored_layers(plain), (nn.Linear,))]
    assert {type(m) for m in roots} == {nn.Linear} and all(m.out_features == 64 for m in roots)
    resnet = small_resnet()
    assert default_ignored_layers(resnet) == [resnet.fc]


# ----------------------------------------------------------------------------- pruning to a target
@pytest.mark.parametrize("criterion", CRITERIA)
def test_small_vit_prunes_whole_heads_and_mlp_units(criterion, tmp_path):
    model = small_vit()
    _, history = prune_structured(
        model,
        torch.randn(1, 3, 32, 32),
        criterion,
        keep_flops=0.5,
        loss_fn=F.cross_entropy,
        batches=batches(32),
        batches_per_step=1,
        progress=False,
    )
    assert 0.45 < history[-1]["flops_kept"] <= 0.5
    widths = vit_widths(model)
    assert sum(w["heads"] for w in widths) < 2 * 4 and sum(w["mlp_hidden"] for w in widths) < 2 * 64
    for block, w in zip(blocks(model), widths, strict=True):
        attn = block.self_attention
        assert w["head_dim"] == 8 and attn.scale == 8**-0.5
        assert attn.q.out_features == attn.k.out_features == attn.v.out_features == w["heads"] * 8
        assert attn.proj.in_features == w["heads"] * 8 and block.mlp[3].in_features == w["mlp_hidden"]
        # the residual stream is untouched
        assert attn.q.in_features == attn.proj.out_features == block.mlp[0].in_features == 32
        assert block.mlp[3].out_features == block.ln_1.weight.numel() == block.ln_2.weight.numel() == 32
    assert model.conv_proj.out_channels == 32 and model.heads.head.weight.shape == (10, 32)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    save_pruned(model, tmp_path / "vit.pt", "vit_b_16", {**VIT, "num_classes": 10})
    loaded = load_pruned(tmp_path / "vit.pt").eval()
    assert isinstance(loaded, torchvision.models.VisionTransformer) and vit_widths(loaded) == widths
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_small_resnet_prunes_channels(criterion, tmp_path):
    model = small_resnet()
    dense = layer_widths(model)
    _, history = prune_structured(
        model,
        torch.randn(1, 3, 16, 16),
        criterion,
        keep_flops=0.6,
        loss_fn=F.cross_entropy,
        batches=batches(16),
        batches_per_step=1,
        progress=False,
    )
    assert 0.55 < history[-1]["flops_kept"] <= 0.6
    widths = history[-1]["widths"]
    assert sum(widths.values()) < sum(dense.values())
    assert widths["fc"] == 10 and model.fc.in_features == model.layer4[0].conv3.out_channels
    assert model.conv1.in_channels == 3
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    save_pruned(model, tmp_path / "resnet.pt", "resnet50", {**RESNET, "num_classes": 10})
    loaded = load_pruned(tmp_path / "resnet.pt").eval()
    assert layer_widths(loaded) == widths
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("method", ["fwd+bwd", "oba exact", "prune"])
def test_imagenet_benchmark_methods_run(method):
    """Only that ``benchmarks/imagenet_memory.py`` works (on the small ViT); its numbers are its own business."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import imagenet_memory
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    try:
        row = imagenet_memory.measure(method, "vit_b_16", batch=2, repeats=1, threads=1, size=32, model_kwargs=VIT)
    finally:
        torch.set_num_threads(threads)  # measure() sets it for its worker process
    assert row["method"] == method and row["median_s"] > 0 and row["peak_mb"] > 0
    if method == "prune":
        assert row["flops_kept"] <= 0.8 and row["roundtrip_max_abs_diff"] == 0
        assert len(row["heads"]) == 2
