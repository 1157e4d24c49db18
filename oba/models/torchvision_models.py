"""ImageNet models from torchvision: ResNet-50 and ViT-B/16.

``pretrained=True`` fetches torchvision's published weights through ``torch.hub`` (downloading
them once into ``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``),
reads them with ``weights_only=True`` and loads them strictly. Without network access and without
a cached copy this raises :class:`PretrainedWeightsError` saying which file to put where.
Inputs are ``[N, 3, 224, 224]``, normalised with the ImageNet mean and std.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet50_Weights, ViT_B_16_Weights, WeightsEnum

from .checkpoints import load_state_dict_strict

__all__ = ["PretrainedWeightsError", "resnet50", "vit_b_16"]


class PretrainedWeightsError(RuntimeError):
    """torchvision's pretrained weights could not be downloaded or read from the cache."""


def resnet50(pretrained: bool = False, *, weights: str = "IMAGENET1K_V1", **kwargs: Any) -> torchvision.models.ResNet:
    """torchvision ResNet-50: ``[N, 3, 224, 224] -> [N, 1000]`` (25.6M params, 4.1 GMACs).

    Args:
        pretrained: load torchvision's ImageNet weights (``weights`` picks which: the classic
            ``"IMAGENET1K_V1"``, 76.1 % top-1, or ``"IMAGENET1K_V2"``, 80.9 %).
        **kwargs: passed to :func:`torchvision.models.resnet50` (e.g. ``num_classes`` when not
            pretrained).
    """
    return _build(torchvision.models.resnet50, ResNet50_Weights, pretrained, weights, kwargs)


def vit_b_16(
    pretrained: bool = False, *, weights: str = "IMAGENET1K_V1", **kwargs: Any
) -> torchvision.models.VisionTransformer:
    """torchvision ViT-B/16: ``[N, 3, 224, 224] -> [N, 1000]`` (86.6M params, 17.6 GMACs).

    Args:
        pretrained: load torchvision's ImageNet weights (``"IMAGENET1K_V1"``: 81.1 % top-1).
        **kwargs: passed to :func:`torchvision.models.vit_b_16`.
    """
    return _build(torchvision.models.vit_b_16, ViT_B_16_Weights, pretrained, weights, kwargs)


def _build(
    builder: Any, weights_enum: type[WeightsEnum], pretrained: bool, weights: str, kwargs: dict[str, Any]
) -> nn.Module:
    if not pretrained:
        return builder(weights=None, **kwargs)
    try:
        chosen = weights_enum[weights]
    except KeyError:
        raise ValueError(
            f"unknown {weights_enum.__name__} {weights!r}; choose from {list(weights_enum.__members__)}"
        ) from None
    if kwargs.get("num_classes", len(chosen.meta["categories"])) != len(chosen.meta["categories"]):
        raise ValueError(f"pretrained ImageNet weights need num_classes={len(chosen.meta['categories'])}")
    kwargs["num_classes"] = len(chosen.meta["categories"])
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
