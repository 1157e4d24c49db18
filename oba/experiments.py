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

Criteria are names of the registry :mod:`oba.criteria` (``names("structured")``), with per-criterion options
from ``criterion_options`` (e.g. ``{"obd_fisher": {"fisher": "per_batch"}}``). Every criterion prunes a copy of
the given model; one that rewrites the model first (``"eigendamage"``: the Kronecker-factored eigenbasis) does so
inside :func:`oba.prune_structured`, which measures FLOPs against the model before the rewrite. Records' ``widths``
hold the widths under the original layer names for every criterion, and ``inner_widths`` the widths of rewritten
layers' parts.
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

from oba.criteria import Scorer, make_scorer
from oba.curvature import Batch
from oba.flops import count_flops
from oba.io import append_jsonl, plain_json, read_jsonl, write_json
from oba.prunable import layer_widths
from oba.prune import prune_structured
from oba.pruned_io import load_pruned, save_pruned
from oba.train import evaluate, fine_tune, recalibrate_batchnorm

__all__ = [
    "ResultLog",
    "StaleResultsError",
    "iterative_pruning",
    "prune_and_fine_tune",
    "structured_sweep",
]


class StaleResultsError(ValueError):
    """A results log was made with another configuration than the run that would extend it."""


class ResultLog:
    """Append-only JSONL results with lookup, so finished work is skipped on a rerun.

    Each record is one line, written with a flush and ``fsync`` (:func:`oba.io.append_jsonl`); a torn last line (a
    crash mid-write) is ignored when reading and cut off before the next append.

    ``config``: what the records' values depend on (e.g. a notebook's parameters and the data it found). It is kept
    beside the log in ``<name>.config.json`` (written atomically with the first use); a later run with another
    ``config`` raises :class:`StaleResultsError` naming the keys that differ, instead of silently reusing records
    made under other settings. Without ``config`` nothing is checked.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path = self.path.with_name(self.path.stem + ".config.json")
        if config is not None:
            self._check_config(plain_json(dict(config)))

    def _check_config(self, config: dict[str, Any]) -> None:
        if not self.config_path.exists():
            write_json(self.config_path, config, indent=1, sort_keys=True)
            return
        saved = json.loads(self.config_path.read_text())
        if saved != config:
            changed = {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))}
            changed = {k: v for k, v in changed.items() if v[0] != v[1]}
            raise StaleResultsError(
                f"{self.path} holds results made with another configuration (key: (then, now)): {changed}. Reusing "
                "them would mix settings: pass another results folder, or delete "
                f"{self.path} and {self.config_path} to start afresh"
            )

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.exists() else []

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records() if all(r.get(k) == v for k, v in match.items())]

    def append(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.path, record)


def _widths(scorer: Scorer, model: nn.Module, widths: Mapping[str, int]) -> dict[str, Any]:
    """``{"widths": ...}`` under the original layer names for every criterion; a criterion that rewrote layers
    (EigenDamage) reports its parts' widths as ``"inner_widths"`` (:meth:`oba.criteria.Preparation.split_widths`)."""
    if scorer.preparation is None:
        return {"widths": dict(widths)}
    return scorer.preparation.split_widths(model, widths)


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
    criterion_options: Mapping[str, Mapping[str, Any]] | None = None,
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
    "widths", "score_seconds"}``; a criterion with a record for every target is skipped. ``criterion_options``:
    ``{criterion: options of oba.criteria.make_scorer}``.
    """
    targets = sorted({float(k) for k in keep_flops}, reverse=True)
    steps, previous = [], 1.0
    for t in targets:  # steps_per_target geometric steps from the previous target to this one
        steps += [previous * (t / previous) ** (j / steps_per_target) for j in range(1, steps_per_target)] + [t]
        previous = t
    for name in criteria:
        logged = {r["keep_flops"] for r in log.find(criterion=name)}
        if logged >= set(targets):
            continue
        scorer = make_scorer(name, loss_fn, **dict((criterion_options or {}).get(name, {})))
        model = copy.deepcopy(dense)
        pending: list[dict[str, Any]] = []

        def on_step(
            m: nn.Module, record: dict[str, Any], name: str = name, pending: list = pending, scorer: Scorer = scorer
        ) -> None:
            if record["target"] not in targets:
                return
            row = {"criterion": name, "keep_flops": record["target"], "flops_kept": record["flops_kept"]}
            row.update(params_kept=record["params_kept"], score_seconds=record["score_seconds"])
            row.update(_evaluate_all(m, eval_loaders))
            if recalibrate_loader is not None:
                recal = copy.deepcopy(m)
                recalibrate_batchnorm(recal, recalibrate_loader, recalibrate_batches)
                row.update({f"{k}_recal": v for k, v in _evaluate_all(recal, eval_loaders).items()})
            row.update(_widths(scorer, m, record["widths"]))
            pending.append(row)

        prune_structured(
            model, example_inputs, scorer, keep_flops=targets[-1], step_targets=steps, loss_fn=loss_fn,
            batches=score_batches, batches_per_step=batches_per_step, on_step=on_step, progress=progress,
            **prune_options,
        )  # fmt: skip
        for row in pending:  # all targets of a criterion land together: a partial trajectory is redone
            if row["keep_flops"] not in logged:  # a kill between two appends: those already logged stay once
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
    criterion_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    **prune_options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``dense`` with ``criterion`` to ``keep_flops`` (of ``reference``, default ``dense``), fine-tune.

    Files in ``out_dir``: ``<tag><criterion>_<keep>_pruned.pt`` (the pruned model before fine-tuning),
    ``..._ft.pt`` (the fine-tuning checkpoint, resumed epoch by epoch), ``..._ft.jsonl`` (per-epoch
    metrics), ``..._final.pt`` (the fine-tuned pruned model). The record ``{"criterion", "keep_flops",
    "flops_kept", "params_kept", "acc_<eval>_pruned", "acc_<eval>", "epochs", ...}`` is appended to ``log``
    at the end; if it is already there, the final model is loaded and returned without work.
    ``criterion_options``: ``{criterion: options of oba.criteria.make_scorer}`` (as for :func:`structured_sweep`).
    """
    out = Path(out_dir)
    stem = f"{tag}{criterion}_{keep_flops:g}"
    final_path = out / f"{stem}_final.pt"
    done = log.find(criterion=criterion, keep_flops=keep_flops, tag=tag)
    if done and final_path.exists():
        return load_pruned(final_path), done[-1]
    pruned_path = out / f"{stem}_pruned.pt"
    scorer = make_scorer(criterion, loss_fn, **dict((criterion_options or {}).get(criterion, {})))
    if pruned_path.exists():  # resumed: the widths are those of the saved pruned model (as history[-1] has them)
        model = load_pruned(pruned_path)
        widths = layer_widths(model)
    else:
        model = copy.deepcopy(dense)
        _, history = prune_structured(
            model, example_inputs, scorer, keep_flops=keep_flops, loss_fn=loss_fn, batches=score_batches,
            reference=reference, progress=progress, **prune_options,
        )  # fmt: skip
        widths = history[-1]["widths"]
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
    record.update(_widths(scorer, model, widths))
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
