"""Crash-safe file IO: atomic writes, append-only JSONL logs, and safe loading of ``torch.save`` files.

What it guarantees:

* :func:`atomic_write` (and :func:`save_torch`, :func:`write_json` built on it): ``path`` holds either its
  previous contents or the complete new ones, never a partial file, even when the process is killed or the
  disk fills up mid-write. The data go to a temporary file in the same directory, which is flushed,
  ``fsync``-ed and then renamed onto ``path`` with :func:`os.replace` (atomic on POSIX and Windows); the
  directory is ``fsync``-ed afterwards (best effort) so that the rename survives a power cut. On any exception
  (``KeyboardInterrupt`` included) the temporary file is removed and ``path`` is left untouched. Missing
  parent directories are created. The file gets mode ``0o644``.
* :func:`append_jsonl` / :func:`read_jsonl`: one JSON record per line, each appended with a flush and an
  ``fsync``. A kill mid-append can only leave a torn *last* line (no newline after it): :func:`read_jsonl`
  ignores it, and the next :func:`append_jsonl` cuts it off first, so a new record never glues onto it. A
  line that does not parse anywhere else means the file was damaged otherwise, and reading it raises
  :class:`DamagedFileError`. Appends assume one writer at a time.
* :func:`load_torch`: always ``torch.load(..., weights_only=True)``, so no code in the file runs. Failures are
  explained: :class:`UnsafeCheckpointError` (the file pickles an object that weights-only loading refuses; the
  message names the blocked global and the safe ways out -- it never suggests ``weights_only`` off),
  :class:`DamagedFileError` (truncated or corrupt), :class:`FileNotFoundError` (no such file). Every message
  names the file.

Both error classes derive from :class:`ValueError` -- what is wrong is the file's *contents* (as for
:class:`json.JSONDecodeError`), not the reading itself -- so code that treats a bad file as a ``ValueError``
keeps working. Genuine I/O errors (permissions, a directory instead of a file, ...) propagate as the
:class:`OSError` they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "DamagedFileError",
    "UnsafeCheckpointError",
    "append_jsonl",
    "atomic_write",
    "load_torch",
    "plain_json",
    "read_jsonl",
    "save_torch",
    "write_json",
]

PathLike = str | os.PathLike


class DamagedFileError(ValueError):
    """A file is truncated or corrupt (e.g. a process was killed while writing it): it cannot be read."""


class UnsafeCheckpointError(ValueError):
    """A ``torch.save`` file pickles objects that ``torch.load(weights_only=True)`` refuses to rebuild."""


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def atomic_write(path: PathLike, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file, then move it onto ``path`` atomically (module docstring).

    Args:
        path: the file to create or replace; missing parent directories are created.
        write: writes the whole contents to the open file it is given (it need not flush or close it).
        mode: ``"wb"`` (binary) or ``"w"`` (text, UTF-8).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            f = os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        except BaseException:
            os.close(fd)
            raise
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and caches may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; silently skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Write ``json.dumps(obj, **json_kwargs)`` to ``path`` atomically, as UTF-8 text (no trailing newline)."""
    text = json.dumps(obj, **json_kwargs)  # serialise first: a TypeError leaves no trace at all
    atomic_write(path, lambda f: f.write(text), mode="w")


# --------------------------------------------------------------------------------------------------
# JSONL logs
# --------------------------------------------------------------------------------------------------


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot write a {type(x).__module__}.{type(x).__qualname__} to JSON")


def plain_json(obj: Any) -> Any:
    """``obj`` as the plain JSON values a file would give back: ``json.loads(json.dumps(obj))``, tensors as lists."""
    return json.loads(json.dumps(obj, default=_json_default))


