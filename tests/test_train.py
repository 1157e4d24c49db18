"""Tests for oba.train: evaluation, resumable fine-tuning, batch-norm recalibration (tiny models, CPU)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from oba import data as D
from oba import train as T

SHAPE = (3, 8, 8)


def small_cnn(seed: int = 0, num_classes: int = 4) -> nn.Module:
    """Conv + BN + dropout: exercises buffers, the global RNG and momentum buffers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, num_classes),
    )


def linear(seed: int = 0, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))


@pytest.fixture
def datasets() -> tuple[D.TensorImageDataset, D.TensorImageDataset]:
    train = D.synthetic(64, shape=SHAPE, num_classes=4, seed=0, augment=True, normalize=((0.5,) * 3, (0.25,) * 3))
    test = D.synthetic(32, shape=SHAPE, num_classes=4, seed=0, normalize=((0.5,) * 3, (0.25,) * 3))
    return train, test


class Crash(Exception):
    pass


class CrashingLoader:
    """Wraps a loader and raises after ``after`` batches in total: an interruption in the middle of an epoch."""

    def __init__(self, loader: Any, after: int) -> None:
        self.loader, self.after, self.seen = loader, after, 0
        self.generator = loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if self.seen >= self.after:
                raise Crash
            self.seen += 1
            yield batch


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------


def test_evaluate_matches_a_manual_computation(datasets) -> None:
    _, test = datasets
    model = small_cnn()
    model.train()
    model[1].eval()  # a mixed state, which must come back as it was
    loader = D.loader(test, 10)
    out = T.evaluate(model, loader, progress=False)
    assert model.training and not model[1].training and model[3].training
    model.eval()
    with torch.no_grad():
        x = torch.stack([test[i][0] for i in range(len(test))])
        logits = model(x)
    assert out["num_samples"] == 32
    assert out["correct"] == int((logits.argmax(1) == test.targets).sum())
    assert out["accuracy"] == pytest.approx(out["correct"] / 32)
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, test.targets)), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # a custom loss, a batch limit, and an eval-mode model stays in eval mode
    limited = T.evaluate(model, loader, loss_fn=nn.MultiMarginLoss(), max_batches=2, progress=False)
    assert limited["num_samples"] == 20 and not model.training
    assert limited["loss"] == pytest.approx(float(nn.MultiMarginLoss()(logits[:20], test.targets[:20])), rel=1e-5)


def test_evaluate_empty_loader() -> None:
    out = T.evaluate(linear(), [], progress=False)
    assert out["num_samples"] == 0 and out["accuracy"] != out["accuracy"]  # NaN


# --------------------------------------------------------------------------------------------------
# fine_tune
# --------------------------------------------------------------------------------------------------


def test_fine_tune_learns_logs_and_checkpoints(datasets, tmp_path: Path) -> None:
    train, test = datasets
    model = linear()
    before = T.evaluate(model, D.loader(test, 16), progress=False)
    log, ckpt = tmp_path / "log.jsonl", tmp_path / "ckpt.pt"
    history = T.fine_tune(
        model,
        D.loader(train, 16, shuffle=True, seed=1),
        epochs=3,
        lr=0.05,
        milestones=(2,),
        eval_loader=D.loader(test, 16),
        log_path=log,
        checkpoint_path=ckpt,
        progress=False,
        seed=0,
    )
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.05, 0.005])
    assert set(history[0]) >= {"epoch", "lr", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "seconds"}
    assert history[-1]["eval_accuracy"] > max(before["accuracy"], 0.5)
    assert history[-1]["eval_loss"] < before["loss"]
    assert T.read_jsonl(log) == json.loads(json.dumps(history))
    assert log.read_text().count("\n") == 3
    # the checkpoint: plain tensors and containers only
    raw = torch.load(ckpt, weights_only=True)
    assert raw["format"] == T.CHECKPOINT_FORMAT and raw["epoch"] == 3
    assert set(raw) >= {"model", "optimizer", "scheduler", "rng", "history", "config"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw["model"].items())
    assert type(raw["scheduler"]["milestones"]) is dict
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    assert model.training  # fine_tune restores the mode it was given


def test_a_seeded_fine_tune_does_not_depend_on_earlier_passes_over_its_loader(datasets) -> None:
    """The iterative protocol fine-tunes each stage with one training loader; a resumed run skips finished stages."""
    train, _ = datasets
    runs = []
    for earlier_passes in (0, 2):
        loader = D.loader(train, 16, shuffle=True, seed=1)
        for _ in range(earlier_passes):
            list(loader)
        model = linear()
        T.fine_tune(model, loader, epochs=1, lr=0.05, progress=False, seed=0)
        runs.append(model)
    assert same_weights(*runs)


