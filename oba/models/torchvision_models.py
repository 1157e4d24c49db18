"""ImageNet models from torchvision: ResNet-50 and ViT-B/16, the ViT with head-prunable attention.

``pretrained=True`` fetches torchvision's published weights through ``torch.hub`` (downloading
them once into ``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``),
reads them with ``weights_only=True`` and loads them strictly. Without network access and without
a cached copy this raises :class:`PretrainedWeightsError` saying which file to put where.
Inputs are ``[N, 3, 224, 224]``, normalised with the ImageNet mean and std.

ViT-B/16 and attention heads. torchvision's ``EncoderBlock.self_attention`` is an
``nn.MultiheadAttention`` with one fused ``in_proj_weight`` ``[3D, D]``; it cannot hold fewer than
``D / head_dim`` heads, and torch-pruning's handler for it prunes ``D`` (the residual width), not heads.
So :func:`vit_b_16` returns torchvision's ``VisionTransformer`` with every ``self_attention`` replaced by
:class:`SplitMultiheadAttention` (:func:`split_vit_attention`): separate ``q``, ``k``, ``v`` and ``proj``
linears, a subclass of :class:`oba.models.vit.Attention` whose head count is derived from the weights
(``q.out_features // head_dim``), called exactly like the module it replaces
(``x, _ = self_attention(x, x, x, need_weights=False)``) and computing the same function. Pretrained
weights load into torchvision's layout first and are split afterwards; ``split_attention=False`` keeps
torchvision's layout. The state dict keys of a split block are ``...self_attention.{q,k,v,proj}.{weight,bias}``.

What prunes by default (:func:`vit_pruning_ignored_layers`, used by :func:`oba.prune.default_ignored_layers`
for any torchvision ``VisionTransformer``): whole attention heads (``d`` rows of ``q``/``k``/``v`` and the
matching columns of ``proj`` per head) and MLP hidden units (rows of ``mlp[0]``, columns of ``mlp[3]``). The
residual width ``D`` stays: the patch embedding ``conv_proj``, the classifier ``heads`` and every layer that
writes into the residual stream (``proj``, ``mlp[3]``) are ignored. After pruning, the construction-time
attributes ``EncoderBlock.num_heads`` and ``VisionTransformer.mlp_dim`` still hold the dense values (torchvision
reads them only in ``__init__``); the per-block truth is ``block.self_attention.num_heads`` and
``block.mlp[0].out_features`` (:func:`vit_widths`).

Architecture overrides. Without pretrained weights both builders accept the size of the same torchvision
class (``layers=[1, 1, 1, 1]`` for :func:`resnet50`; ``patch_size``, ``num_layers``, ``num_heads``,
``hidden_dim``, ``mlp_dim``, ``image_size`` for :func:`vit_b_16`), so that small models of the same classes
go through the registry (``oba.models.create("vit_b_16", num_layers=2, ...)``) and
:func:`oba.prune.save_pruned` / :func:`oba.prune.load_pruned`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, ViT_B_16_Weights, WeightsEnum
from torchvision.models.resnet import Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

from .checkpoints import load_state_dict_strict
from .vit import Attention
from .window_attention import PrunableRelativePositionalAttention

__all__ = [
    "PretrainedWeightsError",
    "SplitMultiheadAttention",
    "resnet50",
    "split_vit_attention",
    "vit_b_16",
    "vit_pruning_ignored_layers",
    "vit_widths",
]

RESNET50_LAYERS = (3, 4, 6, 3)
"""Bottleneck blocks per stage of ResNet-50."""

VIT_B_16_CONFIG: dict[str, int] = {
    "image_size": 224,
    "patch_size": 16,
    "num_layers": 12,
    "num_heads": 12,
    "hidden_dim": 768,
    "mlp_dim": 3072,
}
"""torchvision's ViT-B/16 architecture (the arguments of ``VisionTransformer`` its builder fixes)."""


class PretrainedWeightsError(RuntimeError):
    """torchvision's pretrained weights could not be downloaded or read from the cache."""