def _is_record(line: bytes) -> bool:
    """Whether ``line`` is one complete JSON value (a torn line never is: its closing bracket is missing)."""
    try:
        json.loads(line.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError (a character cut in two)
        return False
    return True


def append_jsonl(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing), with a flush and an ``fsync``.

    Tensors are written as (nested) lists and tuples as lists; any other value JSON cannot hold raises
    :class:`TypeError` naming its type, before the file is touched. If the file does not end with a newline,
    its last line was torn by a kill mid-write: that fragment is cut off first (a last line that is complete
    JSON and only lacks its newline gets the newline instead), so the new record starts on a line of its own.
    """
    line = (json.dumps(dict(record), default=_json_default) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:  # O_APPEND: every write goes to the end, whatever the position
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                _repair_torn_tail(f, size)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _repair_torn_tail(f: IO[bytes], size: int) -> None:
    """Cut the file back to just after its last newline -- unless the tail is a whole record (add a newline)."""
    end, chunk = size, 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    else:
        keep = 0
    f.seek(keep)
    if _is_record(f.read(size - keep)):
        f.write(b"\n")
    else:
        f.truncate(keep)


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file, in order; blank lines are skipped.

    A torn last line -- no newline after it and not valid JSON, as a kill mid-:func:`append_jsonl` leaves it --
    is ignored. A line that is not valid JSON anywhere else raises :class:`DamagedFileError` (a
    :class:`ValueError`) naming the file and the line number.
    """
    lines = Path(path).read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except ValueError as err:
            if number == len(lines):  # no newline after it: a torn write
                break
            raise DamagedFileError(
                f"{path} is damaged: line {number} is not valid JSON ({err}). Only a torn last line is expected "
                "(a kill mid-write); this one has lines after it, so the file was changed otherwise. Fix or "
                "remove that line, or delete the file to start afresh."
            ) from None
    return records


# --------------------------------------------------------------------------------------------------
# Safe torch.load
# --------------------------------------------------------------------------------------------------

_DAMAGE_ERRORS = (
    EOFError,
    zipfile.BadZipFile,
    struct.error,
    KeyError,
    IndexError,
    ValueError,  # UnicodeDecodeError among them
    TypeError,
    AttributeError,
)
_DAMAGED_RUNTIME = re.compile(r"PytorchStreamReader|corrupt|truncat|magic number|zip archive|central directory|EOF")
_DAMAGED_PICKLE = re.compile(r"Unsupported operand|String is too long|corrupt|truncat|invalid load key|persistent")
_BLOCKED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_torch(
    path: PathLike,
    *,
    what: str = "checkpoint",
    safe_globals: Sequence[Any] = (),
    map_location: Any = "cpu",
) -> Any:
    """``torch.load(path, map_location=map_location, weights_only=True)`` with clear errors.

    Args:
        what: what the file is, for the messages (e.g. ``"fine_tune checkpoint"``).
        safe_globals: the exact classes or functions the file may reference besides tensors and plain
            containers (passed to :func:`torch.serialization.safe_globals`); only for trusted files of a known
            format. Keep it minimal.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        UnsafeCheckpointError: the file pickles an object weights-only loading refuses (the message names the
            blocked global and says how to proceed safely).
        DamagedFileError: the file is truncated or corrupt (or not a ``torch.save`` file at all).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the {what} {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"the {what} {path} is a directory: pass the path of the file inside it")
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            detail = _torch_detail(err)
            if _BLOCKED_GLOBAL.search(detail) or not _DAMAGED_PICKLE.search(detail):
                raise UnsafeCheckpointError(_unsafe_message(path, what, detail)) from None
            raise DamagedFileError(_damaged_message(path, what, detail)) from err
        except RuntimeError as err:
            if not _DAMAGED_RUNTIME.search(str(err)):
                raise
            raise DamagedFileError(_damaged_message(path, what, _torch_detail(err))) from err
        except OSError as err:
            if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
                raise
            raise DamagedFileError(_damaged_message(path, what, _torch_detail(err))) from err
        except _DAMAGE_ERRORS as err:
            raise DamagedFileError(_damaged_message(path, what, _torch_detail(err))) from err


def _unsafe_message(path: Path, what: str, detail: str) -> str:
    found = _BLOCKED_GLOBAL.search(detail)
    blocked = f"Unsupported global `{found.group(1)}`" if found else "an object it may not rebuild"
    return (
        f"refused to load the {what} {path}: {blocked} ({detail}). The file holds pickled Python objects, "
        "not just tensors, and torch.load(weights_only=True) refuses them because unpickling them could run "
        "arbitrary code. The safe way out: re-save it as a plain state_dict of tensors (where it was made, e.g. "
        "torch.save(model.state_dict(), path)); or, if you trust the file and it is a known format, allowlist "
        "exactly those classes with torch.serialization.safe_globals([...]) (the safe_globals argument of "
        "oba.io.load_torch)."
    )


def _damaged_message(path: Path, what: str, detail: str) -> str:
    return (
        f"cannot read the {what} {path}: the file is damaged (truncated or corrupt), or is not a torch.save file "
        f"({detail}). A file cut short like this was typically being written when something other than oba "
        "killed the writer, or was copied or downloaded incompletely (oba's own writes are atomic: whole or "
        "absent). Delete it to restart, or get it again."
    )


def _torch_detail(err: BaseException) -> str:
    """The informative part of a ``torch.load`` error, without PyTorch's advice to switch weights-only off."""
    message = _ANSI.sub("", str(err))
    marker = "WeightsUnpickler error:"
    if marker in message:
        message = message.split(marker, 1)[1]
    message = message.split("Check the documentation of torch.load", 1)[0]
    lines = [" ".join(line.split()) for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith("Weights only load failed")]
    sentences = re.split(r"(?<=\.)\s+", " ".join(kept))
    # PyTorch's advice: weights_only=False (never: it would run the file's code) or add_safe_globals (we say when)
    sentences = [s for s in sentences if s and "weights_only" not in s and not s.startswith("Please use")]
    text = " ".join(sentences[:2]).rstrip(".")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
