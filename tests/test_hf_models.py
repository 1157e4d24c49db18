"""Hugging Face models (#13): GPT-2 (``Conv1D`` layers, fused ``c_attn``), RoBERTa and a LLaMA-style model with
grouped-query attention, tiny configurations at random init, pruned to 0.6 of their MACs in 2 steps with exact OBA
scores and with magnitude; each runs afterwards and meets the target. GPT-2 loses whole heads consistently (the
pruned model computes what the dense one computes with those heads' output silenced); GPT-2 and the LLaMA-style
model save and load. Grouped-query attention loses whole key/value heads with their query groups (coupled by hand,
:class:`oba.prunable.GroupedQueryAttention`): exactly those (the pruned model computes what the dense one computes
with the group's query heads silenced in ``o_proj``), scored by the rows and columns they own, with MACs predicted
exactly, kept whole with a Torch-Pruning importance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import oba
import oba.models
from oba.flops import count_flops, macs_by_module
from oba.group_importance import ParameterScoreImportance
from oba.prunable import Logits, attention_heads, grouped_query_attention, layer_widths

transformers = pytest.importorskip("transformers", reason="transformers is in the 'models' extra")

from oba.hf_layers import Conv1DPruner  # noqa: E402

KEEP = 0.6
CLASSES = 3
GPT2 = dict(
    vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=CLASSES, pad_token_id=0,
    bos_token_id=1, eos_token_id=1, use_cache=False, attn_implementation="eager",
)  # fmt: skip
LLAMA_GQA = dict(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, num_labels=CLASSES, pad_token_id=0, use_cache=False, attn_implementation="eager",
)  # fmt: skip
ROBERTA = dict(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
    num_labels=CLASSES, max_position_embeddings=24, pad_token_id=1, attn_implementation="eager",
)  # fmt: skip
MODELS = {
    "GPT2ForSequenceClassification": GPT2,
    "LlamaForSequenceClassification": LLAMA_GQA,
    "RobertaForSequenceClassification": ROBERTA,
}


def build(cls_name: str) -> nn.Module:
    torch.manual_seed(0)
    return oba.models.create(f"transformers:{cls_name}", config=MODELS[cls_name]).eval()


def token_batches(n: int = 2) -> list:
    """``n`` batches of two sequences of 8 tokens (ids 2..49: no padding token) with labels."""
    g = torch.Generator().manual_seed(3)
    return [
        ({"input_ids": torch.randint(2, 50, (2, 8), generator=g)}, torch.randint(0, CLASSES, (2,), generator=g))
        for _ in range(n)
    ]


def prune_and_check(model: nn.Module, criterion: str) -> dict:
    """Prune ``Logits(model)`` to ``KEEP`` of its MACs in 2 steps; it must meet the target and run afterwards."""
    batches = token_batches()
    wrapped, example = Logits(model), {"input_ids": batches[0][0]["input_ids"][:1]}
    dense = count_flops(wrapped, example, device=None)  # HF models read values (padding): not on meta
    _, history = oba.prune_structured(
        wrapped, example, criterion, keep_flops=KEEP, steps=2, batches_per_step=1, loss_fn=F.cross_entropy,
        batches=batches, progress=False,
    )  # fmt: skip
    pruned = count_flops(wrapped, example, device=None)
    assert 0.5 < pruned.macs / dense.macs <= KEEP + 1e-9
    assert history[-1]["macs"] == pruned.macs
    with torch.no_grad():
        out = wrapped(batches[1][0])
    assert out.shape == (2, CLASSES) and torch.isfinite(out).all()
    return history[-1]


@pytest.mark.parametrize("criterion", ["oba", "magnitude"])
@pytest.mark.parametrize("cls_name", list(MODELS))
def test_hugging_face_models_prune_to_the_target_and_run(cls_name, criterion):
    model = build(cls_name)
    heads_before = [a.heads for a in attention_heads(model)]
    last = prune_and_check(model, criterion)
    if cls_name == "GPT2ForSequenceClassification":  # heads and MLP units prune, the residual width stays
        assert [a.heads for a in attention_heads(model)] != heads_before or any(
            m.mlp.c_fc.nf < 4 * 32 for m in model.transformer.h
        )
        assert model.transformer.wte.weight.shape[1] == 32 and model.score.out_features == CLASSES
        for attn in (b.attn for b in model.transformer.h):
            assert attn.c_attn.nf == 3 * attn.num_heads * attn.head_dim == 3 * attn.split_size
            assert attn.c_proj.nx == attn.split_size
    if cls_name == "LlamaForSequenceClassification":  # whole key/value groups and MLP units prune
        for layer in model.model.layers:
            assert_whole_kv_groups(layer.self_attn)
        assert any(layer.mlp.up_proj.out_features < 48 for layer in model.model.layers)
    assert last["flops_kept"] <= KEEP + 1e-9


def assert_whole_kv_groups(attn: nn.Module) -> None:
    """``attn`` (LLaMA attention, 8-channel heads, 2 query heads per key/value head) holds whole key/value heads,
    each with its query group, and writes the full residual width."""
    d, g = attn.head_dim, attn.num_key_value_groups
    kv = attn.k_proj.out_features
    assert (d, g) == (8, 2) and kv in (8, 16) and attn.v_proj.out_features == kv
    assert attn.q_proj.out_features == g * kv == attn.o_proj.in_features and attn.o_proj.out_features == 32


def test_conv1d_pruner_keeps_the_dense_outputs_of_the_kept_channels():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(8, 6)  # nf=8 outputs, nx=6 inputs: weight [6, 8], y = x @ W + b
    nn.init.normal_(layer.bias)
    dense_layer = copy.deepcopy(layer)
    x = torch.randn(3, 5, 6)
    pruner, gone_out, gone_in = Conv1DPruner(), [1, 4, 7], [0, 3]
    kept_out = [c for c in range(8) if c not in gone_out]
    kept_in = [c for c in range(6) if c not in gone_in]
    pruner.prune_out_channels(layer, gone_out)
    assert layer.weight.shape == (6, 5) and layer.nf == 5 == pruner.get_out_channels(layer)
    torch.testing.assert_close(layer(x), dense_layer(x)[..., kept_out])
    pruner.prune_in_channels(layer, gone_in)
    assert layer.weight.shape == (4, 5) and layer.nx == 4 == pruner.get_in_channels(layer)
    silenced = x.clone()
    silenced[..., gone_in] = 0  # what the removed inputs contributed is gone
    torch.testing.assert_close(layer(x[..., kept_in]), dense_layer(silenced)[..., kept_out])


def test_gpt2_fused_c_attn_loses_whole_heads_consistently():
    """Score two heads of block 0 near zero (their q, k and v columns of ``c_attn``), let only that attention's
    heads prune: the pruned model equals the dense one whose output projection ``c_proj`` ignores those heads
    (its weight is ``[in, out]``: the heads' rows zeroed)."""
    gpt2 = build("GPT2ForSequenceClassification")
    model, attn = Logits(gpt2), gpt2.transformer.h[0].attn
    d, width, doomed = attn.head_dim, attn.split_size, (1, 2)
    names = {m: n for n, m in model.named_modules()}
    scores = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for part in range(3):  # q, k, v
        for h in doomed:
            cols = slice(part * width + h * d, part * width + (h + 1) * d)
            scores[names[attn.c_attn] + ".weight"][:, cols] = 1e-9
            scores[names[attn.c_attn] + ".bias"][cols] = 1e-9
    reference = copy.deepcopy(model)
    ref_proj = reference.model.transformer.h[0].attn.c_proj
    with torch.no_grad():
        for h in doomed:
            ref_proj.weight[h * d : (h + 1) * d] = 0
    imp = oba.group_importance.ParameterScoreImportance(model, scores)
    others = [m for m in model.modules() if isinstance(m, (nn.Linear, type(attn.c_attn))) and m is not attn.c_attn]
    ids = token_batches()[0][0]
    oba.prune_structured(
        model, {"input_ids": ids["input_ids"][:1]}, lambda m, b: imp, keep_channels=0.5, steps=1, batches=[None],
        ignored_layers=others, progress=False,
    )  # fmt: skip  # only this attention's heads may go: half of them, the two silenced ones
    assert attn.num_heads == 2 and attn.split_size == 2 * d and attn.c_attn.nf == 6 * d and attn.c_proj.nx == 2 * d
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-6)


