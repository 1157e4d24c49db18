"""Toy networks small enough for dense Hessians: the case matrix every curvature quantity is checked on.

Each :class:`ToyCase` holds a float64 model (a few hundred parameters), a batch and a loss; the
catalogue covers every op whose curvature matters for pruning: ReLU (piecewise linear), GELU (smooth
non-linearity), bias-free layers, convolutions, BatchNorm in train and eval mode, residual additions,
max and average pooling, softmax attention with LayerNorm, and ``nn.MultiheadAttention`` (whose CPU
flash-attention kernel has no second derivatives).

``has_normalization`` marks the cases where ``torch.func.hessian`` is known to be wrong (LayerNorm,
train-mode BatchNorm), so only finite differences may serve as their oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ToyCase", "TOY_CASES", "make_case", "TinyAttention"]


@dataclass
class ToyCase:
    """A float64 model, a batch ``(inputs, targets)`` and a mean-reduced loss."""

    name: str
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    has_normalization: bool

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class TinyAttention(nn.Module):
    """Pre-norm single-head-per-group self-attention block on ``[B, T, D]`` tokens, then a classifier.

    ``y = x + W_o softmax(Q K^T / sqrt(d)) V``,  ``Q, K, V = LN(x) W_{q,k,v}``,
    then ``x + MLP_GELU(LN(y))``, mean-pooled over tokens and mapped to classes. Written with plain
    matmuls so every second derivative is explicit.
    """

    def __init__(self, dim: int = 6, heads: int = 2, tokens: int = 4, classes: int = 3, layer_norm: bool = True):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, D]
        b, t, d = x.shape
        h = self.norm1(x)

        def split(z: Tensor) -> Tensor:  # [B, T, D] -> [B, heads, T, D/heads]
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


class _MHAClassifier(nn.Module):
    """``nn.MultiheadAttention`` (the module torchvision's ViT uses) on ``[B, T, D]``, then a classifier."""

    def __init__(self, dim: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head((x + y).mean(dim=1))


class _Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def _mlp(act: type[nn.Module], bias: bool) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(8, 7, bias=bias), act(), nn.Linear(7, 6, bias=bias), act(), nn.Linear(6, 3, bias=bias)
    )


def _cnn(bn: bool, pool: nn.Module) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(2, 3, 3, padding=1, bias=not bn)]
    layers += [nn.BatchNorm2d(3)] if bn else []
    layers += [nn.ReLU(), pool, nn.Conv2d(3, 4, 3, padding=1, bias=not bn)]
    layers += [nn.BatchNorm2d(4)] if bn else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    return nn.Sequential(*layers)


def _residual(bn: bool) -> nn.Module:
    def conv_block(relu: bool) -> list[nn.Module]:
        out: list[nn.Module] = [nn.Conv2d(3, 3, 3, padding=1, bias=not bn)]
        out += [nn.BatchNorm2d(3)] if bn else []
        return out + ([nn.ReLU()] if relu else [])

    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        _Residual(nn.Sequential(*conv_block(True), *conv_block(False))),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


# name -> (builder, input shape without batch, train mode?, has_normalization)
_CATALOGUE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool, bool]] = {
    "mlp_relu": (lambda: _mlp(nn.ReLU, True), (8,), False, False),
    "mlp_relu_nobias": (lambda: _mlp(nn.ReLU, False), (8,), False, False),
    "mlp_gelu": (lambda: _mlp(nn.GELU, True), (8,), False, False),
    "cnn_bn_train": (lambda: _cnn(True, nn.MaxPool2d(2)), (2, 6, 6), True, True),
    "cnn_bn_eval": (lambda: _cnn(True, nn.MaxPool2d(2)), (2, 6, 6), False, False),
    "cnn_maxpool": (lambda: _cnn(False, nn.MaxPool2d(2)), (2, 6, 6), False, False),
    "cnn_avgpool": (lambda: _cnn(False, nn.AvgPool2d(2)), (2, 6, 6), False, False),
    "residual": (lambda: _residual(False), (2, 5, 5), False, False),
    "residual_bn_train": (lambda: _residual(True), (2, 5, 5), True, True),
    "attention_layernorm": (lambda: TinyAttention(layer_norm=True), (4, 6), False, True),
    "attention_plain": (lambda: TinyAttention(layer_norm=False), (4, 6), False, False),
    "multihead_attention": (lambda: _MHAClassifier(), (3, 4), False, False),
}

TOY_CASES: tuple[str, ...] = tuple(_CATALOGUE)


def make_case(name: str, *, batch_size: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64) -> ToyCase:
    """Build toy case ``name`` (one of :data:`TOY_CASES`) deterministically from ``seed``.

    Parameters and BatchNorm statistics are random (not at their initial values) so that no Hessian
    block vanishes by accident; BatchNorm eval-mode running statistics are random too.
    """
    if name not in _CATALOGUE:
        raise KeyError(f"unknown toy case {name!r}; choose one of {', '.join(TOY_CASES)}")
    builder, shape, train, has_norm = _CATALOGUE[name]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = builder().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.7)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=dtype) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=dtype) + 0.5)
    model.train(train)
    x = torch.randn((batch_size, *shape), generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (batch_size,), generator=gen)
    return ToyCase(name, model, (x, y), F.cross_entropy, has_norm)
