"""Cost of one exact OBA scoring batch against a plain gradient step, measured side by side.

    python benchmarks/oba_speed.py [--model resnet32] [--batch 64] [--repeats 3] [--rounds 3] [--threads N]
                                   [--malloc-retain]

Each method runs in a fresh subprocess (so its peak resident memory is its own): the median wall time of
``--repeats`` runs after one warm-up, and the peak RSS above the process's footprint after building the
model and batch. The methods run in turn, ``--rounds`` times over; each round divides every method's time by
the ``fwd+bwd`` time of the same round (so a drift of the CPU's speed during the run cancels), and the table
gives the median over rounds of these ratios (and of the times). Methods:

* ``fwd+bwd``   one forward and backward pass (``loss.backward()``), the unit of cost;
* ``gradient``  ``oba.gradient`` (torch.func ``grad``);
* ``oba exact`` ``oba.score(..., "oba")`` on one batch: one Hessian-vector product by double backward
  (``hvp_method="rev_rev"``, the default);
* ``oba fwd-rev`` the same with the forward-over-reverse HVP (``torch.func.jvp`` of ``grad``);
* ``decomposed`` ``oba.decompose.HessianDecomposition`` applied to θ: all four terms separately (tangents,
  one backward, op-level sources, one backward sweep per term that has sources; the model is traced once,
  at the warm-up, as when scoring many batches);
* ``decomposed sum`` ``HessianDecomposition.hvp``: the four terms' sources summed and pulled back in one sweep
  (:math:`Hv` through the decomposition);
* ``decomposed 2-term`` the same for ``terms=("series", "parallel")``, the published code's criterion.

Arithmetic floor of ``decomposed`` on a conv net, in units F of one forward pass of the convolutions (a plain
step costs 3F: forward, input gradients, weight gradients): the forward with tangents 3F (value, conv(dx, W),
conv(x, dW)), the first backward (input gradients only) F, the conv sources 2F, and one full backward per term
with activation sources (Gauss-Newton, series, and nonlinear with train-mode BatchNorm) 3 x 2F: 12F, i.e. 4x
before any element-wise work. One summed sweep (``decomposed sum``, ``decomposed 2-term``) makes it 8F (2.7x).

Memory allocator. With glibc's default malloc the methods that hold many activation-sized tensors (all but
``fwd+bwd`` and ``gradient``) spend a large share of their time in page faults: the heap is trimmed back to
the system whenever its top is freed and faulted in again at the next allocation (on ResNet-32, batch 64,
about 200,000 minor faults per decomposed call against 12,000 for ``fwd+bwd``). ``--malloc-retain`` runs the
workers with ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` raised (glibc's environment
switches; jemalloc or tcmalloc, as PyTorch's CPU performance guide suggests, have the same effect), so freed
memory is reused; both settings are worth reporting.

Goals: exact OBA at most 3x a plain gradient step, the decomposed computation at most 4x. Weights are
random (the cost does not depend on them); BatchNorm in train mode, as in the published scoring protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("fwd+bwd", "gradient", "oba exact", "oba fwd-rev", "decomposed", "decomposed sum", "decomposed 2-term")


def measure(method: str, model_name: str, batch: int, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    import oba
    import oba.models
    from oba.decompose import HessianDecomposition

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = oba.models.create(model_name).train()
    spec = oba.models.get_spec(model_name)
    x = torch.randn(batch, *spec.input_shape)
    y = torch.randint(0, 10, (batch,))
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def grad_only() -> None:
        oba.gradient(model, F.cross_entropy, (x, y))

    def oba_exact() -> None:
        oba.score(model, F.cross_entropy, [(x, y)], "oba", progress=False)

    def oba_fwd_rev() -> None:
        oba.score(model, F.cross_entropy, [(x, y)], "oba", hvp_method="fwd_rev", progress=False)

    decomposition = HessianDecomposition(model, F.cross_entropy)  # traced at the warm-up, as when scoring

    def decomposed() -> None:
        decomposition((x, y), oba.select_params(model))

    def decomposed_sum() -> None:
        decomposition.hvp((x, y), oba.select_params(model))

    def decomposed_two_term() -> None:
        decomposition.hvp((x, y), oba.select_params(model), terms=("series", "parallel"))

    fn = {
        "fwd+bwd": fwd_bwd,
        "gradient": grad_only,
        "oba exact": oba_exact,
        "oba fwd-rev": oba_fwd_rev,
        "decomposed": decomposed,
        "decomposed sum": decomposed_sum,
        "decomposed 2-term": decomposed_two_term,
    }[method]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "median_s": statistics.median(times), "peak_mb": (peak_kb - base_kb) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc-retain", action="store_true", help="glibc: keep freed memory (module docstring)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.model, args.batch, args.repeats, args.threads)))
        return
    env = dict(os.environ)
    if args.malloc_retain:
        env.update(MALLOC_TRIM_THRESHOLD_=str(1 << 40), MALLOC_MMAP_THRESHOLD_=str(1 << 32))
    rounds: list[dict[str, dict]] = []
    for _ in range(args.rounds):
        row = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, "--worker", method, "--model", args.model, "--batch", str(args.batch)]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            row[method] = json.loads(out.strip().splitlines()[-1])
        rounds.append(row)
    allocator = "glibc malloc, freed memory retained" if args.malloc_retain else "default allocator"
    print(
        f"{args.model}, batch {args.batch}, {args.threads} threads, {allocator}, median of {args.repeats} calls "
        f"per worker, median over {args.rounds} rounds (CPU)"
    )
    print(f"{'method':18s} {'median s':>9s} {'x fwd+bwd':>10s} {'ratio range':>13s} {'peak MB above model':>20s}")
    for method in METHODS:
        times = [r[method]["median_s"] for r in rounds]
        ratios = [r[method]["median_s"] / r["fwd+bwd"]["median_s"] for r in rounds]
        peak = max(r[method]["peak_mb"] for r in rounds)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(
            f"{method:18s} {statistics.median(times):9.3f} {statistics.median(ratios):10.2f} {spread:>13s} {peak:20.0f}"
        )


if __name__ == "__main__":
    main()