def gqa_llama(attention_bias: bool = False) -> nn.Module:
    """The tiny LLaMA (4 query heads, 2 key/value heads of 8 channels, 2 layers); with random q/k/v/o biases when
    ``attention_bias``."""
    torch.manual_seed(0)
    model = oba.models.create(
        "transformers:LlamaForSequenceClassification", config={**LLAMA_GQA, "attention_bias": attention_bias}
    ).eval()
    for p in model.parameters():
        if p.dim() == 1 and attention_bias:
            nn.init.normal_(p, std=0.1)  # biases (and norm weights): values that matter
    return model


def test_gqa_loses_exactly_the_kv_group_it_scores_lowest():
    """Score key/value head 0 of layer 0 near zero (its rows of k_proj and v_proj, the rows of its query heads 0 and 1
    in q_proj, biases with their rows, and those heads' columns of o_proj), let only that module prune: it loses half
    its channels, that head with its query group, and the pruned model equals the dense one whose o_proj ignores
    query heads 0 and 1 (their columns zeroed). Layer 1's attention, ignored, stays whole."""
    llama = gqa_llama(attention_bias=True)
    model, attn = Logits(llama), llama.model.layers[0].self_attn
    d, g = attn.head_dim, attn.num_key_value_groups
    names = {m: n for n, m in model.named_modules()}
    scores = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    kv_rows, q_rows = slice(0, d), slice(0, g * d)
    for layer, rows in ((attn.k_proj, kv_rows), (attn.v_proj, kv_rows), (attn.q_proj, q_rows)):
        scores[names[layer] + ".weight"][rows] = 1e-9
        scores[names[layer] + ".bias"][rows] = 1e-9
    scores[names[attn.o_proj] + ".weight"][:, q_rows] = 1e-9
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.model.model.layers[0].self_attn.o_proj.weight[:, q_rows] = 0
    imp = ParameterScoreImportance(model, scores)
    own = {attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj}
    others = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in own]
    ids = token_batches()[0][0]
    _, history = oba.prune_structured(
        model, {"input_ids": ids["input_ids"][:1]}, lambda m, b: imp, keep_channels=0.5, steps=1, batches=[None],
        ignored_layers=others, progress=False,
    )  # fmt: skip
    assert (attn.k_proj.weight.shape, attn.v_proj.weight.shape) == ((d, 32), (d, 32))
    assert attn.q_proj.weight.shape == (g * d, 32) and attn.o_proj.weight.shape == (32, g * d)
    assert attn.k_proj.bias.shape == (d,) and attn.q_proj.bias.shape == (g * d,) and attn.o_proj.bias.shape == (32,)
    kept = llama.model.layers[1].self_attn
    assert (kept.q_proj.out_features, kept.k_proj.out_features, kept.o_proj.in_features) == (32, 16, 32)
    heads = history[-1]["heads"]
    assert heads["model.model.layers.0.self_attn.q_proj"] == g and heads["model.model.layers.0.self_attn.k_proj"] == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-6)


