"""Peak memory and wall time of WoodFisher and CBS on the MNIST MLPNet with one full 32,360-weight block.

The setup of the WoodFisher and CBS papers: N per-sample gradients (default 10,000), damping 1e-3, one Fisher
block over all three layers, sparsity 0.9 (fraction REMOVED). The reference implementations build the dense
32,360 x 32,360 inverse (8.4 GB in float64, 4.2 GB in float32); here every inverse quantity goes through the
N x N Woodbury core and the gradients are kept factored (never the N x d matrix G).

    .venv/bin/python benchmarks/obs_memory.py [--grads 10000] [--dtype float64] [--sweeps 2]

Prints, per phase, the wall time and the process's peak resident memory (ru_maxrss) above the baseline
taken after loading the model and the data. Timings are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

import oba.data
import oba.models
from oba.cbs import SwapSearch, cbs_update, rmp_start
from oba.empirical_fisher import (
    block_fishers,
    linear_gradient_factors,
    make_blocks,
    woodfisher_scores,
    woodfisher_update,
)
from oba.unstructured import masked_loss


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grads", type=int, default=10_000, help="number N of per-sample gradients")
    parser.add_argument("--damp", type=float, default=1e-3)
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights REMOVED")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--sweeps", type=int, default=2, help="CBS local-search sweeps to time")
    parser.add_argument("--trials", type=int, default=5, help="RMP start trials")
    parser.add_argument("--loss-samples", type=int, default=2000, help="training images judging CBS candidates")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    model = oba.models.load_pretrained("mlpnet", args.data_dir)
    train = oba.data.subset(oba.data.mnist("train", args.data_dir), args.grads, seed=0)
    batches = list(oba.data.loader(train, batch_size=1000))
    loss_batches = batches[: max(1, args.loss_samples // 1000)]
    layers = ["fc1", "fc2", "fc3"]
    theta = torch.cat([getattr(model, n).weight.detach().reshape(-1) for n in layers])
    d = theta.numel()
    base = peak_mb()
    print(f"MLPNet: d = {d:,} weights in one block, N = {args.grads:,} gradients, {args.dtype}, damping {args.damp}")
    print(
        f"dense inverse the reference code forms: {d * d * 4 / 1e9:.1f} GB (float32), "
        f"{d * d * 8 / 1e9:.1f} GB (float64)"
    )
    print(
        f"G itself would be {args.grads * d * 4 / 1e9:.2f} GB (float32); "
        f"the N x N core {args.grads**2 * dtype.itemsize / 1e9:.2f} GB"
    )
    print(f"baseline resident memory after loading model and data: {base:.0f} MB\n")
    rows = []

    def phase(name, fn):
        clock = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - clock, peak_mb() - base))
        print(f"{name:<44s} {rows[-1][1]:8.2f} s   peak +{rows[-1][2]:7.0f} MB", flush=True)
        return out

    grads = phase(
        "per-sample gradient factors",
        lambda: linear_gradient_factors(model, F.cross_entropy, batches, layers, args.grads, dtype=dtype),
    )
    blocks = make_blocks({f"{n}.weight": getattr(model, n).weight.shape for n in layers}, "joint")
    fishers = phase("Woodbury core G Gᵀ + NλI, Cholesky", lambda: block_fishers(grads, blocks, args.damp))
    fisher = fishers[0]
    inv_diag = phase("diag(F⁻¹) (all 32,360 entries)", fisher.inverse_diagonal)
    scores = phase("WoodFisher scores", lambda: woodfisher_scores(fisher, theta))
    k = round(args.sparsity * d)
    pruned = torch.zeros(d, dtype=torch.bool)
    pruned[torch.argsort(scores, stable=True)[:k]] = True
    phase("WoodFisher update (one F⁻¹ product)", lambda: woodfisher_update(fisher, theta, pruned))
    loss_of = masked_loss(model, F.cross_entropy, loss_batches, [f"{n}.weight" for n in layers])

    def real_loss(p):
        return loss_of(torch.where(p, torch.zeros_like(theta), theta))

    start, _ = phase(
        f"CBS start: {args.trials} RMP trials (real loss)", lambda: rmp_start(theta, k, real_loss, trials=args.trials)
    )
    search = phase("CBS bookkeeping init (u = F θ_P)", lambda: SwapSearch(fishers, blocks, theta, start))
    for s in range(args.sweeps):
        swaps = phase(f"CBS local-search sweep {s + 1}", lambda: search.sweep(eps=1e-4, rho=10, tau=20))
        print(f"    swaps in the sweep: {swaps}, objective {search.objective:.6g}")
    phase("CBS update (exact multi-weight OBS)", lambda: cbs_update(fishers, blocks, theta, search.pruned))
    del inv_diag
    total = max(r[2] for r in rows)
    print(
        f"\npeak resident memory above baseline: {total:.0f} MB ({'under' if total < 1024 else 'OVER'} 1 GB); "
        f"absolute peak {peak_mb():.0f} MB; total time {sum(r[1] for r in rows):.1f} s"
    )


if __name__ == "__main__":
    main()
