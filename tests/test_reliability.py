"""Reliability (#14): nothing lost, nothing silently wrong, the caller's model never left broken.

Each test reproduces a fault a user met (a torn log line, a NaN pixel, a masked model, a meta model, arguments of
the wrong type, a GRU, batches of the wrong shape, a failure midway, unsafe or damaged files) and checks the clear
error, raised before any state is changed, or the recovered result.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

import oba
import oba.models
from oba.experiments import ResultLog
from oba.importance import NonFiniteScoreError
from oba.io import DamagedFileError, UnsafeCheckpointError
from oba.prune import prune_structured
from oba.pruned_io import load_pruned, save_pruned
from oba.train import fine_tune

SHAPE = (3, 8, 8)
EXAMPLE = torch.zeros(1, *SHAPE)


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return oba.models.create("resnet20")


def data(n: int = 4, nan_in: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(4, *SHAPE, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]
    if nan_in is not None:
        out[nan_in][0][1, 0, 2, 3] = float("nan")  # one pixel
    return out


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    model.eval()(EXAMPLE)  # still runs


# ------------------------------------------------------------------------------------------ lost data
def test_a_torn_last_log_line_is_cut_off_and_never_glued_to_the_next_record(tmp_path):
    log = ResultLog(tmp_path / "log.jsonl")
    log.append({"criterion": "a", "keep_flops": 0.5})
    os.truncate(log.path, log.path.stat().st_size - 10)  # killed mid-write
    log.append({"criterion": "b", "keep_flops": 0.5})
    log.append({"criterion": "c", "keep_flops": 0.5})
    assert [r["criterion"] for r in log.records()] == ["b", "c"]


# ------------------------------------------------------------------------------------------ silent wrong results
def test_a_nan_pixel_raises_naming_the_batch_and_a_parameter_or_is_skipped_on_request():
    model = resnet()
    with pytest.raises(NonFiniteScoreError, match=r"batch 2 .*'conv1.weight'.*skip_nonfinite"):
        oba.score(model, F.cross_entropy, data(nan_in=2), "oba", progress=False)
    with pytest.warns(RuntimeWarning, match="batch 2"):
        skipped = oba.score(model, F.cross_entropy, data(nan_in=2), "taylor", progress=False, skip_nonfinite=True)
    clean = oba.score(model, F.cross_entropy, [b for i, b in enumerate(data()) if i != 2], "taylor", progress=False)
    for k in clean:
        torch.testing.assert_close(skipped[k], clean[k])


@pytest.mark.parametrize("criterion", ["oba", "kron_obs"])
def test_a_nan_pixel_stops_structured_pruning_and_leaves_the_model_as_it_was(criterion):
    model = resnet()
    before = state(model)
    with pytest.raises(NonFiniteScoreError, match="batch 1"):
        prune_structured(
            model, EXAMPLE, criterion, keep_flops=0.6, loss_fn=F.cross_entropy, batches=data(nan_in=1),
            batches_per_step=4, progress=False,
        )  # fmt: skip
    assert_unchanged(model, before)


def test_a_model_with_torch_prune_masks_is_refused_before_anything_changes():
    model = resnet()
    torch_prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.5)
    before = state(model)
    with pytest.raises(ValueError, match=r"'layer1.0.conv1'.*remove_masks"):
        prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.6, progress=False)
    assert_unchanged(model, before)


def test_scoring_a_model_on_the_meta_device_is_an_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="meta device"):
        oba.score(model, F.cross_entropy, [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))], "taylor")


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keep_flops": "0.5"}, TypeError, "keep_flops must be a number"),
        ({"keep_flops": 0.5, "batches_per_step": 0}, ValueError, "batches_per_step must be a whole number"),
        ({"keep_flops": 0.5, "steps": 2.5}, TypeError, "steps must be a whole number"),
        ({"keep_flops": 0.5, "batches": 3}, TypeError, "batches must be an iterable"),
    ],
)
def test_prune_structured_arguments_of_the_wrong_type_or_range(kwargs, error, match):
    model = resnet()
    before = state(model)
    options = {"loss_fn": F.cross_entropy, "batches": data(), **kwargs}
    with pytest.raises(error, match=match):
        prune_structured(model, EXAMPLE, "taylor", progress=False, **options)
    assert_unchanged(model, before)


def test_score_arguments_of_the_wrong_type_or_range():
    model = resnet()
    with pytest.raises(TypeError, match=r"params=\['conv1.weight'\]"):
        oba.score(model, F.cross_entropy, data(), "taylor", params="conv1.weight", progress=False)
    with pytest.raises(ValueError, match="max_batches must be"):
        oba.score(model, F.cross_entropy, data(), "taylor", max_batches=-1, progress=False)


def test_batches_that_do_not_match_the_example_input_are_named():
    model = resnet()
    before = state(model)
    wrong = [(torch.randn(4, 3, 10, 10), torch.randint(0, 10, (4,)))]
    with pytest.raises(ValueError, match=r"batch 0 of step 1 has inputs of shape \(4, 3, 10, 10\)"):
        prune_structured(
            model, EXAMPLE, "taylor", keep_flops=0.6, loss_fn=F.cross_entropy, batches=wrong, progress=False
        )
    assert_unchanged(model, before)


def test_a_gru_is_refused_with_its_name():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(self.proj(x))[0][:, -1])

    with pytest.raises(ValueError, match=r"'rnn' is an nn.GRU"):
        prune_structured(Net(), torch.zeros(1, 5, 4), "magnitude", keep_flops=0.6, progress=False)


# ------------------------------------------------------------------------------------------ never a broken model
def test_a_failure_midway_leaves_the_callers_model_exactly_as_it_was():
    model = resnet()
    before = state(model)
    calls = []

    def scorer(m, batches):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("scorer failed at step 2")
        return oba.make_scorer("magnitude")(m, batches)

    with pytest.raises(RuntimeError, match="step 2"):
        prune_structured(model, EXAMPLE, scorer, keep_flops=0.5, steps=3, batches=data(), progress=False)
    assert len(calls) == 2  # the first step did prune before the failure
    assert_unchanged(model, before)
    # and the restored model prunes normally afterwards
    prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.5, steps=2, progress=False)
    model.eval()(EXAMPLE)


def test_an_unreachable_target_leaves_the_model_as_it_was():
    model = resnet()
    before = state(model)
    with pytest.raises(oba.prune.TargetNotReachedError):
        prune_structured(model, EXAMPLE, "magnitude", keep_flops=0.05, max_channel_sparsity=0.5, progress=False)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------ files
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_load_pruned_refuses_pickled_code_naming_the_file_and_the_global_without_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "oba.pruned/1", "x": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pruned(path)
    message = str(info.value)
    assert str(path) in message and "system" in message
    assert "weights_only=False" not in message


def test_a_truncated_pruned_model_or_fine_tuning_checkpoint_is_named_as_damaged(tmp_path):
    model = resnet()
    path = tmp_path / "pruned.pt"
    save_pruned(model, path, "resnet20")
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(DamagedFileError, match="pruned.pt"):
        load_pruned(path)
    ckpt = tmp_path / "ft.pt"
    fine_tune(copy.deepcopy(model), data(2), epochs=1, lr=1e-3, checkpoint_path=ckpt, progress=False)
    os.truncate(ckpt, ckpt.stat().st_size // 2)
    with pytest.raises(DamagedFileError, match=r"ft\.pt.*Delete it to restart"):
        fine_tune(copy.deepcopy(model), data(2), epochs=2, lr=1e-3, checkpoint_path=ckpt, progress=False)
