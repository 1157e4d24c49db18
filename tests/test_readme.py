"""The README's "prune a model in five lines" snippet runs and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pruning_snippet(require_data, monkeypatch, data_dir):
    require_data("checkpoints/resnet20-12fca82f.th")
    require_data("cifar10/cifar10-jpeg-q75.tar.gz")
    monkeypatch.setenv("OBA_DATA_DIR", str(data_dir))
    section = README.read_text().split("## Prune a model in five lines", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - our own README
    masks = [m.weight_mask for m in scope["convs"].values()]
    pruned = sum(int((mk == 0).sum()) for mk in masks)
    total = sum(mk.numel() for mk in masks)
    assert pruned == round(0.5 * total)
    # the mask follows the OBA score: every kept weight scores at least as high as every pruned one
    scores = torch.cat([scope["scores"][f"{n}.weight"].flatten() for n in scope["convs"]])
    flat_mask = torch.cat([mk.flatten() for mk in masks]).bool()
    assert scores[flat_mask].min() >= scores[~flat_mask].max()


def test_readme_structured_snippet(require_data, monkeypatch, data_dir, tmp_path):
    require_data("checkpoints/resnet32-d509ac18.th")
    require_data("cifar10/cifar10-jpeg-q75.tar.gz")
    monkeypatch.setenv("OBA_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    section = README.read_text().split("## Prune channels to a FLOPs target", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    snippet = snippet.replace("steps=5", "steps=2").replace("batches_per_step=4", "batches_per_step=1")  # CI size
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - our own README
    history = scope["history"]
    assert 0.45 < history[-1]["flops_kept"] <= 0.5
    import oba

    loaded = oba.load_pruned(tmp_path / "resnet32_oba_half.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), scope["model"].eval()(x))


def test_readme_bring_your_own_model_snippet():
    import pytest

    pytest.importorskip("timm", reason="timm is in the 'models' extra")
    pytest.importorskip("transformers", reason="transformers is in the 'models' extra")
    section = README.read_text().split("## Bring your own model", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert 0.5 < scope["history"][-1]["flops_kept"] <= 0.6
    heads = scope["history"][-1]["heads"]
    assert heads and all(1 <= h <= 4 for h in heads.values())
    ids = scope["texts"][0][0]["input_ids"]
    assert scope["bert"](input_ids=ids).logits.shape == (4, 2)
    assert scope["cnn"](torch.randn(2, 3, 32, 32)).shape == (2, 10)
