"""A deterministic, learnable synthetic image dataset for fast tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .datasets import TensorImageDataset
from .normalization import Normalize

__all__ = [
    "synthetic",
]


def synthetic(
    num_samples: int,
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    *,
    augment: bool = False,
    normalize: Normalize = None,
    noise: float = 0.5,
) -> TensorImageDataset:
    """A deterministic, learnable synthetic image dataset for fast tests.

    Each class has a random smooth prototype image (a random 4 x 4 grid, upsampled bilinearly); a sample is
    ``(1 - noise) * prototype + noise * uniform noise``, so a small model can learn it, with or without the
    crop-and-flip augmentation. Labels are balanced (``i % num_classes``, shuffled).
    Same arguments, same data. Items are ``(float32 shape, int)`` as for the real datasets.

    Args:
        shape: ``(C, H, W)`` of one image.
        noise: in ``[0, 1]``; 1 gives pure noise (unlearnable).
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
    if num_samples < 0 or num_classes < 1:
        raise ValueError("num_samples must be >= 0 and num_classes >= 1")
    g = torch.Generator().manual_seed(int(seed))
    shape = tuple(int(s) for s in shape)
    # smooth prototypes (a 4 x 4 grid, upsampled): class identity survives crops and flips
    c, h, w = shape
    coarse = torch.randint(0, 256, (num_classes, c, min(4, h), min(4, w)), generator=g, dtype=torch.int64).float()
    prototypes = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    targets = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=g)]
    rand = torch.rand((num_samples, *shape), generator=g) * 255.0
    images = ((1.0 - noise) * prototypes[targets] + noise * rand).round_().clamp_(0, 255).to(torch.uint8)
    return TensorImageDataset(
        images,
        targets,
        [f"class{i}" for i in range(num_classes)],
        augment=augment,
        normalize=normalize,
        source=f"synthetic(seed={seed})",
    )
