"""Per-channel input normalisation ``(mean, std)``, in ``[0, 1]`` pixel units: named constants and presets.

This is the single record of these numbers: the dataset functions take a preset name from
:data:`NORMALIZATION`, and each :mod:`oba.models` registry entry records the pair its model expects
(a model must see inputs normalised exactly as during its training).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "NORMALIZATION",
    "Normalize",
    "resolve_normalization",
]

# ImageNet statistics: torchvision's pretrained models, and the "pytorch_resnet_cifar10"
# CIFAR-10 checkpoints, which were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# CIFAR training-set statistics (std over all pixels of a channel).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
}
"""Named ``(mean, std)`` presets (per channel, for images scaled to ``[0, 1]``).

``"imagenet"`` is also what the pretrained CIFAR-10 ResNet-20/32 checkpoints were trained with;
``"cifar10"``/``"cifar100"`` are the per-channel statistics of those training sets."""

Normalize = str | tuple[Sequence[float], Sequence[float]] | None
"""A preset name from :data:`NORMALIZATION`, an explicit ``(mean, std)`` pair, or ``None`` (only scale to [0, 1])."""


def resolve_normalization(normalize: Normalize) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` as tuples of floats, or ``None``; accepts a preset name or a ``(mean, std)`` pair."""
    if normalize is None:
        return None
    if isinstance(normalize, str):
        try:
            return NORMALIZATION[normalize]
        except KeyError:
            raise ValueError(
                f"unknown normalisation preset {normalize!r}; choose one of {sorted(NORMALIZATION)}, "
                "pass an explicit (mean, std) pair, or None"
            ) from None
    try:
        mean, std = normalize
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be a preset name, a (mean, std) pair or None, not {normalize!r}") from None
    if len(mean_t) != len(std_t) or not mean_t:
        raise ValueError(f"mean and std must be non-empty and of equal length, got {mean_t} and {std_t}")
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std must be positive, got {std_t}")
    return mean_t, std_t
