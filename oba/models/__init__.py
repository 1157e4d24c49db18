"""Model zoo of the `oba` experiments, behind a small registry.

>>> import oba.models
>>> model = oba.models.create("resnet20", num_classes=10)          # random initialisation
>>> model = oba.models.load_pretrained("resnet20")                  # reads <data_dir>/checkpoints
>>> model = oba.models.load_pretrained("vgg19_bn", path="my_vgg.pt")  # any registry model, your own file
>>> spec = oba.models.get_spec("resnet20"); spec.mean, spec.input_shape

Each :class:`ModelSpec` records the dataset a model is meant for, the input normalisation it
expects, its input shape and, where one exists, its published checkpoint: the CIFAR ResNets of
https://github.com/akamaster/pytorch_resnet_cifar10 (depths 20, 32, 44, 56, 110 and 1202) are recognised by file name
when dropped into ``<data_dir>/checkpoints/`` and checked against the SHA-256 prefix their names carry.
"""

from __future__ import annotations

import os
import re
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
from .checkpoints import CheckpointError, check_file_hash, load_state_dict_strict, read_state_dict
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
    "checkpoint_sha256_prefix",
    "create",
    "known",
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
        checkpoint: file name under ``<data_dir>/checkpoints/``, or ``None``; a name ending ``-<8 hex>.<ext>``
            (torch.hub's convention) is checked against the file's SHA-256 (:func:`checkpoint_sha256_prefix`).
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
    specs = [  # the published "pytorch_resnet_cifar10" checkpoints, every depth released
        _cifar_resnet_spec(20, "resnet20-12fca82f.th"),
        _cifar_resnet_spec(32, "resnet32-d509ac18.th"),
        _cifar_resnet_spec(44, "resnet44-014dd654.th"),
        _cifar_resnet_spec(56, "resnet56-4bfd9763.th"),
        _cifar_resnet_spec(110, "resnet110-1d1ed7c2.th"),
        _cifar_resnet_spec(1202, "resnet1202-f3b1deed.th"),
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


EXTERNAL_SOURCES = ("torchvision", "timm", "transformers")
"""Prefixes :func:`create` takes besides the registry names: ``"torchvision:resnext50_32x4d"``, ``"timm:deit_tiny_
patch16_224"``, ``"transformers:GPT2ForSequenceClassification"`` (random initialisation; the same builders users
call)."""


def create(name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised model: ``get_spec(name).builder(**kwargs)`` (e.g. ``num_classes``) for a registry name;
    ``torchvision.models.get_model(model, weights=None, **kwargs)`` for ``"torchvision:<model>"``;
    ``timm.create_model(model, pretrained=False, **kwargs)`` for ``"timm:<model>"``;
    ``transformers.<ModelClass>(ModelClass.config_class(**config))`` for ``"transformers:<ModelClass>"`` with
    ``config`` a plain dict of configuration fields (e.g. ``{"n_embd": 32, "n_layer": 2, "n_head": 4}``)."""
    source, sep, model = name.partition(":")
    if not sep:
        return get_spec(name).builder(**kwargs)
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(model, weights=None, **kwargs)
    if source == "timm":
        import timm

        return timm.create_model(model, pretrained=False, **kwargs)
    if source == "transformers":
        return _create_transformers(model, **kwargs)
    raise KeyError(f"unknown model source {source!r} in {name!r}; sources: {', '.join(EXTERNAL_SOURCES)}")


def known(name: str) -> bool:
    """Whether :func:`create` can build ``name`` (a registry name or a model of an external source)."""
    source, sep, model = name.partition(":")
    if not sep:
        return name in REGISTRY
    if source == "torchvision":
        import torchvision

        return model in torchvision.models.list_models(module=torchvision.models)
    if source == "timm":
        try:
            import timm
        except ImportError:
            return False
        return timm.is_model(model)
    if source == "transformers":
        return _transformers_class(model) is not None
    return False


def _transformers_class(name: str) -> type | None:
    """The Hugging Face model class ``transformers.<name>`` (one with a ``config_class``), or ``None``."""
    try:
        import transformers
    except ImportError:
        return None
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "config_class") else None


def _create_transformers(name: str, config: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """``transformers.<name>(<name>.config_class(**config))``: a randomly initialised Hugging Face model."""
    cls = _transformers_class(name)
    if cls is None:
        raise KeyError(f"'transformers:{name}': no model class transformers.{name} (or transformers is not installed)")
    if kwargs:
        raise TypeError(f"'transformers:{name}' takes config={{...}} only (configuration fields), got {sorted(kwargs)}")
    return cls(cls.config_class(**dict(config or {})))


def checkpoint_sha256_prefix(file_name: str) -> str | None:
    """The SHA-256 prefix a published checkpoint's name carries (``resnet20-12fca82f.th`` -> ``"12fca82f"``)."""
    found = re.search(r"-([0-9a-f]{8,})\.[A-Za-z0-9]+$", file_name)
    return found.group(1) if found else None


def load_pretrained(
    name: str, data_dir: str | os.PathLike | None = None, *, path: str | os.PathLike | None = None
) -> nn.Module:
    """The pretrained model ``name`` in eval mode, on the CPU.

    * ``path`` given: the checkpoint file you have, for any registry model: read with the model's own reader when
      it has a published format, else as a state dict (a dict of tensors, or one under ``"state_dict"``,
      ``"model_state_dict"`` or ``"model"``; a ``module.`` prefix is stripped), loaded strictly.
    * else the published checkpoint ``<data_dir>/checkpoints/<spec.checkpoint>``, with ``data_dir`` resolved by
      :func:`oba.data.resolve_data_dir` (argument, ``$OBA_DATA_DIR``, or the project's ``data/``), checked against
      the SHA-256 prefix in its name;
    * torchvision models download their weights instead (see :mod:`oba.models.torchvision_models`).

    Every file is read with ``weights_only=True``.

    Raises:
        FileNotFoundError: the checkpoint is not there (says where it looked, and how to load a file you have).
        CheckpointError: the file is unreadable, is not the published file its name says, or does not fit the model.
        PretrainedWeightsError: torchvision weights could not be obtained.
        ValueError: no published weights exist for ``name`` (pass ``path=``).
    """
    spec = get_spec(name)
    source = spec.checkpoint_source
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file for {name!r} not found: {path}")
        if spec.read_checkpoint is not None:  # a published format: e.g. your own training in that repository
            return _load_strictly(spec, spec.read_checkpoint(path), path, f"a checkpoint of {name!r} as in {source}")
        return _load_strictly(spec, read_state_dict(path, expected=f"a state_dict of {name!r}"), path, name)
    if spec.torchvision_pretrained:
        return spec.builder(pretrained=True).eval()
    if spec.checkpoint is None or spec.read_checkpoint is None:
        with_weights = [n for n, s in REGISTRY.items() if s.checkpoint or s.torchvision_pretrained]
        raise ValueError(
            f"no published weights are registered for {name!r} (models with weights: {sorted(with_weights)}); "
            f"to load a checkpoint file you have: oba.models.load_pretrained({name!r}, path='your_file.pt')"
        )
    path = resolve_data_dir(data_dir) / "checkpoints" / spec.checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint for {name!r} not found: looked for {path}. Get "
            f"{spec.checkpoint} from {source} and put it in the 'checkpoints' "
            "folder of the data directory (pass data_dir=... or set OBA_DATA_DIR); or, to load a checkpoint file "
            f"you have, oba.models.load_pretrained({name!r}, path='your_file')."
        )
    if (prefix := checkpoint_sha256_prefix(spec.checkpoint)) is not None:
        check_file_hash(path, prefix)
    return _load_strictly(spec, spec.read_checkpoint(path), path, f"a checkpoint of {name!r} from {source}")


def _load_strictly(spec: ModelSpec, state_dict: Mapping[str, Tensor], path: Path, expected: str) -> nn.Module:
    model = spec.builder()
    load_state_dict_strict(model, state_dict, source=path, expected=expected)
    return model.eval()
