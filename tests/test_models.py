"""Tests of oba.models: architectures, pretrained checkpoints, checkpoint errors, registry."""

from __future__ import annotations

import gzip
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

import oba.models as models
from oba.models import CheckpointError, PadShortcut
from oba.models.cifar_resnet import cifar_resnet, read_cifar_resnet_checkpoint, resnet20
from oba.models.mlpnet import CHECKPOINT_GLOBALS, mlpnet, read_mlpnet_checkpoint
from oba.models.torchvision_models import PretrainedWeightsError, resnet50, vit_b_16
from oba.models.vgg import vgg19_bn
from oba.models.vit import Attention, set_num_heads, vit_cifar

RESNET20_CKPT = "checkpoints/resnet20-12fca82f.th"
RESNET32_CKPT = "checkpoints/resnet32-d509ac18.th"
MLPNET_CKPT = "checkpoints/mnist_25_epoch_93.97.ckpt"
CIFAR_SUBSET = "cifar10/cifar10-test-lossless-first1017.npz"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def normalise(x: torch.Tensor, spec: models.ModelSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(512)])
    return 100.0 * (predictions == y).double().mean().item()


# ----------------------------------------------------------------------------- CIFAR ResNet


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_parameter_counts_and_forward(depth, millions):
    model = cifar_resnet(depth)
    assert n_params(model) / 1e6 == pytest.approx(millions, rel=0.02)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_layout():
    model = cifar_resnet(32, num_classes=100)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert model.linear.out_features == 100
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert [(s.in_channels, s.out_channels) for s in shortcuts] == [(16, 32), (32, 64)]


def test_wide_resnet32_has_about_7_4m_parameters():
    with torch.device("meta"):  # shapes only: no memory or compute needed
        model = cifar_resnet(32, width=4)
        out = model(torch.empty(2, 3, 32, 32))
    assert n_params(model) / 1e6 == pytest.approx(7.4, rel=0.01)
    assert model.conv1.out_channels == 64 and model.linear.in_features == 256
    assert out.shape == (2, 10)


def test_fractional_width():
    model = cifar_resnet(20, width=0.5)
    assert model.conv1.out_channels == 8 and model.linear.in_features == 32
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("depth", [0, 19, 21])
def test_cifar_resnet_rejects_invalid_depth(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(depth)


def test_pad_shortcut_subsamples_and_pads_channels_on_both_sides():
    shortcut = PadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert list(shortcut.parameters()) == []
    assert (shortcut.pad_front, shortcut.pad_back) == (8, 8)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.fixture(scope="module")
def cifar_subset(require_data):
    data = np.load(require_data(CIFAR_SUBSET))
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255.0  # [1017, 3, 32, 32]
    y = torch.from_numpy(data["y"].astype(np.int64))
    return x, y


@pytest.mark.parametrize(
    "name, file, expected",
    [
        ("resnet20", RESNET20_CKPT, 91.6),
        ("resnet32", RESNET32_CKPT, 92.8),
    ],
)
def test_pretrained_cifar_resnet_accuracy(require_data, cifar_subset, name, file, expected):
    path = require_data(file)
    model = models.load_pretrained(name, path.parent.parent)
    assert not model.training
    x, y = cifar_subset
    acc = accuracy(model, normalise(x, models.get_spec(name)), y)
    assert acc == pytest.approx(expected, abs=0.5), f"{name}: {acc:.2f} % on the lossless subset"


def test_checkpoint_keys_match_architecture(require_data):
    state = read_cifar_resnet_checkpoint(require_data(RESNET20_CKPT))
    own = {k for k in resnet20().state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == own


# ----------------------------------------------------------------------------- checkpoint errors


def _write_resnet20_checkpoint(data_dir: Path, state: dict) -> Path:
    path = data_dir / "checkpoints" / models.get_spec("resnet20").checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 0.0}, path)
    return path


def test_synthetic_checkpoint_round_trip(tmp_path):
    reference = resnet20().eval()
    path = _write_resnet20_checkpoint(tmp_path, reference.state_dict())
    loaded = models.load_pretrained("resnet20", path=path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), reference(x))


