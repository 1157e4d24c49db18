"""Tests for oba.data: directories, synthetic data, transforms, loaders, caches, and the real datasets.

The real-data tests skip when a file is missing (``require_data``). The full CIFAR-10 JPEG archive is decoded
once into the default cache directory (about half a minute); later runs load the cache in well under a second.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oba import data as D
from oba.data import archives
from oba.data import normalization as norm
from oba.io import DamagedFileError

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _jpeg_bytes(arr: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _make_tar(path: Path, files: dict[str, bytes], mtime: int = 1_600_000_000) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        dirs = sorted({str(Path(n).parent) for n in files} | {str(Path(n).parent.parent) for n in files})
        for d in dirs:
            if d not in (".", ""):
                info = tarfile.TarInfo(d)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mtime = mtime
            tar.addfile(info, io.BytesIO(blob))
    return path


def _flat_images(rng: np.random.Generator, n: int, size: int = 8) -> list[np.ndarray]:
    """Images of one flat colour each (survive JPEG almost exactly, so the decoded order can be checked)."""
    colours = rng.choice(np.arange(16, 240, 8), size=(n, 3), replace=True)
    return [np.broadcast_to(c.astype(np.uint8), (size, size, 3)).copy() for c in colours]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean()
    return float(10 * torch.log10(255.0**2 / mse))


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


# --------------------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------------------


def test_resolve_data_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    default = (Path(D.__file__).resolve().parents[2] / "data").resolve()
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    assert D.resolve_data_dir() == default
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    assert D.resolve_data_dir() == (tmp_path / "env").resolve()
    assert D.resolve_data_dir(tmp_path / "param") == (tmp_path / "param").resolve()
    monkeypatch.setenv(D.ENV_VAR, "")  # empty means unset
    assert D.resolve_data_dir() == default


def test_resolve_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(D.CACHE_ENV_VAR, raising=False)
    # a writable data directory: <data>/.cache
    assert D.resolve_cache_dir(data_dir=data) == data / ".cache"
    # the environment variable wins over it, the parameter over both
    monkeypatch.setenv(D.CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert D.resolve_cache_dir(data_dir=data) == (tmp_path / "env-cache").resolve()
    assert D.resolve_cache_dir(tmp_path / "param-cache", data_dir=data) == (tmp_path / "param-cache").resolve()
    assert (tmp_path / "param-cache").is_dir()
    monkeypatch.delenv(D.CACHE_ENV_VAR)
    # a data directory without write permission (honoured even for root) or a missing one: the user cache
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        assert D.resolve_cache_dir(data_dir=ro) == (tmp_path / "xdg" / "oba").resolve()
        assert not (ro / ".cache").exists()
    finally:
        ro.chmod(0o755)
    assert D.resolve_cache_dir(data_dir=tmp_path / "missing") == (tmp_path / "xdg" / "oba").resolve()


# --------------------------------------------------------------------------------------------------
# synthetic data, normalisation, augmentation, loaders
# --------------------------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism() -> None:
    ds = D.synthetic(50, shape=(3, 16, 12), num_classes=5, seed=7)
    assert len(ds) == 50 and ds.images.shape == (50, 3, 16, 12) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.targets).tolist() == [10] * 5 and ds.classes == [f"class{i}" for i in range(5)]
    x, y = ds[3]
    assert x.shape == (3, 16, 12) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0  # normalize=None: only scaled
    again = D.synthetic(50, shape=(3, 16, 12), num_classes=5, seed=7)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.targets, again.targets)
    assert not torch.equal(ds.images, D.synthetic(50, shape=(3, 16, 12), num_classes=5, seed=8).images)
    gray = D.synthetic(4, shape=(1, 28, 28), normalize="mnist")
    assert gray[0][0].shape == (1, 28, 28)


def test_normalization_presets_and_custom() -> None:
    assert D.resolve_normalization("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert D.resolve_normalization("mnist") == ((0.1307,), (0.3081,))
    assert D.resolve_normalization(None) is None
    assert D.resolve_normalization(([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="unknown normalisation preset"):
        D.resolve_normalization("cifar11")
    with pytest.raises(ValueError):
        D.resolve_normalization(([0.5], [0.0]))
    ds = D.synthetic(2, shape=(3, 4, 4))
    raw = ds.images[0].float() / 255
    mean, std = torch.tensor(D.NORMALIZATION["cifar10"][0]), torch.tensor(D.NORMALIZATION["cifar10"][1])
    expected = (raw - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert torch.allclose(ds.with_transform(normalize="cifar10")[0][0], expected, atol=1e-6)
    assert torch.allclose(ds.with_transform(normalize=((0.5,) * 3, (0.5,) * 3))[0][0], (raw - 0.5) / 0.5, atol=1e-6)
    assert ds.with_transform(normalize="cifar10").images is ds.images  # shares the data


def test_random_crop_flip_matches_reference_and_is_deterministic() -> None:
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    padded = F.pad(img, (4, 4, 4, 4))
    seen = set()
    for seed in range(400):
        out = D.random_crop_flip(img, 4, seed)
        assert out.shape == img.shape and out.dtype == torch.uint8
        assert torch.equal(out, D.random_crop_flip(img, 4, seed))
        # it must be one of the 9 x 9 x 2 crops of the zero-padded image
        match = None
        for dy in range(9):
            for dx in range(9):
                crop = padded[:, dy : dy + 32, dx : dx + 32]
                for flip in (False, True):
                    if torch.equal(out, crop.flip(-1) if flip else crop):
                        match = (dy, dx, flip)
                        break
                if match:
                    break
            if match:
                break
        assert match is not None
        seen.add(match)
    assert len(seen) > 100  # well spread over the 162 possibilities
    # without a seed: the global RNG (reproducible with torch.manual_seed)
    torch.manual_seed(3)
    a = D.random_crop_flip(img)
    torch.manual_seed(3)
    assert torch.equal(a, D.random_crop_flip(img))


def test_augmented_dataset_keeps_shape_and_is_seeded() -> None:
    ds = D.synthetic(8, augment=True, normalize="cifar10")
    x1, y1 = ds[D.SeededIndex(2, 123)]
    x2, y2 = ds[D.SeededIndex(2, 123)]
    assert x1.shape == (3, 32, 32) and x1.dtype == torch.float32 and y1 == y2 == int(ds.targets[2])
    assert torch.equal(x1, x2)
    others = [ds[D.SeededIndex(2, s)][0] for s in range(1, 8)]
    assert any(not torch.equal(x1, o) for o in others)
    plain = ds.with_transform(augment=False)
    assert torch.equal(plain[D.SeededIndex(2, 123)][0], plain[2][0])  # no augmentation: seed irrelevant


def test_loader_is_deterministic_and_independent_of_workers_and_global_rng() -> None:
    ds = D.synthetic(40, shape=(3, 8, 8), num_classes=4, augment=True)

    def batches(seed: int, workers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x, y) for x, y in D.loader(ds, 16, shuffle=True, seed=seed, num_workers=workers)]

    torch.manual_seed(1)
    a = batches(5)
    torch.manual_seed(2)
    b = batches(5)
    assert [x.shape[0] for x, _ in a] == [16, 16, 8]
    assert a[0][0].dtype == torch.float32 and a[0][1].dtype == torch.int64
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = batches(6)
    assert not torch.equal(a[0][1], c[0][1]) or not torch.equal(a[0][0], c[0][0])
    w = batches(5, workers=1)
    for (xa, ya), (xw, yw) in zip(a, w, strict=True):
        assert torch.equal(xa, xw) and torch.equal(ya, yw)
    # successive epochs differ, and the same seed replays them
    dl1, dl2 = D.loader(ds, 40, shuffle=True, seed=5), D.loader(ds, 40, shuffle=True, seed=5)
    e1, e2 = next(iter(dl1)), next(iter(dl1))
    assert not torch.equal(e1[0], e2[0])
    assert torch.equal(next(iter(dl2))[0], e1[0]) and torch.equal(next(iter(dl2))[0], e2[0])
    # without shuffling the order is the dataset's
    ordered = next(iter(D.loader(ds.with_transform(augment=False), 40)))
    assert torch.equal(ordered[1], ds.targets)


def test_subset() -> None:
    ds = D.synthetic(30, shape=(1, 4, 4), num_classes=3)
    first = D.subset(ds, 5, seed=None)
    assert first.indices.tolist() == [0, 1, 2, 3, 4] and torch.equal(first.targets, ds.targets[:5])
    rand = D.subset(ds, 10, seed=1)
    assert len(rand) == 10 and rand.indices.tolist() == sorted(set(rand.indices.tolist()))
    assert torch.equal(rand.indices, D.subset(ds, 10, seed=1).indices)
    assert not torch.equal(rand.indices, D.subset(ds, 10, seed=2).indices)
    explicit = D.subset(ds, indices=[4, 2, -1])
    assert explicit.indices.tolist() == [4, 2, 29] and torch.equal(explicit[1][0], ds[2][0])
    assert explicit.classes == ds.classes
    with pytest.raises(ValueError):
        D.subset(ds, 31)
    aug = D.subset(D.synthetic(10, augment=True), 4, seed=0)
    key = D.SeededIndex(1, 99)
    assert torch.equal(aug[key][0], aug.dataset[D.SeededIndex(int(aug.indices[1]), 99)][0])


# --------------------------------------------------------------------------------------------------
# errors for missing data
# --------------------------------------------------------------------------------------------------


def test_missing_datasets_raise_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (lambda: D.cifar10("train", empty), empty / "cifar10" / "cifar10-jpeg-q75.tar.gz", "download=True"),
        (
            lambda: D.cifar10("test", empty, source="torchvision"),
            empty / "cifar10" / "cifar-10-batches-py",
            "download=True",
        ),
        (lambda: D.cifar100("test", empty), empty / "cifar100" / "cifar-100-python", "download=True"),
        (lambda: D.mnist("train", empty), empty / "mnist", "download=True"),
        (lambda: D.cifar10_lossless_test(empty), empty / "cifar10" / "cifar10-test-lossless-first1017.npz", "shared"),
        (lambda: D.imagenette_val(empty), empty / "imagenette" / "imagenette_val.tar.gz", "imagenette2"),
        (lambda: D.imagenet_folder(split="val", data_dir=empty), empty / "imagenet" / "val", "image-net.org"),
    ]
    for make, path, how in cases:
        with pytest.raises(D.DatasetNotFoundError) as info:
            make()
        err = info.value
        assert isinstance(err, FileNotFoundError)
        msg = str(err)
        assert str(path) in msg, msg
        assert how in msg and "data/README.md" in msg, msg
        assert any(str(p).startswith(str(path)) for p in err.paths)


# --------------------------------------------------------------------------------------------------
# archive decoding cache and extraction (small archives built here)
# --------------------------------------------------------------------------------------------------


def _tiny_folder_archive(path: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    names = ["train/cat/2.jpg", "train/cat/10.jpg", "train/airplane/1.jpg", "test/dog/0.jpg", "test/cat/0.jpg"]
    images = dict(zip(names, _flat_images(rng, len(names)), strict=True))
    files = {f"top/{n}": _jpeg_bytes(a) for n, a in images.items()}
    files["top/train/cat/._hidden.jpg"] = b"junk"
    files["top/README.txt"] = b"not an image"
    return _make_tar(path, files), images


def test_decode_image_folder_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive, images = _tiny_folder_archive(tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    out = D.decode_image_folder(archive, ("train", "test"), cache_dir=cache, progress=False)
    train = out["train"]
    assert train.classes == ("airplane", "cat")
    assert train.files == ("airplane/1.jpg", "cat/2.jpg", "cat/10.jpg")  # numeric order within a class
    assert train.folder_index.tolist() == [0, 1, 1]
    assert train.images.shape == (3, 3, 8, 8) and train.images.dtype == np.uint8
    for i, f in enumerate(train.files):
        ref = images[f"train/{f}"].transpose(2, 0, 1).astype(int)
        assert np.abs(train.images[i].astype(int) - ref).max() <= 3
    assert out["test"].classes == ("cat", "dog")
    written = sorted(p.name for p in cache.iterdir())
    assert len(written) == 1 and written[0].startswith("tiny.train+test.RGB-") and written[0].endswith(".npz")
    with np.load(cache / written[0], allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert "train.images" in z.files
    threaded = D.decode_image_folder(archive, ("train", "test"), cache_dir=tmp_path / "c2", num_threads=3)
    assert np.array_equal(threaded["train"].images, train.images) and threaded["train"].files == train.files

    # second call: served from the cache, the decoder is not called
    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(archives, "_decode_images", fail)
    again = D.decode_image_folder(archive, ("train", "test"), cache_dir=cache, progress=False)
    assert np.array_equal(again["train"].images, train.images)

    # a changed archive invalidates the cache (and the stale file is removed)
    monkeypatch.undo()
    _tiny_folder_archive(archive, seed=1)
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    changed = D.decode_image_folder(archive, ("train", "test"), cache_dir=cache, progress=False)
    assert not np.array_equal(changed["train"].images, train.images)
    assert len(list(cache.iterdir())) == 1 and sorted(p.name for p in cache.iterdir()) != written


def test_cache_write_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive, _ = _tiny_folder_archive(tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    real_savez = np.savez

    def crash_midway(file: object, **arrays: np.ndarray) -> None:
        real_savez(file, **arrays)  # the bytes are written...
        raise KeyboardInterrupt("killed before the rename")  # ...but the process dies before os.replace

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        D.decode_image_folder(archive, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # neither a partial cache file nor a temporary one


def test_decode_errors_on_mixed_sizes(tmp_path: Path) -> None:
    files = {
        "train/a/0.jpg": _jpeg_bytes(np.zeros((8, 8, 3), np.uint8)),
        "train/a/1.jpg": _jpeg_bytes(np.zeros((9, 8, 3), np.uint8)),
    }
    archive = _make_tar(tmp_path / "mixed.tar.gz", files)
    with pytest.raises(ValueError, match="different shapes"):
        D.decode_image_folder(archive, ("train",), cache_dir=tmp_path / "c", progress=False)


def test_extract_archive_once_and_safely(tmp_path: Path) -> None:
    files = {
        f"val/n0000000{i}/img{j}.JPEG": _jpeg_bytes(np.full((10, 12, 3), 40 * i, np.uint8))
        for i in range(2)
        for j in range(2)
    }
    archive = _make_tar(tmp_path / "small_val.tar.gz", files)
    cache = tmp_path / "cache"
    root = D.extract_archive(archive, cache)
    assert root.parent == cache.resolve() and root.name.startswith("small_val-")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.JPEG")) == sorted(files)
    assert [p.name for p in cache.iterdir()] == [root.name]  # no temporary folder left
    mtime = root.stat().st_mtime_ns
    assert D.extract_archive(archive, cache) == root and root.stat().st_mtime_ns == mtime  # not extracted again
    ds = D.imagenet_folder(root, "val", normalize=None, crop_size=8, resize_size=8)
    assert len(ds) == 4 and ds.classes == ["n00000000", "n00000001"] and ds[3][0].shape == (3, 8, 8)

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="unsafe path"):
        D.extract_archive(evil, cache)
    assert not (tmp_path / "escaped.txt").exists()
    assert [p.name for p in cache.iterdir()] == [root.name]


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.5, 0.9])
def test_a_truncated_archive_is_named_with_how_to_get_it_again(tmp_path: Path, keep: float) -> None:
    archive, _ = _tiny_folder_archive(tmp_path / "tiny.tar.gz")
    archive.write_bytes(archive.read_bytes()[: int(archive.stat().st_size * keep)])  # a download cut short
    cache = tmp_path / "cache"
    for read in (
        lambda: D.decode_image_folder(archive, ("train", "test"), cache_dir=cache, progress=False),
        lambda: D.extract_archive(archive, cache),
    ):
        with pytest.raises(DamagedFileError) as info:
            read()
        message = str(info.value)
        assert str(archive) in message and "damaged" in message and "get it again" in message
    assert list(cache.iterdir()) == []  # neither a cache file nor a partly extracted folder


# --------------------------------------------------------------------------------------------------
# dataset functions on small stand-ins
# --------------------------------------------------------------------------------------------------


def test_mnist_idx_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x, train_y = rng.integers(0, 256, (6, 28, 28)), np.array([5, 0, 4, 1, 9, 2])
    test_x, test_y = rng.integers(0, 256, (3, 28, 28)), np.array([7, 2, 1])
    # gzipped files in <data>/mnist
    flat = tmp_path / "flat" / "mnist"
    flat.mkdir(parents=True)
    for name, arr in [
        ("train-images-idx3-ubyte", train_x), ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", test_x), ("t10k-labels-idx1-ubyte", test_y),
    ]:  # fmt: skip
        _write_idx(flat / f"{name}.gz", arr, compress=True)
    ds = D.mnist("train", flat.parent, normalize=None)
    assert ds.images.shape == (6, 1, 28, 28) and ds.targets.tolist() == [5, 0, 4, 1, 9, 2]
    assert torch.equal(ds.images[:, 0], torch.from_numpy(train_x.astype(np.uint8)))
    assert torch.equal(ds[0][0][0], torch.from_numpy(train_x[0]).float() / 255)
    # torchvision's raw layout, uncompressed
    raw = tmp_path / "tv" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x, compress=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y, compress=False)
    assert D.mnist("test", raw.parents[2]).targets.tolist() == [7, 2, 1]
    # a corrupt file
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01")
    with pytest.raises(ValueError, match="dims"):
        D.mnist("test", raw.parents[2])


def test_cifar10_from_a_jpeg_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-jpeg"
    images = {}
    for split, count in (("train", 2), ("test", 1)):
        for cls in reversed(D.CIFAR10_CLASSES):
            for k in range(count):
                arr = _flat_images(rng, 1, 32)[0]
                images[(split, cls, k)] = arr
                target = root / split / cls / f"{k:04d}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(_jpeg_bytes(arr))
    ds = D.cifar10(
        "train", tmp_path / "nodata", jpeg_path=root, cache_dir=tmp_path / "c", normalize=None, progress=False
    )
    assert len(ds) == 20 and ds.targets.tolist() == [i for i in range(10) for _ in range(2)]
    assert ds.classes == list(D.CIFAR10_CLASSES) and ds.files[2] == "automobile/0000.jpg"
    ref = torch.from_numpy(images[("train", "automobile", 0)]).permute(2, 0, 1)
    assert (ds.images[2].int() - ref.int()).abs().max() <= 3
    assert D.cifar10("test", jpeg_path=root, cache_dir=tmp_path / "c", progress=False).targets.tolist() == list(
        range(10)
    )
    # a folder set that is not CIFAR-10's
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "0000.jpg").write_bytes(_jpeg_bytes(images[("train", "cat", 0)]))
    with pytest.raises(ValueError, match="zebra"):
        D.cifar10("train", jpeg_path=root, cache_dir=tmp_path / "c", progress=False)


def test_cifar_torchvision_route(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.datasets as tvd

    class FakeCIFAR10:
        classes = list(D.CIFAR10_CLASSES)

        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 6 if train else 4
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
            self.targets = list(range(n))
            FakeCIFAR10.calls.append((root, train, download))

        calls: list[tuple[str, bool, bool]] = []

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    ds = D.cifar10("test", tmp_path, normalize=None)  # auto: torchvision's files are preferred (lossless)
    assert FakeCIFAR10.calls == [(str(tmp_path / "cifar10"), False, False)]
    assert ds.images.shape == (4, 3, 32, 32) and ds.targets.tolist() == [0, 1, 2, 3]
    assert torch.equal(ds.images[1], torch.from_numpy(FakeCIFAR10(".", False, False).data[1]).permute(2, 0, 1))
    assert ds.source.startswith("torchvision:") and ds.files is None
    # download=True without local files goes to torchvision too
    D.cifar10("train", tmp_path / "other", download=True)
    assert FakeCIFAR10.calls[-1] == (str(tmp_path / "other" / "cifar10"), True, True)


def test_imagenet_folder_transforms(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for wnid in ("n02", "n01"):
        for j in range(2):
            p = tmp_path / "train" / wnid / f"{wnid}_{j}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_jpeg_bytes(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)))
    ev = D.imagenet_folder(tmp_path, "train", train=False)
    assert ev.classes == ["n01", "n02"] and ev.targets.tolist() == [0, 0, 1, 1]
    x, y = ev[2]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    tr = D.imagenet_folder(tmp_path, "train", trivial_augment=True, crop_size=32, class_to_idx={"n01": 10, "n02": 20})
    assert tr.targets.tolist() == [10, 10, 20, 20]
    a, b = tr[D.SeededIndex(0, 5)][0], tr[D.SeededIndex(0, 5)][0]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert any(not torch.equal(a, tr[D.SeededIndex(0, s)][0]) for s in range(6, 10))
    with pytest.raises(ValueError, match="class_to_idx"):
        D.imagenet_folder(tmp_path, "train", class_to_idx={"n01": 0})


def test_constants() -> None:
    assert len(D.CIFAR100_CLASSES) == 100 == len(set(D.CIFAR100_CLASSES))
    assert list(D.CIFAR100_CLASSES) == sorted(D.CIFAR100_CLASSES)
    assert list(D.CIFAR10_CLASSES) == sorted(D.CIFAR10_CLASSES)  # so ImageFolder order == label order
    assert list(D.IMAGENETTE_WNIDS) == sorted(D.IMAGENETTE_WNIDS)
    assert list(D.IMAGENETTE_TO_IMAGENET.values()) == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    # the presets are the named constants that oba.models records for its models
    assert D.NORMALIZATION["imagenet"] == (norm.IMAGENET_MEAN, norm.IMAGENET_STD)
    assert D.NORMALIZATION["cifar10"] == (norm.CIFAR10_MEAN, norm.CIFAR10_STD)
    assert D.NORMALIZATION["cifar100"] == (norm.CIFAR100_MEAN, norm.CIFAR100_STD)
    assert D.NORMALIZATION["mnist"] == (norm.MNIST_MEAN, norm.MNIST_STD)
    meta = pytest.importorskip("torchvision.models._meta")
    names = [meta._IMAGENET_CATEGORIES[i] for i in D.IMAGENETTE_TO_IMAGENET.values()]
    assert names == [
        "tench", "English springer", "cassette player", "chain saw", "church",
        "French horn", "garbage truck", "gas pump", "golf ball", "parachute",
    ]  # fmt: skip


def test_original_order() -> None:
    labels = torch.tensor([2, 0, 2, 1, 0])
    class_major = torch.argsort(labels, stable=True)  # what a class-major copy holds, as original indices
    idx = D.original_order(labels)
    assert torch.equal(class_major[idx], torch.arange(5))


# --------------------------------------------------------------------------------------------------
# real data (skipped when absent)
# --------------------------------------------------------------------------------------------------

CIFAR_JPEG = "cifar10/cifar10-jpeg-q75.tar.gz"
LOSSLESS = "cifar10/cifar10-test-lossless-first1017.npz"


@pytest.fixture(scope="module")
def cifar10_jpeg(data_dir: Path) -> dict[str, D.TensorImageDataset]:
    if not (data_dir / CIFAR_JPEG).exists():
        pytest.skip(f"{CIFAR_JPEG} not found in the data directory {data_dir} (set OBA_DATA_DIR; see data/README.md)")
    return {s: D.cifar10(s, data_dir, source="jpeg", normalize=None, progress=False) for s in ("train", "test")}


def test_cifar10_jpeg_counts_and_classes(cifar10_jpeg: dict[str, D.TensorImageDataset]) -> None:
    train, test = cifar10_jpeg["train"], cifar10_jpeg["test"]
    assert train.images.shape == (50_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert torch.bincount(train.targets).tolist() == [5000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    assert train.classes == list(D.CIFAR10_CLASSES)
    # the label of every image is its folder's standard CIFAR-10 index
    for files, targets in ((train.files, train.targets), (test.files, test.targets)):
        assert [D.CIFAR10_CLASSES.index(f.split("/")[0]) for f in files[::997]] == targets[::997].tolist()
    assert test.files[:2] == ["airplane/0000.jpg", "airplane/0001.jpg"] and test.files[-1] == "truck/0999.jpg"
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0


def test_cifar10_jpeg_cache_is_hit(
    cifar10_jpeg: dict[str, D.TensorImageDataset], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = data_dir / CIFAR_JPEG
    cache_file = archives._cache_file_for(archive, D.resolve_cache_dir(data_dir=data_dir), ("train", "test"), "RGB")
    assert cache_file.is_file()
    leftovers = [p.name for p in cache_file.parent.iterdir() if p.name.startswith(f".{archives._stem(archive)}")]
    assert leftovers == []  # no temporary (partial) file left behind

    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(archives, "_decode_images", fail)
    test = D.cifar10("test", data_dir, source="jpeg", normalize=None)
    assert torch.equal(test.images, cifar10_jpeg["test"].images)


def test_cifar10_lossless_subset(require_data) -> None:
    require_data(LOSSLESS)
    ds = D.cifar10_lossless_test()
    assert ds.images.shape == (1017, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.targets[:8].tolist() == [3, 8, 8, 0, 6, 6, 1, 6]
    x, _ = ds[0]
    mean, std = D.NORMALIZATION["imagenet"]
    expected = (ds.images[0, :, 0, 0].float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-6)
    all_labels = D.cifar10_original_labels("test")
    assert len(all_labels) == 10_000 and torch.equal(all_labels[:1017], ds.targets)


def test_lossless_subset_matches_jpeg_test_set_in_order(
    require_data, cifar10_jpeg: dict[str, D.TensorImageDataset]
) -> None:
    """The JPEG files of a class are numbered in original test-set order: image i of the lossless subset is
    JPEG test image ``original_order(all_labels)[i]``. This checks class order and file order at once."""
    require_data(LOSSLESS)
    lossless = D.cifar10_lossless_test()
    jpeg = cifar10_jpeg["test"]
    all_labels = D.cifar10_original_labels("test")
    assert torch.equal(torch.bincount(all_labels), torch.bincount(jpeg.targets))
    idx = D.original_order(all_labels)[: len(lossless)]
    assert torch.equal(jpeg.targets[idx], lossless.targets)
    matched = jpeg.images[idx]
    psnr = [_psnr(a, b) for a, b in zip(lossless.images, matched, strict=True)]
    assert float(np.median(psnr)) > 28 and _psnr(lossless.images, matched) > 25  # README: median 30.5 dB
    assert min(psnr) > 20
    # and the matched image is the nearest of all 1,000 JPEG test images of its class
    for c in range(10):
        rows = (lossless.targets == c).nonzero().flatten()
        cand = (jpeg.targets == c).nonzero().flatten()
        d = torch.cdist(lossless.images[rows].flatten(1).float(), jpeg.images[cand].flatten(1).float())
        assert torch.equal(cand[d.argmin(dim=1)], idx[rows])


def test_mnist_real(require_data) -> None:
    require_data("mnist/train-images-idx3-ubyte.gz")
    require_data("mnist/t10k-labels-idx1-ubyte.gz")
    train, test = D.mnist("train"), D.mnist("test")
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.targets[:6].tolist() == [5, 0, 4, 1, 9, 2] and test.targets[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(train.targets).sum() == 60_000 and int(train.images.max()) == 255
    x, _ = test[0]
    assert torch.allclose(x.mean(), ((test.images[0].float() / 255 - 0.1307) / 0.3081).mean(), atol=1e-6)


def test_imagenette_val_real(require_data) -> None:
    require_data("imagenette/imagenette_val.tar.gz")
    ds = D.imagenette_val()
    assert len(ds) == 3925 and ds.classes == list(D.IMAGENETTE_WNIDS)
    counts = torch.bincount(ds.targets, minlength=1000)
    assert counts.nonzero().flatten().tolist() == list(D.IMAGENETTE_TO_IMAGENET.values())
    assert counts[701] == 390 and counts[0] == 387
    x, y = ds[len(ds) - 1]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 701
    local = D.imagenette_val(labels="imagenette")
    assert sorted(set(local.targets.tolist())) == list(range(10))


def test_scoring_batches_are_fixed_and_mixed_across_classes_of_a_class_ordered_dataset() -> None:
    full = D.synthetic(400, shape=(3, 4, 4), num_classes=10, seed=0)
    ordered = D.subset(full, indices=torch.argsort(full.targets, stable=True))  # stored class by class, as CIFAR JPEG
    assert ordered.targets.tolist() == sorted(ordered.targets.tolist())

    batches = D.scoring_batches(ordered, 6, 32, seed=3)
    assert len(batches) == 6 and all(x.shape == (32, 3, 4, 4) and y.shape == (32,) for x, y in batches)
    assert all(len(set(y.tolist())) > 1 for _, y in batches)
    again = D.scoring_batches(ordered, 6, 32, seed=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    other = D.scoring_batches(ordered, 6, 32, seed=4)
    assert not torch.equal(batches[0][1], other[0][1])
    seen = torch.cat([x.flatten(1) for x, _ in batches])
    assert len(torch.unique(seen, dim=0)) == 6 * 32  # distinct items (one permutation)
    assert batches.plan.shape == (6, 32)  # only indices are kept

    # the documented ways with a subset: a shuffling loader mixes classes; an unshuffled one would not (the trap)
    part = D.subset(ordered, 160, seed=0)
    assert all(len(set(y.tolist())) > 1 for _, y in D.loader(part, 16, shuffle=True, seed=0))
    assert any(len(set(y.tolist())) == 1 for _, y in D.loader(part, 16, shuffle=False))

    many = D.scoring_batches(ordered, 30, 32, seed=3)  # more than one permutation holds (12 batches of 32 each)
    assert len(many) == 30 and all(torch.equal(a[1], b[1]) for a, b in zip(many, many, strict=True))
    assert all(len(torch.unique(x.flatten(1), dim=0)) == 32 for x, _ in many)  # no item twice in a batch
    assert torch.equal(many[-1][0], list(many)[29][0])
    with pytest.raises(ValueError, match=r"batch_size=401 is larger than the dataset \(400 items\)"):
        D.scoring_batches(ordered, 1, 401)
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        D.scoring_batches(ordered, 2, 0)
