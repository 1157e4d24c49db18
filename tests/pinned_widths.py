"""The pruned widths every structured criterion gives on seeded toy-size ResNet-20/32 and the CIFAR ViT.

Run as a script to (re)write ``tests/data/pinned_widths.json`` from the current code; ``test_pinned_widths.py``
compares against that file, so a refactoring that changes any criterion's choice of channels or heads fails.
The cases are float64, seeded, and small (16x16 or 32x32 inputs, 2 steps of 2 batches of 8).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import oba
import oba.criteria
import oba.models

PATH = Path(__file__).parent / "data" / "pinned_widths.json"

# criterion preset -> (criterion name, scorer options)
CRITERIA: dict[str, tuple[str, dict]] = {
    "magnitude": ("magnitude", {}),
    "taylor": ("taylor", {}),
    "obd_fisher": ("obd_fisher", {"fisher": "per_batch"}),
    "obd_hessian": ("obd_hessian", {"samples": 2}),  # Hutchinson, 2 probes per batch (speed)
    "oba": ("oba", {}),
    "oba_two_term": ("oba", {"terms": ("series", "parallel")}),
    "kron_obd": ("kron_obd", {}),
    "kron_obs": ("kron_obs", {}),
    "eigendamage": ("eigendamage", {}),
}
MODELS: dict[str, tuple[dict, tuple[int, int, int]]] = {
    "resnet20": ({}, (3, 16, 16)),
    "resnet32": ({}, (3, 16, 16)),
    "vit_cifar": ({"dim": 24, "depth": 2, "num_heads": 3, "mlp_dim": 32, "image_size": 16}, (3, 16, 16)),
}

UNSUPPORTED = {("vit_cifar", "eigendamage")}  # EigenDamage reparametrises conv/linear layers, not attention heads


def batches(shape: tuple[int, int, int], n: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, *shape, generator=g, dtype=torch.float64), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def pruned_widths(model_name: str, preset: str) -> dict[str, int]:
    """Widths (and heads) after pruning a seeded ``model_name`` to 0.6 of its MACs with ``preset``."""
    kwargs, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = oba.models.create(model_name, **kwargs).double()
    criterion, options = CRITERIA[preset]
    x = torch.zeros(1, *shape, dtype=torch.float64)
    data = batches(shape)
    scorer = oba.criteria.make_scorer(criterion, F.cross_entropy, **options)
    model, history = oba.prune_structured(
        model, x, scorer, keep_flops=0.6, steps=2, batches=data, batches_per_step=2, progress=False
    )
    last = history[-1]
    heads = {f"heads:{k}": int(v) for k, v in last["heads"].items()}
    return {**{k: int(v) for k, v in last["widths"].items()}, **heads}


def main() -> None:
    out = {m: {p: pruned_widths(m, p) for p in CRITERIA if (m, p) not in UNSUPPORTED} for m in MODELS}
    PATH.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
