"""Datasets for the `oba` experiments (placeholder: resolve_data_dir only; the rest is being written)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "OBA_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$OBA_DATA_DIR``, else the project's ``data/``."""
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parents[1] / "data").resolve()
