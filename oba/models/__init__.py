"""Model zoo of the `oba` experiments, behind a small registry.

>>> import oba.models
>>> model = oba.models.create("resnet20", num_classes=10)          # random initialisation
>>> model = oba.models.load_pretrained("resnet20")                  # reads <data_dir>/checkpoints
>>> spec = oba.models.get_spec("resnet20"); spec.mean, spec.input_shape

Each :class:`ModelSpec` records the dataset a model is meant for, the input normalisation it
expects, its input shape and, where one exists, its pretrained checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from oba.data import resolve_data_dir
from oba.data.normalization import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
)

from . import cifar_resnet, mlpnet, torchvision_models, vgg, vit
from .checkpoints import CheckpointError, load_state_dict_strict
from .cifar_resnet import BasicBlock, CifarResNet, PadShortcut
from .mlpnet import MLPNet
from .torchvision_models import PretrainedWeightsError
from .vgg import CifarVGG
from .vit import Attention, VisionTransformer

__all__ = [
    "REGISTRY",
    "Attention",
    "BasicBlock",
    "CheckpointError",
    "CifarResNet",
    "CifarVGG",
    "MLPNet",
    "ModelSpec",
    "PadShortcut",
    "PretrainedWeightsError",
    "VisionTransformer",
    "available",
    "create",
    "get_spec",
    "load_pretrained",
]


@dataclass(frozen=True)
class ModelSpec:
    """What the project knows about one named model.

    Attributes:
        name: registry key.
        builder: ``builder(**kwargs) -> nn.Module`` with a random initialisation.
        dataset: ``"cifar10"``, ``"cifar100"``, ``"mnist"`` or ``"imagenet"``.
        mean, std: per-channel input normalisation, in ``[0, 1]`` pixel units.
        input_shape: one input without the batch dimension, ``(C, H, W)``.
        checkpoint: file name under ``<data_dir>/checkpoints/``, or ``None``.
        read_checkpoint: ``read_checkpoint(path) -> state_dict`` for ``builder()``'s model.
        checkpoint_source: where to obtain the checkpoint, for error messages.
        torchvision_pretrained: weights come from torchvision (``builder(pretrained=True)``).
    """

    name: str
    builder: Callable[..., nn.Module]
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]
    checkpoint: str | None = None
    read_checkpoint: Callable[[Path], Mapping[str, Tensor]] | None = None
    checkpoint_source: str = ""
    torchvision_pretrained: bool = False


_RESNET_SOURCE = "the pretrained models of https://github.com/akamaster/pytorch_resnet_cifar10 (see data/README.md)"
_MLPNET_SOURCE = "the MNIST MLPNet checkpoint of https://github.com/IST-DASLab/WoodFisher (see data/README.md)"


def _cifar_resnet_spec(
    depth: int, checkpoint: str | None = None, width: float = 1, name: str | None = None
) -> ModelSpec:
    return ModelSpec(
        name=name or f"resnet{depth}",
        builder=partial(cifar_resnet.cifar_resnet, depth, width=width),
        dataset="cifar10",
        # The published checkpoints were trained on ImageNet-normalised inputs; the other
        # depths follow them so that one CIFAR pipeline serves every CIFAR ResNet.
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_shape=(3, 32, 32),
        checkpoint=checkpoint,
        read_checkpoint=cifar_resnet.read_cifar_resnet_checkpoint if checkpoint else None,
        checkpoint_source=_RESNET_SOURCE if checkpoint else "",
    )


def _build_registry() -> Mapping[str, ModelSpec]:
    specs = [
        _cifar_resnet_spec(20, "resnet20-12fca82f.th"),
        _cifar_resnet_spec(32, "resnet32-d509ac18.th"),
        _cifar_resnet_spec(44),
        _cifar_resnet_spec(56),
        _cifar_resnet_spec(110),
        _cifar_resnet_spec(32, width=4, name="resnet32_4x"),
        ModelSpec(
            "resnet32_4x_cifar100",
            partial(cifar_resnet.cifar_resnet, 32, num_classes=100, width=4),
            "cifar100",
            CIFAR100_MEAN,
            CIFAR100_STD,
            (3, 32, 32),
        ),
        ModelSpec("vgg19_bn", vgg.vgg19_bn, "cifar10", CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32)),
        ModelSpec(
            "vgg19_bn_cifar100",
            partial(vgg.vgg19_bn, num_classes=100),
            "cifar100",
            CIFAR100_MEAN,
            CIFAR100_STD,
            (3, 32, 32),
        ),
        ModelSpec("vit_cifar", vit.vit_cifar, "cifar10", CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32)),
        ModelSpec(
            "mlpnet",
            mlpnet.mlpnet,
            "mnist",
            MNIST_MEAN,
            MNIST_STD,
            (1, 28, 28),
            checkpoint="mnist_25_epoch_93.97.ckpt",
            read_checkpoint=mlpnet.read_mlpnet_checkpoint,
            checkpoint_source=_MLPNET_SOURCE,
        ),
        ModelSpec(
            "resnet50",
            torchvision_models.resnet50,
            "imagenet",
            IMAGENET_MEAN,
            IMAGENET_STD,
            (3, 224, 224),
            torchvision_pretrained=True,
        ),
        ModelSpec(
            "vit_b_16",
            torchvision_models.vit_b_16,
            "imagenet",
            IMAGENET_MEAN,
            IMAGENET_STD,
            (3, 224, 224),
            torchvision_pretrained=True,
        ),
    ]
    return MappingProxyType({spec.name: spec for spec in specs})


REGISTRY: Mapping[str, ModelSpec] = _build_registry()
"""Read-only mapping from model name to :class:`ModelSpec`."""


def available() -> list[str]:
    """Names of all registered models."""
    return sorted(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name`` (``KeyError`` listing the names otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {available()}") from None


def create(name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised model, ``get_spec(name).builder(**kwargs)`` (e.g. ``num_classes``)."""
    return get_spec(name).builder(**kwargs)


