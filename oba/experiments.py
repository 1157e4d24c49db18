"""Structured-pruning experiments that survive interruption: one-shot sweeps, prune + fine-tune, iterative.

Each experiment appends one JSON line per finished unit of work to a :class:`ResultLog` and writes pruned
models (:func:`oba.prune.save_pruned`) and fine-tuning checkpoints (:func:`oba.train.fine_tune`) atomically,
so a rerun of the same call skips what is done and continues where it stopped:

* :func:`structured_sweep` -- per criterion, one pruning trajectory through decreasing FLOPs targets
  (re-scored at every step), evaluated without fine-tuning at each target (optionally also after
  recomputing BatchNorm statistics); a criterion is redone from the dense model if it was interrupted;
* :func:`prune_and_fine_tune` -- prune to one target, then fine-tune (resumable epoch by epoch);
* :func:`iterative_pruning` -- the paper's iterative protocol: prune to each target in turn (FLOPs measured
  against the dense model), fine-tune, continue from the fine-tuned model.

Criteria are named by :data:`CRITERION_PRESETS` (a criterion of :func:`oba.prune.make_scorer` plus options).
Every criterion prunes a copy of the given model as it is, except ``"eigendamage"``: the copy is first
reparametrised in the Kronecker-factored eigenbasis (:func:`oba.eigendamage.to_eigenbasis`), only its
eigen-channels are pruned, and FLOPs are measured against the model before the reparametrisation
(:func:`_prepare`). Its records' ``widths`` hold the outer widths under the original layer names (what the other
criteria's ``widths`` hold) and ``inner_widths`` the widths of the reparametrised layers' parts.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from oba.curvature import Batch
from oba.flops import count_flops
from oba.prune import load_pruned, make_scorer, prune_structured, save_pruned
from oba.train import evaluate, fine_tune, read_jsonl, recalibrate_batchnorm

__all__ = [
    "CRITERION_PRESETS",
    "ResultLog",
    "iterative_pruning",
    "prune_and_fine_tune",
    "structured_sweep",
]

CRITERION_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("magnitude", {}),  # L1 norm of each channel's parameters
    "taylor": ("taylor", {}),  # |sum of theta * g| per channel
    "obd_fisher": ("obd_fisher", {"fisher": "per_batch"}),  # C-OBD-like: theta^2 * diagonal (batch) Fisher
    "kron_obd": ("kron_obd", {}),  # K-FAC diagonal
    "kron_obs": ("kron_obs", {}),  # K-FAC OBS with compensation inside the layer
    "oba": ("oba", {}),  # exact: theta * (H theta), all four Hessian terms
    "oba_two_term": ("oba", {"terms": ("series", "parallel")}),  # the published code's criterion
    "eigendamage": ("eigendamage", {}),  # OBD in the K-FAC eigenbasis, true Fisher, eigen-channels only
}
"""Named structured criteria: ``name -> (criterion of make_scorer, options)``."""


class ResultLog:
    """Append-only JSONL results with lookup, so finished work is skipped on a rerun.

    Each record is one line, written with a flush and ``fsync``; a torn last line (a crash mid-write)
    is ignored when reading.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.exists() else []

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records() if all(r.get(k) == v for k, v in match.items())]

    def append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record), default=_plain) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _plain(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def _scorer(name: str, loss_fn: Callable) -> Callable:
    if name not in CRITERION_PRESETS:
        raise ValueError(f"unknown criterion preset {name!r}; choose from {', '.join(CRITERION_PRESETS)}")
    criterion, options = CRITERION_PRESETS[name]
    return make_scorer(criterion, loss_fn, **options)


def _prepare(
    name: str, model: nn.Module, reference: nn.Module, prune_options: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to prune for preset ``name`` and the options of :func:`oba.prune_structured` that go with it.

    Most criteria prune ``model`` as it is (no extra options). EigenDamage reparametrises it first (in place,
    :func:`oba.eigendamage.to_eigenbasis`; a no-op for layers already reparametrised, as in later stages of the
    iterative protocol), prunes only eigen-channels (``ignored_layers``) and measures FLOPs against
    ``reference`` (the dense model), since the reparametrised model starts with more FLOPs than it.
    """
    if CRITERION_PRESETS[name][0] != "eigendamage":
        return model, {}
    from oba.eigendamage import eigenbasis_ignored_layers, to_eigenbasis

    if "ignored_layers" in prune_options:
        raise ValueError("the eigendamage preset prunes eigen-channels only and sets ignored_layers itself")
    to_eigenbasis(model)
    return model, {"ignored_layers": eigenbasis_ignored_layers(model), "reference": reference}


def _split_widths(widths: Mapping[str, int], model: nn.Module) -> dict[str, Any]:
    """``{"widths": ...}`` of ``model``'s layers, with the parts of its reparametrised layers (EigenDamage) under
    ``"inner_widths"`` instead, so that ``widths`` has the original layer names for every criterion."""
    from oba.eigendamage import eigenbasis_layers

    parts = {f"{name}.{part}" for name in eigenbasis_layers(model) for part in ("rotate_in", "core", "rotate_out")}
    out: dict[str, Any] = {"widths": {k: v for k, v in widths.items() if k not in parts}}
    if parts:
        out["inner_widths"] = {k: v for k, v in widths.items() if k in parts}
    return out


def _evaluate_all(model: nn.Module, eval_loaders: Mapping[str, Iterable[Batch]]) -> dict[str, float]:
    out = {}
    for name, loader in eval_loaders.items():
        metrics = evaluate(model, loader, progress=False)
        out[f"acc_{name}"], out[f"loss_{name}"] = metrics["accuracy"], metrics["loss"]
    return out


def structured_sweep(
    dense: nn.Module,
    example_inputs: Tensor,
    criteria: Sequence[str],
    keep_flops: Sequence[float],
    *,
    score_batches: Iterable[Batch],
    eval_loaders: Mapping[str, Iterable[Batch]],
    log: ResultLog,
    batches_per_step: int = 20,
    steps_per_target: int = 1,
    recalibrate_loader: Iterable[Batch] | None = None,
    recalibrate_batches: int = 50,
    loss_fn: Callable = F.cross_entropy,
    progress: bool = True,
    **prune_options: Any,
) -> list[dict[str, Any]]:
    """One-shot (no fine-tuning) accuracy of every criterion at every FLOPs target; resumable.

    For each criterion: a copy of ``dense`` is pruned through ``sorted(keep_flops, reverse=True)`` in one
    :func:`oba.prune.prune_structured` call, with ``steps_per_target`` geometric steps from each target to
    the next (re-scored on the next ``batches_per_step`` batches of ``score_batches`` at every step), and
    evaluated on every loader of ``eval_loaders`` at each target. With ``recalibrate_loader``, the accuracy
    after recomputing the BatchNorm statistics on ``recalibrate_batches`` of its batches is recorded too
    (``acc_<name>_recal``), on a copy.

    Records ``{"criterion", "keep_flops", "flops_kept", "params_kept", "acc_<eval>", "loss_<eval>",
    "widths", "score_seconds"}``; a criterion with a record for every target is skipped.
    """
    targets = sorted({float(k) for k in keep_flops}, reverse=True)
    steps, previous = [], 1.0
    for t in targets:  # steps_per_target geometric steps from the previous target to this one
        steps += [previous * (t / previous) ** (j / steps_per_target) for j in range(1, steps_per_target)] + [t]
        previous = t
    for name in criteria:
        if {r["keep_flops"] for r in log.find(criterion=name)} >= set(targets):
            continue
        scorer = _scorer(name, loss_fn)
        model, extra = _prepare(name, copy.deepcopy(dense), prune_options.get("reference", dense), prune_options)
        options = {**prune_options, **extra}
        pending: list[dict[str, Any]] = []

        def on_step(m: nn.Module, record: dict[str, Any], name: str = name, pending: list = pending) -> None:
            if record["target"] not in targets:
                return
            row = {"criterion": name, "keep_flops": record["target"], "flops_kept": record["flops_kept"]}
            row.update(params_kept=record["params_kept"], score_seconds=record["score_seconds"])
            row.update(_evaluate_all(m, eval_loaders))
            if recalibrate_loader is not None:
                recal = copy.deepcopy(m)
                recalibrate_batchnorm(recal, recalibrate_loader, recalibrate_batches)
                row.update({f"{k}_recal": v for k, v in _evaluate_all(recal, eval_loaders).items()})
            row.update(_split_widths(record["widths"], m))
            pending.append(row)

        prune_structured(
            model, example_inputs, scorer, keep_flops=targets[-1], step_targets=steps, loss_fn=loss_fn,
            batches=score_batches, batches_per_step=batches_per_step, on_step=on_step, progress=progress,
            **options,
        )  # fmt: skip
        for row in pending:  # all targets of a criterion land together: a partial trajectory is redone
            log.append(row)
    return log.records()


def prune_and_fine_tune(
    dense: nn.Module,
    example_inputs: Tensor,
    criterion: str,
    keep_flops: float,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    score_batches: Iterable[Batch],
    train_loader: Iterable[Batch],
    eval_loaders: Mapping[str, Iterable[Batch]],
    out_dir: str | os.PathLike,
    log: ResultLog,
    fine_tune_options: Mapping[str, Any],
    reference: nn.Module | None = None,
    tag: str = "",
    loss_fn: Callable = F.cross_entropy,
    progress: bool = True,
    **prune_options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``dense`` with ``criterion`` to ``keep_flops`` (of ``reference``, default ``dense``), fine-tune.

    Files in ``out_dir``: ``<tag><criterion>_<keep>_pruned.pt`` (the pruned model before fine-tuning),
    ``..._ft.pt`` (the fine-tuning checkpoint, resumed epoch by epoch), ``..._ft.jsonl`` (per-epoch
    metrics), ``..._final.pt`` (the fine-tuned pruned model). The record ``{"criterion", "keep_flops",
    "flops_kept", "params_kept", "acc_<eval>_pruned", "acc_<eval>", "epochs", ...}`` is appended to ``log``
    at the end; if it is already there, the final model is loaded and returned without work.
    """
    out = Path(out_dir)
    stem = f"{tag}{criterion}_{keep_flops:g}"
    final_path = out / f"{stem}_final.pt"
    done = log.find(criterion=criterion, keep_flops=keep_flops, tag=tag)
    if done and final_path.exists():
        return load_pruned(final_path), done[-1]
    pruned_path = out / f"{stem}_pruned.pt"
    if pruned_path.exists():
        model = load_pruned(pruned_path)
        history = None
    else:
        model, extra = _prepare(
            criterion, copy.deepcopy(dense), dense if reference is None else reference, prune_options
        )
        options = {"reference": reference, **prune_options, **extra}
        _, history = prune_structured(
            model, example_inputs, _scorer(criterion, loss_fn), keep_flops=keep_flops, loss_fn=loss_fn,
            batches=score_batches, progress=progress, **options,
        )  # fmt: skip
        save_pruned(model, pruned_path, arch, arch_kwargs)
    before = _evaluate_all(model, eval_loaders)
    start = time.perf_counter()
    epochs = fine_tune(
        model, train_loader, log_path=out / f"{stem}_ft.jsonl", checkpoint_path=out / f"{stem}_ft.pt",
        progress=progress, **fine_tune_options,
    )  # fmt: skip
    save_pruned(model, final_path, arch, arch_kwargs)
    ref = count_flops(reference if reference is not None else dense, example_inputs)
    now = count_flops(model, example_inputs)
    record = {"tag": tag, "criterion": criterion, "keep_flops": keep_flops}
    record.update(flops_kept=now.macs / ref.macs, params_kept=now.params / ref.params, epochs=len(epochs))
    record.update({f"{k}_pruned": v for k, v in before.items()})
    record.update(_evaluate_all(model, eval_loaders))
    record.update(fine_tune_seconds=time.perf_counter() - start)
    if history is not None:
        record.update(_split_widths(history[-1]["widths"], model))
    log.append(record)
    return model, record


def iterative_pruning(
    dense: nn.Module,
    example_inputs: Tensor,
    criterion: str,
    targets: Sequence[float],
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """The iterative protocol: for each target (fraction of the DENSE model's FLOPs kept, decreasing), prune
    the previous stage's fine-tuned model to it and fine-tune; returns one record per stage.

    ``kwargs`` are those of :func:`prune_and_fine_tune` (the stages are tagged ``"stageK_"``); a rerun
    resumes at the first unfinished stage.
    """
    if any(b >= a for a, b in zip(targets, targets[1:], strict=False)):
        raise ValueError(f"targets must decrease, got {list(targets)}")
    model, records = dense, []
    for k, target in enumerate(targets, start=1):
        model, record = prune_and_fine_tune(
            model, example_inputs, criterion, target, reference=dense, tag=f"stage{k}_", **kwargs
        )
        records.append(record)
    return records
