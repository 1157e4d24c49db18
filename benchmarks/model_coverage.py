"""Which models ``oba.prune_structured`` prunes: the coverage table (issue #13).

    python benchmarks/model_coverage.py [--source torchvision|timm|transformers] [--criteria magnitude oba]
                                        [--only resnet18 ...] [--out results/coverage.jsonl] [--timeout 600]
                                        [--memory-gb 8]

For every model of the source (torchvision: ``torchvision.models.list_models(module=torchvision.models)``; timm: the
35 models of :data:`TIMM`, one or more per family; transformers: BERT, RoBERTa, GPT-2, LLaMA-style with grouped-
query attention, ViT and Swin at the small configs of :data:`HF`, through ``oba.prunable.Logits``), at random
initialisation and in eval mode, on synthetic inputs (4 images of 64x64; 224x224 where the architecture fixes it,
96x96 for Inception-v3; 4 sequences of 64 tokens; torchvision's Swin and MaxViT after
``oba.prunable.prunable_window_attention``, so that their heads prune): prune with each criterion to 0.6 of the MACs
in 2 steps of one scoring batch, then check that the pruned model runs, met the target, and saves and loads. One
model and criterion per fresh subprocess (memory limit ``--memory-gb`` on its address space, ``--timeout``
seconds), so a failure or a memory blow-up is that row's result and its peak resident memory is its own.

Each row: model, family, source, criterion, status (``pass`` / ``fail``), the error's first line, MACs and
parameters kept, time, peak memory (MB), CPU latency of the dense and the pruned model on one input
(:func:`oba.flops.latency_ms`, median of 10).
Rows are appended to ``--out`` as they finish (a rerun skips the rows already there); a summary per source
is printed at the end.

``--overhead``: the pruning loop's own cost against Torch-Pruning's ``MetaPruner`` (GroupMagnitudeImportance,
global ranking, the same ignored layers, the same number of steps), side by side in this process on ResNet-50,
DenseNet-121 and ViT-B/16 at their test sizes: ``oba.prune_structured(..., "magnitude", keep_flops=0.6, steps=2)``
(which meets the MACs target exactly, counting after each step) against ``MetaPruner.step()`` twice at a channel
ratio; one warm-up each, then ``--repeats`` alternating runs, medians and their ratio. The garbage collector runs
before each timed run: otherwise a run pays for collecting the reference cycles the previous run (its dependency
graph) left, and which of the two pays depends on the order (0.2 s of oba's 0.7 s on ResNet-50).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

KEEP = 0.6
FIXED_224 = re.compile(r"^(vit_|swin|maxvit)")


def family(name: str) -> str:
    """``resnext50_32x4d`` -> ``resnext``, ``efficientnet_v2_s`` -> ``efficientnet``, ``vit_b_16`` -> ``vit``."""
    return re.match(r"[a-z]+", name).group(0)  # type: ignore[union-attr]


TIMM = [  # at least one per family: ResNet/ResNeXt, EfficientNet, MobileNet, RegNet, ConvNeXt, DeiT/ViT, Swin, Mixer
    "resnet18", "resnet50", "resnext50_32x4d", "seresnet50", "wide_resnet50_2", "resnetv2_50", "efficientnet_b0",
    "efficientnet_b2", "tf_efficientnetv2_s", "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100",
    "mnasnet_100", "regnetx_002", "regnety_002", "regnety_008", "convnext_atto", "convnext_tiny", "densenet121",
    "dla34", "dpn68", "ghostnet_100", "hrnet_w18_small", "inception_v3", "vgg11_bn", "rexnet_100", "cspresnet50",
    "deit_tiny_patch16_224", "vit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
    "mixer_s16_224", "poolformer_s12", "efficientformer_l1", "levit_128s",
]  # fmt: skip
TIMM_224 = re.compile(r"^(deit|vit|swin|mixer|levit|efficientformer)")


def input_size(name: str) -> int:
    if FIXED_224.match(name):
        return 224
    return 96 if name == "inception_v3" else 64


# Hugging Face transformers at small configs (random init): (model class, config fields, input kind)
_TEXT = {"vocab_size": 1000, "pad_token_id": 0}
HF = {
    "bert": ("BertForSequenceClassification", {**_TEXT, "hidden_size": 256, "num_hidden_layers": 4,
             "num_attention_heads": 4, "intermediate_size": 1024}, "text"),
    "roberta": ("RobertaForSequenceClassification", {**_TEXT, "pad_token_id": 1, "hidden_size": 256,
                "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}, "text"),
    "gpt2": ("GPT2ForSequenceClassification", {**_TEXT, "n_embd": 256, "n_layer": 4, "n_head": 4,
             "n_positions": 128}, "text"),
    "llama_gqa": ("LlamaForSequenceClassification", {**_TEXT, "hidden_size": 256, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 688}, "text"),
    "vit": ("ViTForImageClassification", {"image_size": 224, "patch_size": 16, "hidden_size": 256,
            "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}, "image"),
    "swin": ("SwinForImageClassification", {"image_size": 224, "embed_dim": 48, "depths": [2, 2, 2, 2],
             "num_heads": [3, 6, 12, 24]}, "image"),
}  # fmt: skip


def _model_and_data(source: str, name: str):
    """``(model to prune, model to save, arch, kwargs, example, batches)`` at random init."""
    import torch

    import oba.models
    from oba.prunable import Logits, prunable_window_attention

    g = torch.Generator().manual_seed(1)
    labels = [torch.randint(0, 10, (4,), generator=g) for _ in range(2)]
    if source == "transformers":
        cls, config, kind = HF[name]
        arch, kwargs = f"transformers:{cls}", {"config": {**config, "num_labels": 10, "attn_implementation": "eager"}}
        inner = oba.models.create(arch, **kwargs).eval()
        if kind == "text":
            inputs = [{"input_ids": torch.randint(2, 1000, (4, 64), generator=g)} for _ in range(2)]
            example = {"input_ids": inputs[0]["input_ids"][:1]}
        else:
            inputs = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
            example = inputs[0][:1]
        return Logits(inner), inner, arch, kwargs, example, list(zip(inputs, labels, strict=True))
    arch, kwargs = f"{source}:{name}", {"num_classes": 10}
    model = oba.models.create(arch, **kwargs).eval()
    if source == "torchvision":  # Swin and MaxViT: heads prune after the opt-in swap (README); others unchanged
        prunable_window_attention(model)
    side = 224 if source == "timm" and TIMM_224.match(name) else input_size(name)  # Inception-v3: 96 in both
    batches = [(torch.randn(4, 3, side, side, generator=g), y) for y in labels]
    return model, model, arch, kwargs, torch.randn(1, 3, side, side, generator=g), batches


def measure(source: str, name: str, criterion: str, tmp: str) -> dict:
    """Prune one model with one criterion (in this process); the row of the table."""
    import torch
    import torch.nn.functional as F

    import oba
    from oba.flops import count_flops, latency_ms
    from oba.prunable import Logits

    torch.manual_seed(0)
    model, inner, arch, kwargs, example, batches = _model_and_data(source, name)
    device = None if source == "transformers" else "meta"  # GPT-2 reads values (.item()) in its forward
    dense = count_flops(model, example, device)
    latency_dense = latency_ms(model, example)
    start = time.perf_counter()
    oba.prune_structured(
        model, example, criterion, keep_flops=KEEP, steps=2, batches_per_step=1, loss_fn=F.cross_entropy,
        batches=batches, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    pruned = count_flops(model, example, device)
    with torch.no_grad():
        assert model(batches[0][0]).shape == (4, 10)
    assert pruned.macs / dense.macs <= KEEP + 1e-9, f"target missed: {pruned.macs / dense.macs:.3f} of the MACs"
    path = Path(tmp) / f"{source}_{name}.pt"
    oba.save_pruned(inner, path, arch, kwargs)
    loaded = oba.load_pruned(path).eval()
    with torch.no_grad():
        torch.testing.assert_close((loaded if model is inner else Logits(loaded))(example), model(example))
    path.unlink()
    return {
        "macs_kept": pruned.macs / dense.macs, "params_kept": pruned.params / dense.params, "seconds": seconds,
        "latency_dense_ms": latency_dense, "latency_pruned_ms": latency_ms(model, example),
    }  # fmt: skip


def overhead(model_names: list[str], repeats: int) -> list[dict]:
    """Median seconds of oba's pruning loop and of MetaPruner on the same models, and their ratio."""
    import copy

    import torch
    import torch_pruning as tp

    import oba
    import oba.models
    from oba.prunable import default_ignored_layers

    rows = []
    for name in model_names:
        torch.manual_seed(0)
        base = oba.models.create(f"torchvision:{name}", num_classes=10).eval()
        side = input_size(name)
        x = torch.randn(1, 3, side, side)

        def ours(model, x=x):
            oba.prune_structured(model, x, "magnitude", keep_flops=KEEP, steps=2, progress=False)

        def theirs(model, x=x):
            pruner = tp.pruner.MetaPruner(
                model, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.25,
                iterative_steps=2, ignored_layers=default_ignored_layers(model), global_pruning=True,
            )  # fmt: skip
            for _ in range(2):
                pruner.step()

        times: dict[str, list[float]] = {"oba": [], "MetaPruner": []}
        for run in range(repeats + 1):
            for label, fn in (("oba", ours), ("MetaPruner", theirs)):
                model = copy.deepcopy(base)
                gc.collect()  # the previous run's garbage (its dependency graph's cycles) is not this run's cost
                start = time.perf_counter()
                fn(model)
                if run:  # the first round warms up
                    times[label].append(time.perf_counter() - start)
        a, b = statistics.median(times["oba"]), statistics.median(times["MetaPruner"])
        rows.append({"model": name, "oba_s": a, "metapruner_s": b, "ratio": a / b})
        print(f"{name:14} oba {a:7.2f} s   MetaPruner {b:7.2f} s   ratio {a / b:5.2f}", flush=True)
    return rows


