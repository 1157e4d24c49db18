"""Swin Transformers (#13): window attention with a relative position bias table, from timm, torchvision and
Hugging Face, small configurations at random initialisation.

Each prunes to 0.6 of its MACs in 2 steps (``magnitude`` and exact ``oba``), runs afterwards, and its per-head
tensors (the bias table ``[(2W-1)^2, H]``, V2's ``logit_scale`` and ``cpb_mlp`` output) lost the same heads as
q, k and v. Whole heads prune in timm's ``WindowAttention`` and Hugging Face's ``SwinAttention``; torchvision's
``ShiftedWindowAttention`` takes its head width from the residual width, so its heads stay and its MLP hidden units
prune, unless :func:`oba.prunable.prunable_window_attention` swapped it (and MaxViT's attention) for oba's module,
which computes the same function bit for bit (float64) and whose heads prune. The exactness tests silence two heads
and compare with the dense model whose output projection ignores them: equal only if the per-head tensors lost the
same heads as q, k and v.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_model_coverage import _silence_heads_and_compare, data, prune_and_check
from torch import nn
from torchvision.models.maxvit import MaxVit, RelativePositionalMultiHeadAttention

import oba
import oba.models
from oba.models.window_attention import (
    PrunableRelativePositionalAttention,
    PrunableShiftedWindowAttention,
    PrunableShiftedWindowAttentionV2,
)
from oba.prunable import Logits, attention_heads, default_ignored_layers, per_head_tensors, prunable_window_attention

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


def torchvision_swin(v2: bool = False, depths: tuple[int, ...] = (1, 1)) -> nn.Module:
    torch.manual_seed(0)
    extra = {"block": tv_swin.SwinTransformerBlockV2, "downsample_layer": tv_swin.PatchMergingV2} if v2 else {}
    return tv_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=list(depths), num_heads=[2, 4], window_size=[4, 4], num_classes=10,
        **extra,
    ).eval()  # fmt: skip


def torchvision_maxvit() -> nn.Module:
    torch.manual_seed(0)
    return MaxVit(
        input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.0, num_classes=10,
    ).eval()  # fmt: skip


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


def test_torchvision_swin_s_is_mapped_around_what_torch_pruning_cannot_map_and_its_mlps_prune():
    """swin_s (18 blocks in its third stage, 64x64): Torch-Pruning's index mapping raises on the concatenation of a
    patch merging (it could not count the channels of one of its slices) and leaves window reshapes unmapped at its
    recursion limit. The rest of the graph is mapped, and every MLP's hidden width is a group that prunes (what
    reaches those operations is ignored by default: the residual stream, q, k, v and the output projections)."""
    from oba.depgraph import build_graph, prunable_groups

    model = tv_swin.swin_s(num_classes=10).eval()
    dg, unmapped = build_graph(model, torch.randn(1, 3, 64, 64), verbose=False)
    failed = [n for n, why in unmapped.items() if why.startswith("TypeError")]
    assert [type(n.module).__name__ for n in failed] == ["_ConcatOp"]
    assert any(type(n.module).__name__ == "_ReshapeOp" and "recursion limit" in why for n, why in unmapped.items())
    names = {m: n for n, m in model.named_modules()}
    kept, groups = prunable_groups(dg, default_ignored_layers(model), (nn.Conv2d, nn.Linear), names, unmapped=unmapped)
    assert kept == [] and sorted(names[m] for m in groups) == sorted(n for n in names.values() if n.endswith("mlp.0"))


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
    model = torchvision_maxvit()
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


# ------------------------------------------------------------------ torchvision, after prunable_window_attention
SWAPPED = {"swin": torchvision_swin, "swin_v2": lambda: torchvision_swin(v2=True), "maxvit": torchvision_maxvit}
"""Models whose torchvision window attention :func:`prunable_window_attention` swaps (heads: Swin 2, 4; MaxViT 2, 2, 4,
4, a window and a grid attention per stage)."""

EXACT = {  # Swins with shifted windows (every second block); inputs: shifted windows, padding, a map one window wide
    "swin": (lambda: torchvision_swin(depths=(2, 2)), PrunableShiftedWindowAttention, [(64, 64), (40, 40), (64, 16)]),
    "swin_v2": (
        lambda: torchvision_swin(v2=True, depths=(2, 2)),
        PrunableShiftedWindowAttentionV2,
        [(64, 64), (36, 52), (64, 16)],
    ),
    "maxvit": (torchvision_maxvit, PrunableRelativePositionalAttention, [(64, 64)]),
}


def _randomised(model: nn.Module) -> nn.Module:
    """``model`` in float64 with every parameter random, biases (Swin V2's unused key bias too) and scales included."""
    g = torch.Generator().manual_seed(2)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _swapped(source: str) -> nn.Module:
    return prunable_window_attention(SWAPPED[source]())


def _head_counts(model: nn.Module) -> list[int]:
    """The head-count attribute of each attention module oba prunes (``num_heads``; MaxViT: ``n_heads``)."""
    maxvit = PrunableRelativePositionalAttention
    return [a.module.n_heads if isinstance(a.module, maxvit) else a.module.num_heads for a in attention_heads(model)]


@pytest.mark.parametrize("source", EXACT)
def test_prunable_window_attention_computes_exactly_what_torchvision_computes(source):
    build, kind, sizes = EXACT[source]
    dense = _randomised(build())
    model = copy.deepcopy(dense)
    params = {id(p) for p in model.parameters()}
    prunable_window_attention(model)
    stock = (tv_swin.ShiftedWindowAttention, RelativePositionalMultiHeadAttention)
    attn = [m for m in model.modules() if isinstance(m, stock)]
    assert attn and all(type(m) is kind for m in attn)
    assert {id(p) for p in model.parameters()} == params  # the same tensors: an optimizer over them keeps working
    assert list(model.state_dict()) == list(dense.state_dict())  # torchvision's layout: its weights load
    if source != "maxvit":
        assert [m.shift_size for m in attn] == [[0, 0], [2, 2]] * 2
    g = torch.Generator().manual_seed(3)
    for size in sizes:
        x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(model(x), dense(x)), size
    assert prunable_window_attention(model) is model and all(type(m) is kind for m in attn)


@pytest.mark.parametrize("criterion", ["magnitude", "oba"])
@pytest.mark.parametrize("source", SWAPPED)
def test_torchvision_window_attention_loses_whole_heads_after_prunable_window_attention(source, criterion):
    model = _swapped(source)
    before = [a.heads for a in attention_heads(model)]
    assert before == ([2, 2, 4, 4] if source == "maxvit" else [2, 4])
    assert all(a.projections[0] not in default_ignored_layers(model) for a in attention_heads(model))
    prune_and_check(model, torch.randn(1, 3, 64, 64), data((3, 64, 64)), criterion=criterion)
    after = [a.heads for a in attention_heads(model)]
    assert sum(after) < sum(before) and all(h >= 1 for h in after)
    assert _head_counts(model) == after
    _per_head_shapes_agree(model)


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin_heads_prune_exactly_with_their_per_head_tensors(v2):
    model = prunable_window_attention(_randomised(torchvision_swin(v2)))
    attn = model.features[3][0].attn  # 4 heads
    heads = next(a for a in attention_heads(model) if a.module is attn)
    per_head = {(id(owner), name): getattr(owner, name).detach().clone() for owner, name, _ in heads.per_head}
    assert len(per_head) == (2 if v2 else 1)  # logit_scale and the cpb_mlp output rows; the bias table
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _silence_heads_and_compare(model, attn, attn.proj, attn.head_dim, x[:1], lambda m: m(x))
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * attn.head_dim
    for owner, name, dim in heads.per_head:
        kept = per_head[id(owner), name].index_select(dim, torch.tensor([0, 3]))
        torch.testing.assert_close(getattr(owner, name), kept, rtol=0, atol=0)


def test_torchvision_maxvit_heads_prune_exactly_with_their_bias_table_columns():
    """One partition-attention layer of MaxViT (its residual stream, attention output and MLP are the only other
    layers: all ignored), silenced heads compared with the dense layer."""
    layer = prunable_window_attention(_randomised(torchvision_maxvit())).blocks[1].layers[0].layers.grid_attention
    attn = layer.attn_layer[1]  # 4 heads
    table = attn.relative_position_bias_table.detach().clone()
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    _silence_heads_and_compare(layer, attn, attn.merge, attn.head_dim, x[:1], lambda m: m(x))
    assert attn.n_heads == 2 and attn.to_qkv.out_features == 3 * 2 * attn.head_dim == 3 * attn.merge.in_features
    torch.testing.assert_close(attn.relative_position_bias_table, table[:, [0, 3]], rtol=0, atol=0)


@pytest.mark.parametrize("source", ["swin_v2", "maxvit"])
def test_pruned_torchvision_window_attention_saves_and_loads_into_torchvision_modules(tmp_path, source):
    """:func:`oba.load_pruned` swaps a torchvision model's window attention when some lost heads (a fresh model here,
    as ``oba.models.create("torchvision:swin_v2_t")`` gives for that name) and tells each its head count."""
    model = _swapped(source)
    x = torch.randn(2, 3, 64, 64)
    before = [a.heads for a in attention_heads(model)]
    oba.prune_structured(model, x[:1], "magnitude", keep_flops=0.6, steps=2, progress=False)
    heads = [a.heads for a in attention_heads(model)]
    assert sum(heads) < sum(before)
    oba.save_pruned(
        model, tmp_path / "pruned.pt", "torchvision:swin_v2_t" if source == "swin_v2" else "torchvision:maxvit_t"
    )
    loaded = oba.load_pruned(tmp_path / "pruned.pt", model=SWAPPED[source]()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [a.heads for a in attention_heads(loaded)] == heads == _head_counts(loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
