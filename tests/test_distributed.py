"""Multi-process runs with torch.distributed (oba.distributed): 2 CPU processes, gloo backend.

One module-scoped fixture starts the two processes once (forked from this one where the platform allows, so they
share its imports and start in a second instead of importing torch afresh; a FileStore in a temporary folder
rendezvouses them, so no port is needed) and runs every scenario there: scores, K-FAC factors, structured pruning,
DDP fine-tuning with checkpoints and resumption, evaluation, the error paths and the example script. Each rank
saves its results; the tests compare them with each other and with single-process runs here, on the same batches.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import oba
import oba.models
import oba.train as T
from oba import distributed as D
from oba import kfac
from oba.data import synthetic
from oba.prune import layer_widths, make_scorer, prune_structured
from oba.toynets import make_case

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 300

# ------------------------------------------------------------------------------------------ the scenarios
SCORE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("magnitude", {}),
    "taylor": ("taylor", {}),
    "obd_fisher": ("obd_fisher", {"fisher": "per_batch"}),
    "obd_hessian": ("obd_hessian", {"method": "exact"}),
    "oba": ("oba", {}),
    "oba_two_terms": ("oba", {"terms": ("series", "parallel")}),
    "oba_first_order_abs": ("oba", {"first_order": True, "absolute": True}),
}
PRUNE_CRITERIA = ("oba", "kron_obs", "eigendamage")
SCRIPT_ARGS = [
    "--data", "synthetic", "--synthetic-samples", "16", "--batch-size", "4", "--batches-per-step", "2",
    "--steps", "1", "--keep-flops", "0.8", "--criterion", "taylor", "--fine-tune-epochs", "1",
    "--ft-batch-size", "4", "--eval-samples", "8",
]  # fmt: skip


def toy() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 CNN with BatchNorm in train mode and 5 batches (3 for rank 0, 2 for rank 1)."""
    case = make_case("cnn_bn_train", batch_size=6, seed=0)
    g = torch.Generator().manual_seed(1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)

    return case.model, [batch(n) for n in (6, 6, 4, 5, 6)]


def resnet() -> tuple[nn.Module, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """ResNet-20 in float64 on 8x8 inputs, 8 batches of 4."""
    torch.manual_seed(0)
    model = oba.models.create("resnet20").double()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g))
               for _ in range(8)]  # fmt: skip
    return model, torch.zeros(1, 3, 8, 8, dtype=torch.float64), batches


def prune(criterion: str, distributed: bool) -> tuple[dict[str, int], dict[str, int], dict[str, torch.Tensor]]:
    """ResNet-20 pruned to 60 % of its FLOPs in 2 steps of 4 batches; returns widths before, after, and weights.

    EigenDamage (reparametrised by the pruner before the first step) with the batches' labels (``sampled=False``;
    sampled labels are drawn per process) so that one and two processes see the same Fisher.
    """
    model, example, batches = resnet()
    options = {"sampled": False} if criterion == "eigendamage" else {}
    scorer = (D.distributed_scorer if distributed else make_scorer)(criterion, F.cross_entropy, **options)
    before = layer_widths(model)
    prune_structured(
        model, example, scorer, keep_flops=0.6, steps=2, batches=batches, batches_per_step=4, progress=False
    )
    return before, layer_widths(model), model.state_dict()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4),
    )  # fmt: skip


def ft_data() -> tuple[Any, Any]:
    norm = ((0.5,) * 3, (0.25,) * 3)
    return (
        synthetic(32, shape=(3, 8, 8), num_classes=4, seed=0, augment=True, normalize=norm),
        synthetic(21, shape=(3, 8, 8), num_classes=4, seed=1, normalize=norm),
    )