def test_fine_tune_resumes_exactly_after_an_interruption(datasets, tmp_path: Path) -> None:
    train, test = datasets
    kw: dict[str, Any] = dict(epochs=4, lr=0.1, milestones=(2, 3), gamma=0.5, nesterov=True, progress=False, seed=0)

    reference = small_cnn(0)
    ref_history = T.fine_tune(
        reference, D.loader(train, 16, shuffle=True, seed=3), eval_loader=D.loader(test, 16), **kw
    )

    ckpt, log = tmp_path / "run.pt", tmp_path / "run.jsonl"
    interrupted = small_cnn(0)
    with pytest.raises(Crash):  # dies in the middle of epoch 3 (4 batches per epoch)
        T.fine_tune(
            interrupted,
            CrashingLoader(D.loader(train, 16, shuffle=True, seed=3), after=10),
            eval_loader=D.loader(test, 16),
            checkpoint_path=ckpt,
            log_path=log,
            **kw,
        )
    assert T.load_checkpoint(ckpt)["epoch"] == 2
    with open(log, "a") as f:  # a crash while writing a log line leaves half a line
        f.write('{"epoch": 3, "lr": 0.0')
    assert [r["epoch"] for r in T.read_jsonl(log)] == [1, 2]

    resumed = small_cnn(123)  # a fresh process: other initial weights, other global RNG state
    history = T.fine_tune(
        resumed,
        D.loader(train, 16, shuffle=True, seed=3),
        eval_loader=D.loader(test, 16),
        checkpoint_path=ckpt,
        log_path=log,
        **kw,
    )
    assert same_weights(resumed, reference)
    assert without_time(history) == without_time(ref_history)
    assert [r["epoch"] for r in T.read_jsonl(log)] == [1, 2, 3, 4]
    assert without_time(T.read_jsonl(log)) == json.loads(json.dumps(without_time(ref_history)))

    # a finished run: rerunning returns the history and loads the final weights, without training
    again = small_cnn(7)
    never = CrashingLoader(D.loader(train, 16, shuffle=True, seed=3), after=0)
    assert T.fine_tune(again, never, checkpoint_path=ckpt, **kw) == history
    assert same_weights(again, reference)


def test_fine_tune_can_extend_a_finished_run(datasets, tmp_path: Path) -> None:
    train, _ = datasets
    kw: dict[str, Any] = dict(lr=0.1, milestones=(1,), progress=False, seed=0)
    straight = small_cnn(0)
    T.fine_tune(straight, D.loader(train, 32, shuffle=True, seed=0), epochs=3, **kw)
    extended = small_cnn(0)
    ckpt = tmp_path / "c.pt"
    T.fine_tune(extended, D.loader(train, 32, shuffle=True, seed=0), epochs=2, checkpoint_path=ckpt, **kw)
    history = T.fine_tune(small_cnn(9), D.loader(train, 32, shuffle=True, seed=0), epochs=3, checkpoint_path=ckpt, **kw)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    resumed = small_cnn(9)
    T.fine_tune(resumed, D.loader(train, 32, shuffle=True, seed=0), epochs=3, checkpoint_path=ckpt, **kw)
    assert same_weights(resumed, straight)
    with pytest.raises(ValueError, match="more than epochs"):
        T.fine_tune(small_cnn(0), D.loader(train, 32), epochs=2, checkpoint_path=ckpt, **kw)


def test_fine_tune_rejects_another_models_checkpoint(datasets, tmp_path: Path) -> None:
    train, _ = datasets
    ckpt = tmp_path / "c.pt"
    T.fine_tune(small_cnn(), D.loader(train, 32), epochs=1, lr=0.1, checkpoint_path=ckpt, progress=False)
    with pytest.raises(T.CheckpointMismatchError, match=r"different model") as info:
        T.fine_tune(linear(), D.loader(train, 32), epochs=2, lr=0.1, checkpoint_path=ckpt, progress=False)
    assert "0.weight" in str(info.value) and str(ckpt) in str(info.value)
    with pytest.raises(T.CheckpointMismatchError, match="shape"):
        T.fine_tune(
            small_cnn(num_classes=5), D.loader(train, 32), epochs=2, lr=0.1, checkpoint_path=ckpt, progress=False
        )
    with pytest.raises(ValueError, match="hyper-parameters"):
        T.fine_tune(small_cnn(), D.loader(train, 32), epochs=2, lr=0.2, checkpoint_path=ckpt, progress=False)
    # resume=False starts afresh and overwrites
    history = T.fine_tune(
        linear(), D.loader(train, 32), epochs=1, lr=0.2, checkpoint_path=ckpt, resume=False, progress=False
    )
    assert len(history) == 1 and "0.weight" not in T.load_checkpoint(ckpt)["model"]


def test_read_jsonl_tolerates_only_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert T.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        T.read_jsonl(path)


# --------------------------------------------------------------------------------------------------
# recalibrate_batchnorm
# --------------------------------------------------------------------------------------------------


def test_recalibrate_batchnorm_computes_cumulative_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Flatten())
    model.eval()
    bn = model[0]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    batches = [(torch.randn(8, 3, 4, 4) * (i + 1) + i, torch.zeros(8, dtype=torch.int64)) for i in range(4)]
    T.recalibrate_batchnorm(model, batches, num_batches=3)
    used = torch.stack([b[0] for b in batches[:3]])  # (3, 8, 3, 4, 4)
    means = used.mean(dim=(1, 3, 4))  # per batch, per channel
    variances = used.transpose(1, 2).reshape(3, 3, -1).var(dim=2, unbiased=True)
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, variances.mean(0), atol=1e-4)
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.3 and model[2].momentum == 0.1  # momenta restored
    assert not model.training and not any(m.training for m in model.modules())  # modes restored
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no batch"):
        T.recalibrate_batchnorm(model, [])
    assert T.recalibrate_batchnorm(nn.Linear(2, 2), []) is not None  # nothing to do without batch norm
