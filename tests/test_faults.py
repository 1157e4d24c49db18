"""Fault injection: every resumable runner, SIGKILLed at a chosen point and rerun, ends as an uninterrupted run.

The runs happen in ``tests/fault_runner.py`` (one subprocess; each run in a forked child, which kills itself at the
point its environment names). For each scenario: an uninterrupted run in ``A`` (one per runner), a killed run in
``B`` (it must die by SIGKILL), a rerun in ``B``; then ``B`` must hold the same files as ``A`` (plus, after a kill
mid-``atomic_write``, the stray temporary file), every file readable, the same JSONL records (timings aside) with no
unit of work twice, and the same weights. Also: a full disk (``ENOSPC``) mid-write leaves the previous checkpoint
and log intact, and the error propagates.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from torch import nn

from oba.experiments import ResultLog
from oba.io import load_torch, read_jsonl
from oba.pruned_io import load_pruned
from oba.train import fine_tune, load_checkpoint

RUNNER = Path(__file__).with_name("fault_runner.py")

# name: (runner, kill point). prune_step calls: sweep 4 (2 per criterion), iterative 2 (1 per stage); fine-tuning:
# 4 batches an epoch, 2 epochs; atomic_write calls: fine_tune 1 (log reset) + 1 per epoch, prune_ft 1 (pruned model)
# + 3 (fine_tune) + 1 (final model); append_jsonl calls: 1 per epoch, then 1 per result record.
SCENARIOS = {
    "sweep-mid-second-criterion": ("sweep", {"FAULT_PRUNE_STEP": "3"}),
    "sweep-torn-second-record": ("sweep", {"FAULT_APPEND": "2"}),
    "fine_tune-mid-epoch-2": ("fine_tune", {"FAULT_BATCH": "6"}),
    "fine_tune-torn-log-epoch-2": ("fine_tune", {"FAULT_APPEND": "2"}),
    "fine_tune-torn-checkpoint-epoch-2": ("fine_tune", {"FAULT_ATOMIC": "3"}),
    "prune_ft-mid-epoch-2": ("prune_ft", {"FAULT_BATCH": "6"}),
    "prune_ft-torn-final-model": ("prune_ft", {"FAULT_ATOMIC": "5"}),
    "prune_ft-torn-result-record": ("prune_ft", {"FAULT_APPEND": "3"}),
    "iterative-mid-stage-2-pruning": ("iterative", {"FAULT_PRUNE_STEP": "2"}),
    "iterative-torn-stage-1-record": ("iterative", {"FAULT_APPEND": "3"}),
    "iterative_fixed_order-mid-stage-2-pruning": ("iterative_fixed_order", {"FAULT_PRUNE_STEP": "2"}),
    # the series runner (scripts/notebooks.py) over tests/data/toy_series: killed inside the second notebook, while
    # the first notebook writes a record, and while the runner writes the first notebook's .done marker
    "notebooks-mid-second-notebook": ("notebooks", {"FAULT_NOTEBOOK": "cubes:1:kill"}),
    "notebooks-torn-record": ("notebooks", {"FAULT_NOTEBOOK": "squares:2:torn"}),
    "notebooks-torn-done-marker": ("notebooks", {"FAULT_ATOMIC": "1"}),
}
BASELINES = sorted({runner for runner, _ in SCENARIOS.values()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every baseline and scenario in one subprocess; ``{name: (dir, [return codes])}``."""
    root = tmp_path_factory.mktemp("faults")
    groups = [[{"runner": r, "out": str(root / f"A-{r}"), "env": {}}] for r in BASELINES]
    for name, (runner, env) in SCENARIOS.items():
        out = str(root / f"B-{name}")
        groups.append([{"runner": runner, "out": out, "env": env}, {"runner": runner, "out": out, "env": {}}])
    (root / "jobs.json").write_text(json.dumps(groups))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--jobs", str(root / "jobs.json")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    names = [f"A-{r}" for r in BASELINES] + [f"B-{n}" for n in SCENARIOS]
    return {name: (root / name, c, done.stderr) for name, c in zip(names, codes, strict=True)}


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds" and not k.endswith("_seconds")}