def test_gqa_channel_scores_sum_the_rows_and_columns_each_kv_channel_owns():
    """:meth:`ParameterScoreImportance.coupled_linear` on a module's coupling, raw signed sums: key/value channel
    ``c = j d + t`` scores k and v rows ``c`` (with their biases), q rows ``j g d + i d + t`` (with their biases) and
    o columns ``j g d + i d + t`` for ``i < g``, summed entry by entry here."""
    llama = gqa_llama(attention_bias=True)
    (a, *_) = grouped_query_attention(llama)
    torch.manual_seed(1)
    scores = {n: torch.randn_like(p) for n, p in llama.named_parameters()}
    imp = ParameterScoreImportance(llama, scores, normalizer=None, absolute=False)
    got = imp.coupled_linear(a.coupling(), a.k.out_features)
    names = {m: n for n, m in llama.named_modules()}
    w, b = ({layer: scores[f"{names[layer]}.{kind}"] for layer in (a.q, a.k, a.v, a.o)} for kind in ("weight", "bias"))
    d, g = a.head_dim, a.group_size
    for c in range(a.k.out_features):
        j, t = divmod(c, d)
        queries = [j * g * d + i * d + t for i in range(g)]
        want = w[a.k][c].sum() + b[a.k][c] + w[a.v][c].sum() + b[a.v][c]
        want += sum(w[a.q][q].sum() + b[a.q][q] + w[a.o][:, q].sum() for q in queries)
        torch.testing.assert_close(got[c], want)


def test_mac_model_predicts_a_kv_group_removal_exactly():
    """Removing a key/value head with its query group takes the MACs of its rows of q, k, v, its columns of o and its
    query heads' share of the attention products (QK^T, AV scale with the query width): MacModel's prediction is
    the real count."""
    from oba.prune import _context
    from oba.prune_step import MacModel, rank_units

    model = Logits(gqa_llama())
    example = {"input_ids": token_batches()[0][0]["input_ids"][:1]}
    macs = macs_by_module(model, example, in_place=True)
    ctx, _ = _context(model, example, [model.model.score], (nn.Linear,), None, 1.0, True)
    ctx.dense_total = float(macs[""])
    scores = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    groups, _ = rank_units(ctx, ParameterScoreImportance(model, scores))
    a = ctx.gqa[1]
    (group,) = [g for g in groups if g.root is a.k]
    predicted = MacModel(ctx, macs, groups)
    predicted.remove(group, a.head_dim)
    a.prune(list(range(a.head_dim)))  # key/value head 0 with its query group
    real = macs_by_module(model, example, in_place=True)[""]
    assert predicted.total == pytest.approx(real, rel=1e-12) and real < macs[""]