def load_pretrained(name: str, data_dir: str | os.PathLike | None = None) -> nn.Module:
    """The pretrained model ``name`` in eval mode, on the CPU.

    Local checkpoints are read from ``<data_dir>/checkpoints/<spec.checkpoint>``, with
    ``data_dir`` resolved by :func:`oba.data.resolve_data_dir` (argument, ``$OBA_DATA_DIR``, or
    the project's ``data/``), with ``weights_only=True`` and loaded strictly. torchvision models
    download their weights instead (see :mod:`oba.models.torchvision_models`).

    Raises:
        FileNotFoundError: the checkpoint is not in the data directory (says where it looked).
        CheckpointError: the file is unreadable or does not fit the model.
        PretrainedWeightsError: torchvision weights could not be obtained.
        ValueError: no pretrained weights exist for ``name``.
    """
    spec = get_spec(name)
    if spec.torchvision_pretrained:
        return spec.builder(pretrained=True).eval()
    if spec.checkpoint is None or spec.read_checkpoint is None:
        with_weights = [n for n, s in REGISTRY.items() if s.checkpoint or s.torchvision_pretrained]
        raise ValueError(
            f"no pretrained weights are registered for {name!r}; models with weights: {sorted(with_weights)}"
        )
    path = resolve_data_dir(data_dir) / "checkpoints" / spec.checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint for {name!r} not found: looked for {path}. Get "
            f"{spec.checkpoint} from {spec.checkpoint_source} and put it in the 'checkpoints' "
            "folder of the data directory (pass data_dir=... or set OBA_DATA_DIR)."
        )
    model = spec.builder()
    load_state_dict_strict(
        model,
        spec.read_checkpoint(path),
        source=path,
        expected=f"a checkpoint of {name!r} from {spec.checkpoint_source}",
    )
    return model.eval()
