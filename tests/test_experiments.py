"""Tests of oba.experiments: resumable one-shot sweeps, prune + fine-tune, the iterative protocol."""

from __future__ import annotations

import pytest
import torch

import oba.models
from oba.experiments import ResultLog, StaleResultsError, iterative_pruning, prune_and_fine_tune, structured_sweep

EXAMPLE = torch.randn(1, 3, 32, 32)


def data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return oba.models.create("resnet20").eval()


def test_sweep_records_every_criterion_and_target_and_skips_them_on_a_rerun(tmp_path):
    log = ResultLog(tmp_path / "sweep.jsonl")
    kwargs = dict(
        score_batches=data(4, 0),
        eval_loaders={"val": data(2, 1)},
        log=log,
        batches_per_step=1,
        recalibrate_loader=data(2, 2),
        recalibrate_batches=2,
        progress=False,
    )
    rows = structured_sweep(dense(), EXAMPLE, ["magnitude", "taylor"], [0.6, 0.8], **kwargs)
    assert [(r["criterion"], r["keep_flops"]) for r in rows] == [
        ("magnitude", 0.8),
        ("magnitude", 0.6),
        ("taylor", 0.8),
        ("taylor", 0.6),
    ]
    for r in rows:
        assert r["flops_kept"] <= r["keep_flops"] + 1e-9 and 0 <= r["acc_val"] <= 1 and "acc_val_recal" in r
    structured_sweep(dense(), EXAMPLE, ["magnitude", "taylor"], [0.6, 0.8], **kwargs)
    assert log.records() == rows  # nothing redone
    with pytest.raises(ValueError, match="oba_two_term"):
        structured_sweep(dense(), EXAMPLE, ["obs"], [0.5], **kwargs)


def test_iterative_protocol_continues_from_the_fine_tuned_model_and_resumes(tmp_path):
    log = ResultLog(tmp_path / "iter.jsonl")
    kwargs = dict(
        arch="resnet20", score_batches=data(2, 0), train_loader=data(2, 3), eval_loaders={"val": data(1, 1)},
        out_dir=tmp_path, log=log, fine_tune_options={"epochs": 1, "lr": 1e-3, "seed": 0},
        batches_per_step=1, progress=False,
    )  # fmt: skip
    records = iterative_pruning(dense(), EXAMPLE, "taylor", [0.7, 0.5], **kwargs)
    assert [r["tag"] for r in records] == ["stage1_", "stage2_"]
    assert records[0]["flops_kept"] <= 0.7 + 1e-9 and 0.45 < records[1]["flops_kept"] <= 0.5 + 1e-9
    assert (tmp_path / "stage2_taylor_0.5_final.pt").exists()
    again = iterative_pruning(dense(), EXAMPLE, "taylor", [0.7, 0.5], **kwargs)
    assert again == records and len(log.records()) == 2


def test_an_interrupted_fine_tune_resumes_from_the_saved_pruned_model(tmp_path):
    log = ResultLog(tmp_path / "ft.jsonl")
    kwargs = dict(
        arch="resnet20", score_batches=data(2, 0), train_loader=data(2, 3), eval_loaders={"val": data(1, 1)},
        out_dir=tmp_path, log=log, batches_per_step=1, progress=False,
    )  # fmt: skip
    first, _ = prune_and_fine_tune(
        dense(), EXAMPLE, "magnitude", 0.6, fine_tune_options={"epochs": 1, "lr": 1e-3}, **kwargs
    )
    (tmp_path / "magnitude_0.6_final.pt").unlink()  # as if stopped before the end: pruned file + checkpoint stay
    model, record = prune_and_fine_tune(
        dense(), EXAMPLE, "magnitude", 0.6, fine_tune_options={"epochs": 2, "lr": 1e-3}, **kwargs
    )
    assert record["epochs"] == 2
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [
        m.out_channels for m in first.modules() if isinstance(m, torch.nn.Conv2d)
    ]


def test_a_result_log_refuses_records_made_with_another_configuration(tmp_path):
    config = {"epochs": 2, "eval_sets": ("val",), "dataset": "cifar10"}
    log = ResultLog(tmp_path / "r.jsonl", config=config)
    log.append({"criterion": "oba", "keep_flops": 0.5, "acc_val": 0.9})
    again = ResultLog(tmp_path / "r.jsonl", config=dict(config))  # same settings (a tuple reads back as a list)
    assert again.records() == log.records()
    with pytest.raises(StaleResultsError, match=r"'epochs': \(2, 5\).*delete .*r\.jsonl and .*r\.config\.json") as e:
        ResultLog(tmp_path / "r.jsonl", config={**config, "epochs": 5})
    assert "dataset" not in str(e.value)  # only what differs is named
    with pytest.raises(StaleResultsError, match=r"'dataset': \('cifar10', 'synthetic'\)"):
        ResultLog(tmp_path / "r.jsonl", config={**config, "dataset": "synthetic"})
    assert ResultLog(tmp_path / "r.jsonl").records() == log.records()  # without a config, nothing is checked
