r"""Window attention of torchvision's Swin Transformers (V1, V2) and MaxViT whose whole heads can be pruned.

torchvision's modules cannot lose a head: ``ShiftedWindowAttention`` (and ``ShiftedWindowAttentionV2``) call
``torchvision.models.swin_transformer.shifted_window_attention``, which takes the head width as ``C // num_heads``
from the input width ``C`` and reshapes the heads' output back to ``C``; MaxViT's
``RelativePositionalMultiHeadAttention`` reshapes its heads' output to the input width ``D``. After ``h`` of ``h_0``
heads are left, q, k and v hold ``h d`` channels, not ``C``, and both forwards fail.

:func:`prunable_window_attention` replaces, in place, each such module by a subclass with oba's own forward
(:class:`PrunableShiftedWindowAttention`, :class:`PrunableShiftedWindowAttentionV2`,
:class:`PrunableRelativePositionalAttention`), in which the head width ``head_dim`` (``d``) is fixed at its
construction value and the number of heads follows the weights (``h = qkv.out_features / (3 d)``). At full width it
computes exactly what torchvision's module computes (the same operations in the same order, bit for bit in
float64), it holds the same tensors under the same names (torchvision's state dicts and pretrained weights load
into it; the parameter objects are taken over, not copied) and it is called the same way. Its heads are then found
by :func:`oba.prunable.attention_heads`: q, k and v rows of the fused ``qkv`` / ``to_qkv``, the matching input
columns of ``proj`` / ``merge``, and the tensors indexed by head (the relative position bias table's columns;
V2's ``logit_scale`` and the rows of the ``cpb_mlp`` layer producing the bias) go together, and the module's head
count (``num_heads`` / ``n_heads``) is updated.

:func:`oba.prune.prune_structured` does not swap by itself (as for torchvision's ViT, whose
``nn.MultiheadAttention`` keeps its heads unless :func:`oba.models.torchvision_models.split_vit_attention` ran):
without the swap, torchvision's modules keep their heads and only MLP hidden units (and MaxViT's MBConv widths)
prune. :func:`oba.pruned_io.load_pruned` swaps them when some lost heads, so that a pruned
``"torchvision:swin_t"`` loads by name.

Torch-Pruning 1.6 traces these forwards only in a certain form, kept here: the fused projection runs on 3-D
``[batch, tokens, C]`` inputs (it takes a 4-D tensor's channels at dimension 1, NCHW), every attention tensor is
4-D (it takes a 5-D expand for a grouped-query attention's repeat), and each of ``q``, ``k``, ``v`` is read by one
operation (it cuts ``unbind``'s input into as many parts as the operations reading its outputs).
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

__all__ = [
    "PrunableRelativePositionalAttention",
    "PrunableShiftedWindowAttention",
    "PrunableShiftedWindowAttentionV2",
    "QueryValueBiasLinear",
    "prunable_window_attention",
]

M = TypeVar("M", bound=nn.Module)

SHIFT_MASK = -100.0
"""The logit added between two tokens of one window that were not neighbours before the cyclic shift (Swin)."""


def _adopt(new: M, old: nn.Module) -> M:
    """``new`` holding ``old``'s submodules, parameters and buffers -- the same objects, so that an optimizer over
    ``old``'s parameters keeps working -- in ``old``'s training mode."""
    for name, child in old.named_children():
        new.add_module(name, child)
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buffer in old.named_buffers(recurse=False):
        new.register_buffer(name, buffer, persistent=name not in old._non_persistent_buffers_set)
    return new.train(old.training)


class QueryValueBiasLinear(nn.Linear):
    r"""Swin V2's fused projection ``[q | k | v]`` without a key bias: ``y = x W^\top + [b_q, 0, b_v]``.

    ``bias`` holds ``3 h d`` entries like a plain ``nn.Linear``'s (torchvision's state dict layout); its middle third,
    the key bias, is held but never used (torchvision zeroes it in every forward, so it never trains). Whole heads
    prune as for a plain linear layer: the thirds stay equal.
    """

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> QueryValueBiasLinear:
        """``layer``'s weight and bias (the same parameters) in a :class:`QueryValueBiasLinear`."""
        bias = layer.bias is not None
        return _adopt(cls(layer.in_features, layer.out_features, bias=bias, device="meta"), layer)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in] -> [..., 3 h d]``."""
        if self.bias is None:
            return F.linear(x, self.weight)
        third = self.out_features // 3
        key = torch.arange(self.out_features, device=self.bias.device) // third == 1
        return F.linear(x, self.weight, self.bias.masked_fill(key, 0.0))


class PrunableShiftedWindowAttention(ShiftedWindowAttention):
    r"""torchvision's ``ShiftedWindowAttention`` (Swin V1) with the head width fixed, so that whole heads prune.

    Shapes: ``B`` batch, ``H x W`` the feature map, ``C`` its width (the residual width), windows of
    ``w_h x w_w`` with ``N = w_h w_w`` tokens, shift ``(s_h, s_w)``, ``h`` heads of width ``d`` (``d = C / h_0``
    at construction; ``head_dim``). For ``x [B, H, W, C]``:

    1. pad the bottom and right with zeros to ``H' x W'``, multiples of the window; a shift along a dimension
       whose window covers the padded map is taken as 0;
    2. roll the map cyclically by ``(-s_h, -s_w)`` and cut it into ``n_W = H' W' / N`` windows,
       ``X [B n_W, N, C]`` (row-major windows, row-major tokens in each);
    3. per head ``i``: ``Q_i, K_i, V_i`` are columns ``[p h d + i d, p h d + (i + 1) d)`` of
       ``X W_{qkv}^\top + b_{qkv}`` for ``p = 0, 1, 2``, and

       .. math::
           A_i = \mathrm{softmax}\big(\ell(Q_i, K_i) + B_i + M\big) \in [B n_W, N, N], \qquad
           Y = [\,\mathrm{drop}(A_1) V_1, \dots, \mathrm{drop}(A_h) V_h\,]\, W_{proj}^\top + b_{proj},

       with the logits ``\ell(Q, K) = (Q / \sqrt{d}) K^\top`` (V1), ``B_i [N, N]`` column ``i`` of the relative
       position bias table ``[(2 w_h - 1)(2 w_w - 1), h]`` gathered by ``relative_position_index``, and ``M`` the
       shift mask (only with a shift): :data:`SHIFT_MASK` between two tokens of one window from different regions
       of the rolled map, else 0 (:func:`_shift_mask`);
    4. ``drop(Y)``, windows back into the map, roll by ``(s_h, s_w)``, crop the padding: ``[B, H, W, C]``.

    ``drop`` are dropouts of ``attention_dropout`` (on ``A``) and ``dropout`` (on the output), in training only.
    ``d`` stays fixed when heads go (and with it the temperature ``1 / sqrt(d)``); ``num_heads`` is told the new
    count by :func:`oba.prunable.attention_heads`' ``sync`` (the forward derives the heads from the weights).

    Args: torchvision's ``ShiftedWindowAttention``'s.
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            dim, window_size, shift_size, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
            attention_dropout=attention_dropout, dropout=dropout,
        )  # fmt: skip
        self.head_dim = dim // num_heads
        self.qkv = self._own_qkv(self.qkv)

    @staticmethod
    def _own_qkv(qkv: nn.Linear) -> nn.Linear:
        """``qkv`` as this class's fused projection (V1: a plain linear layer)."""
        return qkv

    @classmethod
    def from_torchvision(cls, attn: ShiftedWindowAttention) -> PrunableShiftedWindowAttention:
        """The same function as ``attn`` (torchvision's module: V1 for this class, V2 for
        :class:`PrunableShiftedWindowAttentionV2`) holding its tensors and submodules (the same objects), in its
        training mode. The head width is ``C / num_heads``, ``C`` the input
        width: right also for a module whose ``qkv`` was narrowed to a pruned state dict (``num_heads`` is then
        still the dense count)."""
        dim = attn.qkv.in_features
        with torch.device("meta"):  # every tensor is replaced by attn's next
            new = cls(
                dim, list(attn.window_size), list(attn.shift_size), attn.num_heads, qkv_bias=attn.qkv.bias is not None,
                proj_bias=attn.proj.bias is not None, attention_dropout=attn.attention_dropout, dropout=attn.dropout,
            )  # fmt: skip
        new = _adopt(new, attn)
        new.qkv = cls._own_qkv(new.qkv)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, H, W, C] -> [B, H, W, C]`` (class docstring)."""
        batch, height, width, _ = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        x = F.pad(x, (0, 0, 0, -width % ww, 0, -height % wh))
        padded = x.shape[1:3]
        shift = [s if w < p else 0 for s, w, p in zip((sh, sw), (wh, ww), padded, strict=True)]
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = _shift_mask(padded, (wh, ww), shift, x) if shifted else None
        y = self._attend(_windows(x, wh, ww), mask)  # [B n_W, N, C]
        y = y.view(batch, padded[0] // wh, padded[1] // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(batch, padded[0], padded[1], -1)
        if shifted:
            y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
        return y[:, :height, :width, :].contiguous()

    def _attend(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Attention within each window: ``x [B n_W, N, C] -> [B n_W, N, C]``, ``mask [n_W, N, N]`` or ``None``."""
        windows, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B n_W, h, N, d]
        logits = self._logits(q, k) + self.get_relative_position_bias()  # [B n_W, h, N, N]
        if mask is not None:
            heads = logits.shape[1]
            logits = logits.view(-1, mask.shape[0], heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            logits = logits.view(-1, heads, tokens, tokens)
        attn = F.dropout(F.softmax(logits, dim=-1), p=self.attention_dropout, training=self.training)
        y = self.proj(attn.matmul(v).transpose(1, 2).reshape(windows, tokens, -1))
        return F.dropout(y, p=self.dropout, training=self.training)

    def _logits(self, q: Tensor, k: Tensor) -> Tensor:
        """``(Q / sqrt(d)) K^T``: ``[B n_W, h, N, N]``."""
        return (q * self.head_dim**-0.5).matmul(k.transpose(-2, -1))


class PrunableShiftedWindowAttentionV2(PrunableShiftedWindowAttention, ShiftedWindowAttentionV2):
    r"""torchvision's ``ShiftedWindowAttentionV2`` (Swin V2) with the head width fixed, so that whole heads prune.

    As :class:`PrunableShiftedWindowAttention` (shapes, windows, shift mask), with V2's scaled cosine logits and
    continuous position bias:

    .. math::
        \ell(Q_i, K_i) = \tau_i\, \hat Q_i \hat K_i^\top, \quad \tau_i = \exp(\min(\lambda_i, \log 100)), \qquad
        B_i = 16\, \sigma\big(\mathrm{cpb\_mlp}(R)_{:, i}\big) \text{ gathered by } \texttt{relative\_position\_index},

    ``\hat Q`` the rows of ``Q`` scaled to unit length, ``\lambda = `` ``logit_scale [h, 1, 1]``, ``R`` the
    log-spaced relative coordinates ``[1, 2 w_h - 1, 2 w_w - 1, 2]``, and no key bias (:class:`QueryValueBiasLinear`).
    """

    @staticmethod
    def _own_qkv(qkv: nn.Linear) -> nn.Linear:
        """``qkv`` without its key bias (:class:`QueryValueBiasLinear`, the same parameters)."""
        return qkv if isinstance(qkv, QueryValueBiasLinear) else QueryValueBiasLinear.from_linear(qkv)

    def _logits(self, q: Tensor, k: Tensor) -> Tensor:
        """``tau * cos(Q, K)``: ``[B n_W, h, N, N]``. (``q`` and ``k`` are copied first: Torch-Pruning cuts the fused
        ``[q | k | v]`` into as many parts as the operations reading ``q``, ``k`` and ``v``, and a normalisation reads
        its input twice.)"""
        cosine = F.normalize(q.clone(), dim=-1).matmul(F.normalize(k.clone(), dim=-1).transpose(-2, -1))
        return cosine * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()


def _windows(x: Tensor, wh: int, ww: int) -> Tensor:
    """``x [B, H', W', C]`` cut into windows ``[B n_W, w_h w_w, C]``: row-major windows, row-major tokens."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // wh, wh, width // ww, ww, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, channels)


def _shift_mask(size: torch.Size, window: tuple[int, int], shift: list[int], like: Tensor) -> Tensor:
    """The logits added after a cyclic shift ``[n_W, N, N]`` (``like``'s dtype and device): :data:`SHIFT_MASK`
    between two tokens of one window from different regions, else 0. Along a dimension of size ``S`` (window
    ``w``, shift ``s``) the regions are ``[0, S - w)``, ``[S - w, S - s)`` and ``[S - s, S)``: the last ``s`` rows
    (columns) came from the map's other side; a token's region is the pair of its row and column regions."""
    rows, cols = (_regions(n, w, s, like.device) for n, w, s in zip(size, window, shift, strict=True))
    region = 3 * rows[:, None] + cols[None, :]  # [H', W']
    region = _windows(region[None, :, :, None], *window)[..., 0]  # [n_W, N]
    apart = region.unsqueeze(1) != region.unsqueeze(2)
    return torch.zeros(apart.shape, dtype=like.dtype, device=like.device).masked_fill(apart, SHIFT_MASK)


def _regions(size: int, window: int, shift: int, device: torch.device) -> Tensor:
    """The region (0, 1, 2) of each of ``S = size`` positions along a dimension of window ``w`` and shift ``s``:
    ``[0, S - w)``, ``[S - w, S - s)``, ``[S - s, S)``."""
    position = torch.arange(size, device=device)
    return (position >= size - window).long() + (position >= size - shift).long()


class PrunableRelativePositionalAttention(RelativePositionalMultiHeadAttention):
    r"""torchvision's MaxViT ``RelativePositionalMultiHeadAttention`` with its output width following its heads.

    Shapes: ``B`` batch, ``G`` partitions, ``P`` tokens per partition, ``D`` the residual width, ``h`` heads of width
    ``d`` (``head_dim``, fixed). For ``x [B, G, P, D]``, per head ``i`` ``Q_i, K_i, V_i`` are columns
    ``[p h d + i d, p h d + (i + 1) d)`` of ``x W_{qkv}^\top + b_{qkv}`` (``to_qkv``, ``p = 0, 1, 2``), and

    .. math::
        A_i = \mathrm{softmax}\big(Q_i\, (s K_i)^\top + B_i\big) \in [B, G, P, P], \qquad
        \mathrm{out} = [\,A_1 V_1, \dots, A_h V_h\,]\, W_{merge}^\top + b_{merge} \in [B, G, P, D],

    with ``s = scale_factor`` (torchvision's ``D_0^{-1/2}``, the input width at construction, fixed) and
    ``B_i [P, P]`` column ``i`` of ``relative_position_bias_table [(2 sqrt(P) - 1)^2, h]`` gathered by
    ``relative_position_index``. torchvision's forward reshapes the heads' output to ``D``; here to ``h d``, so
    that whole heads prune; ``n_heads`` is told the new count by :func:`oba.prunable.attention_heads`' ``sync``.

    Args: torchvision's ``RelativePositionalMultiHeadAttention``'s.
    """

    @classmethod
    def from_torchvision(cls, attn: RelativePositionalMultiHeadAttention) -> PrunableRelativePositionalAttention:
        """The same function as ``attn`` holding its tensors and submodules (the same objects), in its mode."""
        with torch.device("meta"):  # every tensor is replaced by attn's next
            new = cls(attn.to_qkv.in_features, attn.head_dim, attn.max_seq_len)
        new.scale_factor = attn.scale_factor
        return _adopt(new, attn)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, G, P, D] -> [B, G, P, D]`` (class docstring)."""
        # B and G as one dimension: Torch-Pruning takes a 4-D tensor's channels at dimension 1, a 5-D expand for a
        # grouped-query attention's
        batch, groups, tokens, _ = x.shape
        x = x.reshape(batch * groups, tokens, -1)
        qkv = self.to_qkv(x).reshape(batch * groups, tokens, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B G, h, P, d]
        logits = q.matmul((k * self.scale_factor).transpose(-2, -1)) + self.get_relative_positional_bias()
        out = F.softmax(logits, dim=-1).matmul(v).transpose(1, 2)  # [B G, P, h, d]
        return self.merge(out.reshape(batch * groups, tokens, -1)).reshape(batch, groups, tokens, -1)


_PRUNABLE: dict[type[nn.Module], type[nn.Module]] = {
    ShiftedWindowAttention: PrunableShiftedWindowAttention,
    ShiftedWindowAttentionV2: PrunableShiftedWindowAttentionV2,
    RelativePositionalMultiHeadAttention: PrunableRelativePositionalAttention,
}
"""torchvision's window attention (exactly these classes: a subclass may compute something else) -> oba's."""


def prunable_window_attention(model: M, if_pruned: bool = False) -> M:
    """Replace, in place, every torchvision ``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2`` (Swin) and
    ``RelativePositionalMultiHeadAttention`` (MaxViT) in ``model`` by oba's module computing the same function
    (:class:`PrunableShiftedWindowAttention`, :class:`PrunableShiftedWindowAttentionV2`,
    :class:`PrunableRelativePositionalAttention`), so that whole heads prune; returns ``model``. Modules already
    replaced, and all others, are left alone.

    Args:
        if_pruned: replace them only if one of them lost heads -- its fused ``qkv`` / ``to_qkv`` is narrower than
            three times its input width, which only oba's forward runs: a torchvision model resized to a pruned state
            dict, as :func:`oba.pruned_io.load_pruned` does (a model whose heads all stayed keeps torchvision's
            modules).
    """
    found = [
        (parent, name, child, kind)
        for parent in model.modules()
        for name, child in parent.named_children()
        if (kind := _PRUNABLE.get(type(child))) is not None
    ]
    if if_pruned and not any(_lost_heads(child) for _, _, child, _ in found):
        return model
    for parent, name, child, kind in found:
        setattr(parent, name, kind.from_torchvision(child))
    return model


def _lost_heads(attn: nn.Module) -> bool:
    """Whether torchvision window attention ``attn`` holds fewer q, k, v channels than its input width."""
    qkv = attn.to_qkv if isinstance(attn, RelativePositionalMultiHeadAttention) else attn.qkv
    return qkv.out_features < 3 * qkv.in_features
