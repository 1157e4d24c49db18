"""Structured pruning to a FLOPs target on several processes (torch.distributed), optionally fine-tuned with DDP.

    # one process
    python scripts/prune_distributed.py --model resnet20 --pretrained --criterion oba --keep-flops 0.5
    # four processes on one machine (one per GPU, or four CPU processes with gloo)
    torchrun --standalone --nproc_per_node=4 scripts/prune_distributed.py --model resnet20 --pretrained \\
        --criterion oba --keep-flops 0.5 --steps 5 --batches-per-step 8 --fine-tune-epochs 10

Every process loads the same model and iterates the same seeded loader of training batches; at each pruning
step the step's ``--batches-per-step`` batches are dealt out rank-strided, scores (or K-FAC factors) are
all-reduced, and every process removes the same channels (:func:`oba.distributed.distributed_scorer`), so the
result equals a one-process run on the same batches up to float rounding. Rank 0 saves the pruned model with
:func:`oba.prune.save_pruned`; with ``--fine-tune-epochs`` the model is then fine-tuned with DDP
(:func:`oba.train.fine_tune`, a DistributedSampler per process, a resumable checkpoint and JSONL log written by
rank 0) and saved again. Rerunning the same command resumes an interrupted fine-tuning. On several machines,
use torchrun's --nnodes/--rdzv-endpoint and an output folder every machine can read (the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import oba.data
import oba.io
import oba.models
from oba import distributed as D
from oba.criteria import names
from oba.prune import prune_structured, save_pruned
from oba.train import evaluate, fine_tune


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Launch with torchrun --nproc_per_node=K for K processes; without torchrun it runs in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default="resnet20", help=f"oba.models registry name ({', '.join(oba.models.available())})"
    )
    p.add_argument(
        "--pretrained", action="store_true", help="load the pretrained checkpoint (else a seeded random init)"
    )
    p.add_argument(
        "--data",
        choices=["auto", "real", "synthetic"],
        default="auto",
        help="the model's dataset (CIFAR-10/100 from $OBA_DATA_DIR; ImageNet models: --dataset-root or Imagenette), "
        "synthetic images of its input shape, or auto: the real data when present, else synthetic",
    )
    p.add_argument("--synthetic-samples", type=int, default=2048, help="training images of the synthetic data")
    p.add_argument(
        "--dataset-root",
        type=Path,
        default=None,
        help="ImageNet models: an ImageNet folder with train/<wnid>/ and val/<wnid>/ (reference transforms); without "
        "it the Imagenette validation images of $OBA_DATA_DIR, half for scoring/training and half for evaluation",
    )
    p.add_argument("--trivial-augment", action="store_true", help="ImageNet training: add TrivialAugmentWide")
    p.add_argument(
        "--criterion",
        choices=names("structured"),
        default="oba",
        help="pruning criterion (oba.criteria; eigendamage reparametrises the layers first)",
    )
    p.add_argument(
        "--terms",
        nargs="+",
        default=None,
        metavar="TERM",
        help="OBA only: Hessian terms to use, e.g. 'series parallel' for the published two-term score",
    )
    p.add_argument("--keep-flops", type=float, default=0.5, help="fraction of the dense model's FLOPs (MACs) KEPT")
    p.add_argument("--steps", type=int, default=5, help="pruning steps (re-scored before each)")
    p.add_argument("--batches-per-step", type=int, default=4, help="batches scored per step, over all processes")
    p.add_argument("--batch-size", type=int, default=64, help="scoring batch size")
    p.add_argument("--score-mode", choices=["train", "eval"], default="train", help="BatchNorm mode while scoring")
    p.add_argument("--fine-tune-epochs", type=int, default=0, help="DDP fine-tuning epochs after pruning (0: none)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        default=None,
        help="epochs where the fine-tuning lr drops 10x (default: half way; ImageNet paper recipe: 30 60 80)",
    )
    p.add_argument("--weight-decay", type=float, default=5e-4, help="fine-tuning weight decay")
    p.add_argument("--ft-batch-size", type=int, default=128, help="fine-tuning batch size PER PROCESS")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N test images (all: None)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the loaders (same on every rank)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/prune_distributed"),
        help="output folder: pruned.pt, fine_tuned.pt, checkpoint.pt, fine_tune.jsonl, summary.json",
    )
    p.add_argument("--progress", action="store_true", help="progress bars (rank 0)")
    return p.parse_args(argv)


def datasets(args: argparse.Namespace, num_classes: int) -> tuple[Dataset, Dataset, Dataset]:
    """``(train set, train set with augmentation, test set)`` of the model's dataset, or synthetic ones."""
    spec = oba.models.get_spec(args.model)
    norm = (spec.mean, spec.std)
    real = {"cifar10": oba.data.cifar10, "cifar100": oba.data.cifar100}.get(spec.dataset)
    if args.data != "synthetic" and spec.dataset == "imagenet":
        try:
            return imagenet_datasets(args)
        except oba.data.DatasetNotFoundError:
            if args.data == "real":
                raise
    elif args.data != "synthetic" and real is not None:
        try:
            train = real("train", normalize=norm, progress=False)
            aug = real("train", normalize=norm, augment=True, progress=False)
            return train, aug, real("test", normalize=norm, progress=False)
        except oba.data.DatasetNotFoundError:
            if args.data == "real":
                raise
    elif args.data == "real":
        raise SystemExit(f"--data real: no loader for {args.model}'s dataset {spec.dataset!r}; use --data synthetic")
    n, shape = args.synthetic_samples, spec.input_shape
    make = oba.data.synthetic
    train = make(n, shape, num_classes, seed=args.seed, normalize=norm)
    aug = make(n, shape, num_classes, seed=args.seed, normalize=norm, augment=True)
    return train, aug, make(max(n // 4, 1), shape, num_classes, seed=args.seed + 1, normalize=norm)


def imagenet_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, Dataset]:
    """ImageNet train (plain and augmented) and val of ``--dataset-root``; else Imagenette val split in halves
    (ImageNet-1k labels; the same images in both training sets, evaluated on the other half)."""
    if args.dataset_root is not None:
        train = oba.data.imagenet_folder(args.dataset_root, "train", train=False)
        aug = oba.data.imagenet_folder(args.dataset_root, "train", trivial_augment=args.trivial_augment)
        return train, aug, oba.data.imagenet_folder(args.dataset_root, "val")
    val = oba.data.imagenette_val(labels="imagenet")
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed)).tolist()
    half = len(order) // 2
    train = oba.data.subset(val, indices=sorted(order[half:]))
    return train, train, oba.data.subset(val, indices=sorted(order[:half]))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = D.init_process_group_from_env()
    main_process = D.is_main_process()
    torch.manual_seed(args.seed)  # the same random init on every process
    model = oba.models.load_pretrained(args.model) if args.pretrained else oba.models.create(args.model)
    model.to(device)
    num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    train, train_aug, test = datasets(args, num_classes)
    if args.eval_samples is not None:
        test = oba.data.subset(test, min(args.eval_samples, len(test)), seed=None)
    test_loader = D.distributed_loader(test, batch_size=256, even=False)  # each test image once, over all ranks
    before = evaluate(model, test_loader, progress=False)

    # the same seeded batches on every process: the scorer deals each step's batches out rank-strided
    batches = oba.data.loader(train, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    options = {"terms": tuple(args.terms)} if args.terms else {}
    scorer = D.distributed_scorer(args.criterion, F.cross_entropy, progress=args.progress and main_process, **options)
    example = torch.zeros(1, *oba.models.get_spec(args.model).input_shape, device=device)
    model, history = prune_structured(  # eigendamage: reparametrised here, FLOPs against the dense model
        model, example, scorer, keep_flops=args.keep_flops, steps=args.steps, batches=batches,
        batches_per_step=args.batches_per_step, score_mode=args.score_mode, progress=args.progress and main_process,
    )  # fmt: skip
    D.check_same_model(model, "pruned model")  # every process removed the same channels
    pruned = evaluate(model, test_loader, progress=False)
    if main_process:
        save_pruned(model, args.out / "pruned.pt", args.model)
    summary = {
        "processes": D.get_world_size(),
        "criterion": args.criterion,
        "flops_kept": history[-1]["flops_kept"],
        "params_kept": history[-1]["params_kept"],
        "accuracy_dense": before["accuracy"],
        "accuracy_pruned": pruned["accuracy"],
        "widths": history[-1]["widths"],
    }
    if args.fine_tune_epochs > 0:
        milestones = args.milestones
        if milestones is None:
            milestones = [args.fine_tune_epochs // 2] if args.fine_tune_epochs > 1 else []
        train_loader = D.distributed_loader(train_aug, batch_size=args.ft_batch_size, shuffle=True, seed=args.seed)
        records = fine_tune(
            model, train_loader, epochs=args.fine_tune_epochs, lr=args.lr, milestones=milestones,
            weight_decay=args.weight_decay,
            eval_loader=test_loader, log_path=args.out / "fine_tune.jsonl", checkpoint_path=args.out / "checkpoint.pt",
            device=device, progress=args.progress, seed=args.seed,
        )  # fmt: skip
        summary["accuracy_fine_tuned"] = records[-1].get("eval_accuracy")
        if main_process:
            save_pruned(model, args.out / "fine_tuned.pt", args.model)
    if main_process:
        oba.io.write_json(args.out / "summary.json", summary, indent=1)
        print(json.dumps({k: v for k, v in summary.items() if k != "widths"}))
    D.barrier()  # rank 0's files are written before any process exits
    return summary


if __name__ == "__main__":
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(0)