def test_gqa_stays_whole_with_a_torch_pruning_importance():
    """A Torch-Pruning ``Importance`` scores Torch-Pruning groups only: grouped-query attention, coupled by hand,
    stays whole; the MLP units prune."""
    llama = gqa_llama()
    example = {"input_ids": token_batches()[0][0]["input_ids"][:1]}
    oba.prune_structured(
        Logits(llama), example, tp.importance.GroupMagnitudeImportance(), keep_flops=0.8, progress=False
    )
    for layer in llama.model.layers:
        a = layer.self_attn
        assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) == (
            32, 16, 16, 32
        )  # fmt: skip
    assert any(layer.mlp.up_proj.out_features < 48 for layer in llama.model.layers)


@pytest.mark.parametrize("criterion", ["oba", "magnitude"])
def test_gqa_loses_kv_groups_at_a_lower_target_and_saves_and_loads(tmp_path, criterion):
    """At 0.3 of the MACs (MLP units alone cannot get there) whole key/value groups go, never the last of a
    module; the pruned model saves and loads with the same logits."""
    llama = gqa_llama()
    batches = token_batches()
    wrapped, example = Logits(llama), {"input_ids": batches[0][0]["input_ids"][:1]}
    dense = count_flops(wrapped, example, device=None)
    oba.prune_structured(
        wrapped, example, criterion, keep_flops=0.3, steps=2, batches_per_step=1, loss_fn=F.cross_entropy,
        batches=batches, progress=False,
    )  # fmt: skip
    assert count_flops(wrapped, example, device=None).macs / dense.macs <= 0.3 + 1e-9
    for layer in llama.model.layers:
        assert_whole_kv_groups(layer.self_attn)
    assert any(layer.self_attn.k_proj.out_features == 8 for layer in llama.model.layers)
    arch = "transformers:LlamaForSequenceClassification"
    oba.save_pruned(llama, tmp_path / "pruned.pt", arch, {"config": LLAMA_GQA})
    loaded = oba.load_pruned(tmp_path / "pruned.pt").eval()
    ids = batches[1][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, llama(**ids).logits)
    assert layer_widths(loaded) == layer_widths(llama)


def test_gqa_pruning_that_fails_leaves_the_model_as_it_was():
    """An unreachable target fails after key/value groups went (the history says so): every projection gets back its
    width and values."""
    llama = gqa_llama(attention_bias=True)
    batches = token_batches()
    before = copy.deepcopy(llama.state_dict())
    with pytest.raises(oba.prune.TargetNotReachedError) as info:
        oba.prune_structured(
            Logits(llama), {"input_ids": batches[0][0]["input_ids"][:1]}, "magnitude", keep_flops=0.02, steps=2,
            batches_per_step=1, loss_fn=F.cross_entropy, batches=batches, progress=False,
        )  # fmt: skip
    assert info.value.history[-1]["heads"]["model.model.layers.0.self_attn.k_proj"] == 1
    assert llama.model.layers[0].self_attn.k_proj.out_features == 16
    after = llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cls_name", ["GPT2ForSequenceClassification", "LlamaForSequenceClassification"])
def test_a_pruned_hugging_face_model_saves_and_loads(tmp_path, cls_name):
    model = build(cls_name)
    prune_and_check(model, "magnitude")  # prunes through Logits(model); the inner model is saved
    arch = f"transformers:{cls_name}"
    oba.save_pruned(model, tmp_path / "pruned.pt", arch, {"config": MODELS[cls_name]})
    loaded = oba.load_pruned(tmp_path / "pruned.pt").eval()
    ids = token_batches()[1][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits)
    assert [a.heads for a in attention_heads(loaded)] == [a.heads for a in attention_heads(model)]
    assert layer_widths(loaded) == layer_widths(model)


def test_transformers_models_are_created_by_class_name_and_unknown_ones_refused():
    assert oba.models.known("transformers:GPT2ForSequenceClassification")
    assert not oba.models.known("transformers:NoSuchModel") and not oba.models.known("transformers:os")
    with pytest.raises(KeyError, match="NoSuchModel"):
        oba.models.create("transformers:NoSuchModel", config={})
    with pytest.raises(TypeError, match="config="):
        oba.models.create("transformers:GPT2ForSequenceClassification", num_labels=3)
