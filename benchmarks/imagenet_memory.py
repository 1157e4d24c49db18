"""Exact OBA at ImageNet scale: time and peak memory of scoring full-size ViT-B/16 and ResNet-50 on CPU.

    python benchmarks/imagenet_memory.py [--models vit_b_16 resnet50] [--batch 2] [--repeats 3] [--threads 2]
                                         [--no-prune]

Each (model, method) runs in a fresh subprocess, so that its peak resident memory (``ru_maxrss``) is its own;
``peak GB`` is that whole-process peak (Python, torch, model, batch and the method's work), ``above model`` the
part above the footprint after building the model and the batch. Times are the median of ``--repeats`` calls
after one warm-up call. Weights are random (cost and memory do not depend on them); torchvision's zero-initialised
classifier is re-drawn so that the scores are not degenerate. Inputs ``[batch, 3, 224, 224]``, labels in
``0..999``, the model in train mode (as the published scoring protocol; ViT-B/16 has no dropout). Methods:

* ``fwd+bwd``   one plain training step's gradient: ``cross_entropy(model(x), y).backward()``, the unit of cost
  (its row: the time and peak memory of plain steps alone);
* ``oba exact`` ``oba.score(model, F.cross_entropy, [(x, y)], "oba")``: the exact OBA score
  :math:`s = \\theta \\odot H\\theta` of every parameter, one Hessian-vector product by double backward. Each
  call is paired with a plain step timed just before it in the same process (its ``.grad`` freed before
  scoring); ``x fwd+bwd`` is the median of the per-pair ratios, so a drift of the CPU's speed (other jobs)
  cancels. Its peak is OBA's: a plain step needs less memory;
* ``prune``     the full-size structural check: ``oba.prune_structured(model, x[:1], "oba", keep_flops=0.8)``
  scored on the same batch (one step), then the forward pass, the head / width bookkeeping (ViT: every block's
  q/k/v widths ``heads * head_dim``, residual width 768 untouched) and a ``save_pruned`` / ``load_pruned``
  round trip (largest output difference); its ``median s`` is the one pruning call, not a median.

The issue's requirement: exact OBA of ViT-B/16 within 16 GB of memory. The CPU may be shared with other jobs:
timings then vary from run to run, the ratio to ``fwd+bwd`` (measured in the same conditions) less so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

METHODS = ("fwd+bwd", "oba exact", "prune")


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(
    method: str,
    model_name: str,
    batch: int = 2,
    repeats: int = 3,
    threads: int = 2,
    size: int = 224,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``method`` on a fresh ``oba.models.create(model_name, **model_kwargs)``; returns one JSON-able row.

    ``size``: input height and width (224 for the full-size models; small configurations for tests).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    import oba
    import oba.models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = oba.models.create(model_name, **(model_kwargs or {})).train()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(classifier.weight, std=0.01)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, classifier.out_features, (batch,))
    base_kb = _peak_kb()
    row: dict[str, Any] = {"method": method, "model": model_name, "params": sum(p.numel() for p in model.parameters())}

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def oba_exact() -> None:
        oba.score(model, F.cross_entropy, [(x, y)], "oba", progress=False)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    if method == "prune":
        start = time.perf_counter()
        row.update(_prune_check(model, model_name, model_kwargs or {}, x, y))
        row["median_s"] = time.perf_counter() - start - row.pop("check_s")
    elif method == "fwd+bwd":
        fwd_bwd()  # warm-up
        row["median_s"] = statistics.median(timed(fwd_bwd) for _ in range(repeats))
        model.zero_grad(set_to_none=True)
    else:  # each OBA call paired with a plain step timed just before it: the ratio is drift-free
        fwd_bwd()
        model.zero_grad(set_to_none=True)  # frees the .grad tensors before scoring
        oba_exact()
        pairs = []
        for _ in range(repeats):
            unit = timed(fwd_bwd)
            model.zero_grad(set_to_none=True)
            pairs.append((timed(oba_exact), unit))
        row["median_s"] = statistics.median(t for t, _ in pairs)
        row["paired_fwd_bwd_s"] = statistics.median(u for _, u in pairs)
        row["ratio"] = statistics.median(t / u for t, u in pairs)
    peak_kb = _peak_kb()
    row.update(peak_mb=peak_kb / 1024, above_model_mb=(peak_kb - base_kb) / 1024)
    return row


def _prune_check(model, model_name: str, model_kwargs: dict[str, Any], x, y) -> dict[str, Any]:
    """OBA-prune ``model`` to 80 % of its MACs on ``(x, y)``; check forward, structure and a save/load round trip."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from oba.models.torchvision_models import vit_widths
    from oba.prune import load_pruned, prune_structured, save_pruned

    _, history = prune_structured(
        model,
        x[:1],
        "oba",
        keep_flops=0.8,
        loss_fn=F.cross_entropy,
        batches=[(x, y)],
        batches_per_step=1,
        progress=False,
    )
    check_start = time.perf_counter()
    model.eval()
    result: dict[str, Any] = {"flops_kept": history[-1]["flops_kept"], "params_kept": history[-1]["params_kept"]}
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    if isinstance(model, torchvision.models.VisionTransformer):
        widths = vit_widths(model)
        for block, w in zip(model.encoder.layers, widths, strict=True):
            attn = block.self_attention
            assert attn.q.out_features == attn.k.out_features == attn.v.out_features == w["heads"] * w["head_dim"]
            assert attn.proj.out_features == block.mlp[3].out_features == model.hidden_dim
        result["heads"] = [w["heads"] for w in widths]
        result["mlp_hidden"] = [w["mlp_hidden"] for w in widths]
    else:
        result["stage_widths"] = [getattr(model, f"layer{i}")[0].conv3.out_channels for i in range(1, 5)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.pt")
        save_pruned(model, path, model_name, model_kwargs)
        loaded = load_pruned(path).eval()
        with torch.no_grad():
            result["roundtrip_max_abs_diff"] = float((loaded(x) - out).abs().max())
    result["check_s"] = time.perf_counter() - check_start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_b_16", "resnet50"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-prune", action="store_true", help="skip the full-size pruning check")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (model_name,) = args.models
        print(json.dumps(measure(args.worker, model_name, args.batch, args.repeats, args.threads)))
        return
    methods = [m for m in METHODS if not (args.no_prune and m == "prune")]
    rows = []
    for model_name in args.models:
        for method in methods:
            cmd = [sys.executable, __file__, "--worker", method, "--models", model_name, "--batch", str(args.batch)]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"batch {args.batch} x 3 x 224 x 224, {args.threads} threads, CPU, median of {args.repeats} calls after a "
        "warm-up, one fresh process per row"
    )
    print(
        f"{'model':9s} {'method':10s} {'median s':>9s} {'x fwd+bwd':>10s} {'fwd+bwd s (paired)':>19s} "
        f"{'peak GB':>8s} {'above model GB':>15s}"
    )
    for row in rows:
        ratio = f"{row['ratio']:10.2f}" if "ratio" in row else f"{'-':>10s}"
        unit = f"{row['paired_fwd_bwd_s']:19.2f}" if "paired_fwd_bwd_s" in row else f"{'-':>19s}"
        print(
            f"{row['model']:9s} {row['method']:10s} {row['median_s']:9.2f} {ratio} {unit} "
            f"{row['peak_mb'] / 1024:8.2f} {row['above_model_mb'] / 1024:15.2f}"
        )
    for row in rows:
        if row["method"] == "prune":
            skip = ("method", "model", "median_s", "peak_mb", "above_model_mb")
            detail = {k: v for k, v in row.items() if k not in skip}
            print(f"prune check {row['model']}: {json.dumps(detail)}")
    vit = [r for r in rows if r["model"] == "vit_b_16" and r["method"] == "oba exact"]
    if vit:
        peak = vit[0]["peak_mb"] / 1024
        verdict = "within" if peak < 16 else "OVER"
        print(f"ViT-B/16 exact OBA, batch {args.batch}: peak RSS {peak:.2f} GB ({verdict} 16 GB)")


if __name__ == "__main__":
    main()
