"""The speed benchmark's methods run (in-process, on the small MNIST MLPNet) and report sane numbers.

Only that they work: the timings are the benchmark's business, never asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
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
