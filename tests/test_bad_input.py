"""Bad input over the public API (#14): every case ends in an error that names the argument or file and says what
to do, raised before any state is changed.

One table, :data:`CASES`: ``id -> (call, error type, what the message must say)``. Each call gets a fresh
:class:`World` (a small CNN with BatchNorm, good batches, and a folder of files: a pruned model, a fine-tuning
checkpoint, garbage, a pickle that would run code, a folder where a file is expected). After the error, the model's
state (every tensor and the module tree) and every file in the folder must be exactly as before. Faults covered
elsewhere: torn logs, NaN pixels in scoring, masked models, meta tensors, GRUs and mid-run failures in
``tests/test_reliability.py``; truncated archives and missing datasets in ``tests/test_data.py``; broken
checkpoints of the known formats in ``tests/test_models.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba
import oba.data as D
import oba.models
from oba.batches import BadBatchError
from oba.io import DamagedFileError, UnsafeCheckpointError
from oba.models.checkpoints import CheckpointError
from oba.train import NonFiniteLossError, fine_tune
from oba.unstructured import prune_unstructured

SHAPE = (3, 6, 6)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    )  # fmt: skip


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@dataclass
class World:
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    dir: Path

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(1, *SHAPE)

    def with_labels(self, labels: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.batches[0][0][: len(labels)]
        return [(x, torch.tensor(labels))]

    def ft(self, batches=None, **kwargs: Any) -> Any:
        options = {"epochs": 1, "lr": 0.01, "progress": False, **kwargs}
        return fine_tune(self.model, self.batches if batches is None else batches, **options)


def make_world(tmp_path: Path) -> World:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, *SHAPE, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    files = tmp_path / "files"
    files.mkdir()
    oba.save_pruned(oba.models.create("resnet20"), files / "pruned.pt", "resnet20")
    fine_tune(cnn(), batches, epochs=1, lr=0.01, progress=False, checkpoint_path=files / "ft.pt")
    (files / "garbage.pt").write_bytes(b"not a torch file " * 8)
    torch.save({"format": "oba.pruned/1", "state_dict": _Evil()}, files / "evil.pt")
    torch.save({"weights": torch.zeros(3)}, files / "other.pt")
    (files / "folder.pt").mkdir()
    (files / "checkpoints").mkdir()
    (files / "checkpoints" / oba.models.get_spec("resnet20").checkpoint).write_bytes(b"junk")
    return World(cnn(), batches, files)


def score(w: World, batches=None, criterion: str = "oba", **kwargs: Any) -> Any:
    return oba.score(w.model, F.cross_entropy, w.batches if batches is None else batches, criterion, progress=False,
                     **kwargs)  # fmt: skip


def prune(w: World, criterion: str = "oba", example=None, batches=None, **kwargs: Any) -> Any:
    options = {"keep_flops": 0.6, "loss_fn": F.cross_entropy, "progress": False, **kwargs}
    example = w.example if example is None else example
    return oba.prune_structured(w.model, example, criterion, batches=w.batches if batches is None else batches,
                                **options)  # fmt: skip


# id: (call, error type, regular expression the message must match: the argument or file, and what to do)
CASES: dict[str, tuple[Callable[[World], Any], type[BaseException], str]] = {
    # --- oba.score
    "score/model-not-a-module": (lambda w: oba.score("resnet20", F.cross_entropy, w.batches), TypeError,
                                 r"model must be an nn\.Module, got str"),
    "score/unknown-criterion": (lambda w: score(w, criterion="obd"), ValueError,
                                r"unknown criterion 'obd'; choose one of .*obd_fisher"),
    "score/unknown-option": (lambda w: score(w, damping=1.0), TypeError, r"takes no option.*damping.*its options"),
    "score/empty-batches": (lambda w: score(w, batches=[]), ValueError, r"batches is empty"),
    "score/labels-out-of-range": (lambda w: score(w, batches=w.with_labels([3, 10])), BadBatchError,
                                  r"batch 0 has labels in \[10, 10\] outside \[0, 9\].*num_classes"),
    "score/negative-label": (lambda w: score(w, batches=w.with_labels([-3, 1])), BadBatchError,
                             r"labels in \[-3, -3\] outside \[0, 9\]"),
    "score/wrong-channels": (lambda w: score(w, batches=[(torch.randn(2, 1, 6, 6), torch.tensor([0, 1]))]),
                             BadBatchError, r"batch 0: the model fails on its inputs \(shape \(2, 1, 6, 6\).*channels"),
    "score/batch-not-a-pair": (lambda w: score(w, batches=[w.batches[0][0]]), BadBatchError,
                               r"batch 0 is a Tensor.*expected \(inputs, targets\) pairs"),
    "score/float-targets-for-cross-entropy": (
        lambda w: score(w, batches=[(w.batches[0][0], torch.rand(4, 3))]), BadBatchError,
        r"batch 0: the loss fails on the model's outputs \(shape \(4, 10\).*targets \(shape \(4, 3\)"),
    # --- oba.prune_structured
    "prune/model-not-a-module": (lambda w: oba.prune_structured(None, w.example, "magnitude", keep_flops=0.5),
                                 TypeError, r"model must be an nn\.Module, got NoneType"),
    "prune/example-of-the-wrong-shape": (lambda w: prune(w, example=torch.zeros(1, 1, 6, 6)), BadBatchError,
                                         r"fails on example_inputs \(shape \(1, 1, 6, 6\).*torch\.randn\(1, 3"),
    "prune/example-not-a-tensor": (lambda w: prune(w, example="image"), BadBatchError,
                                   r"example_inputs must be a tensor.*got str"),
    "prune/labels-out-of-range": (lambda w: prune(w, batches=w.with_labels([0, 42])), BadBatchError,
                                  r"labels in \[42, 42\] outside \[0, 9\]"),
    "prune/batches-unlike-the-example": (lambda w: prune(w, batches=[(torch.randn(4, 3, 8, 8), w.batches[0][1])]),
                                         BadBatchError, r"batch 0 of step 1 has inputs of shape \(4, 3, 8, 8\).*"
                                         r"example_inputs have shape \(1, 3, 6, 6\)"),
    "prune/ignored-layer-unknown-name": (lambda w: prune(w, "magnitude", ignored_layers=["classifier"]), ValueError,
                                         r"ignored_layers names 'classifier', which is not a module"),
    "prune/ignored-layer-foreign-module": (lambda w: prune(w, "magnitude", ignored_layers=[nn.Linear(4, 10)]),
                                           ValueError, r"ignored_layers holds Linear.*not a module of the model"),
    "prune/no-loss-for-a-data-criterion": (lambda w: prune(w, loss_fn=None), ValueError, r"'oba' needs a loss_fn"),
    "prune/no-batches-for-a-data-criterion": (
        lambda w: oba.prune_structured(w.model, w.example, "oba", keep_flops=0.5, loss_fn=F.cross_entropy),
        ValueError, r"scores on data: pass batches"),
    "prune/target-out-of-range": (lambda w: prune(w, "magnitude", keep_flops=1.5), ValueError,
                                  r"keep_flops is the fraction KEPT and must be in \(0, 1\], got 1\.5"),
    # --- oba.unstructured.prune_unstructured
    "unstructured/sparsity-out-of-range": (
        lambda w: prune_unstructured(w.model, criterion="magnitude", sparsity=1.5), ValueError,
        r"sparsity is the fraction of weights REMOVED.*got 1\.5.*sparsity=0\.9"),
    "unstructured/labels-out-of-range": (
        lambda w: prune_unstructured(w.model, criterion="oba", sparsity=0.5, loss_fn=F.cross_entropy,
                                     batches=w.with_labels([11, 2]), progress=False),
        BadBatchError, r"labels in \[11, 11\] outside \[0, 9\]"),
    "unstructured/scores-and-criterion": (
        lambda w: prune_unstructured(w.model, {"0.weight": torch.ones(4, 3, 3, 3)}, criterion="magnitude",
                                     sparsity=0.5),
        ValueError, r"exactly one of scores= or criterion="),
    # --- oba.train.fine_tune
    "fine_tune/model-not-a-module": (lambda w: fine_tune("cnn", w.batches, epochs=1, lr=0.1), TypeError,
                                     r"model must be an nn\.Module"),
    "fine_tune/epochs-as-text": (lambda w: w.ft(epochs="2"), ValueError, r"epochs must be a whole number >= 0.*'2'"),
    "fine_tune/negative-lr": (lambda w: w.ft(lr=-0.1), ValueError, r"lr must be a number > 0, got -0\.1"),
    "fine_tune/milestones-as-text": (lambda w: w.ft(milestones="30"), ValueError,
                                     r"milestones must be a sequence of epoch numbers.*e\.g\. \[30, 60\]"),
    "fine_tune/loader-not-iterable": (lambda w: w.ft(batches=128), TypeError,
                                      r"train_loader must be an iterable of \(inputs, targets\) batches, got int"),
    "fine_tune/empty-loader": (lambda w: w.ft(batches=[]), ValueError, r"train_loader yielded no batches"),
    "fine_tune/labels-out-of-range": (lambda w: w.ft(batches=w.with_labels([1, 10])), BadBatchError,
                                      r"the first batch of train_loader has labels in \[10, 10\] outside \[0, 9\]"),
    "fine_tune/wrong-input-shape": (lambda w: w.ft(batches=[(torch.randn(2, 6, 6), torch.tensor([0, 1]))]),
                                    BadBatchError, r"first batch of train_loader: the model fails on its inputs"),
    "fine_tune/nan-pixel": (lambda w: w.ft(batches=[(w.batches[0][0].clone().index_fill_(3, torch.tensor([2]),
                                                                                          float("nan")),
                                                     w.batches[0][1])]),
                            NonFiniteLossError, r"first batch of train_loader gives a loss of nan.*check the data"),
    "fine_tune/bogus-device": (lambda w: w.ft(device="tpu"), ValueError, r"device='tpu' is not a torch device"),
    "fine_tune/checkpoint-path-is-a-folder": (lambda w: w.ft(checkpoint_path=w.dir / "folder.pt"), ValueError,
                                              r"checkpoint_path='.*folder\.pt' is a directory: pass a file path"),
    "fine_tune/damaged-checkpoint": (lambda w: w.ft(checkpoint_path=w.dir / "garbage.pt"), DamagedFileError,
                                     r"garbage\.pt.*damaged.*Delete it to restart"),
    "fine_tune/checkpoint-of-another-format": (lambda w: w.ft(checkpoint_path=w.dir / "other.pt"), ValueError,
                                               r"other\.pt is not a fine_tune checkpoint"),
    "fine_tune/unsafe-checkpoint": (lambda w: w.ft(checkpoint_path=w.dir / "evil.pt"), UnsafeCheckpointError,
                                    r"evil\.pt.*posix\.system.*safe way out"),
    "fine_tune/another-models-checkpoint": (lambda w: fine_tune(nn.Linear(3, 10), w.batches, epochs=1, lr=0.1,
                                                                checkpoint_path=w.dir / "ft.pt", progress=False),
                                            ValueError, r"ft\.pt.*(other|different) model"),
    # --- oba.models.load_pretrained
    "load_pretrained/unknown-name": (lambda w: oba.models.load_pretrained("resnet99"), KeyError,
                                     r"unknown model 'resnet99'; available: .*resnet20"),
    "load_pretrained/missing-file": (lambda w: oba.models.load_pretrained("resnet20", data_dir=w.dir / "nowhere"),
                                     FileNotFoundError, r"looked for .*nowhere.*resnet20-12fca82f\.th\. Get "),
    "load_pretrained/damaged-file": (lambda w: oba.models.load_pretrained("resnet20", data_dir=w.dir),
                                     CheckpointError, r"resnet20-12fca82f\.th.*damaged"),
    # --- oba.load_pruned / oba.save_pruned
    "load_pruned/missing": (lambda w: oba.load_pruned(w.dir / "gone.pt"), FileNotFoundError,
                            r"pruned model .*gone\.pt does not exist"),
    "load_pruned/a-folder": (lambda w: oba.load_pruned(w.dir / "folder.pt"), IsADirectoryError,
                             r"folder\.pt is a directory: pass the path of the file"),
    "load_pruned/damaged": (lambda w: oba.load_pruned(w.dir / "garbage.pt"), DamagedFileError,
                            r"pruned model .*garbage\.pt.*damaged.*Delete it to restart, or get it again"),
    "load_pruned/unsafe": (lambda w: oba.load_pruned(w.dir / "evil.pt"), UnsafeCheckpointError,
                           r"evil\.pt.*posix\.system.*safe way out"),
    "load_pruned/a-training-checkpoint": (lambda w: oba.load_pruned(w.dir / "ft.pt"), ValueError,
                                          r"ft\.pt is not a pruned model.*oba\.train\.load_checkpoint"),
    "save_pruned/unknown-arch": (lambda w: oba.save_pruned(w.model, w.dir / "new.pt", "mycnn"), ValueError,
                                 r"arch='mycnn' is not a model name of oba\.models.*Pass the name the model"),
    # --- oba.data
    "data/batch-size-zero": (lambda w: D.loader(D.synthetic(8, shape=SHAPE, num_classes=2, seed=0), batch_size=0),
                             ValueError, r"batch_size must be a whole number >= 1, got 0"),
    "data/batch-size-as-text": (lambda w: D.loader(D.synthetic(8, shape=SHAPE, num_classes=2), batch_size="64"),
                                ValueError, r"batch_size must be a whole number >= 1, got '64'"),
    "data/negative-workers": (lambda w: D.loader(D.synthetic(8, shape=SHAPE, num_classes=2), num_workers=-1),
                              ValueError, r"num_workers must be a whole number >= 0"),
    "data/subset-larger-than-the-dataset": (lambda w: D.subset(D.synthetic(8, shape=SHAPE, num_classes=2), 9),
                                            ValueError, r"cannot take 9 items from a dataset of 8"),
    "data/missing-cifar": (lambda w: D.cifar10(data_dir=w.dir / "nowhere"), D.DatasetNotFoundError,
                           r"CIFAR-10 \(train split\) not found\. Looked for:.*nowhere.*To obtain it"),
}  # fmt: skip


def _files(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _model_state(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_with_what_to_do_and_changes_nothing(tmp_path, case):
    call, error, says = CASES[case]
    world = make_world(tmp_path)
    model_before, files_before = _model_state(world.model), _files(world.dir)
    with pytest.raises(error) as info:
        call(world)
    message = str(info.value)
    assert re.search(says, message, re.S), f"{case}: {type(info.value).__name__}: {message}"
    assert "weights_only=False" not in message
    tree, tensors = _model_state(world.model)
    assert tree == model_before[0], f"{case}: the model's structure changed"
    assert tensors.keys() == model_before[1].keys()
    for k, v in model_before[1].items():
        assert torch.equal(tensors[k], v), f"{case}: {k} changed"
    assert world.model.training, f"{case}: the model's mode changed"
    assert _files(world.dir) == files_before, f"{case}: files changed"


def test_class_index_checks_allow_the_ignore_index_and_other_losses():
    """The label check follows the loss: ``ignore_index`` is allowed, and losses other than the class-index ones
    (here MSE on one-hot targets) are left to themselves."""
    from oba.batches import check_batch

    model, x = cnn(), torch.randn(3, *SHAPE)
    check_batch(model, F.cross_entropy, (x, torch.tensor([0, -100, 9])))
    check_batch(model, nn.CrossEntropyLoss(ignore_index=255), (x, torch.tensor([0, 255, 9])))
    with pytest.raises(BadBatchError, match=r"labels in \[255, 255\]"):
        check_batch(model, F.cross_entropy, (x, torch.tensor([0, 255, 9])))
    check_batch(model, F.mse_loss, (x, F.one_hot(torch.tensor([0, 4, 9]), 10).float()))