# ------------------------------------------------------------------------------------------ attention
class SplitMultiheadAttention(Attention):
    r"""Drop-in for a ``batch_first`` ``nn.MultiheadAttention`` with separate ``q``, ``k``, ``v``, ``proj`` linears.

    Shapes: ``N`` batch, ``L`` query tokens, ``S`` key/value tokens, ``D`` embedding width, ``h`` heads, ``d``
    query/key width per head, ``d_v`` value width per head (``d = d_v = D / h`` before pruning). For
    ``query [N, L, D]``, ``key``/``value [N, S, D]``:

    .. math::
        Q_i = \mathrm{query}\, W_{q,i}^\top + b_{q,i}, \quad K_i, V_i \text{ alike}, \quad
        A_i = \mathrm{softmax}\!\big(Q_i K_i^\top / \sqrt{d_0}\big) \in [N, L, S], \quad
        \mathrm{out} = [\,\mathrm{drop}(A_1) V_1, \dots, \mathrm{drop}(A_h) V_h\,]\, W_{proj}^\top + b_{proj},

    with ``d_0`` the head width at construction (``scale`` stays fixed under pruning, see
    :mod:`oba.models.vit`) and ``drop`` the attention-weight dropout of ``nn.MultiheadAttention``. The head
    bookkeeping is :class:`oba.models.vit.Attention`'s: ``num_heads = q.out_features // head_dim``, so removing
    whole heads (``d`` rows of ``q``/``k``, ``d_v`` rows of ``v`` and columns of ``proj`` per head) keeps the
    module consistent, and :func:`oba.prune.prune_structured` finds its heads by itself.

    Args:
        dim: embedding width ``D``.
        num_heads: heads ``h`` (``D`` must be divisible by it).
        dropout: dropout probability on the attention weights (``nn.MultiheadAttention``'s ``dropout``).
        bias: biases of ``q``/``k``/``v`` and ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias=bias)
        if not bias:
            self.proj = nn.Linear(self.proj.in_features, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The same function as ``mha`` (same device, dtype, training mode and ``requires_grad``), weights copied:
        ``in_proj_weight [3D, D]`` splits row-wise into ``q``, ``k``, ``v``; ``out_proj`` becomes ``proj``."""
        unsupported = {
            "batch_first=False": not mha.batch_first,
            "separate kdim/vdim": not mha._qkv_same_embed_dim,
            "add_bias_kv": mha.bias_k is not None,
            "add_zero_attn": mha.add_zero_attn,
        }
        if bad := [k for k, v in unsupported.items() if v]:
            raise ValueError(f"cannot split this nn.MultiheadAttention: {', '.join(bad)} is not supported")
        weight = mha.in_proj_weight
        bias = mha.in_proj_bias is not None
        if bias != (mha.out_proj.bias is not None):
            raise ValueError("cannot split this nn.MultiheadAttention: in_proj and out_proj disagree on biases")
        with torch.device("meta"):  # no initialisation of weights that are overwritten next
            new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=bias)
        new.to_empty(device=weight.device).to(weight.dtype)
        dim = mha.embed_dim
        pairs = [(layer.weight, weight[i * dim : (i + 1) * dim]) for i, layer in enumerate((new.q, new.k, new.v))]
        pairs.append((new.proj.weight, mha.out_proj.weight))
        if bias:
            pairs += [
                (layer.bias, mha.in_proj_bias[i * dim : (i + 1) * dim]) for i, layer in enumerate((new.q, new.k, new.v))
            ]
            pairs.append((new.proj.bias, mha.out_proj.bias))
        with torch.no_grad():
            for target, source in pairs:
                target.copy_(source)
                target.requires_grad_(source.requires_grad)
        return new.train(mha.training)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention``'s call: ``(out [N, L, D], weights or None)``; the weights (after dropout, as
        there) are ``[N, L, S]`` averaged over heads, or ``[N, h, L, S]`` with ``average_attn_weights=False``.
        Masks are not supported (torchvision's ViT passes none)."""
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("SplitMultiheadAttention supports no attention masks")
        if query.dim() != 3:
            raise ValueError(f"expected batch-first inputs [N, L, D], got query of shape {tuple(query.shape)}")
        n, length, _ = query.shape
        source = key.shape[1]
        h = self.num_heads
        q = self.q(query).view(n, length, h, -1).transpose(1, 2)  # [N, h, L, d]
        k = self.k(key).view(n, source, h, -1).transpose(1, 2)  # [N, h, S, d]
        v = self.v(value).view(n, source, h, -1).transpose(1, 2)  # [N, h, S, d_v]
        weights = self.dropout(torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1))  # [N, h, L, S]
        out = self.proj((weights @ v).transpose(1, 2).reshape(n, length, -1))  # [N, L, D]
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_first=True"