def names(source: str) -> list[str]:
    if source == "torchvision":
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)
    if source == "timm":
        return list(TIMM)
    if source == "transformers":
        return list(HF)
    raise ValueError(f"unknown source {source!r}")


def worker(args: argparse.Namespace) -> None:
    """The subprocess: one row as JSON on the last line of stdout."""
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    row = {"model": args.worker, "family": family(args.worker), "source": args.source, "criterion": args.criteria[0]}
    try:
        row.update(measure(args.source, args.worker, args.criteria[0], args.tmp), status="pass", error="")
    except BaseException as err:  # noqa: BLE001 -- every failure is a row of the table
        first = (str(err).strip().splitlines() or [""])[0]
        row.update(status="fail", error=f"{type(err).__name__}: {first}"[:300])
    row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="torchvision", choices=["torchvision", "timm", "transformers"])
    parser.add_argument("--criteria", nargs="+", default=["magnitude", "oba"])
    parser.add_argument("--only", nargs="*", help="model names")
    parser.add_argument("--skip", nargs="*", default=[], help="model names to leave out")
    parser.add_argument("--out", default="results/coverage.jsonl")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--memory-gb", type=float, default=8)
    parser.add_argument("--overhead", action="store_true", help="the MetaPruner comparison only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.overhead:
        overhead(args.only or ["resnet50", "densenet121", "vit_b_16"], args.repeats)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from oba.io import append_jsonl, read_jsonl

    done = {(r["model"], r["criterion"]) for r in read_jsonl(out)} if out.exists() else set()
    todo = [n for n in (args.only or names(args.source)) if n not in args.skip]
    for name in todo:
        for criterion in args.criteria:
            if (name, criterion) in done:
                continue
            cmd = [sys.executable, __file__, "--worker", name, "--source", args.source, "--criteria", criterion,
                   "--memory-gb", str(args.memory_gb), "--tmp", str(out.parent)]  # fmt: skip
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = run.stdout.strip().splitlines()
                row = json.loads(lines[-1]) if lines else None
                if row is None:
                    tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"status": "fail", "error": f"the worker died (return code {run.returncode}): {tail}"[:300]}
            except subprocess.TimeoutExpired:
                row = {"status": "fail", "error": f"timeout after {args.timeout:.0f} s"}
            row = {"model": name, "family": family(name), "source": args.source, "criterion": criterion, **row}
            append_jsonl(out, row)
            print(f"{name:24} {criterion:10} {row['status']:4} {row.get('error', '')[:90]}", flush=True)
    rows = read_jsonl(out)
    for criterion in args.criteria:
        mine = [r for r in rows if r["criterion"] == criterion and r["source"] == args.source]
        passed = sum(r["status"] == "pass" for r in mine)
        print(f"{args.source} / {criterion}: {passed} of {len(mine)} pass")


if __name__ == "__main__":
    main()
