"""Repository hygiene: dependency files in sync, notebooks committed clean and parameterised."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _normalise(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_in_sync_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= set(extra)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("-e")}
    assert {_normalise(r) for r in listed} == {_normalise(r) for r in wanted}
    assert "-e ." in pip_section
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python", "") == project["requires-python"]


def test_there_are_notebooks():
    assert [p.stem for p in NOTEBOOKS][:1] == ["00_quickstart"]


def _parameters_cell(nb: dict) -> dict[str, ast.expr]:
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'parameters'"
    tree = ast.parse("".join(cells[0]["source"]))
    out = {}
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"parameters must be typed assignments: {ast.unparse(node)}"
        out[node.target.id] = node.annotation
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "strip outputs (nbstripout)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_and_param_files(path):
    nb = json.loads(path.read_text())
    names = _parameters_cell(nb)
    assert "results_dir" in names and "data_dir" in names
    last_code = [c for c in nb["cells"] if c["cell_type"] == "code"][-1]
    assert "assert " in "".join(last_code["source"]), "the notebook must end with a cell of asserts (nbval)"
    for param_set in ("ci", "paper"):
        file = ROOT / "notebooks" / "params" / param_set / f"{path.stem}.yaml"
        assert file.exists(), f"{file.relative_to(ROOT)} missing"
        values = yaml.safe_load(file.read_text()) or {}
        unknown = set(values) - set(names)
        assert not unknown, f"{file.name} sets parameters the notebook does not have: {unknown}"


PARAM_FILES = sorted((ROOT / "notebooks" / "params").rglob("*.yaml"))


@pytest.mark.parametrize("file", PARAM_FILES, ids=lambda p: str(p.relative_to(ROOT / "notebooks" / "params")))
def test_every_parameter_file_names_a_notebook_and_its_parameters(file):
    """Any set (``--params <folder>``, nested folders too) only sets parameters its notebook has."""
    notebook = ROOT / "notebooks" / f"{file.stem}.ipynb"
    assert notebook.exists(), f"{file.name} names no notebook"
    names = _parameters_cell(json.loads(notebook.read_text()))
    values = yaml.safe_load(file.read_text()) or {}
    assert not set(values) - set(names), f"unknown parameters {set(values) - set(names)}"
    if "model_name" in values:
        from oba.models import available

        assert values["model_name"] in available(), values["model_name"]
