"""Datasets, transforms and deterministic loaders for the ``oba`` experiments.

Every dataset function returns a map-style :class:`torch.utils.data.Dataset` whose items are
``(image, label)`` pairs: ``image`` a ``float32`` tensor of shape ``(C, H, W)`` (scaled to ``[0, 1]``
and then normalised with the requested mean/std), ``label`` a Python ``int``.

Where the files are looked for
    Everything is found relative to a *data directory* (see :func:`resolve_data_dir`: an explicit
    ``data_dir`` argument, else ``$OBA_DATA_DIR``, else the project's ``data/``). The layout, and how
    to obtain each dataset, is described in ``data/README.md``::

        <data_dir>/cifar10/cifar-10-batches-py/            torchvision's CIFAR-10 (download=True)
        <data_dir>/cifar10/cifar10-jpeg-q75.tar.gz         JPEG ImageFolder archive (train/<class>/NNNN.jpg, test/...)
        <data_dir>/cifar10/cifar10-test-lossless-first1017.npz
        <data_dir>/cifar100/cifar-100-python/              torchvision's CIFAR-100 (download=True)
        <data_dir>/mnist/*-idx?-ubyte[.gz]                 MNIST IDX files (or mnist/MNIST/raw/, torchvision's layout)
        <data_dir>/imagenette/imagenette_val.tar.gz        Imagenette validation split (val/<wnid>/*.JPEG)
        <data_dir>/imagenet/{train,val}/<wnid>/*.JPEG      ImageNet-1k in ImageFolder layout

Caching
    Archives are never modified or extracted next to the data (the data directory may be read-only).
    Small-image archives (CIFAR JPEGs) are decoded once, straight from the tar, and the decoded ``uint8``
    arrays are cached as an ``.npz`` file (loaded with ``allow_pickle=False``); large-image archives
    (Imagenette) are extracted once. Both live in the cache directory (:func:`resolve_cache_dir`), are
    written atomically (:func:`oba.io.atomic_write`; a temporary folder, then :func:`os.rename`) and are
    keyed by the source's name, size and modification time, so a changed archive is decoded again. A
    truncated or corrupt archive raises :class:`oba.io.DamagedFileError` naming it.

Determinism
    :func:`loader` builds a :class:`~torch.utils.data.DataLoader` driven by one seeded
    :class:`torch.Generator`. For the datasets defined here it also draws one seed per sample and passes
    it to the dataset (:class:`SeededIndex`), so random augmentation depends only on the loader's seed and
    the epoch -- not on the global RNG, nor on ``num_workers``. Saving and restoring
    ``loader.generator.get_state()`` (as :func:`oba.train.fine_tune` does) resumes the exact stream.
    :func:`scoring_batches` draws a fixed sequence of batches across the whole dataset (whatever its storage order:
    the CIFAR JPEG copy is stored class by class, and :func:`subset` keeps the parent's order), to score every
    criterion and step on the same data.
    :func:`distributed_loader` gives each process of a :mod:`torch.distributed` group its part of the data
    (:class:`DistributedSeededSampler`; the same per-sample seeds whatever the number of processes).

Modules
    :mod:`~oba.data.paths` (data and cache directories, :class:`DatasetNotFoundError`),
    :mod:`~oba.data.normalization` (the ``(mean, std)`` constants and presets),
    :mod:`~oba.data.transforms`, :mod:`~oba.data.datasets`, :mod:`~oba.data.loading`,
    :mod:`~oba.data.archives` (decode-once caches, extraction), and one module per source:
    :mod:`~oba.data.cifar`, :mod:`~oba.data.mnist_idx`, :mod:`~oba.data.imagenet`,
    :mod:`~oba.data.synthetic_data`. Everything public is re-exported here.
"""

from __future__ import annotations

from .archives import DecodedSplit, decode_image_folder, extract_archive
from .cifar import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    cifar10,
    cifar10_lossless_test,
    cifar10_original_labels,
    cifar100,
    original_order,
)
from .datasets import (
    ImageFolderDataset,
    ScoringBatches,
    SeededIndex,
    SubsetDataset,
    TensorImageDataset,
    scoring_batches,
    subset,
)
from .imagenet import IMAGENETTE_TO_IMAGENET, IMAGENETTE_WNIDS, imagenet_folder, imagenette_val
from .loading import DistributedSeededSampler, SeededSampler, distributed_loader, loader
from .mnist_idx import mnist, read_idx
from .normalization import NORMALIZATION, resolve_normalization
from .paths import CACHE_ENV_VAR, ENV_VAR, DatasetNotFoundError, resolve_cache_dir, resolve_data_dir
from .synthetic_data import synthetic
from .transforms import TensorImageTransform, imagenet_transform, random_crop_flip

__all__ = [
    "CACHE_ENV_VAR",
    "CIFAR100_CLASSES",
    "CIFAR10_CLASSES",
    "DatasetNotFoundError",
    "DecodedSplit",
    "DistributedSeededSampler",
    "ENV_VAR",
    "IMAGENETTE_TO_IMAGENET",
    "IMAGENETTE_WNIDS",
    "ImageFolderDataset",
    "NORMALIZATION",
    "SeededIndex",
    "SeededSampler",
    "SubsetDataset",
    "TensorImageDataset",
    "TensorImageTransform",
    "cifar10",
    "cifar100",
    "cifar10_lossless_test",
    "cifar10_original_labels",
    "decode_image_folder",
    "distributed_loader",
    "extract_archive",
    "imagenet_folder",
    "imagenet_transform",
    "imagenette_val",
    "loader",
    "mnist",
    "original_order",
    "random_crop_flip",
    "read_idx",
    "resolve_cache_dir",
    "resolve_data_dir",
    "resolve_normalization",
    "ScoringBatches",
    "scoring_batches",
    "subset",
    "synthetic",
]
