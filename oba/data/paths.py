"""Where the data are looked for and where decoded copies are cached; the error for missing data."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_ENV_VAR",
    "DatasetNotFoundError",
    "ENV_VAR",
    "PathLike",
    "resolve_cache_dir",
    "resolve_data_dir",
]

ENV_VAR = "OBA_DATA_DIR"
CACHE_ENV_VAR = "OBA_CACHE_DIR"

_README_HINT = "See data/README.md in the oba project for the expected layout."

PathLike = str | os.PathLike
"""A file-system path: a ``str`` or an :class:`os.PathLike`."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$OBA_DATA_DIR``, else the project's ``data/``."""
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parents[2] / "data").resolve()


def _permits_writing(path: Path) -> bool:
    """Whether ``path`` (an existing directory) is writable *by its permission bits*.

    Unlike :func:`os.access` for root, a directory whose mode has no write bit for us (``chmod a-w``) counts
    as read-only, so a shared data directory marked read-only is never written into, even by root.
    """
    try:
        st = path.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not os.access(path, os.W_OK | os.X_OK):
        return False  # also covers read-only mounts
    if not hasattr(os, "geteuid"):  # pragma: no cover - Windows
        return True
    if st.st_uid == os.geteuid():
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return bool(st.st_mode & stat.S_IWGRP)
    if os.geteuid() == 0:  # root: honour the owner's write bit
        return bool(st.st_mode & stat.S_IWUSR)
    return bool(st.st_mode & stat.S_IWOTH)


def resolve_cache_dir(cache_dir: PathLike | None = None, data_dir: PathLike | None = None) -> Path:
    """The (created) directory for decoded and extracted copies of archives.

    In order: ``cache_dir`` if given, else ``$OBA_CACHE_DIR``, else ``<data_dir>/.cache`` when the data
    directory is writable (judged by its permission bits, see above), else ``$XDG_CACHE_HOME/oba`` or
    ``~/.cache/oba``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()
    data = resolve_data_dir(data_dir)
    candidate = data / ".cache"
    if candidate.is_dir():
        if _permits_writing(candidate):
            return candidate
    elif _permits_writing(data):
        try:
            candidate.mkdir(exist_ok=True)
            return candidate
        except OSError:
            pass
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    path = base / "oba"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for.

    Attributes:
        dataset: a human-readable name of what was missing.
        paths: every path that was tried, in the order tried.
        hint: how to obtain the data.
    """

    def __init__(self, dataset: str, paths: Sequence[PathLike], hint: str) -> None:
        self.dataset = dataset
        self.paths = [Path(p) for p in paths]
        self.hint = hint
        looked = "\n".join(f"  - {p}" for p in self.paths)
        super().__init__(f"{dataset} not found. Looked for:\n{looked}\nTo obtain it: {hint} {_README_HINT}")

    def __reduce__(self) -> tuple[Any, ...]:  # keep it picklable across DataLoader workers
        return (type(self), (self.dataset, self.paths, self.hint))
