"""The Hessian decomposition's tracing cost per pruning step, and two-term against exact OBA per step.

    python benchmarks/decomposition_tracing.py [--model resnet56] [--steps 5] [--batches 4] [--batch 64]
                                               [--keep 0.5] [--image 32] [--threads N]

``oba.prune_structured`` prunes a seeded model (random weights: the cost does not depend on them; BatchNorm in
train mode, the published scoring protocol) to ``--keep`` of its MACs in ``--steps`` steps, each scored on the same
``--batches`` fixed batches of ``--batch`` synthetic images. At every step the SAME model and batches are scored
twice, side by side: exact OBA (``"oba"``: one double-backward Hessian-vector product per batch) and the published
code's two-term criterion (``"oba_two_term"``: the series + parallel terms of
:class:`oba.decompose.HessianDecomposition`); the two-term scores drive the pruning. The decomposition is traced
with ``make_fx`` (the graph changes as channels go, so once per step, then reused for every batch of the step);
every trace is timed here (a wrapper in this process only).

Per step: the time of each criterion's scoring, their ratio, the number of traces, the trace time and its share of
the step's two-term scoring time. Goal (issue #16): the trace share at most 20 % at every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import oba
import oba.decompose
import oba.models
from oba.group_importance import ParameterScoreImportance


def run(model_name: str, steps: int, batches: int, batch: int, keep: float, image: int) -> list[dict]:
    """One pruning run; per step ``{step, exact_s, two_term_s, ratio, traces, trace_s, trace_share}``."""
    torch.manual_seed(0)
    model = oba.models.create(model_name).train()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 3, image, image, generator=g), torch.randint(0, 10, (batch,), generator=g))]
    data += [(torch.randn_like(data[0][0]), data[0][1].roll(k + 1)) for k in range(batches - 1)]
    traces: list[float] = []
    real_make_fx = oba.decompose.make_fx

    def timed_make_fx(*args, **kwargs):
        traced = real_make_fx(*args, **kwargs)

        def trace(*inputs):
            start = time.perf_counter()
            try:
                return traced(*inputs)
            finally:
                traces.append(time.perf_counter() - start)

        return trace

    rows: list[dict] = []

    def scorer(m, step_batches):
        start = time.perf_counter()
        oba.score(m, F.cross_entropy, step_batches, "oba", progress=False)
        exact = time.perf_counter() - start
        traces.clear()
        start = time.perf_counter()
        scores = oba.score(m, F.cross_entropy, step_batches, "oba_two_term", progress=False)
        two_term = time.perf_counter() - start
        rows.append(
            {
                "step": len(rows) + 1, "exact_s": exact, "two_term_s": two_term, "ratio": two_term / exact,
                "traces": len(traces), "trace_s": sum(traces), "trace_share": sum(traces) / two_term,
            }
        )  # fmt: skip
        return ParameterScoreImportance(m, scores)

    oba.decompose.make_fx = timed_make_fx
    try:
        oba.prune_structured(
            model, torch.zeros(1, 3, image, image), scorer, keep_flops=keep, steps=steps, batches=data,
            batches_per_step=batches, progress=False,
        )  # fmt: skip
    finally:
        oba.decompose.make_fx = real_make_fx
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="scoring batches per step")
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--image", type=int, default=32, help="image side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.model}, {args.steps} steps of {args.batches} batches of {args.batch} ({args.image}x{args.image}), "
        f"keep {args.keep} of the MACs, {args.threads} threads, torch {torch.__version__}"
    )
    rows = run(args.model, args.steps, args.batches, args.batch, args.keep, args.image)
    header = ("step", 4), ("exact s", 9), ("two-term s", 11), ("2-term/exact", 13), ("traces", 7), ("trace s", 8)
    print(" ".join(f"{h:>{w}}" for h, w in header), f"{'share':>7}")
    for r in rows:
        print(
            f"{r['step']:>4} {r['exact_s']:>9.2f} {r['two_term_s']:>11.2f} {r['ratio']:>13.2f} {r['traces']:>7} "
            f"{r['trace_s']:>8.2f} {100 * r['trace_share']:>6.1f}%"
        )
    print(
        f"median two-term/exact {statistics.median(r['ratio'] for r in rows):.2f}; largest trace share "
        f"{100 * max(r['trace_share'] for r in rows):.1f}% (goal <= 20%)"
    )


if __name__ == "__main__":
    main()
