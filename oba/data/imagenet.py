"""ImageNet-style ``<split>/<wnid>/*.JPEG`` folders and the Imagenette validation split."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from .archives import extract_archive
from .datasets import ImageFolderDataset
from .normalization import Normalize
from .paths import DatasetNotFoundError, PathLike, resolve_data_dir
from .transforms import imagenet_transform

__all__ = [
    "IMAGENETTE_TO_IMAGENET",
    "IMAGENETTE_WNIDS",
    "imagenet_folder",
    "imagenette_val",
]

IMAGENETTE_WNIDS: tuple[str, ...] = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)  # fmt: skip
"""The 10 Imagenette classes (WordNet ids), in sorted order: tench, English springer, cassette player,
chain saw, church, French horn, garbage truck, gas pump, golf ball, parachute."""

IMAGENETTE_TO_IMAGENET: dict[str, int] = dict(
    zip(IMAGENETTE_WNIDS, (0, 217, 482, 491, 497, 566, 569, 571, 574, 701), strict=True)
)
"""Imagenette WordNet id -> ImageNet-1k class index (standard sorted-wnid order, as torchvision's models)."""


def imagenet_folder(
    root: PathLike | None = None,
    split: str = "val",
    *,
    data_dir: PathLike | None = None,
    train: bool | None = None,
    trivial_augment: bool = False,
    normalize: Normalize = "imagenet",
    crop_size: int = 224,
    resize_size: int = 256,
    class_to_idx: Mapping[str, int] | None = None,
) -> ImageFolderDataset:
    """An ImageNet-style folder ``<root>/<split>/<wnid>/*.JPEG`` with the reference transforms.

    Args:
        root: the folder holding the splits; default ``<data_dir>/imagenet``.
        split: the sub-folder, e.g. ``"train"`` or ``"val"``.
        train: training transforms (random resized crop + flip); default: ``split == "train"``.
        trivial_augment: add ``TrivialAugmentWide`` to the training transforms.
        class_to_idx: folder name -> label; default: sorted folder names numbered from 0 (for the full
            ImageNet-1k that is the standard class index). For a subset of the classes pass the ImageNet-1k
            indices (e.g. :data:`IMAGENETTE_TO_IMAGENET`).

    Items: ``(float32 (3, crop_size, crop_size), label)``.
    """
    base = Path(root) if root is not None else resolve_data_dir(data_dir) / "imagenet"
    folder = base / split
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet-style {split!r} split",
            [folder],
            "ImageNet cannot be downloaded automatically: get ILSVRC2012 from image-net.org and lay it out as "
            f"{base}/{{train,val}}/<wnid>/*.JPEG (torchvision.datasets.ImageNet can prepare that layout from the "
            "official tars).",
        )
    transform = imagenet_transform(
        split == "train" if train is None else train,
        crop_size=crop_size,
        resize_size=resize_size,
        trivial_augment=trivial_augment,
        normalize=normalize,
    )
    return ImageFolderDataset(folder, transform, class_to_idx=class_to_idx)


def imagenette_val(
    data_dir: PathLike | None = None,
    *,
    labels: Literal["imagenet", "imagenette"] = "imagenet",
    normalize: Normalize = "imagenet",
    crop_size: int = 224,
    resize_size: int = 256,
    cache_dir: PathLike | None = None,
) -> ImageFolderDataset:
    """The Imagenette validation split (3,925 ImageNet images of 10 classes), with ImageNet eval transforms.

    Looks for ``<data_dir>/imagenette/imagenette_val.tar.gz`` (extracted once into the cache directory, see
    :func:`extract_archive`), else an extracted ``val/`` folder at ``<data_dir>/imagenette/val``,
    ``<data_dir>/imagenette/imagenette2/val`` or ``<data_dir>/imagenette/imagenette2-320/val``.

    Args:
        labels: ``"imagenet"`` labels items with ImageNet-1k indices (:data:`IMAGENETTE_TO_IMAGENET`), for
            models with 1,000 outputs; ``"imagenette"`` numbers the 10 classes 0-9 (sorted wnids).

    Items: ``(float32 (3, crop_size, crop_size), label)``; images are decoded lazily.
    """
    if labels not in ("imagenet", "imagenette"):
        raise ValueError(f"labels must be 'imagenet' or 'imagenette', not {labels!r}")
    data = resolve_data_dir(data_dir)
    archive = data / "imagenette" / "imagenette_val.tar.gz"
    folders = [data / "imagenette" / sub / "val" for sub in (".", "imagenette2", "imagenette2-320")]
    if archive.is_file():
        root = extract_archive(archive, cache_dir, data_dir=data)
        val = next((p for p in (root / "val", *root.glob("*/val")) if p.is_dir()), None)
        if val is None:
            raise ValueError(f"{archive} has no val/<wnid>/ folders (extracted to {root})")
    else:
        val = next((p for p in folders if p.is_dir()), None)
        if val is None:
            raise DatasetNotFoundError(
                "Imagenette validation split",
                [archive, *folders],
                "download imagenette2 (or imagenette2-320) from the fast.ai Imagenette project and unpack it to "
                f"{data / 'imagenette'} (it has val/<wnid>/*.JPEG), or put a tar.gz of val/<wnid>/*.JPEG at {archive}.",
            )
    mapping = IMAGENETTE_TO_IMAGENET if labels == "imagenet" else {w: i for i, w in enumerate(IMAGENETTE_WNIDS)}
    return imagenet_folder(
        val.parent,
        val.name,
        train=False,
        normalize=normalize,
        crop_size=crop_size,
        resize_size=resize_size,
        class_to_idx=mapping,
    )
