"""Safe, strict checkpoint loading.

Every checkpoint is read with ``torch.load(..., weights_only=True)`` (through :func:`oba.io.load_torch`):
the unpickler only rebuilds tensors, containers and primitive types, plus the few classes a caller
allowlists explicitly (for example the optimizer *class* object pickled inside the MNIST MLPNet
checkpoint). Arbitrary code in a checkpoint therefore never runs.

Loading into a model is always strict. Instead of PyTorch's generic message, a mismatch raises
:class:`CheckpointError` naming the file, the format that was expected, and every missing key,
unexpected key and shape mismatch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from oba.io import DamagedFileError, UnsafeCheckpointError, load_torch

__all__ = [
    "CheckpointError",
    "check_file_hash",
    "get_entry",
    "get_state_dict",
    "load_state_dict_strict",
    "read_state_dict",
    "read_torch_file",
    "strip_prefix",
]

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
"""Where :func:`read_state_dict` looks for the tensors in a checkpoint dict, in this order."""

_MAX_KEYS_SHOWN = 12


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, has an unexpected layout, or does not fit the model."""


def read_torch_file(
    path: str | os.PathLike,
    *,
    expected: str,
    allowed_globals: Iterable[Any] = (),
) -> Any:
    """Read a file saved with ``torch.save`` onto the CPU, with ``weights_only=True``.

    Args:
        path: the checkpoint file.
        expected: a short description of the expected format, quoted in error messages.
        allowed_globals: classes or functions the file may reference besides tensors and
            containers (passed to :func:`torch.serialization.safe_globals`). Keep it minimal.

    Returns:
        The unpickled object, every tensor on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a torch checkpoint, is truncated or corrupt, or needs
            a global that is not allowlisted (the message of :func:`oba.io.load_torch`'s
            :class:`~oba.io.DamagedFileError` or :class:`~oba.io.UnsafeCheckpointError`, which
            says what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return load_torch(path, what="checkpoint", safe_globals=tuple(allowed_globals))
    except (DamagedFileError, UnsafeCheckpointError) as err:
        raise CheckpointError(f"could not read {path} as a PyTorch checkpoint (expected {expected}): {err}") from err


def get_entry(obj: Any, key: str, *, path: str | os.PathLike, expected: str) -> Any:
    """``obj[key]`` for a checkpoint dict, or a :class:`CheckpointError` describing the layout."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected {expected}, but the file holds a {type(obj).__name__}")
    if key not in obj:
        raise CheckpointError(
            f"{path}: expected {expected}, but the dict has no key {key!r} (its keys: {_preview(obj.keys())})"
        )
    return obj[key]


def get_state_dict(
    checkpoint: Any,
    key: str,
    *,
    path: str | os.PathLike,
    expected: str,
    prefix: str = "module.",
) -> dict[str, Tensor]:
    """The state dict stored under ``checkpoint[key]``, with ``prefix`` stripped from its keys.

    Raises:
        CheckpointError: ``checkpoint`` is not a dict, lacks ``key``, or ``checkpoint[key]`` is
            not a dict of tensors.
    """
    state_dict = get_entry(checkpoint, key, path=path, expected=expected)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: expected {expected}, but {key!r} holds a {type(state_dict).__name__}")
    return strip_prefix(state_dict, prefix)


def read_state_dict(path: str | os.PathLike, *, expected: str = "a state_dict") -> dict[str, Tensor]:
    """The state dict in a checkpoint file of a common layout (``weights_only=True``): a dict of tensors itself, or
    one under ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` (e.g. :func:`oba.train.fine_tune`'s
    checkpoints), with a ``module.`` prefix (``nn.DataParallel``) stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file cannot be read, or holds none of these layouts.
    """
    obj = read_torch_file(path, expected=expected)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return strip_prefix(obj)
    for key in STATE_DICT_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return get_state_dict(obj, key, path=path, expected=expected)
    keys = f" with keys {_preview(obj.keys())}" if isinstance(obj, Mapping) else ""
    raise CheckpointError(
        f"{path}: expected {expected}: a dict of tensors, or a dict holding one under {list(STATE_DICT_KEYS)}; "
        f"the file holds a {type(obj).__name__}{keys}"
    )


def check_file_hash(path: str | os.PathLike, prefix: str) -> None:
    """Check that the SHA-256 of the file at ``path`` starts with ``prefix`` (the torch.hub convention of naming a
    published checkpoint ``<name>-<first 8 hex digits of its sha256>.<ext>``).

    Raises:
        CheckpointError: the digest differs (a different or damaged file under the published name).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise CheckpointError(
            f"{path} is not the published file of that name: its SHA-256 begins {digest.hexdigest()[:8]}, the name "
            f"says {prefix}. It is damaged or a different checkpoint: get the published file again, or load your "
            "own file by its path (oba.models.load_pretrained(name, path=...)), which skips this check"
        )


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Remove ``prefix`` (e.g. the ``module.`` left by ``nn.DataParallel``) from every key that has it."""
    return {(key.removeprefix(prefix)): value for key, value in state_dict.items()}


def state_dict_mismatches(own: Mapping[str, Tensor], state_dict: Mapping[str, Any]) -> list[str]:
    """What keeps ``state_dict`` from fitting a model whose own state dict is ``own``, one line per kind
    of problem (missing keys, unexpected keys, shape mismatches, non-tensor entries); empty if it fits."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    not_tensors = [k for k in state_dict if not isinstance(state_dict[k], Tensor)]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and k not in not_tensors and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
    if not_tensors:
        problems.append(f"entries that are not tensors: {_preview(not_tensors)}")
    return problems


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str | os.PathLike | None = None,
    expected: str | None = None,
) -> None:
    """Copy ``state_dict`` into ``model``, requiring exactly the model's keys and shapes.

    Args:
        model: the model to fill in place.
        state_dict: parameter and buffer tensors keyed like ``model.state_dict()``.
        source: where the tensors came from (a file path), for error messages (optional).
        expected: the expected checkpoint format, for error messages (optional).

    BatchNorm's ``num_batches_tracked`` counter is the one key that may be absent (checkpoints
    saved before PyTorch 0.4.1 lack it; PyTorch fills it in the same way); the model keeps its
    own value. Every other parameter and buffer must be present with the model's shape.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    for key in _batchnorm_counters(model):
        if key not in state_dict:  # checkpoints saved before PyTorch 0.4.1 lack the counter
            state_dict[key] = own[key].clone()
    problems = state_dict_mismatches(own, state_dict)
    if problems:
        where = "the state dict" if source is None else str(source)
        what = f" (expected {expected})" if expected else ""
        raise CheckpointError(f"{where} does not fit {type(model).__name__}{what}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _batchnorm_counters(model: nn.Module) -> list[str]:
    """State-dict keys of the ``num_batches_tracked`` buffers of the model's batch norms."""
    return [
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.num_batches_tracked is not None
    ]


def _preview(items: Iterable[Any]) -> str:
    """A comma-separated list of at most ``_MAX_KEYS_SHOWN`` items, noting how many were left out."""
    items = [str(item) for item in items]
    shown = ", ".join(items[:_MAX_KEYS_SHOWN])
    if len(items) > _MAX_KEYS_SHOWN:
        shown += f", ... ({len(items) - _MAX_KEYS_SHOWN} more)"
    return shown
