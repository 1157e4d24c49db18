"""Map-style datasets of ``(image, label)`` items, seeded indexing, and subsets."""

from __future__ import annotations

import copy
import operator
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from oba.arguments import check_whole_number

from .normalization import Normalize
from .paths import DatasetNotFoundError, PathLike
from .transforms import TensorImageTransform

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "SeededIndex",
    "SubsetDataset",
    "Split",
    "TensorImageDataset",
    "check_split",
    "natural_key",
    "subset",
]


class SeededIndex(NamedTuple):
    """A dataset key carrying the seed for that sample's random augmentation (see :func:`loader`)."""

    index: int
    seed: int


def _split_key(key: int | SeededIndex) -> tuple[int, int | None]:
    if isinstance(key, SeededIndex):
        return operator.index(key.index), int(key.seed)
    return operator.index(key), None


class TensorImageDataset(Dataset):
    """Images held in memory as one ``uint8`` tensor, transformed on access.

    Items are ``(image, label)``: ``image`` is ``float32 (C, H, W)`` (see :class:`TensorImageTransform`),
    ``label`` an ``int``. Index with an ``int`` (augmentation then draws from the global torch RNG) or with a
    :class:`SeededIndex` (deterministic).

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)`` (shared, not copied, by :meth:`with_transform`).
        targets: ``int64`` tensor ``(N,)``.
        classes: class names, ``classes[label]``.
        transform: the :class:`TensorImageTransform` applied on access.
        files: the source file of each image (relative to ``source``), when known.
        source: where the data came from (a description, for reports).
    """

    supports_seeded_index = True

    def __init__(
        self,
        images: Tensor,
        targets: Tensor | Sequence[int],
        classes: Sequence[str],
        *,
        augment: bool = False,
        normalize: Normalize = None,
        padding: int = 4,
        files: Sequence[str] | None = None,
        source: str = "",
    ) -> None:
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but targets of shape {tuple(targets.shape)}")
        if files is not None and len(files) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(files)} file names")
        self.images = images
        self.targets = targets
        self.classes = list(classes)
        self.transform = TensorImageTransform(augment, normalize, padding)
        self.files = list(files) if files is not None else None
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: int | SeededIndex) -> tuple[Tensor, int]:
        i, seed = _split_key(key)
        return self.transform(self.images[i], seed), int(self.targets[i])

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def with_transform(
        self, *, augment: bool | None = None, normalize: Normalize | Literal["keep"] = "keep"
    ) -> TensorImageDataset:
        """A shallow copy sharing the images, with augmentation and/or normalisation changed."""
        new = copy.copy(self)
        new.transform = TensorImageTransform(
            self.transform.augment if augment is None else augment,
            self.transform.normalize if normalize == "keep" else normalize,
            self.transform.padding,
        )
        return new

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, shape={tuple(self.images.shape[1:])}, classes={len(self.classes)}, "
            f"transform={self.transform!r}, source={self.source!r})"
        )


IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key ordering embedded numbers numerically (``img2`` < ``img10``)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _pil_rgb(path: PathLike) -> Any:
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """``<root>/<class>/<image>`` folders, decoded lazily with PIL (as torchvision's ``ImageFolder``).

    Items are ``(transform(PIL RGB image), label)``. Classes are the sub-folder names, sorted, numbered
    ``0..K-1`` unless ``class_to_idx`` maps folder names to other labels (e.g. ImageNet-1k indices); with a
    mapping, folders it does not name are an error. Images are listed sorted by class folder, then by
    file name (numbers compared numerically).

    Index with an ``int`` (random transforms use the global torch RNG) or a :class:`SeededIndex`
    (the transform runs under a forked RNG seeded with it: deterministic).

    Attributes:
        root, samples (``[(path, label)]``), targets (``int64 (N,)``), classes (folder names, sorted),
        class_to_idx, transform.
    """

    supports_seeded_index = True

    def __init__(
        self,
        root: PathLike,
        transform: Callable[[Any], Tensor] | None = None,
        *,
        class_to_idx: Mapping[str, int] | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root}", [self.root], "create it or point to it.")
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(folders)}
        else:
            unknown = [c for c in folders if c not in class_to_idx]
            if unknown:
                raise ValueError(f"class folders not in class_to_idx under {self.root}: {unknown[:10]}")
        self.classes = folders
        self.class_to_idx = {c: int(class_to_idx[c]) for c in folders}
        exts = tuple(e.lower() for e in extensions)
        samples: list[tuple[str, int]] = []
        for c in folders:
            names = [
                e.name
                for e in os.scandir(self.root / c)
                if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(exts)
            ]
            samples.extend((str(self.root / c / n), self.class_to_idx[c]) for n in sorted(names, key=natural_key))
        if not samples:
            raise DatasetNotFoundError(
                f"images under {self.root}", [self.root / "<class>" / "*"], "expected <root>/<class>/<image> files."
            )
        self.samples = samples
        self.targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SeededIndex) -> tuple[Any, int]:
        i, seed = _split_key(key)
        path, target = self.samples[i]
        img = _pil_rgb(path)
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    img = self.transform(img)
        return img, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)})"