def run_fine_tune(ckpt: Path, epochs: int) -> tuple[nn.Module, list[dict[str, Any]]]:
    train, test = ft_data()
    model = small_cnn()
    loader = D.distributed_loader(train, batch_size=4, shuffle=True, seed=0)
    eval_loader = D.distributed_loader(test, batch_size=8, even=False)
    history = T.fine_tune(
        model, loader, epochs=epochs, lr=0.05, eval_loader=eval_loader, log_path=ckpt.with_suffix(".jsonl"),
        checkpoint_path=ckpt, progress=False, seed=0,
    )  # fmt: skip
    return model, history


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("prune_distributed", ROOT / "scripts" / "prune_distributed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)  # forked: no OpenMP pool from the parent; two processes on few cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    out_dir = Path(out)
    try:
        res: dict[str, Any] = {}
        model, batches = toy()
        res["scores"] = {}
        for name, (criterion, opts) in SCORE_CASES.items():
            res["scores"][name] = D.score(model, F.cross_entropy, batches, criterion, progress=False, **opts)
        names = {m: n for n, m in model.named_modules()}
        factors = D.kfac_factors(model, F.cross_entropy, batches, progress=False)
        res["kfac"] = {names[m]: (f.A, f.S) for m, f in factors.items()}

        res["pruned"] = {criterion: prune(criterion, distributed=True) for criterion in PRUNE_CRITERIA}

        # DDP fine-tuning: count the checkpoint writes of this process
        writes: list[str] = []
        save_torch = T.save_torch
        T.save_torch = lambda obj, path: (writes.append(Path(path).name), save_torch(obj, path))[1]
        try:
            model_a, hist_a = run_fine_tune(out_dir / "a.pt", epochs=2)
            run_fine_tune(out_dir / "b.pt", epochs=1)
            model_b, hist_b = run_fine_tune(out_dir / "b.pt", epochs=2)  # resumes after epoch 1
        finally:
            T.save_torch = save_torch
        _, test = ft_data()
        res["fine_tune"] = {
            "state": model_a.state_dict(),
            "resumed_state": model_b.state_dict(),
            "history": hist_a,
            "resumed_history": hist_b,
            "writes": writes,
            "eval": T.evaluate(model_a, D.distributed_loader(test, batch_size=5, even=False), progress=False),
        }

        res["errors"] = {
            "batches": _error(lambda: D.score(model, F.cross_entropy, batches[rank:], "taylor", progress=False)),
            "model": _error(lambda: D.check_same_model(small_cnn() if rank else model)),
        }
        res["script"] = load_script().main([*SCRIPT_ARGS, "--out", str(out_dir / "script")])
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread while these tests run: the two processes already fill the (few) cores, and OpenMP
    threads competing with them (or with other jobs) make the float64 references several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """Run :func:`_worker` on 2 processes; returns each rank's results and their output folder."""
    out = tmp_path_factory.mktemp("distributed")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(
        _worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=False, start_method=method
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert list(a) == list(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_scores_of_two_processes_equal_one_process_on_the_same_batches(ranks, name):
    results, _ = ranks
    criterion, opts = SCORE_CASES[name]
    model, batches = toy()
    expected = oba.score(model, F.cross_entropy, batches, criterion, progress=False, **opts)
    assert_same(results[0]["scores"][name], results[1]["scores"][name], exact=True)  # identical on the ranks
    assert_same(results[0]["scores"][name], expected)


def test_kfac_factors_of_two_processes_equal_one_process(ranks):
    results, _ = ranks
    model, batches = toy()
    names = {m: n for n, m in model.named_modules()}
    expected = {
        names[m]: (f.A, f.S) for m, f in kfac.kfac_factors(model, F.cross_entropy, batches, progress=False).items()
    }
    assert list(results[0]["kfac"]) == list(expected)
    for layer, (A, S) in expected.items():
        for r in range(WORLD):
            torch.testing.assert_close(results[r]["kfac"][layer][0], A, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(results[r]["kfac"][layer][1], S, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("criterion", PRUNE_CRITERIA)
def test_prune_structured_is_identical_on_both_ranks_and_equal_to_one_process(ranks, criterion):
    results, _ = ranks
    (before, w0, s0), (_, w1, s1) = results[0]["pruned"][criterion], results[1]["pruned"][criterion]
    assert w0 == w1
    assert_same(s0, s1, exact=True)
    _, widths, state = prune(criterion, distributed=False)
    assert w0 == widths
    assert w0 != before, "nothing was pruned"
    assert_same(s0, state)


# ------------------------------------------------------------------------------------------ fine-tuning
def test_ddp_fine_tune_identical_weights_one_checkpoint_writer_and_exact_resume(ranks):
    results, out = ranks
    ft0, ft1 = results[0]["fine_tune"], results[1]["fine_tune"]
    assert_same(ft0["state"], ft1["state"], exact=True)  # parameters and BatchNorm buffers
    assert not torch.equal(ft0["state"]["0.weight"], small_cnn().state_dict()["0.weight"]), "no training happened"
    # only rank 0 writes: a.pt twice (2 epochs), b.pt once, then once more after resuming (a restart from scratch
    # would write it twice)
    assert ft0["writes"] == ["a.pt", "a.pt", "b.pt", "b.pt"]
    assert ft1["writes"] == []
    assert T.load_checkpoint(out / "a.pt")["epoch"] == 2
    assert len(T.read_jsonl(out / "a.jsonl")) == 2 and len(T.read_jsonl(out / "b.jsonl")) == 2
    # resuming from epoch 1 ends with the weights of the uninterrupted run, on every rank
    assert_same(ft0["resumed_state"], ft0["state"], exact=True)
    assert_same(ft1["resumed_state"], ft1["state"], exact=True)
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(ft0["resumed_history"]) == drop(ft0["history"])
    # global metrics: every sample of the 32 (16 per rank) and the 21 test images counted once
    for ft in (ft0, ft1):
        assert [h["train_num_samples"] for h in ft["history"]] == [32, 32]
        assert [h["eval_num_samples"] for h in ft["history"]] == [21, 21]
    assert ft0["history"][-1]["eval_accuracy"] == ft1["history"][-1]["eval_accuracy"]


def test_evaluate_all_reduces_to_the_global_accuracy(ranks):
    results, _ = ranks
    model = small_cnn()
    model.load_state_dict(results[0]["fine_tune"]["state"])
    _, test = ft_data()
    expected = T.evaluate(model, oba.data.loader(test, batch_size=7), progress=False)
    for r in range(WORLD):
        got = results[r]["fine_tune"]["eval"]
        assert got["num_samples"] == 21 and got["correct"] == expected["correct"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------ errors, script
def test_clear_errors_instead_of_silently_different_results(ranks):
    results, _ = ranks
    for r in range(WORLD):
        errors = results[r]["errors"]
        assert errors["batches"].startswith("RuntimeError: the processes were given different batches")
        assert errors["model"].startswith("RuntimeError: the model differs between processes")


def test_example_script_under_two_processes_equals_one_process(ranks, tmp_path):
    results, out = ranks
    assert results[0]["script"] == results[1]["script"]
    assert results[0]["script"]["processes"] == 2
    two = oba.load_pruned(out / "script" / "pruned.pt")
    assert (out / "script" / "fine_tuned.pt").exists() and (out / "script" / "checkpoint.pt").exists()
    single = load_script().main([*SCRIPT_ARGS, "--fine-tune-epochs", "0", "--out", str(tmp_path)])
    assert single["processes"] == 1 and single["widths"] == results[0]["script"]["widths"]
    assert single["accuracy_pruned"] == pytest.approx(results[0]["script"]["accuracy_pruned"])
    assert_same(oba.load_pruned(tmp_path / "pruned.pt").state_dict(), two.state_dict())
    assert json.loads((tmp_path / "summary.json").read_text())["processes"] == 1


# ------------------------------------------------------------------------------------------ no process group
def test_without_a_process_group_everything_is_single_process():
    assert not D.is_distributed() and D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    model, batches = toy()
    for criterion in ("taylor", "oba"):
        expected = oba.score(model, F.cross_entropy, batches, criterion, progress=False)
        assert_same(D.score(model, F.cross_entropy, batches, criterion, progress=False), expected, exact=True)
    single = kfac.kfac_factors(model, F.cross_entropy, batches, progress=False)
    for m, f in D.kfac_factors(model, F.cross_entropy, batches, progress=False).items():
        assert torch.equal(f.A, single[m].A) and torch.equal(f.S, single[m].S)
    t = [torch.ones(2)]
    assert D.all_reduce_sum(t)[0] is t[0]
    D.barrier()
    D.check_same_model(model)


def test_shard_and_distributed_sampler_partition_the_data():
    assert list(D.shard(range(7), rank=1, world_size=3)) == [1, 4]
    with pytest.raises(ValueError, match="rank"):
        list(D.shard(range(7), rank=3, world_size=3))
    data = synthetic(10, shape=(1, 2, 2), num_classes=2, seed=0)
    for even in (True, False):
        parts = []
        for r in range(3):
            sampler = D.DistributedSeededSampler(data, num_replicas=3, rank=r, shuffle=True, seed=5, even=even)
            sampler.set_epoch(2)
            items = list(sampler)
            assert len(items) == len(sampler)
            parts.append(items)
        flat = [i for p in parts for i in p]
        seeds = {i.index: i.seed for i in flat}
        assert all(seeds[i.index] == i.seed for i in flat)  # one augmentation seed per sample and epoch
        assert {i.index for i in flat} == set(range(10))
        if even:
            assert [len(p) for p in parts] == [4, 4, 4]
        else:
            assert sorted(i.index for i in flat) == list(range(10))
    loader = D.distributed_loader(data, batch_size=4, even=False)  # no process group: all of it, once
    assert sum(len(y) for _, y in loader) == 10
