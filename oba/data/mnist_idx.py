"""MNIST, read from its IDX files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .datasets import Split, TensorImageDataset, check_split
from .normalization import Normalize
from .paths import DatasetNotFoundError, PathLike, resolve_data_dir

__all__ = [
    "mnist",
    "read_idx",
]

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed or not (detected from the content)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: dims {dims} need {expected} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_mnist(data: Path, split: str) -> tuple[Path, Path] | None:
    for folder in (data / "mnist", data / "mnist" / "MNIST" / "raw", data / "MNIST" / "raw"):
        found = []
        for base in _MNIST_FILES[split]:
            hit = next((folder / (base + s) for s in ("", ".gz") if (folder / (base + s)).is_file()), None)
            found.append(hit)
        if all(found):
            return found[0], found[1]  # type: ignore[return-value]
    return None


def mnist(
    split: Split = "train",
    data_dir: PathLike | None = None,
    *,
    normalize: Normalize = "mnist",
    download: bool = False,
) -> TensorImageDataset:
    """MNIST: 60,000 train / 10,000 test digits, ``(1, 28, 28)``, labels 0-9.

    Reads the standard IDX files (``train-images-idx3-ubyte`` etc., gzipped or not) from
    ``<data_dir>/mnist/``, ``<data_dir>/mnist/MNIST/raw/`` or ``<data_dir>/MNIST/raw/`` (torchvision's
    layout). ``download=True`` lets torchvision fetch them into ``<data_dir>/mnist/MNIST/raw/``.
    """
    check_split(split, ("train", "test"))
    data = resolve_data_dir(data_dir)
    found = _find_mnist(data, split)
    if found is None and download:
        import torchvision.datasets as tvd

        tvd.MNIST(root=str(data / "mnist"), train=split == "train", download=True)
        found = _find_mnist(data, split)
    if found is None:
        names = _MNIST_FILES[split]
        folders = (data / "mnist", data / "mnist" / "MNIST" / "raw", data / "MNIST" / "raw")
        looked = [f / (n + "[.gz]") for f in folders for n in names]
        all_names = ", ".join(n for v in _MNIST_FILES.values() for n in v)
        raise DatasetNotFoundError(
            f"MNIST ({split} split)",
            looked,
            f"pass download=True when online (torchvision downloads it into {data / 'mnist' / 'MNIST' / 'raw'}), "
            f"or put the four IDX files ({all_names}; .gz or not) in {data / 'mnist'}.",
        )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"MNIST files {found} have shapes {images.shape} and {labels.shape}")
    return TensorImageDataset(
        torch.from_numpy(images.astype(np.uint8)[:, None].copy()),
        torch.from_numpy(labels.astype(np.int64)),
        [str(i) for i in range(10)],
        normalize=normalize,
        source=f"idx:{found[0].parent}",
    )