def split_vit_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, the ``self_attention`` of every torchvision ``EncoderBlock`` in ``model`` by a
    :class:`SplitMultiheadAttention` computing the same function; returns ``model``. Blocks already split
    are left alone."""
    for module in model.modules():
        if isinstance(module, EncoderBlock) and isinstance(module.self_attention, nn.MultiheadAttention):
            module.self_attention = SplitMultiheadAttention.from_multihead_attention(module.self_attention)
    return model


def vit_pruning_ignored_layers(model: torchvision.models.VisionTransformer) -> list[nn.Module]:
    """Layers of a torchvision ViT whose output channels :func:`oba.prune.prune_structured` keeps by default.

    The patch embedding (every conv/linear of ``conv_proj``), the classifier (every linear of ``heads``) and,
    per block, the layers writing into the residual stream: the attention's ``proj`` and the MLP's second
    linear. What remains prunable: whole heads (split attention) and MLP hidden units. An unsplit
    ``nn.MultiheadAttention`` is ignored whole (torch-pruning would prune its embedding width).
    """
    dense = (nn.modules.conv._ConvNd, nn.Linear)
    ignored = [m for m in model.conv_proj.modules() if isinstance(m, dense)]
    ignored += [m for m in model.heads.modules() if isinstance(m, dense)]
    for block in model.modules():
        if not isinstance(block, EncoderBlock):
            continue
        attn = block.self_attention
        ignored += [attn.proj] if isinstance(attn, Attention) else [attn, attn.out_proj]
        ignored += [m for m in block.mlp.modules() if isinstance(m, nn.Linear)][-1:]
    return ignored


def maxvit_pruning_ignored_layers(model: torchvision.models.MaxVit) -> list[nn.Module]:
    """Layers of a torchvision MaxViT whose output channels :func:`oba.prune.prune_structured` keeps by default: the
    layers writing into the residual stream -- the stem, each MBConv's last convolution (``conv_c``) and shortcut
    projection, each attention's output (``merge``) and each MLP's second linear -- and the classifier's last linear.
    torchvision's ``RelativePositionalMultiHeadAttention`` reshapes its output to the residual width
    (``reshape(B, G, P, D)``), so no head can go: its ``to_qkv`` is kept too; after
    :func:`oba.models.window_attention.prunable_window_attention` (oba's
    :class:`~oba.models.window_attention.PrunableRelativePositionalAttention`) its ``to_qkv`` prunes by whole heads.
    What prunes: the MBConv inner widths (expansion, depthwise, squeeze-excitation), the MLP hidden units, and the
    heads of oba's attention. (The residual stream itself runs through window partitions, 4-D reshapes along which
    Torch-Pruning's group search grows without bound.)"""
    from torchvision.models.maxvit import MBConv, PartitionAttentionLayer, RelativePositionalMultiHeadAttention

    dense = (nn.modules.conv._ConvNd, nn.Linear)
    ignored = [m for m in model.stem.modules() if isinstance(m, dense)]
    for m in model.modules():
        if isinstance(m, MBConv):
            ignored += [m.layers.conv_c, *(c for c in m.proj.modules() if isinstance(c, dense))]
        elif isinstance(m, RelativePositionalMultiHeadAttention):
            ignored += [m.merge] if isinstance(m, PrunableRelativePositionalAttention) else [m.to_qkv, m.merge]
        elif isinstance(m, PartitionAttentionLayer):
            ignored += [c for c in m.mlp_layer.modules() if isinstance(c, nn.Linear)][-1:]
    ignored += [m for m in model.classifier.modules() if isinstance(m, nn.Linear)][-1:]
    return ignored


def vit_widths(model: torchvision.models.VisionTransformer) -> list[dict[str, int]]:
    """Per encoder block: ``heads`` (split attention; ``nn.MultiheadAttention``'s own count otherwise), ``head_dim``
    and ``mlp_hidden`` (output width of the MLP's first linear) -- the truth after pruning, unlike the dense
    values in ``EncoderBlock.num_heads`` / ``VisionTransformer.mlp_dim``."""
    rows = []
    for block in model.modules():
        if isinstance(block, EncoderBlock):
            attn = block.self_attention
            heads = attn.num_heads
            head_dim = attn.head_dim
            first = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear))
            rows.append({"heads": heads, "head_dim": head_dim, "mlp_hidden": first.out_features})
    return rows


