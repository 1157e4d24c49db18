"""Cost of the block-Taylor criterion per scoring batch against one exact OBA HVP, measured side by side.

    python benchmarks/block_taylor_cost.py [--model resnet20] [--batch 64] [--repeats 3] [--probes 1 4 16]

On a CIFAR ResNet (random weights: the cost does not depend on them) in eval mode, one batch of random images:

* ``oba``             ``oba.score(..., "oba")`` on the batch: one exact Hessian-vector product (the unit of cost);
* ``block K=k``       :func:`oba.block_taylor.block_taylor` with ``probes=k`` over the pruner's groups: the gradient,
                      ``k`` HVPs, and the sign bookkeeping (one backward pass through the channel-sum rule per probe);
* ``block exact``     ``probes=None`` on ``--exact-units`` units of the first group (one HVP per unit), reported per
                      unit and extrapolated to all of the model's units.

The methods alternate ``--repeats`` times after one warm-up each; the table gives median seconds and the ratio to
``oba`` in the same run. The estimator costs about ``K`` HVPs whatever the number of units; the exact reference
costs one per unit (ResNet-20: 336 prunable channels in its 9 block-internal groups).
"""

from __future__ import annotations

import argparse
import statistics
import time


def setup(model_name: str, batch: int, image: int = 32):
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    import oba.models
    from oba.prunable import default_ignored_layers

    torch.manual_seed(0)
    model = oba.models.create(model_name).eval()
    x, y = torch.randn(batch, 3, image, image), torch.randint(0, 10, (batch,))
    dg = tp.DependencyGraph().build_dependency(model, x[:1])
    groups = list(
        dg.get_all_groups(
            ignored_layers=default_ignored_layers(model), root_module_types=(torch.nn.Conv2d, torch.nn.Linear)
        )
    )
    return model, F.cross_entropy, (x, y), groups


def run(model_name: str, batch: int, repeats: int, probes: list[int], exact_units: int, image: int = 32) -> list[dict]:
    import oba
    from oba.block_taylor import block_taylor

    model, loss_fn, data, groups = setup(model_name, batch, image)
    units = sum(len(g[0].idxs) for g in groups)
    first = groups[:1]
    some = [[(c,) for c in range(min(exact_units, len(first[0][0].idxs)))]]
    methods = {"oba": lambda: oba.score(model, loss_fn, [data], "oba", progress=False)}
    for k in probes:
        methods[f"block K={k}"] = lambda k=k: block_taylor(model, loss_fn, [data], groups, probes=k)
    methods["block exact"] = lambda: block_taylor(model, loss_fn, [data], first, units=some, probes=None)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for run_index in range(repeats + 1):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if run_index:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["oba"])
    rows = []
    for name, ts in times.items():
        seconds = statistics.median(ts)
        row = {"method": name, "seconds": seconds, "ratio": seconds / base}
        if name == "block exact":
            per_unit = seconds / len(some[0])
            row.update(per_unit_s=per_unit, all_units_s=per_unit * units, all_units_ratio=per_unit * units / base)
        rows.append(row)
    print(f"{model_name}, batch {batch}, {units} units in {len(groups)} groups; median of {repeats}")
    for row in rows:
        extra = ""
        if "all_units_s" in row:
            extra = f"   (per unit {row['per_unit_s']:.3f} s; all {units} units {row['all_units_ratio']:.0f}x)"
        print(f"{row['method']:12} {row['seconds']:8.3f} s   {row['ratio']:6.2f}x one OBA HVP{extra}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--exact-units", type=int, default=8)
    args = parser.parse_args()
    run(args.model, args.batch, args.repeats, args.probes, args.exact_units)


if __name__ == "__main__":
    main()
