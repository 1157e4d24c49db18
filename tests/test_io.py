"""Tests for oba.io: atomic writes, torn-line-safe JSONL logs, and weights-only torch loading with clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from oba import io as oio
from oba import train as T
from oba.io import DamagedFileError, UnsafeCheckpointError

PYTORCH_ADVICE = ("weights_only=False", "`weights_only` set to `False`")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------------
# atomic_write, save_torch, write_json
# --------------------------------------------------------------------------------------------------


def test_atomic_write_creates_parents_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.txt"
    oio.atomic_write(path, lambda f: f.write("first"), mode="w")
    oio.atomic_write(path, lambda f: f.write("second ✓"), mode="w")
    assert path.read_text(encoding="utf-8") == "second ✓"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert leftovers(path.parent) == []


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def fail(f) -> None:
        f.write(b"half of the new contents")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        oio.atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "metrics.json"
    oio.write_json(path, {"old": 1})

    def disk_full(src, dst) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        oio.write_json(path, {"new": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert leftovers(tmp_path) == []


def test_write_json_is_json_dumps_and_fails_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    obj = {"a": [1, 2.5], "é": None}
    oio.write_json(path, obj, indent=2, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == json.dumps(obj, indent=2, ensure_ascii=False)
    with pytest.raises(TypeError):
        oio.write_json(path, {"x": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert leftovers(tmp_path) == []


def test_save_torch_and_load_torch_round_trip(tmp_path: Path) -> None:
    obj = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"epoch": 3, "names": ["a", "b"]}}
    path = tmp_path / "ckpt" / "x.pt"
    oio.save_torch(obj, path)
    loaded = oio.load_torch(path)
    assert torch.equal(loaded["w"], obj["w"]) and loaded["meta"] == obj["meta"]
    assert leftovers(path.parent) == []


# --------------------------------------------------------------------------------------------------
# append_jsonl, read_jsonl
# --------------------------------------------------------------------------------------------------


def test_a_torn_line_is_dropped_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    oio.append_jsonl(path, {"epoch": 1, "loss": 0.123456789})
    os.truncate(path, path.stat().st_size - 10)  # a kill mid-write: the first record is torn
    oio.append_jsonl(path, {"epoch": 2})
    oio.append_jsonl(path, {"epoch": 3})
    assert oio.read_jsonl(path) == [{"epoch": 2}, {"epoch": 3}]
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 2}, {"epoch": 3}]  # nothing glued onto a fragment


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}')
    assert oio.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    oio.append_jsonl(path, {"epoch": 3})
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n'


def test_a_torn_fragment_without_any_newline_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"epo')
    assert oio.read_jsonl(path) == []
    oio.append_jsonl(path, {"epoch": 1})
    assert path.read_text() == '{"epoch": 1}\n'


def test_read_jsonl_ignores_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"epoch": 1}\n\n{"epoch": 2}\n{"epo')
    assert oio.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    path.write_bytes('{"epoch": 1}\n{"name": "\u00e9'.encode()[:-1])  # a character cut in two
    assert oio.read_jsonl(path) == [{"epoch": 1}]


def test_read_jsonl_refuses_a_bad_line_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(DamagedFileError, match="line 2") as info:
        oio.read_jsonl(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and "damaged" in str(info.value)
    path.write_text('{"epoch": 1}\n{"epo\n')  # followed by a newline: not a torn write
    with pytest.raises(ValueError, match="line 2"):
        oio.read_jsonl(path)


def test_append_jsonl_writes_tensors_and_tuples_as_lists(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.jsonl"
    oio.append_jsonl(path, {"t": torch.tensor([[1, 2], [3, 4]]), "s": torch.tensor(0.5), "pair": (1, "a")})
    assert oio.read_jsonl(path) == [{"t": [[1, 2], [3, 4]], "s": 0.5, "pair": [1, "a"]}]


def test_append_jsonl_refuses_other_objects_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    oio.append_jsonl(path, {"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="pathlib.*Path"):
        oio.append_jsonl(path, {"where": tmp_path})
    assert path.read_bytes() == before


def test_train_reexports_read_jsonl() -> None:
    assert T.read_jsonl is oio.read_jsonl


# --------------------------------------------------------------------------------------------------
# load_torch
# --------------------------------------------------------------------------------------------------


class Malicious:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_torch_refuses_pickled_code_and_names_the_global(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": Malicious(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        oio.load_torch(path, what="test checkpoint")
    message = str(info.value)
    assert not marker.exists()  # the code did not run
    assert isinstance(info.value, ValueError)
    assert str(path) in message and "test checkpoint" in message
    assert f"{os.system.__module__}.system" in message  # posix.system on Linux
    assert "state_dict" in message and "safe_globals" in message  # the safe ways out
    assert not any(advice in message for advice in PYTORCH_ADVICE)


def test_load_torch_allowlists_exactly_the_given_classes(tmp_path: Path) -> None:
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": torch.optim.SGD, "w": torch.ones(2)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.optim\.sgd\.SGD") as info:
        oio.load_torch(path)
    assert not any(advice in str(info.value) for advice in PYTORCH_ADVICE)
    assert oio.load_torch(path, safe_globals=[torch.optim.SGD])["optimizer"] is torch.optim.SGD


@pytest.mark.parametrize("keep", [0, 100, 0.5, -1])
def test_load_torch_on_a_truncated_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "ckpt.pt"
    oio.save_torch({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DamagedFileError) as info:
        oio.load_torch(path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "truncated" in message and "Delete it" in message
    assert not any(advice in message for advice in PYTORCH_ADVICE)


def test_load_torch_on_garbage_and_on_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(DamagedFileError, match="garbage.pt"):
        oio.load_torch(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        oio.load_torch(tmp_path / "missing.pt")


def test_load_checkpoint_raises_the_io_errors(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    oio.save_torch({"format": T.CHECKPOINT_FORMAT, "epoch": 1}, path)
    assert T.load_checkpoint(path)["epoch"] == 1
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DamagedFileError, match="fine_tune checkpoint"):
        T.load_checkpoint(path)
    torch.save({"format": T.CHECKPOINT_FORMAT, "x": Malicious(tmp_path / "pwned")}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        T.load_checkpoint(path)
    assert not any(advice in str(info.value) for advice in PYTORCH_ADVICE)
    with pytest.raises(FileNotFoundError):
        T.load_checkpoint(tmp_path / "nothing.pt")