def test_checkpoint_with_missing_key(tmp_path):
    state = resnet20().state_dict()
    del state["layer2.1.conv1.weight"]
    path = _write_resnet20_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError) as info:
        models.load_pretrained("resnet20", path=path)
    message = str(info.value)
    assert "missing keys (1): layer2.1.conv1.weight" in message
    assert str(path) in message and "pytorch_resnet_cifar10" in message


def test_checkpoint_with_unexpected_key(tmp_path):
    state = resnet20().state_dict()
    state["layer4.0.conv1.weight"] = torch.zeros(3)
    path = _write_resnet20_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): layer4\.0\.conv1\.weight"):
        models.load_pretrained("resnet20", path=path)


def test_checkpoint_with_wrong_shape(tmp_path):
    state = resnet20().state_dict()
    state["linear.weight"] = torch.zeros(100, 64)
    path = _write_resnet20_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError) as info:
        models.load_pretrained("resnet20", path=path)
    assert "shape mismatches (1): linear.weight: checkpoint (100, 64) vs model (10, 64)" in str(info.value)


def test_garbage_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "checkpoints" / models.get_spec("resnet20").checkpoint
    path.parent.mkdir()
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="could not read .* as a PyTorch checkpoint") as info:
        models.load_pretrained("resnet20", path=path)
    assert str(path) in str(info.value) and "weights_only` set to `False" not in str(info.value)


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    path = _write_resnet20_checkpoint(tmp_path, resnet20().state_dict())
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        models.load_pretrained("resnet20", path=path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ([1, 2, 3], "holds a list"),
        ({"model": {}}, "no key 'state_dict'"),
        ({"state_dict": torch.zeros(3)}, "'state_dict' holds a Tensor"),
    ],
)
def test_wrong_layout_is_a_checkpoint_error(tmp_path, content, fragment):
    path = tmp_path / "checkpoints" / models.get_spec("resnet20").checkpoint
    path.parent.mkdir()
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=fragment):
        models.load_pretrained("resnet20", path=path)


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        models.load_pretrained("resnet32", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "resnet32-d509ac18.th") in message
    assert "pytorch_resnet_cifar10" in message and "OBA_DATA_DIR" in message


CIFAR_RESNET_CHECKPOINTS = {  # the published pytorch_resnet_cifar10 files: name -> SHA-256 prefix in it
    "resnet20": "12fca82f", "resnet32": "d509ac18", "resnet44": "014dd654", "resnet56": "4bfd9763",
    "resnet110": "1d1ed7c2", "resnet1202": "f3b1deed",
}  # fmt: skip


def test_every_published_cifar_resnet_is_registered_by_file_name_and_checksum():
    for name, digest in CIFAR_RESNET_CHECKPOINTS.items():
        spec = models.get_spec(name)
        assert spec.checkpoint == f"{name}-{digest}.th" and models.checkpoint_sha256_prefix(spec.checkpoint) == digest
        assert spec.read_checkpoint is read_cifar_resnet_checkpoint
    assert models.checkpoint_sha256_prefix("mnist_25_epoch_93.97.ckpt") is None


def test_a_file_under_a_published_name_must_have_its_checksum(tmp_path):
    torch.manual_seed(0)
    state = cifar_resnet(56).state_dict()
    path = tmp_path / "checkpoints" / "resnet56-4bfd9763.th"
    path.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 0.0}, path)
    with pytest.raises(CheckpointError, match=r"resnet56-4bfd9763\.th is not the published file.*path=") as info:
        models.load_pretrained("resnet56", tmp_path)
    assert "says 4bfd9763" in str(info.value)
    loaded = models.load_pretrained("resnet56", path=path)  # your own file by its path: no checksum
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_the_published_resnet20_is_found_by_name_in_a_data_directory(require_data, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet20-12fca82f.th").symlink_to(require_data(RESNET20_CKPT))
    model = models.load_pretrained("resnet20", tmp_path)
    state = read_cifar_resnet_checkpoint(require_data(RESNET20_CKPT))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model_state_dict", "model", "data_parallel"])
def test_any_registry_model_loads_a_checkpoint_file_by_path(tmp_path, layout):
    torch.manual_seed(0)
    reference = models.create("vgg19_bn").eval()
    state = reference.state_dict()
    content = {
        "plain": state, "state_dict": {"state_dict": state, "epoch": 3},
        "model_state_dict": {"model_state_dict": state}, "model": {"model": state, "optimizer": {}},
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
    }[layout]  # fmt: skip
    torch.save(content, tmp_path / "vgg.pt")
    loaded = models.load_pretrained("vgg19_bn", path=tmp_path / "vgg.pt")
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), reference(x))


