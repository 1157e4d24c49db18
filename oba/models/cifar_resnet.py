"""CIFAR ResNets of He et al. (2016), section 4.2, with option-A (parameter-free) shortcuts.

Depth ``6n + 2``: a 3x3 conv-BN-ReLU stem, three stages of ``n`` BasicBlocks with
``16w, 32w, 64w`` channels (``w`` the width multiplier) at 32x32, 16x16 and 8x8 resolution,
global average pooling and a linear classifier. Where the channel count doubles, the shortcut
subsamples by 2 and zero-pads the new channels (:class:`PadShortcut`, no parameters).

Module and parameter names match the widely used "pytorch_resnet_cifar10" checkpoints
(``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``), whose inputs are normalised with the
ImageNet mean and std (see :data:`CHECKPOINT_MEAN`, :data:`CHECKPOINT_STD`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oba.data.normalization import IMAGENET_MEAN, IMAGENET_STD

from .checkpoints import get_state_dict, read_torch_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_MEAN",
    "CHECKPOINT_STD",
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet",
    "read_cifar_resnet_checkpoint",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

CHECKPOINT_MEAN = IMAGENET_MEAN
CHECKPOINT_STD = IMAGENET_STD
CHECKPOINT_FORMAT = (
    "a 'pytorch_resnet_cifar10' checkpoint: a dict with 'state_dict' (keys prefixed 'module.') and 'best_prec1'"
)

STAGE_CHANNELS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad channels.

    ``[N, in_channels, H, W] -> [N, out_channels, ceil(H/stride), ceil(W/stride)]``. The input
    channels land in the middle: ``pad_front = (out_channels - in_channels) // 2`` zero channels
    before them and the rest after, as in the original implementation (``planes // 4`` on each
    side when the width doubles). No parameters.

    Pruning code that changes the channels of the residual stream must update ``in_channels``,
    ``out_channels`` (and so the padding) itself; the forward pass uses the stored values.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    @property
    def pad_front(self) -> int:
        """Zero channels placed before the input channels."""
        return (self.out_channels - self.in_channels) // 2

    @property
    def pad_back(self) -> int:
        """Zero channels placed after the input channels."""
        return self.out_channels - self.in_channels - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x)``.

    ``[N, in_channels, H, W] -> [N, out_channels, H/stride, W/stride]``. The shortcut is
    ``nn.Identity`` when shapes agree, else a :class:`PadShortcut`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: ``[N, 3, H, W] -> [N, num_classes]`` logits (H = W = 32 for CIFAR).

    Args:
        blocks_per_stage: ``n`` for depth ``6n + 2``.
        num_classes: outputs of the final linear layer.
        width: channel multiplier for the three stages (16, 32, 64 times ``width``, rounded).
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: float = 1) -> None:
        super().__init__()
        channels = [_scaled(c, width) for c in STAGE_CHANNELS]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.layer1 = _stage(channels[0], channels[0], blocks_per_stage, stride=1)
        self.layer2 = _stage(channels[0], channels[1], blocks_per_stage, stride=2)
        self.layer3 = _stage(channels[1], channels[2], blocks_per_stage, stride=2)
        self.linear = nn.Linear(channels[2], num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def pruning_ignored_layers(self) -> list[nn.Module]:
        """Layers whose output channels structured pruning must leave alone (see :mod:`oba.prune`).

        The residual streams: the stem conv and every block's ``conv2`` write into them, and the option-A
        shortcut (:class:`PadShortcut`) maps stream channels by a fixed offset that DepGraph cannot express
        (it ties the 16-, 32- and 64-channel streams into one invalid group); and the classifier. What stays
        prunable is each block's inner group {``conv1`` out, ``bn1``, ``conv2`` in}.
        """
        blocks = [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]
        return [self.conv1, *(b.conv2 for b in blocks), self.linear]

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def _scaled(channels: int, width: float) -> int:
    scaled = round(channels * width)
    if scaled < 1:
        raise ValueError(f"width={width} leaves no channels")
    return scaled


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def cifar_resnet(depth: int = 20, num_classes: int = 10, width: float = 1) -> CifarResNet:
    """A CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...), ``width`` times as wide."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, width=width)


def resnet20(num_classes: int = 10, width: float = 1) -> CifarResNet:
    """ResNet-20 (0.27M parameters at width 1)."""
    return cifar_resnet(20, num_classes, width)


def resnet32(num_classes: int = 10, width: float = 1) -> CifarResNet:
    """ResNet-32 (0.46M parameters at width 1, 7.4M at width 4)."""
    return cifar_resnet(32, num_classes, width)


def resnet44(num_classes: int = 10, width: float = 1) -> CifarResNet:
    """ResNet-44 (0.66M parameters at width 1)."""
    return cifar_resnet(44, num_classes, width)


def resnet56(num_classes: int = 10, width: float = 1) -> CifarResNet:
    """ResNet-56 (0.85M parameters at width 1)."""
    return cifar_resnet(56, num_classes, width)


def resnet110(num_classes: int = 10, width: float = 1) -> CifarResNet:
    """ResNet-110 (1.7M parameters at width 1)."""
    return cifar_resnet(110, num_classes, width)


def read_cifar_resnet_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a "pytorch_resnet_cifar10" checkpoint, ``module.`` prefix removed.

    Raises:
        CheckpointError: the file is unreadable or has no ``state_dict`` entry.
    """
    checkpoint = read_torch_file(path, expected=CHECKPOINT_FORMAT)
    return get_state_dict(checkpoint, "state_dict", path=path, expected=CHECKPOINT_FORMAT)
