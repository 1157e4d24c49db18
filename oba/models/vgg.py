"""VGG with batch normalisation for 32x32 CIFAR images (VGG-19 by default).

Each number in the configuration is a 3x3 conv (padding 1) - BatchNorm - ReLU with that many
output channels; ``"M"`` is a 2x2 max-pool. Five pools take 32x32 down to 1x1, so the classifier
is a single linear layer on the 512 final features, as in the CIFAR variants used by the
pruning literature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["VGG_CONFIGS", "CifarVGG", "cifar_vgg", "vgg19_bn"]

VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class CifarVGG(nn.Module):
    """VGG-BN for CIFAR: ``[N, 3, 32, 32] -> [N, num_classes]`` logits.

    Attributes:
        features: ``nn.Sequential`` of conv-BN-ReLU and max-pool layers, ``[N, 3, 32, 32] ->
            [N, C_last, 1, 1]``.
        classifier: ``nn.Linear(C_last, num_classes)``.
    """

    def __init__(self, config: Sequence[int | str], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(channels, int(item), 3, padding=1),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def cifar_vgg(name: str = "vgg19", num_classes: int = 10) -> CifarVGG:
    """A CIFAR VGG-BN from :data:`VGG_CONFIGS` (``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"``)."""
    if name not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG configuration {name!r}; choose from {sorted(VGG_CONFIGS)}")
    return CifarVGG(VGG_CONFIGS[name], num_classes)


def vgg19_bn(num_classes: int = 10) -> CifarVGG:
    """CIFAR VGG-19 with BatchNorm (20.0M parameters for 10 classes)."""
    return cifar_vgg("vgg19", num_classes)
