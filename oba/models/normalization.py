"""Per-channel input normalisation constants ``(mean, std)``, in ``[0, 1]`` pixel units.

A model must see inputs normalised exactly as during its training; each registry entry in
:mod:`oba.models` records which pair it expects.
"""

from __future__ import annotations

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
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
