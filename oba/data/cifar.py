"""CIFAR-10 and CIFAR-100 (torchvision's files or a JPEG ImageFolder copy), and the lossless CIFAR-10 subset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .archives import decode_image_folder
from .datasets import Split, TensorImageDataset, check_split
from .normalization import Normalize
from .paths import DatasetNotFoundError, PathLike, resolve_data_dir

__all__ = [
    "CIFAR100_CLASSES",
    "CIFAR10_CLASSES",
    "cifar10",
    "cifar100",
    "cifar10_lossless_test",
    "cifar10_original_labels",
    "original_order",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
"""The CIFAR-10 class names in the standard label order (label ``i`` is ``CIFAR10_CLASSES[i]``)."""

CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
"""The 100 CIFAR-100 fine-label names in the standard label order."""

_CIFAR = {
    "cifar10": dict(
        title="CIFAR-10", classes=CIFAR10_CLASSES, tv_class="CIFAR10", tv_folder="cifar-10-batches-py",
        archive="cifar10-jpeg-q75.tar.gz", folder="cifar10-jpeg-q75",
    ),
    "cifar100": dict(
        title="CIFAR-100", classes=CIFAR100_CLASSES, tv_class="CIFAR100", tv_folder="cifar-100-python",
        archive="cifar100-jpeg-q75.tar.gz", folder="cifar100-jpeg-q75",
    ),
}  # fmt: skip


def _cifar_from_torchvision(name: str, split: str, root: Path, download: bool) -> tuple[Tensor, Tensor, str]:
    import torchvision.datasets as tvd

    spec = _CIFAR[name]
    cls = getattr(tvd, spec["tv_class"])
    ds = cls(root=str(root), train=split == "train", download=download)
    if list(ds.classes) != list(spec["classes"]):
        raise ValueError(f"torchvision's {spec['title']} classes {ds.classes[:5]}... differ from the standard order")
    images = torch.from_numpy(np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2)))
    return images, torch.as_tensor(ds.targets, dtype=torch.int64), f"torchvision:{root / spec['tv_folder']}"


def _cifar_from_jpeg(
    name: str, split: str, source: Path, cache_dir: PathLike | None, data_dir: Path, progress: bool
) -> tuple[Tensor, Tensor, list[str], str]:
    spec = _CIFAR[name]
    decoded = decode_image_folder(source, ("train", "test"), cache_dir=cache_dir, data_dir=data_dir, progress=progress)
    if split not in decoded:
        raise DatasetNotFoundError(
            f"{spec['title']} {split} split",
            [source / split],
            f"the archive/folder {source} has no {split}/<class>/ images.",
        )
    part = decoded[split]
    standard = {c: i for i, c in enumerate(spec["classes"])}
    if set(part.classes) != set(standard):
        missing = sorted(set(standard) - set(part.classes))
        extra = sorted(set(part.classes) - set(standard))
        raise ValueError(
            f"{source}: the {split} class folders are not the {spec['title']} classes "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    lut = torch.tensor([standard[c] for c in part.classes], dtype=torch.int64)
    targets = lut[torch.from_numpy(part.folder_index)]
    # Class-major in the standard label order, files in numeric order within each class (a stable sort;
    # a no-op for CIFAR, whose folder names sort alphabetically in label order).
    order = torch.argsort(targets, stable=True)
    images = torch.from_numpy(part.images)
    files = list(part.files)
    if not torch.equal(order, torch.arange(len(order))):
        images, targets, files = images[order], targets[order], [files[i] for i in order.tolist()]
    return images, targets, files, f"jpeg:{source}"


def _cifar(
    name: str,
    split: str,
    data_dir: PathLike | None,
    *,
    source: str,
    augment: bool,
    normalize: Normalize,
    download: bool,
    jpeg_path: PathLike | None,
    cache_dir: PathLike | None,
    progress: bool,
) -> TensorImageDataset:
    check_split(split, ("train", "test"))
    if source not in ("auto", "torchvision", "jpeg"):
        raise ValueError(f"source must be 'auto', 'torchvision' or 'jpeg', not {source!r}")
    spec = _CIFAR[name]
    data = resolve_data_dir(data_dir)
    root = data / name
    tv_dir = root / spec["tv_folder"]
    jpeg_candidates = [Path(jpeg_path)] if jpeg_path is not None else [root / spec["archive"], root / spec["folder"]]
    jpeg_found = next((p for p in jpeg_candidates if p.exists()), None)

    use_tv = source == "torchvision" or (source == "auto" and (tv_dir.is_dir() or (download and jpeg_found is None)))
    files: list[str] | None = None
    if use_tv:
        if not tv_dir.is_dir() and not download:
            raise DatasetNotFoundError(
                f"{spec['title']} ({split} split, torchvision format)",
                [tv_dir],
                f"pass download=True when online (torchvision downloads it into {root}).",
            )
        try:
            images, targets, where = _cifar_from_torchvision(name, split, root, download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise DatasetNotFoundError(
                f"{spec['title']} ({split} split, torchvision format; {exc})",
                [tv_dir],
                f"pass download=True when online (torchvision downloads it into {root}).",
            ) from exc
    else:
        if jpeg_found is None:
            looked = ([] if source == "jpeg" else [tv_dir]) + jpeg_candidates
            raise DatasetNotFoundError(
                f"{spec['title']} ({split} split)",
                looked,
                f"pass download=True when online (torchvision downloads it into {root}), or put the JPEG "
                f"ImageFolder archive at {root / spec['archive']} (train/<class>/*.jpg, test/<class>/*.jpg).",
            )
        images, targets, files, where = _cifar_from_jpeg(name, split, jpeg_found, cache_dir, data, progress)
    return TensorImageDataset(
        images, targets, spec["classes"], augment=augment, normalize=normalize, padding=4, files=files, source=where
    )


def cifar10(
    split: Split = "train",
    data_dir: PathLike | None = None,
    *,
    source: Literal["auto", "torchvision", "jpeg"] = "auto",
    augment: bool = False,
    normalize: Normalize = "imagenet",
    download: bool = False,
    jpeg_path: PathLike | None = None,
    cache_dir: PathLike | None = None,
    progress: bool = True,
) -> TensorImageDataset:
    """CIFAR-10: 50,000 train / 10,000 test images, ``(3, 32, 32)``, labels in :data:`CIFAR10_CLASSES` order.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: see :func:`resolve_data_dir`; files are looked for under ``<data_dir>/cifar10/``.
        source: ``"torchvision"`` (the original, lossless ``cifar-10-batches-py``; downloaded with
            ``download=True``), ``"jpeg"`` (an ImageFolder archive or folder, ``train/<class>/*``,
            ``test/<class>/*``; by default ``cifar10-jpeg-q75.tar.gz`` or the folder ``cifar10-jpeg-q75/``),
            or ``"auto"``: torchvision's files if present, else the JPEG copy, else a download if allowed.
        augment: random crop 32 with padding 4 + horizontal flip (applied whatever the split).
        normalize: see :data:`Normalize`; ``"imagenet"`` suits the pretrained ResNet-20/32 checkpoints.
        download: let torchvision download the original dataset into ``<data_dir>/cifar10``.
        jpeg_path: an explicit JPEG archive or folder (implies the JPEG route under ``"auto"``).
        cache_dir: where decoded JPEGs are cached (see :func:`resolve_cache_dir`).
        progress: show a progress bar while decoding.

    Order: torchvision's data is in the original order. The JPEG copy is class-major (label order), files
    in numeric order within each class -- for ``cifar10-jpeg-q75`` that is the original order within each
    class, so :func:`original_order` with :func:`cifar10_original_labels` restores the original order.
    Note that the JPEG copy is lossy (see data/README.md).

    Raises:
        DatasetNotFoundError: the data is not there (the message lists the paths tried and how to get it).
    """
    if jpeg_path is not None and source == "auto":
        source = "jpeg"
    return _cifar(
        "cifar10", split, data_dir, source=source, augment=augment, normalize=normalize, download=download,
        jpeg_path=jpeg_path, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip


def cifar100(
    split: Split = "train",
    data_dir: PathLike | None = None,
    *,
    source: Literal["auto", "torchvision", "jpeg"] = "auto",
    augment: bool = False,
    normalize: Normalize = "cifar100",
    download: bool = False,
    jpeg_path: PathLike | None = None,
    cache_dir: PathLike | None = None,
    progress: bool = True,
) -> TensorImageDataset:
    """CIFAR-100 (fine labels): 50,000 train / 10,000 test images, ``(3, 32, 32)``, :data:`CIFAR100_CLASSES`.

    Same arguments and sources as :func:`cifar10`, under ``<data_dir>/cifar100/`` (torchvision's
    ``cifar-100-python``, or ``cifar100-jpeg-q75.tar.gz`` / ``cifar100-jpeg-q75/`` in ImageFolder layout
    with the fine-label names as folder names).
    """
    if jpeg_path is not None and source == "auto":
        source = "jpeg"
    return _cifar(
        "cifar100", split, data_dir, source=source, augment=augment, normalize=normalize, download=download,
        jpeg_path=jpeg_path, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip


_LOSSLESS_TEST = "cifar10/cifar10-test-lossless-first1017.npz"
_TRAIN_LABELS = "cifar10/cifar10-train-labels-lossless-prefixes.npz"


def _load_npz(path: Path, what: str, hint: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetNotFoundError(what, [path], hint)
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def cifar10_lossless_test(data_dir: PathLike | None = None, *, normalize: Normalize = "imagenet") -> TensorImageDataset:
    """The first 1,017 images of the original CIFAR-10 test set, bit-exact.

    Read from ``<data_dir>/cifar10/cifar10-test-lossless-first1017.npz`` (``x`` uint8 ``(1017, 32, 32, 3)``, ``y``).

    ``(3, 32, 32)`` images, labels in :data:`CIFAR10_CLASSES` order; they equal items ``0..1016`` of
    ``cifar10("test", source="torchvision")``. Accuracies on it are comparable with published figures.
    """
    path = resolve_data_dir(data_dir) / _LOSSLESS_TEST
    z = _load_npz(
        path,
        "the lossless CIFAR-10 test subset",
        "it is part of the project's shared data (x: uint8 (1017,32,32,3), y: (1017,)); with the original "
        "dataset available use cifar10('test', source='torchvision', download=True) and "
        "subset(ds, 1017, seed=None) instead.",
    )
    x = z["x"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{path}: expected x uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return TensorImageDataset(
        images, torch.from_numpy(z["y"].astype(np.int64)), CIFAR10_CLASSES, normalize=normalize, source=f"npz:{path}"
    )


def cifar10_original_labels(split: Split = "test", data_dir: PathLike | None = None) -> Tensor:
    """All CIFAR-10 labels of ``split`` in the original order (``int64``; 50,000 or 10,000).

    Read from the shared data's label files (``cifar10-test-lossless-first1017.npz``'s ``all_labels``,
    ``cifar10-train-labels-lossless-prefixes.npz``'s ``labels``), or from torchvision's copy if present.
    """
    check_split(split, ("train", "test"))
    data = resolve_data_dir(data_dir)
    npz, key = (data / _LOSSLESS_TEST, "all_labels") if split == "test" else (data / _TRAIN_LABELS, "labels")
    if npz.is_file():
        return torch.from_numpy(_load_npz(npz, "", "")[key].astype(np.int64))
    tv_dir = data / "cifar10" / "cifar-10-batches-py"
    if tv_dir.is_dir():
        return _cifar_from_torchvision("cifar10", split, data / "cifar10", False)[1]
    raise DatasetNotFoundError(
        f"CIFAR-10 {split} labels in original order",
        [npz, tv_dir],
        "download CIFAR-10 with cifar10(..., download=True).",
    )


def original_order(original_labels: Sequence[int] | Tensor) -> Tensor:
    """Indices that put a class-major copy of a dataset back into its original order.

    For a copy sorted by label, with images in original order within each label (as the JPEG CIFAR-10
    folders are), ``copy[idx[i]]`` is original image ``i``, where ``idx = original_order(original_labels)``.
    Use ``subset(copy, indices=idx)`` for an originally ordered view.
    """
    labels = torch.as_tensor(original_labels, dtype=torch.int64)
    order = torch.argsort(labels, stable=True)  # class-major position -> original index
    idx = torch.empty_like(order)
    idx[order] = torch.arange(len(order))
    return idx