def _assert_same(a, b, where: str) -> None:
    """Equal JSON values; floats equal to 1e-6 (relative) -- resumption is meant to be exact."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(b, (int, float)) and (
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
        ), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _unit(record: dict) -> tuple:
    """What a record is the result of: it must appear once."""
    if "i" in record:  # the toy notebooks' records
        return ("i", record["i"])
    if "epoch" in record:
        return ("epoch", record["epoch"])
    return (record.get("tag"), record["criterion"], record["keep_flops"])


def _assert_state_dicts_equal(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{where}: {k}: {m}")


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_killed_and_rerun_runner_ends_as_an_uninterrupted_run(runs, name):
    runner, env = SCENARIOS[name]
    a, codes_a, log = runs[f"A-{runner}"]
    b, codes_b, _ = runs[f"B-{name}"]
    assert codes_a == [0], log[-5000:]
    assert codes_b[0] == -9, f"the run was not killed by SIGKILL at {env} (return code {codes_b[0]})"
    assert codes_b[1] == 0, f"the rerun failed: {log[-5000:]}"

    files_a = _files(a)
    stray = {f for f in _files(b) if Path(f).name.startswith(".") and f.endswith(".tmp")}
    assert _files(b) - stray == files_a
    # a kill inside atomic_write leaves its temporary file (nothing removes it); any other kill leaves none
    assert len(stray) == (1 if "FAULT_ATOMIC" in env else 0), stray

    for fname in sorted(files_a):
        pa, pb = a / fname, b / fname
        if fname.endswith(".jsonl"):
            ra, rb = read_jsonl(pa), read_jsonl(pb)
            assert pb.read_bytes().endswith(b"\n"), f"{fname}: torn last line left"
            units = [_unit(r) for r in rb]
            assert len(units) == len(set(units)), f"{fname}: a record twice: {units}"
            _assert_same([_strip(r) for r in ra], [_strip(r) for r in rb], fname)
        elif fname.endswith(("_pruned.pt", "_final.pt")):
            ma, mb = load_pruned(pa), load_pruned(pb)
            _assert_state_dicts_equal(ma.state_dict(), mb.state_dict(), fname)
        elif fname.endswith("_ft.pt") or fname == "ft.pt":
            ca, cb = load_checkpoint(pa), load_checkpoint(pb)
            assert ca["epoch"] == cb["epoch"]
            _assert_state_dicts_equal(ca["model"], cb["model"], fname)
            _assert_same([_strip(r) for r in ca["history"]], [_strip(r) for r in cb["history"]], fname)
        elif fname.endswith(".done"):  # the runner's marker: the parameters, results_dir aside (A and B differ)
            da, db = json.loads(pa.read_text()), json.loads(pb.read_text())
            assert da.pop("results_dir") == str(a) and db.pop("results_dir") == str(b) and da == db, fname
        elif fname.endswith(".ipynb"):  # the executed notebook: whole, every code cell run without an error
            na, nb = nbformat.read(pa, as_version=4), nbformat.read(pb, as_version=4)

            def sources(n):  # the injected parameters name the output folder, A or B
                return [c.source for c in n.cells if "injected-parameters" not in c.metadata.get("tags", [])]

            assert sources(na) == sources(nb), fname
            code = [c for c in nb.cells if c.cell_type == "code"]
            assert all(c.execution_count is not None for c in code), f"{fname}: a cell was not run"
            assert not any(o.get("output_type") == "error" for c in code for o in c.outputs), fname
        else:
            assert fname.endswith(".pt"), fname
            _assert_state_dicts_equal(load_torch(pa), load_torch(pb), fname)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tiny() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint_and_log(tmp_path, monkeypatch):
    model, batches = _tiny()
    ckpt, log = tmp_path / "ft.pt", tmp_path / "ft.jsonl"
    options = dict(lr=0.01, log_path=log, checkpoint_path=ckpt, progress=False, seed=0)
    fine_tune(model, batches, epochs=1, **options)
    before_ckpt, before_log = ckpt.read_bytes(), log.read_bytes()
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):  # half the file gets written, then the disk is full
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise _enospc()

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError) as err:
        fine_tune(model, batches, epochs=2, **options)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert ckpt.read_bytes() == before_ckpt and load_checkpoint(ckpt)["epoch"] == 1
    assert log.read_bytes() == before_log and [r["epoch"] for r in read_jsonl(log)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.jsonl", "ft.pt"]  # no temporary file left
    # once there is room again, the run resumes and ends as an uninterrupted one
    fine_tune(model, batches, epochs=2, **options)
    straight, _ = _tiny()
    fine_tune(straight, batches, epochs=2, lr=0.01, progress=False, seed=0)
    _assert_state_dicts_equal(straight.state_dict(), model.state_dict(), "after the full disk")
    assert [r["epoch"] for r in read_jsonl(log)] == [1, 2]


class _FullDiskFile:
    """A file whose next write stores half of its data, then fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise _enospc()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def test_a_full_disk_during_a_result_append_keeps_the_previous_records(tmp_path, monkeypatch):
    log = ResultLog(tmp_path / "results.jsonl")
    old = [{"criterion": "magnitude", "keep_flops": 0.8, "acc_val": 0.25}, {"criterion": "taylor", "keep_flops": 0.8}]
    for r in old:
        log.append(r)
    monkeypatch.setattr("oba.io.open", lambda *a, **k: _FullDiskFile(open(*a, **k)), raising=False)
    with pytest.raises(OSError) as err:
        log.append({"criterion": "taylor", "keep_flops": 0.6, "acc_val": 0.5})
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert not log.path.read_bytes().endswith(b"\n")  # the half record is there, torn ...
    assert log.records() == old  # ... and ignored
    new = {"criterion": "taylor", "keep_flops": 0.6, "acc_val": 0.5}
    log.append(new)  # the retry cuts the fragment off first
    assert log.records() == [*old, new] and read_jsonl(log.path) == [*old, new]
