"""Saving and loading structurally pruned models: :func:`save_pruned`, :func:`load_pruned`.

A pruned model is stored as its registry name, arguments, every layer's width and its ``state_dict`` -- tensors
and plain containers only, so :func:`load_pruned` reads it with ``torch.load(weights_only=True)`` and rebuilds the
architecture by resizing a fresh model's layers (:func:`resize_to_state_dict`). Layers a criterion rewrote before
pruning (EigenDamage's eigenbasis) are named per :class:`oba.criteria.Preparation` and rebuilt by it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from oba.cached_shapes import cached_shapes, sync_cached_shapes
from oba.criteria import REGISTRY, Preparation
from oba.hf_layers import is_conv1d
from oba.io import load_torch, save_torch
from oba.models import available, create, known
from oba.prunable import attention_heads, layer_widths, prunable_window_attention

__all__ = ["PRUNED_FORMAT", "load_pruned", "resize_to_state_dict", "save_pruned"]

PRUNED_FORMAT = "oba.pruned/1"


def _preparations() -> dict[str, Preparation]:
    return {c.preparation.name: c.preparation for c in REGISTRY.values() if c.preparation is not None}


def _prepared_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{preparation name: names of the layers it rewrote}`` for every preparation that rewrote some."""
    return {name: layers for name, p in _preparations().items() if (layers := p.prepared_layers(model))}


def _preparation(name: str, path: Any) -> Preparation:
    known = _preparations()
    if name not in known:
        raise ValueError(f"{path} holds layers rewritten by {name!r}, which this version of oba does not know")
    return known[name]


def save_pruned(
    model: nn.Module, path: str | os.PathLike, arch: str, arch_kwargs: Mapping[str, Any] | None = None
) -> None:
    """Write a pruned model as ``{format, arch, arch_kwargs, widths, state_dict, state_dict_metadata}`` (atomic; no
    pickled code), plus ``prepared`` (``{preparation name: [layer names]}``) when a criterion's
    :class:`oba.criteria.Preparation` rewrote layers (EigenDamage: ``{"eigenbasis_layers": [...]}``), so that
    :func:`load_pruned` rebuilds them.

    Args:
        arch: the :mod:`oba.models` name the model was created from (e.g. ``"resnet32"``, or
            ``"torchvision:resnext50_32x4d"``, ``"timm:deit_tiny_patch16_224"``: see :func:`oba.models.create`).
        arch_kwargs: the arguments it was created with (plain values only).
    """
    if not known(arch):
        raise ValueError(
            f"arch={arch!r} is not a model name of oba.models (have {', '.join(available())}, or "
            "'torchvision:<name>' / 'timm:<name>' / 'transformers:<ModelClass>'): load_pruned could not rebuild the "
            "model. Pass the name the model "
            "was created from (and its arguments as arch_kwargs)"
        )
    state = model.state_dict()
    payload = {
        "format": PRUNED_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "widths": layer_widths(model),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        # each module's state-dict version ({prefix: {"version": n}}): some modules' loading reads it (MNASNet)
        "state_dict_metadata": {k: dict(v) for k, v in getattr(state, "_metadata", {}).items()},
    }
    if prepared := _prepared_layers(model):
        payload["prepared"] = prepared
    save_torch(payload, path)


def load_pruned(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Read a file of :func:`save_pruned`: a fresh ``oba.models.create(arch, **arch_kwargs)`` (or ``model``),
    resized to the saved widths, with the saved weights; the layers listed under ``prepared`` are first rebuilt
    by their preparation (EigenDamage: :func:`oba.eigendamage.to_eigenbasis` with identity rotations, then the
    saved weights). Uses ``torch.load(weights_only=True)``.

    Raises:
        ValueError: the file is not a pruned-model file of this format.
    """
    payload = load_torch(path, what="pruned model")
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        raise ValueError(
            f"{path} is not a pruned model written by oba.prune.save_pruned (expected format {PRUNED_FORMAT!r}); "
            "plain state_dicts load with model.load_state_dict, training checkpoints with oba.train.load_checkpoint"
        )
    model = create(payload["arch"], **payload["arch_kwargs"]) if model is None else model
    prepared = dict(payload.get("prepared", {}))
    if payload.get("eigenbasis_layers"):  # files written before the preparations were generic
        prepared["eigenbasis_layers"] = payload["eigenbasis_layers"]
    for name, layers in prepared.items():
        _preparation(name, path).restore(model, layers)
    resize_to_state_dict(model, payload["state_dict"])
    prunable_window_attention(model, if_pruned=True)  # torchvision Swin / MaxViT attention whose heads prune
    for attention in attention_heads(model):  # head counts follow the widths
        width = layer_widths(attention.projections[0])[""]  # out_features, or a Conv1D's nf
        attention.sync(width // attention.parts // attention.head_dim)
    state = OrderedDict(payload["state_dict"])
    state._metadata = payload.get("state_dict_metadata", {})  # type: ignore[attr-defined]
    model.load_state_dict(state)
    return model


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Give every parameter and buffer of ``model`` the shape it has in ``state_dict`` and update the layers'
    size attributes (``in_channels``/``out_channels``, ``in_features``/``out_features``, ``num_features``,
    ``normalized_shape``, ``num_channels``, ``embedding_dim``); modules that merely hold tensors (a ViT's class
    token) just get the new tensors, and view shapes they cache from them follow (:mod:`oba.cached_shapes`,
    PoolFormer's ``Scale``).
    Values are left uninitialised: load the state dict next.
    """
    shapes = cached_shapes(model)
    for prefix, module in model.named_modules():
        changed = False
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                key = f"{prefix}.{name}" if prefix else name
                if t is None or key not in state_dict or state_dict[key].shape == t.shape:
                    continue
                new = torch.empty(state_dict[key].shape, dtype=t.dtype, device=t.device)
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                changed = True
        if changed:
            _update_size_attributes(module)
    sync_cached_shapes(shapes)
    return model


def _update_size_attributes(m: nn.Module) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        a, b = m.weight.shape[:2]
        out_ch, in_per_group = (b * m.groups, a) if m.transposed else (a, b)
        if depthwise:
            m.groups = out_ch
        m.out_channels = out_ch if not m.transposed else b * m.groups
        m.in_channels = in_per_group * m.groups if not m.transposed else a
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif is_conv1d(m):  # Hugging Face Conv1D: weight [in, out]
        m.nx, m.nf = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = (m.weight if m.weight is not None else m.running_mean).shape[0]
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = tuple(m.weight.shape)
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = m.weight.shape[0]
    elif isinstance(m, nn.Embedding):  # a transformer's token / position embedding, pruned with the hidden width
        m.num_embeddings, m.embedding_dim = m.weight.shape
    elif isinstance(m, (nn.MultiheadAttention, nn.RNNBase, nn.modules.conv._ConvTransposeNd)):
        raise TypeError(
            f"cannot resize a {type(m).__name__} to a pruned state_dict: only conv, linear and normalisation layers "
            "(and modules that merely hold tensors, e.g. a ViT's class token and position embedding) are supported"
        )
    # else: a module holding bare tensors (class token, position embedding, layer scale): no size attributes
