"""Shared pytest fixtures.

The real datasets and checkpoints are read from the data directory, resolved as in
:func:`oba.data.resolve_data_dir` (the ``OBA_DATA_DIR`` environment variable, else ``data/``).
Tests that need a file that is not there are *skipped* with the reason, never failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oba.data import resolve_data_dir

# tests/data/ holds inputs of tests (e.g. the toy notebook series of tests/test_faults.py), not tests: nbval must not
# collect its notebooks
collect_ignore_glob = ["data/*"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return resolve_data_dir()


@pytest.fixture(scope="session")
def require_data(data_dir: Path):
    """Return a function ``require_data("cifar10/x.npz") -> Path`` that skips when the file is absent."""

    def _require(relpath: str) -> Path:
        path = data_dir / relpath
        if not path.exists():
            pytest.skip(
                f"{relpath} not found in the data directory {data_dir} "
                "(set OBA_DATA_DIR to a folder holding it; see data/README.md)"
            )
        return path

    return _require


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
