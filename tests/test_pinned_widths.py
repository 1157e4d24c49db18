"""Every structured criterion prunes seeded ResNet-20/32 and the CIFAR ViT to exactly the widths pinned in
``tests/data/pinned_widths.json`` (written by ``tests/pinned_widths.py`` before the architecture redesign), so a
refactoring of the scoring or pruning code cannot change which channels and heads go."""

from __future__ import annotations

import json

import pinned_widths as pinned
import pytest

EXPECTED = json.loads(pinned.PATH.read_text())
CASES = [(m, p) for m in pinned.MODELS for p in pinned.CRITERIA if (m, p) not in pinned.UNSUPPORTED]


def test_every_case_is_pinned() -> None:
    assert sorted((m, p) for m in EXPECTED for p in EXPECTED[m]) == sorted(CASES)


@pytest.mark.parametrize(("model_name", "preset"), CASES)
def test_pruned_widths_unchanged(model_name: str, preset: str) -> None:
    got = pinned.pruned_widths(model_name, preset)
    want = EXPECTED[model_name][preset]
    diff = {k: (want.get(k), got.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
    assert got == want, diff