def test_a_model_without_published_weights_says_how_to_load_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"no published weights .*'resnet44'|load_pretrained\('vgg19_bn', path="):
        models.load_pretrained("vgg19_bn")
    with pytest.raises(FileNotFoundError, match=r"load_pretrained\('resnet56', path="):
        models.load_pretrained("resnet56", tmp_path)
    torch.save({"optimizer": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"a dict of tensors, or a dict holding one under"):
        models.load_pretrained("vgg19_bn", path=tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        models.load_pretrained("vgg19_bn", path=tmp_path / "gone.pt")


def test_load_state_dict_strict_needs_no_message_arguments():
    model = resnet20()
    models.load_state_dict_strict(model, resnet20().state_dict())
    with pytest.raises(CheckpointError, match=r"the state dict does not fit CifarResNet: missing keys"):
        models.load_state_dict_strict(model, {})


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {}, "hook": Path("x")}, path)  # a non-allowlisted class
    with pytest.raises(CheckpointError, match="Unsupported global"):
        read_cifar_resnet_checkpoint(path)


# ----------------------------------------------------------------------------- VGG


def test_vgg19_bn_forward_and_parameters():
    model = vgg19_bn()
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) == 16
    assert n_params(model) / 1e6 == pytest.approx(20.04, rel=0.005)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.device("meta"):
        assert vgg19_bn(num_classes=100)(torch.empty(2, 3, 32, 32)).shape == (2, 100)


# ----------------------------------------------------------------------------- MLPNet