class SubsetDataset(Dataset):
    """The items ``indices`` of ``dataset`` (forwards :class:`SeededIndex` keys, unlike ``torch.utils.data.Subset``).

    Attributes: ``dataset``, ``indices`` (``int64`` tensor), ``targets`` and ``classes`` when the parent has them.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.int64).flatten()
        n = len(dataset)  # type: ignore[arg-type]
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"subset indices out of range for a dataset of {n} items")
        self.dataset = dataset
        self.indices = torch.where(idx < 0, idx + n, idx)
        self._index_list = self.indices.tolist()
        self.supports_seeded_index = bool(getattr(dataset, "supports_seeded_index", False))

    def __len__(self) -> int:
        return len(self._index_list)

    def __getitem__(self, key: int | SeededIndex) -> Any:
        i, seed = _split_key(key)
        j = self._index_list[i]
        if seed is not None and self.supports_seeded_index:
            return self.dataset[SeededIndex(j, seed)]
        return self.dataset[j]

    @property
    def targets(self) -> Tensor:
        return torch.as_tensor(self.dataset.targets)[self.indices]  # type: ignore[attr-defined]

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes  # type: ignore[attr-defined]


def subset(
    dataset: Dataset,
    n: int | None = None,
    seed: int | None = 0,
    *,
    indices: Sequence[int] | Tensor | None = None,
) -> SubsetDataset:
    """A subset of ``dataset``, **in the parent's order**.

    The items are kept in increasing index order (a random draw is sorted). Datasets stored class by class (the
    JPEG CIFAR copy, ImageFolder layouts) therefore stay class-ordered: iterate such a subset with a shuffling
    loader (``oba.data.loader(..., shuffle=True)``), or take fixed scoring batches with :func:`scoring_batches`,
    never with an unshuffled loader (its batches would each hold one class).

    Args:
        n: how many items; ``None`` keeps all (with ``indices``: all of them).
        seed: ``None`` takes the first ``n`` items; an int draws ``n`` distinct items at random with that seed.
        indices: explicit indices instead (``n`` and ``seed`` are then ignored).
    """
    if indices is not None:
        return SubsetDataset(dataset, indices)
    total = len(dataset)  # type: ignore[arg-type]
    n = total if n is None else int(n)
    if not 0 <= n <= total:
        raise ValueError(f"cannot take {n} items from a dataset of {total}")
    if seed is None:
        return SubsetDataset(dataset, torch.arange(n))
    g = torch.Generator().manual_seed(int(seed))
    return SubsetDataset(dataset, torch.randperm(total, generator=g)[:n].sort().values)


class ScoringBatches(Sequence):
    """A fixed, reproducible sequence of batches drawn at random across a whole dataset (see :func:`scoring_batches`).

    Only the plan (``[num_batches, batch_size]`` indices) is stored; batch ``i`` is built from the dataset when it is
    read, identically on every read, so the sequence costs no memory for images and gives the same batches on every
    pass, to every criterion and every pruning step.
    """

    def __init__(self, dataset: Dataset, num_batches: int, batch_size: int, seed: int = 0) -> None:
        check_whole_number("num_batches", num_batches)
        check_whole_number("batch_size", batch_size)
        total = len(dataset)  # type: ignore[arg-type]
        if batch_size > total:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset ({total} items)")
        g = torch.Generator().manual_seed(int(seed))
        per_pass = total // batch_size  # batches per permutation; the rest of each is dropped (no repeats in a batch)
        passes = -(-num_batches // per_pass)
        used = per_pass * batch_size
        plan = [torch.randperm(total, generator=g)[:used].view(per_pass, batch_size) for _ in range(passes)]
        self.dataset, self.plan = dataset, torch.cat(plan)[:num_batches]

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        return tuple(default_collate([self.dataset[j] for j in self.plan[i].tolist()]))  # type: ignore[return-value]


def scoring_batches(dataset: Dataset, num_batches: int, batch_size: int, seed: int = 0) -> ScoringBatches:
    """``num_batches`` fixed batches of ``batch_size`` items of ``dataset``, drawn at random across the whole dataset
    (so across classes, whatever its storage order) with ``seed``: a :class:`ScoringBatches` sequence.

    Reuse it to score every criterion, every pruning step and every run on identical data (a shuffling loader gives
    other batches on each pass). Items within a batch are distinct; successive permutations of the dataset supply
    the batches when more are asked for than one permutation holds. Items are read without augmentation seeds
    (plain indices); batches are ``(inputs [B, ...], targets [B])`` as ``default_collate`` stacks them.

    Raises:
        ValueError: ``batch_size`` exceeds the dataset, or an argument is not a whole number >= 1.
    """
    return ScoringBatches(dataset, num_batches, batch_size, seed)


Split = Literal["train", "test"]
"""The splits of the CIFAR and MNIST datasets."""


def check_split(split: str, allowed: Sequence[str]) -> None:
    """Raise a ``ValueError`` unless ``split`` is one of ``allowed``."""
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, not {split!r}")
