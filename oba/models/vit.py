"""A small Vision Transformer for 32x32 CIFAR images, written to stay consistent under pruning.

Shapes: ``N`` batch, ``T = 1 + (H / patch)(W / patch)`` tokens (class token first), ``D`` the
embedding width, ``h`` heads, ``d`` query/key width per head, ``d_v`` value width per head.

Head bookkeeping (the one rule pruning code must know): :class:`Attention` stores only the
per-head query/key width ``head_dim``; the number of heads is *derived* from the weights,
``num_heads = q.out_features // head_dim``, and the per-head value width is
``v.out_features // num_heads``.

* Removing whole heads (rows ``[i*d, (i+1)*d)`` of ``q``/``k``, the matching ``d_v`` rows of ``v``
  and columns of ``proj``) needs no further step: the module stays consistent. torch-pruning's
  ``MetaPruner(..., num_heads={attn.q: h, attn.k: h, attn.v: h}, prune_num_heads=True,
  prune_head_dims=False)`` does exactly this.
* Shrinking every head (head-dimension pruning) keeps the head count, so ``head_dim`` must be
  re-derived afterwards: call :meth:`Attention.set_num_heads` or :func:`set_num_heads` with
  torch-pruning's updated ``pruner.num_heads`` dict (its ``prune_head_dims=True`` mode). Until
  then the forward pass raises a clear error whenever ``q.out_features`` is no longer a multiple
  of ``head_dim``. One case cannot be detected: if the shrunken width happens to be a multiple of
  the old ``head_dim`` (e.g. 4 heads of 16 pruned to 4 heads of 8 = 32 = 2 x 16), forgetting the
  call silently regroups the channels into fewer, wider heads.

The softmax temperature ``scale`` is fixed at construction (``1 / sqrt(head_dim)`` of the
unpruned model) so that removing zero-contribution channels never changes the function.
Attention is plain matmul-softmax, which supports double backward on every backend.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["MLP", "Attention", "Block", "VisionTransformer", "set_num_heads", "vit_cifar"]


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` projections: ``[N, T, D] -> [N, T, D]``.

    Args:
        dim: embedding width ``D``.
        num_heads: initial number of heads ``h``.
        head_dim: query/key/value width per head ``d`` (default ``dim // num_heads``).
        qkv_bias: whether ``q``, ``k``, ``v`` have biases.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
            head_dim = dim // num_heads
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.k = nn.Linear(dim, inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    @property
    def num_heads(self) -> int:
        """Heads, derived from the weights: ``q.out_features // head_dim`` (checked for consistency)."""
        qk_width = self.q.out_features
        heads, remainder = divmod(qk_width, self.head_dim)
        if (
            remainder
            or heads == 0
            or self.k.out_features != qk_width
            or self.v.out_features % heads
            or self.proj.in_features != self.v.out_features
        ):
            raise RuntimeError(
                f"inconsistent attention shapes: q.out={qk_width}, k.out={self.k.out_features}, "
                f"v.out={self.v.out_features}, proj.in={self.proj.in_features}, "
                f"head_dim={self.head_dim}. After pruning head dimensions call "
                "set_num_heads(...) to re-derive head_dim."
            )
        return heads

    @property
    def v_head_dim(self) -> int:
        """Value width per head: ``v.out_features // num_heads``."""
        return self.v.out_features // self.num_heads

    def set_num_heads(self, num_heads: int) -> None:
        """Re-derive ``head_dim = q.out_features // num_heads`` after head-dimension pruning."""
        if num_heads < 1 or self.q.out_features % num_heads:
            raise ValueError(f"q.out_features={self.q.out_features} does not split into {num_heads} heads")
        self.head_dim = self.q.out_features // num_heads
        _ = self.num_heads  # validates the other shapes against the new head_dim

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        h = self.num_heads
        q = self.q(x).view(n, t, h, -1).transpose(1, 2)  # [N, h, T, d]
        k = self.k(x).view(n, t, h, -1).transpose(1, 2)  # [N, h, T, d]
        v = self.v(x).view(n, t, h, -1).transpose(1, 2)  # [N, h, T, d_v]
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # [N, h, T, T]
        out = (weights @ v).transpose(1, 2).reshape(n, t, -1)  # [N, T, h * d_v]
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, scale={self.scale:.4g}"


class MLP(nn.Module):
    """Transformer feed-forward: ``fc2(gelu(fc1 x))``, ``[N, T, D] -> [N, T, D]``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``; ``[N, T, D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: ``[N, C, H, W] -> [N, num_classes]`` logits (from the class token).

    Attributes:
        patch_embed: ``Conv2d(C, D, patch, stride=patch)``, ``[N, C, H, W] -> [N, D, H/p, W/p]``.
        cls_token: ``[1, 1, D]``.
        pos_embed: ``[1, T, D]`` with ``T = 1 + (H/p)(W/p)``; inputs must be ``image_size``.
        blocks: ``nn.Sequential`` of :class:`Block`.
        norm: final ``LayerNorm(D)``.
        head: ``Linear(D, num_classes)``.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_dim: int = 384,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, P, D]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # [N, 1, D]
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed  # [N, T, D]
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])


def vit_cifar(
    num_classes: int = 10,
    *,
    image_size: int = 32,
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 6,
    num_heads: int = 3,
    mlp_dim: int = 384,
) -> VisionTransformer:
    """A small CIFAR ViT (defaults: 4x4 patches, 65 tokens, width 192, 6 blocks, 3 heads; 1.8M params)."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
    )


def set_num_heads(model: nn.Module, num_heads: Mapping[nn.Module, int]) -> None:
    """Re-derive ``head_dim`` of every :class:`Attention` whose ``q`` is a key of ``num_heads``.

    Pass torch-pruning's ``pruner.num_heads`` after pruning head dimensions.
    """
    for module in model.modules():
        if isinstance(module, Attention) and module.q in num_heads:
            module.set_num_heads(num_heads[module.q])