def test_mlpnet_shapes():
    model = mlpnet()
    assert [tuple(p.shape) for p in model.parameters()] == [(40, 784), (20, 40), (10, 20)]
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model(torch.randn(3, 784)).shape == (3, 10)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped): magic (2 zero bytes, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    raw = gzip.decompress(path.read_bytes())
    assert raw[:3] == b"\x00\x00\x08", "expected unsigned-byte IDX data"
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_pretrained_mlpnet_accuracy(require_data):
    images = _read_idx(require_data("mnist/t10k-images-idx3-ubyte.gz"))  # [10000, 28, 28]
    labels = _read_idx(require_data("mnist/t10k-labels-idx1-ubyte.gz"))  # [10000]
    path = require_data(MLPNET_CKPT)
    model = models.load_pretrained("mlpnet", path.parent.parent)
    x = torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0
    acc = accuracy(model, normalise(x, models.get_spec("mlpnet")), torch.from_numpy(labels.astype(np.int64)))
    assert acc == pytest.approx(93.97, abs=0.01)


def test_mlpnet_checkpoint_needs_exactly_the_allowlisted_classes(require_data):
    path = require_data(MLPNET_CKPT)
    assert CHECKPOINT_GLOBALS == (torch.optim.SGD, torch.optim.lr_scheduler.ExponentialLR)
    for left_out in CHECKPOINT_GLOBALS:
        kept = [g for g in CHECKPOINT_GLOBALS if g is not left_out]
        with pytest.raises(pickle.UnpicklingError, match=left_out.__name__), torch.serialization.safe_globals(kept):
            torch.load(path, map_location="cpu", weights_only=True)
    assert set(read_mlpnet_checkpoint(path)) == {"fc1.weight", "fc2.weight", "fc3.weight"}


def test_mlpnet_masks_are_folded_into_weights(tmp_path):
    reference = mlpnet()
    mask = (torch.rand(40, 784) > 0.5).float()
    raw = {
        f"module.{name}._layer.weight": w
        for name, w in (("fc1", reference.fc1.weight), ("fc2", reference.fc2.weight), ("fc3", reference.fc3.weight))
    }
    raw.update({f"module.fc{k}._weight_mask": torch.ones_like(raw[f"module.fc{k}._layer.weight"]) for k in (2, 3)})
    raw["module.fc1._weight_mask"] = mask
    path = tmp_path / "mlp.ckpt"
    torch.save({"model_state_dict": raw}, path)
    state = read_mlpnet_checkpoint(path)
    torch.testing.assert_close(state["fc1.weight"], reference.fc1.weight.detach() * mask)
    torch.testing.assert_close(state["fc3.weight"], reference.fc3.weight.detach())


# ----------------------------------------------------------------------------- ViT


def _attentions(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def test_vit_forward_and_double_backward():
    model = vit_cifar(dim=48, depth=2, num_heads=3, mlp_dim=96)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.pos_embed.shape == (1, 65, 48)
    assert [(a.num_heads, a.head_dim, a.v_head_dim) for a in _attentions(model)] == [(3, 16, 16)] * 2
    # Hessian-vector products need double backward through the attention.
    weight = model.blocks[0].attn.q.weight
    (grad,) = torch.autograd.grad(model(x).square().sum(), weight, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.randn_like(grad)).sum(), weight)
    assert hvp.shape == weight.shape and torch.isfinite(hvp).all()


def test_default_vit_size():
    model = vit_cifar()
    assert n_params(model) / 1e6 == pytest.approx(1.8, rel=0.01)
    assert _attentions(model)[0].num_heads == 3


def _remove_head(attn: Attention, head: int) -> None:
    """Delete rows of q/k/v and columns of proj belonging to ``head``, by hand."""
    keep = [i for i in range(attn.q.out_features) if i // attn.head_dim != head]
    keep_v = [i for i in range(attn.v.out_features) if i // attn.v_head_dim != head]
    for name, rows in (("q", keep), ("k", keep), ("v", keep_v)):
        old = getattr(attn, name)
        new = nn.Linear(old.in_features, len(rows))
        new.weight.data, new.bias.data = old.weight.data[rows].clone(), old.bias.data[rows].clone()
        setattr(attn, name, new)
    old = attn.proj
    attn.proj = nn.Linear(len(keep_v), old.out_features)
    attn.proj.weight.data = old.weight.data[:, keep_v].clone()
    attn.proj.bias.data = old.bias.data.clone()


def test_vit_removing_a_head_by_hand_is_consistent():
    model = vit_cifar(dim=48, depth=2, num_heads=3, mlp_dim=96).eval()
    x = torch.randn(2, 3, 32, 32)
    attn = model.blocks[0].attn
    # Reference: silence head 1 by zeroing its proj columns (the head then contributes nothing).
    with torch.no_grad():
        attn.proj.weight[:, 16:32] = 0
    expected = model(x)
    _remove_head(attn, head=1)
    assert (attn.num_heads, attn.head_dim, attn.v_head_dim) == (2, 16, 16)
    assert attn.scale == pytest.approx(16**-0.5)
    torch.testing.assert_close(model(x), expected)


def _attention_pruner(**head_options):
    """A small ViT, an input and a torch-pruning MetaPruner of its attention groups only (rooted at proj)."""
    model = vit_cifar(dim=48, depth=2, num_heads=3, mlp_dim=96).eval()
    x = torch.randn(2, 3, 32, 32)
    attns = _attentions(model)
    num_heads = {layer: a.num_heads for a in attns for layer in (a.q, a.k, a.v)}
    ignored = [model.head, model.patch_embed] + [layer for b in model.blocks for layer in (b.mlp.fc1, b.mlp.fc2)]
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=ignored,
        num_heads=num_heads,
        unwrapped_parameters=[(model.cls_token, 2), (model.pos_embed, 2)],
        **head_options,
    )
    return model, x, attns, pruner


def test_vit_torch_pruning_removes_whole_heads():
    model, x, attns, pruner = _attention_pruner(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=1 / 3)
    pruner.step()
    for a in attns:
        assert (a.num_heads, a.head_dim, a.v_head_dim) == (2, 16, 16)
        assert a.q.out_features == a.k.out_features == a.v.out_features == a.proj.in_features == 32
        assert pruner.num_heads[a.q] == a.num_heads
    assert model(x).shape == (2, 10)


def test_vit_torch_pruning_head_dims_then_set_num_heads():
    model, x, attns, pruner = _attention_pruner(prune_num_heads=False, prune_head_dims=True)
    pruner.step()
    assert attns[0].q.out_features == 24  # 3 heads of 8
    with pytest.raises(RuntimeError, match="set_num_heads"):
        model(x)
    set_num_heads(model, pruner.num_heads)
    assert [(a.num_heads, a.head_dim, a.scale) for a in attns] == [(3, 8, 0.25)] * 2
    assert model(x).shape == (2, 10)


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_models_build():
    with torch.device("meta"):
        r50, vit = resnet50(), vit_b_16()
        assert r50(torch.empty(1, 3, 224, 224)).shape == (1, 1000)
    assert n_params(r50) / 1e6 == pytest.approx(25.56, rel=0.001)
    assert n_params(vit) / 1e6 == pytest.approx(86.57, rel=0.001)


def test_torchvision_download_failure_is_explained(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models.WeightsEnum.get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError) as info:
        resnet50(pretrained=True)
    message = str(info.value)
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "hub" in message and "TORCH_HOME" in message


def test_torchvision_pretrained_loads_strictly(monkeypatch):
    reference = resnet50()
    monkeypatch.setattr(
        "torchvision.models.WeightsEnum.get_state_dict", lambda self, *args, **kwargs: reference.state_dict()
    )
    model = models.load_pretrained("resnet50")
    torch.testing.assert_close(model.fc.weight, reference.fc.weight)
    broken = {k: v for k, v in reference.state_dict().items() if k != "fc.bias"}
    monkeypatch.setattr("torchvision.models.WeightsEnum.get_state_dict", lambda self, *args, **kwargs: broken)
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): fc.bias"):
        resnet50(pretrained=True)


# ----------------------------------------------------------------------------- registry


def test_registry_entries_are_consistent():
    assert {
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet110",
        "resnet32_4x",
        "vgg19_bn",
        "mlpnet",
        "vit_cifar",
        "resnet50",
        "vit_b_16",
    } <= set(models.available())
    for name, spec in models.REGISTRY.items():
        assert spec.name == name
        assert len(spec.mean) == len(spec.std) == spec.input_shape[0]
    assert models.get_spec("resnet20").mean == (0.485, 0.456, 0.406)
    assert models.get_spec("mlpnet").std == (0.3081,)
    with pytest.raises(TypeError):
        models.REGISTRY["x"] = None  # read-only


@pytest.mark.parametrize(
    "name", ["resnet20", "resnet32_4x", "vgg19_bn_cifar100", "resnet32_4x_cifar100", "vit_cifar", "mlpnet"]
)
def test_create_builds_models_of_the_registered_shape(name):
    spec = models.get_spec(name)
    with torch.device("meta"):
        model = models.create(name)
        out = model(torch.empty(2, *spec.input_shape))
    assert out.shape == (2, 100 if spec.dataset == "cifar100" else 10)


def test_create_passes_arguments_and_rejects_unknown_names():
    assert models.create("resnet20", num_classes=100).linear.out_features == 100
    assert models.create("resnet32_4x", num_classes=100).conv1.out_channels == 64
    with pytest.raises(KeyError, match="available"):
        models.create("resnet18")
    with pytest.raises(ValueError, match="no published weights"):
        models.load_pretrained("vit_cifar")