# ------------------------------------------------------------------------------------------ builders
def resnet50(
    pretrained: bool = False,
    *,
    weights: str = "IMAGENET1K_V1",
    layers: Sequence[int] = RESNET50_LAYERS,
    **kwargs: Any,
) -> torchvision.models.ResNet:
    """torchvision ResNet-50: ``[N, 3, 224, 224] -> [N, 1000]`` (25.6M params, 4.1 GMACs).

    Args:
        pretrained: load torchvision's ImageNet weights (``weights`` picks which: the classic
            ``"IMAGENET1K_V1"``, 76.1 % top-1, or ``"IMAGENET1K_V2"``, 80.9 %).
        layers: Bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``; others only without weights).
        **kwargs: passed to ``torchvision.models.ResNet`` (e.g. ``num_classes`` when not pretrained).
    """
    layers = [int(n) for n in layers]
    if not pretrained:
        return torchvision.models.ResNet(Bottleneck, layers, **kwargs)
    if tuple(layers) != RESNET50_LAYERS:
        raise ValueError(f"pretrained ResNet-50 weights need layers={list(RESNET50_LAYERS)}, got {layers}")
    return _build(torchvision.models.resnet50, ResNet50_Weights, weights, kwargs)


def vit_b_16(
    pretrained: bool = False, *, weights: str = "IMAGENET1K_V1", split_attention: bool = True, **kwargs: Any
) -> torchvision.models.VisionTransformer:
    """torchvision ViT-B/16: ``[N, 3, 224, 224] -> [N, 1000]`` (86.6M params, 17.6 GMACs), attention split.

    Args:
        pretrained: load torchvision's ImageNet weights (``"IMAGENET1K_V1"``: 81.1 % top-1), into torchvision's
            layout, before splitting the attention.
        split_attention: replace every ``nn.MultiheadAttention`` by :class:`SplitMultiheadAttention` (same
            function; needed to prune heads); ``False`` keeps torchvision's layout.
        **kwargs: passed to ``torchvision.models.VisionTransformer``; without pretrained weights they may also
            override the architecture (:data:`VIT_B_16_CONFIG`: ``patch_size``, ``num_layers``, ...).
    """
    if pretrained:
        overrides = sorted(set(kwargs) & (set(VIT_B_16_CONFIG) - {"image_size"}))
        if overrides:
            raise ValueError(f"pretrained ViT-B/16 weights fix the architecture; do not pass {overrides}")
        model = _build(torchvision.models.vit_b_16, ViT_B_16_Weights, weights, kwargs)
    else:
        model = torchvision.models.VisionTransformer(**{**VIT_B_16_CONFIG, **kwargs})
    return split_vit_attention(model) if split_attention else model


def _build(builder: Any, weights_enum: type[WeightsEnum], weights: str, kwargs: dict[str, Any]) -> nn.Module:
    """``builder(weights=None, **kwargs)`` with the pretrained ``weights`` loaded strictly."""
    try:
        chosen = weights_enum[weights]
    except KeyError:
        raise ValueError(
            f"unknown {weights_enum.__name__} {weights!r}; choose from {list(weights_enum.__members__)}"
        ) from None
    if kwargs.get("num_classes", len(chosen.meta["categories"])) != len(chosen.meta["categories"]):
        raise ValueError(f"pretrained ImageNet weights need num_classes={len(chosen.meta['categories'])}")
    kwargs["num_classes"] = len(chosen.meta["categories"])
    if weights_enum is ViT_B_16_Weights:  # the SWAG weights are for 384 x 384 inputs
        kwargs.setdefault("image_size", chosen.meta["min_size"][0])
    model = builder(weights=None, **kwargs)
    state_dict = _fetch(chosen)
    load_state_dict_strict(
        model, state_dict, source=chosen.url, expected=f"torchvision {weights_enum.__name__}.{weights}"
    )
    return model


def _fetch(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """Download (or read from the torch.hub cache) the state dict of ``weights``, weights-only."""
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as err:  # network, file system, hash and unpickling errors alike
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        file_name = weights.url.rsplit("/", 1)[-1]
        raise PretrainedWeightsError(
            f"could not obtain torchvision weights {type(weights).__name__}.{weights.name} "
            f"({type(err).__name__}: {err}). They download automatically from {weights.url} "
            f"when the machine is online. Offline, download that file elsewhere and copy it to "
            f"{cache / file_name} (set TORCH_HOME to use another cache folder)."
        ) from err
