"""Tensor and PIL image transforms: scaling and normalisation, CIFAR crop-and-flip, ImageNet pipelines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .normalization import Normalize, resolve_normalization

__all__ = [
    "TensorImageTransform",
    "imagenet_transform",
    "random_crop_flip",
]


class _Normalizer:
    """``uint8 (C, H, W)`` tensor -> ``float32``: divide by 255, then ``(x - mean) / std`` per channel."""

    def __init__(self, normalize: Normalize) -> None:
        self.stats = resolve_normalization(normalize)
        if self.stats is None:
            self._mean = self._std = None
        else:
            self._mean = torch.tensor(self.stats[0], dtype=torch.float32).view(-1, 1, 1)
            self._std = torch.tensor(self.stats[1], dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        x = img.to(torch.float32).div_(255.0)
        if self._mean is not None:
            if self._mean.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"normalisation has {self._mean.shape[0]} channels, the image {x.shape[0]}")
            x = x.sub_(self._mean).div_(self._std)
        return x

    def __repr__(self) -> str:
        return f"_Normalizer({self.stats})"


def _mix64(seed: int) -> int:
    """A 64-bit avalanche mix (splitmix64 finaliser): consecutive seeds give unrelated outputs."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def random_crop_flip(img: Tensor, padding: int = 4, seed: int | None = None) -> Tensor:
    """Random ``H x W`` crop of the zero-padded image, then a horizontal flip with probability 1/2.

    The standard CIFAR training augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``),
    on a ``(C, H, W)`` tensor of any dtype (no padding is materialised). With ``seed`` the result is a
    function of the seed alone; without it, the global torch RNG is used (as torchvision does).
    Returns a new tensor of the same shape and dtype.
    """
    if img.dim() != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(img.shape)}")
    c, h, w = img.shape
    n = 2 * padding + 1
    if seed is None:
        dy, dx = (int(v) for v in torch.randint(0, n, (2,)))
        flip = bool(torch.randint(0, 2, ()))
    else:
        r = _mix64(int(seed))
        dy, r = r % n, r // n
        dx, r = r % n, r // n
        flip = bool(r & 1)
    y0, x0 = dy - padding, dx - padding  # top-left corner of the window, in unpadded coordinates
    out = img.new_zeros((c, h, w))
    sy0, sy1 = max(0, y0), min(h, y0 + h)
    sx0, sx1 = max(0, x0), min(w, x0 + w)
    out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[:, sy0:sy1, sx0:sx1]
    return out.flip(-1) if flip else out


class TensorImageTransform:
    """``uint8 (C, H, W)`` -> ``float32 (C, H, W)``: optional CIFAR augmentation, scaling, normalisation.

    Args:
        augment: apply :func:`random_crop_flip` (random crop with ``padding`` + horizontal flip).
        normalize: see :data:`Normalize`.
        padding: the crop padding (4 for CIFAR).
    """

    def __init__(self, augment: bool = False, normalize: Normalize = None, padding: int = 4) -> None:
        self.augment = bool(augment)
        self.padding = int(padding)
        self.normalize = normalize
        self._normalizer = _Normalizer(normalize)

    def __call__(self, img: Tensor, seed: int | None = None) -> Tensor:
        if self.augment:
            img = random_crop_flip(img, self.padding, seed)
        return self._normalizer(img)

    def __repr__(self) -> str:
        stats = self._normalizer.stats
        return f"TensorImageTransform(augment={self.augment}, normalize={stats}, padding={self.padding})"


class _PILPipeline:
    def __init__(self, ops: Callable[[Any], Any], normalize: Normalize) -> None:
        from torchvision.transforms import v2

        self.ops = ops
        self.to_tensor = v2.PILToTensor()
        self.normalizer = _Normalizer(normalize)

    def __call__(self, img: Any) -> Tensor:
        out = self.to_tensor(self.ops(img))
        return self.normalizer(out.as_subclass(Tensor))

    def __repr__(self) -> str:
        return f"_PILPipeline({self.ops!r}, {self.normalizer!r})"


def imagenet_transform(
    train: bool,
    *,
    crop_size: int = 224,
    resize_size: int = 256,
    trivial_augment: bool = False,
    normalize: Normalize = "imagenet",
) -> Callable[[Any], Tensor]:
    """torchvision's reference ImageNet transforms: PIL RGB image -> ``float32 (3, crop_size, crop_size)``.

    Train: ``RandomResizedCrop(crop_size)`` + horizontal flip (+ ``TrivialAugmentWide`` if asked).
    Eval: ``Resize(resize_size)`` (shorter side, bilinear, antialiased) + ``CenterCrop(crop_size)``.
    Both then scale to ``[0, 1]`` and normalise.
    """
    from torchvision.transforms import v2

    if train:
        ops: list[Any] = [v2.RandomResizedCrop(crop_size, antialias=True), v2.RandomHorizontalFlip()]
        if trivial_augment:
            ops.append(v2.TrivialAugmentWide())
    else:
        ops = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)]
    return _PILPipeline(v2.Compose(ops), normalize)
