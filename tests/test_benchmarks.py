"""The benchmarks' methods run (in-process, on small models and batches) and report sane numbers.

Only that they work: the timings are the benchmark's business, never asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import block_taylor_cost
    import decomposition_tracing
    import oba_speed
finally:
    sys.path.pop(0)


@pytest.mark.parametrize("method", oba_speed.METHODS)
def test_oba_speed_method_runs(method):
    threads = torch.get_num_threads()
    try:
        row = oba_speed.measure(method, "mlpnet", batch=2, repeats=1, threads=1)
    finally:
        torch.set_num_threads(threads)  # measure() sets it for its worker process
    assert row["method"] == method
    assert row["median_s"] > 0 and row["peak_mb"] >= 0


def test_the_tracing_benchmark_scores_both_criteria_on_every_step_and_traces_once_per_step():
    rows = decomposition_tracing.run("resnet20", steps=2, batches=2, batch=2, keep=0.7, image=8)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["traces"] == 1 and 0 < r["trace_s"] < r["two_term_s"] and r["exact_s"] > 0 for r in rows)


def test_the_block_taylor_benchmark_times_every_probe_count_against_one_oba_hvp():
    rows = block_taylor_cost.run("resnet20", batch=2, repeats=1, probes=[1, 2], exact_units=1, image=8)
    assert [r["method"] for r in rows] == ["oba", "block K=1", "block K=2", "block exact"]
    assert rows[0]["ratio"] == 1.0 and all(r["seconds"] > 0 for r in rows)
    assert rows[-1]["all_units_s"] == rows[-1]["per_unit_s"] * 336  # ResNet-20's block-internal channels
