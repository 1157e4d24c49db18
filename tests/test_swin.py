"""Swin Transformers (#13): window attention with a relative position bias table, from timm, torchvision and
Hugging Face, small configurations at random initialisation.

Each prunes to 0.6 of its MACs in 2 steps (``magnitude`` and exact ``oba``), runs afterwards, and its per-head
tensors (the bias table ``[(2W-1)^2, H]``, V2's ``logit_scale`` and ``cpb_mlp`` output) lost the same heads as
q, k and v. Whole heads prune in timm's ``WindowAttention`` and Hugging Face's ``SwinAttention``; torchvision's
``ShiftedWindowAttention`` takes its head width from the residual width, so its heads stay and its MLP hidden units
prune. The exactness test silences two heads and compares with the dense model whose output projection ignores
them: equal only if the bias table lost the same heads as q, k and v.
"""

from __future__ import annotations

import pytest
import torch
from test_model_coverage import _silence_heads_and_compare, data, prune_and_check
from torch import nn

import oba
import oba.models
from oba.prunable import Logits, attention_heads, default_ignored_layers, per_head_tensors

timm = pytest.importorskip("timm", reason="timm is in the 'models' extra (scripts/env.sh installs it)")
transformers = pytest.importorskip("transformers", reason="transformers is in the 'models' extra")
from torchvision.models import swin_transformer as tv_swin  # noqa: E402

TIMM_NAME = "swin_tiny_patch4_window7_224"
TIMM_KWARGS = {
    "num_classes": 10,
    "img_size": 32,
    "window_size": 4,
    "embed_dim": 16,
    "depths": (1, 1),
    "num_heads": (2, 4),
}


def timm_swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TIMM_NAME, pretrained=False, **TIMM_KWARGS).eval()


def torchvision_swin(v2: bool = False) -> nn.Module:
    torch.manual_seed(0)
    extra = {"block": tv_swin.SwinTransformerBlockV2, "downsample_layer": tv_swin.PatchMergingV2} if v2 else {}
    return tv_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4], num_classes=10, **extra
    ).eval()


def hf_swin() -> nn.Module:
    cfg = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return Logits(transformers.SwinForImageClassification(cfg).eval())


MODELS = {"timm": (timm_swin, 32), "hf": (hf_swin, 32), "torchvision": (torchvision_swin, 64)}


def _per_head_shapes_agree(model: nn.Module) -> None:
    """Every per-head tensor of every attention module has one slice per head left."""
    for a in attention_heads(model):
        assert a.per_head, f"{type(a.module).__name__} without its bias table"
        for owner, name, dim in a.per_head:
            assert getattr(owner, name).shape[dim] == a.heads


@pytest.mark.parametrize("criterion", ["magnitude", "oba"])
@pytest.mark.parametrize("source", ["timm", "hf"])
def test_swin_loses_whole_heads_and_their_bias_table_columns(source, criterion):
    build, side = MODELS[source]
    model = build()
    before = [a.heads for a in attention_heads(model)]
    assert before == [2, 4]
    prune_and_check(model, torch.randn(1, 3, side, side), data((3, side, side)), criterion=criterion)
    after = [a.heads for a in attention_heads(model)]
    assert sum(after) < sum(before) and all(h >= 1 for h in after)
    _per_head_shapes_agree(model)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("criterion", ["magnitude", "oba"])
def test_torchvision_swin_prunes_its_mlps_and_keeps_its_heads(v2, criterion):
    model = torchvision_swin(v2)
    attn = [m for m in model.modules() if isinstance(m, tv_swin.ShiftedWindowAttention)]
    shapes = {m: {n: p.shape for n, p in m.named_parameters()} for m in attn}  # qkv, bias table, cpb_mlp
    ignored = default_ignored_layers(model)
    assert all(m.qkv in ignored and m.proj in ignored for m in attn) and attention_heads(model) == []
    last = prune_and_check(model, torch.randn(1, 3, 64, 64), data((3, 64, 64)))
    assert shapes == {m: {n: p.shape for n, p in m.named_parameters()} for m in attn}
    mlp_widths = [w for k, w in last["widths"].items() if k.endswith(".mlp.0")]
    assert mlp_widths and sum(mlp_widths) < sum(4 * m.proj.out_features for m in attn)


