"""What structured pruning may touch, and how wide it is: default ignored layers, attention heads, layer widths.

Ignored layers (their output channels are never pruned): by default the model's own
``pruning_ignored_layers()`` when it defines one (the CIFAR ResNets: residual streams and classifier, see
:meth:`oba.models.cifar_resnet.CifarResNet.pruning_ignored_layers`); for torchvision's ``VisionTransformer`` the
patch embedding, the classifier and every layer writing into the residual stream (attention output projection,
second MLP layer), so that whole heads and MLP hidden units prune
(:func:`oba.models.torchvision_models.vit_pruning_ignored_layers`); else the last ``nn.Linear`` (the classifier).
"""

from __future__ import annotations

import torchvision
from torch import nn

from oba.models.torchvision_models import vit_pruning_ignored_layers
from oba.models.vit import Attention

__all__ = ["default_ignored_layers", "default_num_heads", "layer_widths"]


def default_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """``model.pruning_ignored_layers()`` if the model defines it; for a torchvision ``VisionTransformer``
    :func:`oba.models.torchvision_models.vit_pruning_ignored_layers` (patch embedding, classifier and the layers
    writing into the residual stream: only heads and MLP hidden units prune); else the last ``nn.Linear`` (the
    classifier)."""
    own = getattr(model, "pruning_ignored_layers", None)
    if callable(own):
        return list(own())
    if isinstance(model, torchvision.models.VisionTransformer):
        return vit_pruning_ignored_layers(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def default_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{q/k/v projection: heads}`` of every :class:`oba.models.vit.Attention` (whose whole heads prune)."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, Attention):
            heads.update({m.q: m.num_heads, m.k: m.num_heads, m.v: m.num_heads})
    return heads


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv / linear / norm layer (``out_channels``, ``out_features``, ...), by name; a
    module that reports its own width (an ``output_width()`` method, e.g. a layer reparametrised by
    :func:`oba.eigendamage.to_eigenbasis`) is listed with it, and its parts under their own names."""
    widths = {}
    for name, m in model.named_modules():
        if callable(getattr(m, "output_width", None)):
            widths[name] = int(m.output_width())
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            widths[name] = int(m.weight.shape[1] if getattr(m, "transposed", False) else m.weight.shape[0])
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            widths[name] = int(m.weight.shape[0] if m.weight.dim() else 1)
    return widths
