"""Run one resumable oba runner on tiny synthetic data, optionally killing itself (SIGKILL) at a chosen point.

Used by ``tests/test_faults.py`` in subprocesses::

    python tests/fault_runner.py RUNNER OUT_DIR        # one run
    python tests/fault_runner.py --jobs JOBS.json      # many runs, each in a forked child (one import of torch)

JOBS.json is a list of groups, each a list of ``{"runner", "out", "env"}`` run in order; the groups run two at a time.
The ``--jobs`` mode prints one JSON line: per group, the children's return codes (``-9``: killed by SIGKILL), as
:class:`subprocess.Popen` reports them.

RUNNER is ``sweep`` (:func:`oba.experiments.structured_sweep`), ``fine_tune`` (:func:`oba.train.fine_tune`),
``prune_ft`` (:func:`oba.experiments.prune_and_fine_tune`), ``iterative`` (:func:`oba.experiments.iterative_pruning`),
``iterative_fixed_order`` (the same with an unshuffled list of training batches) or ``notebooks`` (the series runner
``scripts/notebooks.py run`` over the toy series in ``tests/data/toy_series``, whose notebooks kill the runner
and themselves where ``FAULT_NOTEBOOK`` says).
The kill point comes from the environment (the monkeypatching happens in this process only):

* ``FAULT_PRUNE_STEP=k``: SIGKILL at the start of the k-th call of :func:`oba.prune_step.prune_step` (mid-pruning);
* ``FAULT_BATCH=k``: SIGKILL when the k-th fine-tuning batch is collated (mid-epoch);
* ``FAULT_APPEND=k``: on the k-th :func:`oba.io.append_jsonl`, write half of the JSON line (flush + fsync), SIGKILL;
* ``FAULT_ATOMIC=k``: on the k-th :func:`oba.io.atomic_write` (``save_torch`` and ``write_json`` included), write half
  of the contents to the temporary file (flush + fsync), SIGKILL: a stray temporary file stays behind.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)

import oba.experiments  # noqa: E402
import oba.io  # noqa: E402
import oba.models  # noqa: E402
import oba.prune  # noqa: E402
import oba.train  # noqa: E402

EXAMPLE_SHAPE = (1, 3, 8, 8)
ROOT = Path(__file__).resolve().parents[1]
TOY_SERIES = ROOT / "tests" / "data" / "toy_series"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def counter(var: str):
    """A function that returns True on its k-th call, k = int($var) (never without the variable)."""
    k = int(os.environ.get(var, "0"))
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == k

    return hit


def install_faults() -> None:
    if "FAULT_PRUNE_STEP" in os.environ:
        hit, original = counter("FAULT_PRUNE_STEP"), oba.prune.prune_step

        def prune_step(*args, **kwargs):
            if hit():
                die()
            return original(*args, **kwargs)

        oba.prune.prune_step = prune_step

    if "FAULT_APPEND" in os.environ:
        hit, original = counter("FAULT_APPEND"), oba.io.append_jsonl

        def append_jsonl(path, record):
            if hit():
                line = (json.dumps(dict(record), default=oba.io._json_default) + "\n").encode()
                with open(path, "ab") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                die()
            return original(path, record)

        for module in (oba.io, oba.experiments, oba.train):
            module.append_jsonl = append_jsonl

    if "FAULT_ATOMIC" in os.environ:
        hit, original = counter("FAULT_ATOMIC"), oba.io.atomic_write

        def atomic_write(path, write, mode="wb"):
            if not hit():
                return original(path, write, mode)

            def torn(f):
                buf = io.BytesIO() if "b" in mode else io.StringIO()
                write(buf)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()

            return original(path, torn, mode)

        for module in (oba.io, oba.train):  # oba.io.save_torch / write_json look atomic_write up in oba.io
            module.atomic_write = atomic_write


def data(n: int, seed: int, bs: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, *EXAMPLE_SHAPE[1:], generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)
    ]


def train_loader() -> DataLoader:
    """4 shuffled batches of 4 (a seeded generator, saved in and restored from fine_tune's checkpoints)."""
    g = torch.Generator().manual_seed(7)
    ds = TensorDataset(torch.randn(16, *EXAMPLE_SHAPE[1:], generator=g), torch.randint(0, 10, (16,), generator=g))
    hit = counter("FAULT_BATCH")

    def collate(samples):
        if hit():
            die()
        return torch.utils.data.default_collate(samples)

    return DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3), collate_fn=collate)


def dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return oba.models.create("resnet20").eval()


def main(runner: str, out: Path) -> None:
    example = torch.randn(*EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(11))
    log = oba.experiments.ResultLog(out / "results.jsonl")
    ft = {"epochs": 2, "lr": 0.01, "seed": 0}
    experiment = dict(
        arch="resnet20", score_batches=data(2, 0), train_loader=train_loader(), eval_loaders={"val": data(1, 1)},
        out_dir=out, log=log, fine_tune_options=ft, batches_per_step=1, progress=False,
    )  # fmt: skip
    if runner == "sweep":
        oba.experiments.structured_sweep(
            dense(), example, ["magnitude", "taylor"], [0.8, 0.6], score_batches=data(4, 0),
            eval_loaders={"val": data(2, 1)}, log=log, batches_per_step=1, progress=False,
        )  # fmt: skip
    elif runner == "fine_tune":
        model = dense().train()
        oba.train.fine_tune(
            model, train_loader(), eval_loader=data(1, 1), log_path=out / "ft.jsonl", checkpoint_path=out / "ft.pt",
            progress=False, **ft,
        )  # fmt: skip
        oba.io.save_torch(model.state_dict(), out / "model.pt")
    elif runner == "prune_ft":
        oba.experiments.prune_and_fine_tune(dense(), example, "taylor", 0.6, **experiment)
    elif runner == "iterative":
        oba.experiments.iterative_pruning(dense(), example, "magnitude", [0.8, 0.6], **experiment)
    elif runner == "iterative_fixed_order":  # a plain list of batches: no loader generator carried across stages
        experiment["train_loader"] = data(4, 7)
        oba.experiments.iterative_pruning(dense(), example, "magnitude", [0.8, 0.6], **experiment)
    elif runner == "notebooks":
        spec = importlib.util.spec_from_file_location("notebooks_script", ROOT / "scripts" / "notebooks.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        script.main(["run", "--notebooks", str(TOY_SERIES), "--out", str(out)])
    else:
        raise SystemExit(f"unknown runner {runner!r}")


def run_forked(job: dict) -> int:
    """Run one job in a forked child; its return code (negative: the signal that killed it)."""
    pid = os.fork()
    if pid == 0:  # the child: faults are installed here only
        code = 1
        try:
            os.environ.update(job.get("env", {}))
            install_faults()
            main(job["runner"], Path(job["out"]))
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_groups(groups: list[list[dict]], parallel: int = 2) -> list[list[int]]:
    """Each group's jobs in order, in forked children; ``parallel`` groups at a time (each in a forked worker)."""
    results: list[list[int]] = [[] for _ in groups]
    pending = list(enumerate(groups))
    running: dict[int, tuple[int, int]] = {}  # worker pid -> (group index, read end of its pipe)
    while pending or running:
        while pending and len(running) < parallel:
            index, group = pending.pop(0)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                codes = [run_forked(job) for job in group]
                os.write(w, json.dumps(codes).encode())
                os._exit(0)
            os.close(w)
            running[pid] = (index, r)
        pid, _ = os.wait()
        index, r = running.pop(pid)
        with os.fdopen(r) as f:
            results[index] = json.loads(f.read() or "null")
    return results


if __name__ == "__main__":
    if sys.argv[1] == "--jobs":
        print(json.dumps(run_groups(json.loads(Path(sys.argv[2]).read_text()))))
    else:
        install_faults()
        main(sys.argv[1], Path(sys.argv[2]))