def test_swin_v2_window_attention_tensors_left_out_of_the_graph():
    """V2's cpb_mlp computes a per-head bias Torch-Pruning cannot map to channels: traced as ignored layers, with the
    per-head parameters as ignored parameters."""
    model = torchvision_swin(v2=True)
    params, layers = per_head_tensors(model)
    attn = [m for m in model.modules() if isinstance(m, tv_swin.ShiftedWindowAttentionV2)]
    assert {id(p) for p in params} == {id(m.logit_scale) for m in attn} | {id(m.cpb_mlp[2].weight) for m in attn}
    assert set(layers) == {m.cpb_mlp[0] for m in attn} | {m.cpb_mlp[2] for m in attn}


def test_timm_window_attention_heads_prune_exactly_with_their_bias_table_columns():
    model = timm_swin()
    attn = model.layers[1].blocks[0].attn  # 4 heads
    x = torch.randn(2, 3, 32, 32)
    head_dim = attn.qkv.out_features // 3 // attn.num_heads
    table = attn.relative_position_bias_table.detach().clone()
    _silence_heads_and_compare(model, attn, attn.proj, head_dim, x[:1], lambda m: m(x))
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * head_dim
    torch.testing.assert_close(attn.relative_position_bias_table, table[:, [0, 3]], rtol=0, atol=0)


def test_hugging_face_swin_heads_prune_exactly_with_their_bias_table_columns():
    model = hf_swin()
    attn = model.model.swin.encoder.layers[1].blocks[0].attention  # 4 heads
    bias = attn.relative_position_bias
    table = bias.relative_position_bias_table.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    _silence_heads_and_compare(model, attn, attn.o_proj, attn.head_dim, x[:1], lambda m: m(x))
    assert attn.num_attention_heads == 2 and attn.q_proj.out_features == 2 * attn.head_dim
    torch.testing.assert_close(bias.relative_position_bias_table, table[:, [0, 3]], rtol=0, atol=0)


def test_a_pruned_timm_swin_saves_and_loads(tmp_path):
    arch = f"timm:{TIMM_NAME}"
    torch.manual_seed(0)
    model = oba.models.create(arch, **TIMM_KWARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    oba.prune_structured(model, x[:1], "magnitude", keep_flops=0.6, steps=2, progress=False)
    assert [a.heads for a in attention_heads(model)] != [2, 4]
    oba.save_pruned(model, tmp_path / "pruned.pt", arch, TIMM_KWARGS)
    loaded = oba.load_pruned(tmp_path / "pruned.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert [a.heads for a in attention_heads(loaded)] == [a.heads for a in attention_heads(model)]
    assert [m.num_heads for m in loaded.modules() if hasattr(m, "qkv")] == [a.heads for a in attention_heads(model)]


@pytest.mark.parametrize("criterion", ["magnitude", "oba"])
def test_torchvision_maxvit_prunes_its_mbconv_and_mlp_widths_and_keeps_its_residual_stream(criterion):
    """MaxViT's attention reshapes to the residual width (no head can go) and its residual stream runs through window
    partitions: the defaults keep both; MBConv inner widths and MLP hidden units prune to the target."""
    from torchvision.models.maxvit import MaxVit, RelativePositionalMultiHeadAttention

    torch.manual_seed(0)
    model = MaxVit(
        input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=10,
    ).eval()  # fmt: skip
    attn = [m for m in model.modules() if isinstance(m, RelativePositionalMultiHeadAttention)]
    tables = [m.relative_position_bias_table.shape for m in attn]
    before = oba.prunable.layer_widths(model)
    last = prune_and_check(model, torch.randn(1, 3, 64, 64), data((3, 64, 64)), criterion=criterion)
    assert [m.relative_position_bias_table.shape for m in attn] == tables
    assert all(m.to_qkv.out_features == 3 * m.merge.out_features for m in attn)
    for kind in ("conv_a.0", "mlp_layer.1", "conv_c", "merge", "stem.0.0"):  # pruned / pruned / kept widths
        layers = [k for k in before if k.endswith(kind)]
        assert layers, kind
        kept = sum(last["widths"][k] for k in layers) / sum(before[k] for k in layers)
        assert (kept < 1) if kind in ("conv_a.0", "mlp_layer.1") else (kept == 1), (kind, kept)
