"""What structured pruning may touch, and how wide it is: default ignored layers, attention heads, layer widths.

Attention heads (:func:`attention_heads`): the attention modules whose whole heads prune, found by their structure,
with what the pruner must know -- the projections whose output channels hold the heads, whether they are one fused
``[q | k | v]`` projection, and how to tell the module its new head count:

==================================================  =====================================  ===================
module                                              head projections                       updated attributes
==================================================  =====================================  ===================
:class:`oba.models.vit.Attention`                   ``q``, ``k``, ``v``                    none (derived)
timm ``Attention`` (ViT, DeiT, ...)                 ``qkv`` (fused)                        ``num_heads``,
                                                                                           ``attn_dim``
Hugging Face BERT/RoBERTa self-attention            ``query``, ``key``, ``value``          ``num_attention_heads``,
                                                                                           ``all_head_size``
Hugging Face ViT, LLaMA-style (``head_dim``)         ``q_proj``, ``k_proj``, ``v_proj``     ``num_attention_heads``
timm Swin ``WindowAttention`` (bias table)          ``qkv`` (fused)                        ``num_heads``
Hugging Face ``SwinAttention`` (``head_dim``)       ``q_proj``, ``k_proj``, ``v_proj``     ``num_attention_heads``
torchvision Swin V1/V2, MaxViT (swapped, below)     ``qkv`` / ``to_qkv`` (fused)           ``num_heads`` /
                                                                                           ``n_heads``
Hugging Face GPT-2 ``GPT2Attention``                ``c_attn`` (fused, ``Conv1D``)         ``num_heads``,
                                                                                           ``split_size``
LLaMA-style grouped-query attention                 ``k_proj``, ``v_proj`` (a key/value    none (derived)
(:class:`GroupedQueryAttention`, hand-coupled)      head with its query group of
                                                    ``q_proj`` and ``o_proj``)
==================================================  =====================================  ===================

Torch-Pruning couples q, k, v and the output projection of each module above (but grouped-query attention, see
below) in one group; the pruner removes whole heads from it (the same heads from q, k and v) and sets the attributes
after each removal.

GPT-2's layers are Hugging Face ``Conv1D`` (a linear layer with its weight ``[in, out]``), pruned by
:class:`oba.hf_layers.Conv1DPruner`, a Torch-Pruning custom pruner. Its attention splits the output of ``c_attn``
into ``[q | k | v]`` pieces of ``split_size`` and views them as heads of ``head_dim`` (``embed_dim`` is read only when
it is built); the residual stream stays (:func:`gpt2_pruning_ignored_layers`). Torch-Pruning 1.6 maps that split
onto ``c_proj``'s inputs for the q part only (:func:`oba.depgraph.prunable_groups`, ``split_roots``), which is exact
for whole heads.

Swin window attention also holds tensors indexed by head (``AttentionHeads.per_head``): the relative position bias
table ``[(2W-1)^2, H]`` (its columns), V2's ``logit_scale`` ``[H, 1, 1]`` and the last layer of its ``cpb_mlp``
(rows). Torch-Pruning couples channels, and the bias reaches the attention logits through an indexing and an
element-wise sum it can only map channel to channel, not channel to head; so these tensors are left out of its graph
(``ignored_params``; the ``cpb_mlp`` layers as ``ignored_layers`` in tracing, :func:`per_head_tensors`) and oba
removes the same heads from them when it removes heads from q, k and v (:meth:`AttentionHeads.drop_heads_at`,
hand-written). torchvision's ``ShiftedWindowAttention`` (V1, V2) computes its head width from the residual width
(``C // num_heads``) and MaxViT's ``RelativePositionalMultiHeadAttention`` reshapes its heads' output to the residual
width, so none of their heads can go: they are not listed, and their ``qkv`` / ``to_qkv`` is ignored (MLP hidden
units, and MaxViT's MBConv widths, prune). :func:`prunable_window_attention` (an explicit opt-in, as
:func:`oba.models.torchvision_models.split_vit_attention` is for torchvision's ViT) swaps them for oba's modules
(:mod:`oba.models.window_attention`: the same function, tensors and state dict keys, the head width fixed), whose
heads prune with their bias table columns (and V2's ``logit_scale`` and ``cpb_mlp`` rows) as above.

Grouped-query attention (fewer key/value heads than query heads: LLaMA-style ``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` with ``num_key_value_groups``, :func:`grouped_query_attention`) prunes whole key/value heads, each with its
query group (:class:`GroupedQueryAttention`). Torch-Pruning 1.6 loses that coupling at ``repeat_kv`` (for a tiny
LLaMA with 4 query and 2 key/value heads, ``v_proj``'s group holds ``v_proj`` alone, without ``o_proj``, and
``q_proj``'s group never finishes building), so it is written by hand: the four projections stay out of
Torch-Pruning's groups (the pruner adds them to its ignored layers; the residual stream, which ``o_proj`` writes,
keeps its width) and :func:`oba.prune_step.rank_units` ranks the module's key/value heads as a group of its own,
scored by :meth:`oba.group_importance.ParameterScoreImportance.coupled_linear`. With an importance that is not a
:class:`~oba.group_importance.ParameterScoreImportance` (a Torch-Pruning ``Importance`` of your own), these modules
stay whole. No attribute changes: the module's forward reshapes with ``-1``.

Ignored layers (their output channels are never pruned): by default the model's own
``pruning_ignored_layers()`` when it defines one (the CIFAR ResNets: residual streams and classifier, see
:meth:`oba.models.cifar_resnet.CifarResNet.pruning_ignored_layers`); for torchvision's ``VisionTransformer`` the
patch embedding, the classifier and every layer writing into the residual stream (attention output projection,
second MLP layer), so that whole heads and MLP hidden units prune
(:func:`oba.models.torchvision_models.vit_pruning_ignored_layers`); likewise for Swin Transformers of timm,
torchvision and Hugging Face, plus the patch-merging reductions (:func:`swin_pruning_ignored_layers`), and for
Hugging Face GPT-2 (:func:`gpt2_pruning_ignored_layers`); else the last ``nn.Linear`` (the classifier), and
grouped-query attention's ``o_proj`` (:func:`default_ignored_layers`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
import torchvision
from torch import nn

from oba.hf_layers import dense_layer_types, is_conv1d
from oba.models.torchvision_models import maxvit_pruning_ignored_layers, vit_pruning_ignored_layers
from oba.models.vit import Attention
from oba.models.window_attention import (
    PrunableRelativePositionalAttention,
    PrunableShiftedWindowAttention,
    prunable_window_attention,
)

__all__ = [
    "AttentionHeads",
    "GroupedQueryAttention",
    "Logits",
    "attention_heads",
    "default_ignored_layers",
    "default_num_heads",
    "gpt2_pruning_ignored_layers",
    "grouped_query_attention",
    "layer_widths",
    "per_head_tensors",
    "prunable_window_attention",
    "swin_pruning_ignored_layers",
]


def default_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """``model.pruning_ignored_layers()`` if the model defines it; for a torchvision ``VisionTransformer``
    :func:`oba.models.torchvision_models.vit_pruning_ignored_layers` (patch embedding, classifier and the layers
    writing into the residual stream: only heads and MLP hidden units prune); else the last ``nn.Linear`` (the
    classifier; the last convolution for a model without one, as SqueezeNet), plus the output projection ``o_proj``
    of every grouped-query attention module (:func:`grouped_query_attention`: its outputs are the residual stream,
    which stays; its key/value heads prune with their query groups) and the projections of any other module with
    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` of unequal widths that neither finder recognises (kept whole).
    A grouped-query attention module whose ``q_proj``, ``k_proj`` or ``v_proj`` is ignored stays whole."""
    own = getattr(model, "pruning_ignored_layers", None)
    if callable(own):
        return list(own())
    if isinstance(model, torchvision.models.VisionTransformer):
        return vit_pruning_ignored_layers(model)
    if isinstance(model, torchvision.models.MaxVit):
        return maxvit_pruning_ignored_layers(model)
    if swin := swin_pruning_ignored_layers(model):
        return swin
    if gpt2 := gpt2_pruning_ignored_layers(model):
        return gpt2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classifier = linears[-1:] or [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1:]
    others = [a.o for a in grouped_query_attention(model)] + _unrecognised_attention(model)
    return [*classifier, *(m for m in dict.fromkeys(others) if m not in classifier)]


@dataclass
class AttentionHeads:
    """One attention module whose whole heads prune.

    Attributes:
        module: the attention module.
        projections: the layers whose output channels hold the heads (q, k, v; or the fused qkv layer).
        parts: 3 when ``projections`` is one fused layer whose output is ``[q | k | v]`` (head ``i`` is channels
            ``[p*H*d + i*d, p*H*d + (i+1)*d)`` of each part ``p``), else 1 (head ``i`` is ``[i*d, (i+1)*d)``).
        heads: the number of heads now.
        sync: ``sync(heads)`` sets the module's own head-count attributes after heads went.
        head_dim: the channels of one head in each part.
        split_by_width: the module's forward splits the fused projection's output into parts of a width that
            ``sync`` sets (GPT-2's ``split_size``), so its group prunes through that split.
    """

    module: nn.Module
    projections: list[nn.Module]
    parts: int
    heads: int
    sync: Callable[[int], None]
    head_dim: int
    per_head: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    split_by_width: bool = False  # its forward splits the fused projection into parts of the width sync sets

    def drop_heads_at(self, positions: list[int]) -> None:
        """:meth:`drop_per_head` of the heads holding output channels ``positions`` of a head projection (current
        numbering, before Torch-Pruning removes them): head ``(p mod W/parts) // head_dim`` for width ``W``."""
        width = self.projections[0].out_features // self.parts
        self.drop_per_head(sorted({p % width // self.head_dim for p in positions}))

    def drop_per_head(self, heads: list[int]) -> None:
        """Remove ``heads`` (indices among the current heads) from every per-head tensor ``(owner, name, dim)`` of
        :attr:`per_head` -- a Swin relative position bias table ``[(2W-1)^2, H]`` along dim 1, a V2 ``logit_scale``
        ``[H, 1, 1]`` and the rows of the ``cpb_mlp`` layer producing the bias ``[H, 512]`` along dim 0 --, keeping
        each a parameter (a ``nn.Linear`` also gets its new ``out_features``)."""
        for owner, name, dim in self.per_head:
            old = getattr(owner, name)
            keep = [i for i in range(old.shape[dim]) if i not in set(heads)]
            kept = old.detach().index_select(dim, torch.tensor(keep, dtype=torch.long, device=old.device))
            setattr(owner, name, nn.Parameter(kept.clone(), requires_grad=old.requires_grad))
            if isinstance(owner, nn.Linear):
                owner.out_features = owner.weight.shape[0]


class Logits(nn.Module):
    """``model``'s logits as one tensor, for models that return a structure (Hugging Face ``ModelOutput`` with a
    ``logits`` field, tuples): what pruning (Torch-Pruning traces the output tensor) and the losses need. It wraps
    ``model`` without copying it, so pruning ``Logits(model)`` prunes ``model``. A single dict argument is passed
    as keyword arguments (``Logits(bert)({"input_ids": ids})``), so batches may hold dicts of model inputs. A model
    whose forward takes ``use_cache`` (Hugging Face decoders such as GPT-2) is called with ``use_cache=False`` unless
    the inputs say otherwise: only the logits are returned, and the key/value cache it would build is a
    concatenation Torch-Pruning cannot trace.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._use_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, *args, **kwargs):
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            args, kwargs = (), dict(args[0])
        if self._use_cache:
            kwargs.setdefault("use_cache", False)
        out = self.model(*args, **kwargs)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out


def attention_heads(model: nn.Module) -> list[AttentionHeads]:
    """The attention modules of ``model`` whose heads prune (module docstring: the table)."""
    found = []
    for m in model.modules():
        if isinstance(m, Attention):
            found.append(AttentionHeads(m, [m.q, m.k, m.v], 1, m.num_heads, lambda h: None, m.head_dim))
        elif _is_gpt2_attention(m):  # Hugging Face GPT-2: fused Conv1D c_attn [q | k | v]
            heads = m.c_attn.nf // 3 // m.head_dim
            sync = _setter(m, num_heads=1, split_size=m.head_dim)
            found.append(AttentionHeads(m, [m.c_attn], 3, heads, sync, m.head_dim, split_by_width=True))
        elif isinstance(m, PrunableShiftedWindowAttention):  # torchvision Swin V1/V2, after prunable_window_attention
            found.append(_fixed_width_heads(m, m.qkv, "num_heads"))
        elif isinstance(m, PrunableRelativePositionalAttention):  # torchvision MaxViT, after prunable_window_attention
            found.append(_fixed_width_heads(m, m.to_qkv, "n_heads"))
        elif isinstance(m, _TORCHVISION_WINDOW_ATTENTION):
            continue  # its forward takes the head width from the residual width: no head can go
        elif _is_linear(getattr(m, "qkv", None)) and isinstance(getattr(m, "num_heads", None), int) and _bias_table(m):
            heads = _window_heads(m)  # Swin (timm): the width of q is H*d
            dim = m.qkv.out_features // 3 // heads
            found.append(AttentionHeads(m, [m.qkv], 3, heads, _setter(m, num_heads=1), dim, _per_head(m, heads)))
        elif (
            _is_linear(getattr(m, "qkv", None))
            and isinstance(getattr(m, "num_heads", None), int)
            and hasattr(m, "head_dim")
        ):  # timm
            sync = _setter(m, num_heads=1, attn_dim=m.head_dim)
            found.append(AttentionHeads(m, [m.qkv], 3, m.num_heads, sync, m.head_dim))
        elif all(_is_linear(getattr(m, n, None)) for n in ("query", "key", "value")) and hasattr(
            m, "num_attention_heads"
        ):  # Hugging Face BERT family, ViT
            size = m.attention_head_size
            sync = _setter(m, num_attention_heads=1, all_head_size=size)
            found.append(AttentionHeads(m, [m.query, m.key, m.value], 1, m.num_attention_heads, sync, size))
        elif (q := _q_k_v_proj(m)) is not None:  # Hugging Face ViT, LLaMA-style (without grouped-query attention)
            heads = q[0].out_features // m.head_dim
            per_head = _per_head(getattr(m, "relative_position_bias", m), heads)  # Swin: the bias table
            found.append(AttentionHeads(m, q, 1, heads, _setter(m, num_attention_heads=1), m.head_dim, per_head))
    return found


_TORCHVISION_WINDOW_ATTENTION = torchvision.models.swin_transformer.ShiftedWindowAttention


def _fixed_width_heads(m: nn.Module, qkv: nn.Linear, count: str) -> AttentionHeads:
    """The heads of oba's torchvision window attention (:mod:`oba.models.window_attention`): a fused ``[q | k | v]``
    ``qkv`` of ``3 h d`` outputs with ``d = m.head_dim`` fixed, the head count in attribute ``count``."""
    heads = qkv.out_features // 3 // m.head_dim
    return AttentionHeads(m, [qkv], 3, heads, _setter(m, **{count: 1}), m.head_dim, _per_head(m, heads))


def _stock_window_attention(m: nn.Module) -> bool:
    """A torchvision Swin ``ShiftedWindowAttention`` (V1 or V2) whose heads cannot go (not oba's)."""
    return isinstance(m, _TORCHVISION_WINDOW_ATTENTION) and not isinstance(m, PrunableShiftedWindowAttention)


def _bias_table(m: nn.Module) -> bool:
    """Whether ``m`` holds a Swin relative position bias (a table ``[(2W-1)^2, H]``, or V2's ``cpb_mlp``)."""
    return isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter) or hasattr(m, "cpb_mlp")


def _window_heads(m: nn.Module) -> int:
    """The heads of a Swin window attention: its bias table's columns (right also after a pruned state dict was
    loaded, before the head count was told), else ``num_heads``."""
    table = getattr(m, "relative_position_bias_table", None)
    return int(table.shape[1]) if isinstance(table, nn.Parameter) and table.dim() == 2 else m.num_heads


def _per_head(m: nn.Module, heads: int) -> list[tuple[nn.Module, str, int]]:
    """The tensors of window attention ``m`` indexed by head, as ``(owner, name, dim)``: the relative position bias
    table ``[(2W-1)^2, H]`` (dim 1), Swin V2's ``logit_scale`` ``[H, 1, 1]`` (dim 0) and the last layer of its
    ``cpb_mlp`` (the MLP producing the bias table: weight ``[H, hidden]`` and bias ``[H]``, dim 0)."""
    found = []
    table = getattr(m, "relative_position_bias_table", None)
    if isinstance(table, nn.Parameter) and table.dim() == 2 and table.shape[1] == heads:
        found.append((m, "relative_position_bias_table", 1))
    scale = getattr(m, "logit_scale", None)
    if isinstance(scale, nn.Parameter) and scale.dim() >= 1 and scale.shape[0] == heads and scale.numel() == heads:
        found.append((m, "logit_scale", 0))
    cpb = getattr(m, "cpb_mlp", None)
    last = [layer for layer in cpb.modules() if isinstance(layer, nn.Linear)][-1:] if cpb is not None else []
    if last and last[0].out_features == heads:
        found += [(last[0], name, 0) for name in ("weight", "bias") if getattr(last[0], name) is not None]
    return found


def per_head_tensors(
    model: nn.Module, heads: Sequence[AttentionHeads] | None = None
) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """What Torch-Pruning must leave out of its dependency graph because oba prunes it with the heads
    (:meth:`AttentionHeads.drop_per_head`): the per-head parameters (its ``ignored_params``) and the Swin V2
    ``cpb_mlp`` layers (its ``ignored_layers`` in tracing: the bias they compute is indexed by head, which the
    graph, coupling channels, cannot express). ``heads``: :func:`attention_heads` of ``model``, when the caller
    has them already."""
    windows = [(a.module, a.per_head) for a in (attention_heads(model) if heads is None else heads)]
    windows += [(m, _per_head(m, m.num_heads)) for m in model.modules() if _stock_window_attention(m)]
    params, layers = [], []
    for module, per_head in windows:
        params += [getattr(owner, name) for owner, name, _ in per_head]
        cpb = getattr(module, "cpb_mlp", None)
        layers += [] if cpb is None else [m for m in cpb.modules() if isinstance(m, nn.Linear)]
    return params, layers


def _q_k_v_proj(m: nn.Module) -> list[nn.Module] | None:
    """``[q_proj, k_proj, v_proj]`` of an attention module with ``head_dim`` and as many key/value heads as query
    heads; ``None`` otherwise (grouped-query attention: see :func:`grouped_query_attention`)."""
    layers = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(_is_linear(layer) for layer in layers) or not isinstance(getattr(m, "head_dim", None), int):
        return None
    return layers if layers[0].out_features == layers[1].out_features == layers[2].out_features else None


@dataclass
class GroupedQueryAttention:
    """One grouped-query attention module (fewer key/value heads than query heads: LLaMA-style ``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj`` with ``head_dim`` and ``num_key_value_groups``) whose key/value heads prune,
    each with its query group.

    Unit ``j`` (key/value head ``j``, ``d = head_dim``, ``g = group_size``): rows ``[j d, (j+1) d)`` of ``k`` and
    ``v``, rows ``[j g d, (j+1) g d)`` of ``q`` (query heads ``j g .. (j+1) g - 1``, which attend with key/value head
    ``j`` after ``repeat_kv``), the same columns of ``o`` (its inputs), biases with their rows. Channel ``c = j d + t``
    of ``k`` is coupled with channels ``j g d + i d + t`` (``i < g``) of ``q`` and ``o``'s inputs. The coupling is
    written by hand: Torch-Pruning 1.6 loses it at ``repeat_kv`` (for a tiny LLaMA with 4 query and 2 key/value
    heads, ``v_proj``'s group holds ``v_proj`` alone, without ``o_proj``, and ``q_proj``'s group never finishes
    building), so these projections stay out of its groups (:func:`oba.prune_step.rank_units` adds the module as a
    group of its own). Removing whole key/value heads leaves ``num_key_value_groups`` and ``head_dim`` unchanged and
    the module's forward reshapes with ``-1``: no attribute to update, and the shared config is not touched.
    """

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    group_size: int  # query heads per key/value head (num_key_value_groups)
    head_dim: int

    def query_channels(self, kv_channels: list[int]) -> list[int]:
        """Channels of ``q`` (and inputs of ``o``) coupled with channels ``kv_channels`` of ``k``, in order: for
        ``c = j d + t``, ``j g d + i d + t`` for ``i < g``."""
        d, g = self.head_dim, self.group_size
        return [c // d * g * d + i * d + c % d for c in kv_channels for i in range(g)]

    def coupling(self) -> list[tuple[nn.Linear, bool, list[int]]]:
        """``(layer, output side?, root)`` for ``k`` (the root, first), ``v``, ``q`` (outputs) and ``o`` (inputs):
        ``root[i]``, the channel of ``k`` that channel ``i`` of the layer goes with (``q``'s channel ``j g d + i d + t``
        with ``j d + t``), for :meth:`oba.group_importance.ParameterScoreImportance.coupled_linear`."""
        d, g, width = self.head_dim, self.group_size, self.k.out_features
        query_root = [c // (g * d) * d + c % d for c in range(g * width)]
        return [(self.k, True, list(range(width))), (self.v, True, list(range(width))), (self.q, True, query_root),
                (self.o, False, query_root)]  # fmt: skip

    def prune(self, kv_channels: list[int]) -> None:
        """Remove channels ``kv_channels`` of ``k`` (current numbering; whole heads) from ``k`` and ``v``, and their
        query channels (:meth:`query_channels`) from ``q``'s outputs and ``o``'s inputs, with Torch-Pruning's layer
        functions."""
        if len(set(kv_channels)) != len({c // self.head_dim for c in kv_channels}) * self.head_dim:
            raise ValueError(f"grouped-query attention loses whole key/value heads only, got channels {kv_channels}")
        queries = self.query_channels(kv_channels)
        tp.prune_linear_out_channels(self.k, kv_channels)
        tp.prune_linear_out_channels(self.v, kv_channels)
        tp.prune_linear_out_channels(self.q, queries)
        tp.prune_linear_in_channels(self.o, queries)


def grouped_query_attention(model: nn.Module) -> list[GroupedQueryAttention]:
    """The grouped-query attention modules of ``model`` (:class:`GroupedQueryAttention`): ``q_proj``, ``k_proj``,
    ``v_proj`` and ``o_proj`` linear layers, integer ``head_dim`` and ``num_key_value_groups`` (``g > 1``), ``k`` and
    ``v`` of equal width, a multiple of ``head_dim``, and ``q`` ``g`` times as wide."""
    found = []
    for m in model.modules():
        layers = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        d, g = getattr(m, "head_dim", None), getattr(m, "num_key_value_groups", None)
        if not all(_is_linear(layer) for layer in layers) or not isinstance(d, int) or not isinstance(g, int):
            continue
        q, k, v, o = layers
        if (
            g > 1
            and k.out_features == v.out_features
            and k.out_features % d == 0
            and q.out_features == g * k.out_features == o.in_features
        ):
            found.append(GroupedQueryAttention(m, q, k, v, o, g, d))
    return found


def _unrecognised_attention(model: nn.Module) -> list[nn.Module]:
    """The projections (q, k, v and output) of modules with ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` linear
    layers that neither :func:`attention_heads` nor :func:`grouped_query_attention` recognises (kept whole)."""
    known = {a.module for a in grouped_query_attention(model)}
    found = []
    for m in model.modules():
        layers = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if all(_is_linear(layer) for layer in layers) and _q_k_v_proj(m) is None and m not in known:
            found.extend(layers)
    return found


def swin_pruning_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The layers writing into the residual stream of a Swin Transformer (timm, torchvision or Hugging Face; ``[]``
    for a model without window attention): the patch embedding (every convolution), the patch-merging
    ``reduction`` layers, each window attention's output projection (``proj`` / ``o_proj``), the last linear layer
    of each block's MLP, and the classifier (the last ``nn.Linear``). Ignoring them keeps the residual width, as
    for a ViT (:func:`oba.models.torchvision_models.vit_pruning_ignored_layers`): whole heads and MLP hidden units
    prune. (torchvision's ``ShiftedWindowAttention`` takes its head width from the residual width, so its heads
    stay: its ``qkv`` is ignored too, and only the MLP hidden units of such a model prune -- unless
    :func:`prunable_window_attention` swapped it for oba's module, whose ``qkv`` prunes by whole heads.)"""
    names = {m: n for n, m in model.named_modules()}
    windows = [m for m in model.modules() if _stock_window_attention(m)]
    windows += [
        a.module
        for a in attention_heads(model)
        if a.per_head and not isinstance(a.module, PrunableRelativePositionalAttention)  # MaxViT: not a Swin
    ]
    if not windows:
        return []
    ignored = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    ignored += [m.reduction for m in model.modules() if _is_linear(getattr(m, "reduction", None))]
    for attn in windows:
        ignored += [getattr(attn, n) for n in ("proj", "o_proj") if _is_linear(getattr(attn, n, None))]
        if _stock_window_attention(attn):
            ignored.append(attn.qkv)
        block = model.get_submodule(names[attn].rpartition(".")[0])
        inside = set(attn.modules())
        ignored += [m for m in block.modules() if isinstance(m, nn.Linear) and m not in inside][-1:]
    ignored += [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return list(dict.fromkeys(ignored))


def _is_gpt2_attention(m: nn.Module) -> bool:
    """A Hugging Face GPT-2 self-attention: ``Conv1D`` layers ``c_attn`` (``[q | k | v]``) and ``c_proj``, with
    ``num_heads``, ``head_dim`` and ``split_size`` (its forward splits ``c_attn``'s output into pieces of
    ``split_size`` and views them as heads of ``head_dim``); cross-attention (a separate ``q_attn``) is not listed."""
    return (
        is_conv1d(getattr(m, "c_attn", None))
        and is_conv1d(getattr(m, "c_proj", None))
        and all(isinstance(getattr(m, n, None), int) for n in ("num_heads", "head_dim", "split_size"))
        and not getattr(m, "is_cross_attention", False)
    )


def gpt2_pruning_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The layers writing into the residual stream of a Hugging Face GPT-2 (``[]`` for a model without GPT-2
    attention): each block's attention output ``attn.c_proj`` and MLP output ``mlp.c_proj`` (``Conv1D``), and the
    classifier (the last ``nn.Linear``: ``score``, or the tied ``lm_head``). As for a ViT
    (:func:`oba.models.torchvision_models.vit_pruning_ignored_layers`), the residual width stays and whole heads
    (``c_attn``) and MLP hidden units (``mlp.c_fc``) prune."""
    attention = [m for m in model.modules() if _is_gpt2_attention(m)]
    if not attention:
        return []
    ignored = [m.c_proj for m in attention]
    mlps = [m for m in model.modules() if is_conv1d(getattr(m, "c_fc", None)) and is_conv1d(getattr(m, "c_proj", None))]
    ignored += [m.c_proj for m in mlps]
    ignored += [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return list(dict.fromkeys(ignored))


def _is_linear(layer: object) -> bool:
    return isinstance(layer, nn.Linear)


def _setter(module: nn.Module, **per_head: int) -> Callable[[int], None]:
    """``sync(h)`` setting each named attribute to ``h * per_head[name]`` (attributes the module has)."""

    def sync(heads: int) -> None:
        for name, factor in per_head.items():
            if hasattr(module, name):
                setattr(module, name, heads * factor)

    return sync


def default_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{head projection: heads}`` of every attention module :func:`attention_heads` finds."""
    return {p: a.heads for a in attention_heads(model) for p in a.projections}


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv / linear / norm layer (``out_channels``, ``out_features``, ...), by name; a
    module that reports its own width (an ``output_width()`` method, e.g. a layer reparametrised by
    :func:`oba.eigendamage.to_eigenbasis`) is listed with it, and its parts under their own names."""
    widths = {}
    for name, m in model.named_modules():
        if callable(getattr(m, "output_width", None)):
            widths[name] = int(m.output_width())
        elif isinstance(m, (nn.modules.conv._ConvNd, *dense_layer_types())):  # Conv1D: weight [in, out]
            transposed = getattr(m, "transposed", False) or is_conv1d(m)
            widths[name] = int(m.weight.shape[1] if transposed else m.weight.shape[0])
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            widths[name] = int(m.weight.shape[0] if m.weight.dim() else 1)
    return widths
