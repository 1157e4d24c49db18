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
==================================================  =====================================  ===================

Grouped-query attention (fewer key/value heads than query heads) is not pruned yet: its projections are among the
default ignored layers (:func:`grouped_query_attention`), so the rest of such a model (MLP units) prunes.

Torch-Pruning couples q, k, v and the output projection of such a module in one group; the pruner removes whole
heads from it (the same heads from q, k and v) and sets the attributes after each removal.

Ignored layers (their output channels are never pruned): by default the model's own
``pruning_ignored_layers()`` when it defines one (the CIFAR ResNets: residual streams and classifier, see
:meth:`oba.models.cifar_resnet.CifarResNet.pruning_ignored_layers`); for torchvision's ``VisionTransformer`` the
patch embedding, the classifier and every layer writing into the residual stream (attention output projection,
second MLP layer), so that whole heads and MLP hidden units prune
(:func:`oba.models.torchvision_models.vit_pruning_ignored_layers`); else the last ``nn.Linear`` (the classifier).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from oba.models.torchvision_models import vit_pruning_ignored_layers
from oba.models.vit import Attention

__all__ = [
    "AttentionHeads",
    "Logits",
    "attention_heads",
    "default_ignored_layers",
    "default_num_heads",
    "grouped_query_attention",
    "layer_widths",
]


def default_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """``model.pruning_ignored_layers()`` if the model defines it; for a torchvision ``VisionTransformer``
    :func:`oba.models.torchvision_models.vit_pruning_ignored_layers` (patch embedding, classifier and the layers
    writing into the residual stream: only heads and MLP hidden units prune); else the last ``nn.Linear`` (the
    classifier; the last convolution for a model without one, as SqueezeNet), plus the projections of grouped-query
    attention modules (:func:`grouped_query_attention`)."""
    own = getattr(model, "pruning_ignored_layers", None)
    if callable(own):
        return list(own())
    if isinstance(model, torchvision.models.VisionTransformer):
        return vit_pruning_ignored_layers(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classifier = linears[-1:] or [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1:]
    return [*classifier, *(m for m in grouped_query_attention(model) if m not in classifier)]


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
    """

    module: nn.Module
    projections: list[nn.Module]
    parts: int
    heads: int
    sync: Callable[[int], None]
    head_dim: int


class Logits(nn.Module):
    """``model``'s logits as one tensor, for models that return a structure (Hugging Face ``ModelOutput`` with a
    ``logits`` field, tuples): what pruning (Torch-Pruning traces the output tensor) and the losses need. It wraps
    ``model`` without copying it, so pruning ``Logits(model)`` prunes ``model``. A single dict argument is passed
    as keyword arguments (``Logits(bert)({"input_ids": ids})``), so batches may hold dicts of model inputs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            args, kwargs = (), args[0]
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
            found.append(AttentionHeads(m, q, 1, heads, _setter(m, num_attention_heads=1), m.head_dim))
    return found


def _q_k_v_proj(m: nn.Module) -> list[nn.Module] | None:
    """``[q_proj, k_proj, v_proj]`` of an attention module with ``head_dim`` and as many key/value heads as query
    heads; ``None`` otherwise (grouped-query attention: see :func:`grouped_query_attention`)."""
    layers = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(_is_linear(layer) for layer in layers) or not isinstance(getattr(m, "head_dim", None), int):
        return None
    return layers if layers[0].out_features == layers[1].out_features == layers[2].out_features else None


def grouped_query_attention(model: nn.Module) -> list[nn.Module]:
    """The projections (q, k, v and output) of grouped-query attention modules (fewer key/value heads than query
    heads, as LLaMA-style models with ``num_key_value_heads``): a key/value head must leave with its whole query
    group, which the pruner does not do yet, so :func:`default_ignored_layers` keeps these layers."""
    found = []
    for m in model.modules():
        layers = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if all(_is_linear(layer) for layer in layers) and _q_k_v_proj(m) is None:
            found.extend(layers)
    return found


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
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            widths[name] = int(m.weight.shape[1] if getattr(m, "transposed", False) else m.weight.shape[0])
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            widths[name] = int(m.weight.shape[0] if m.weight.dim() else 1)
    return widths
