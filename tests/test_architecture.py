"""Structural facts of the ``oba`` package, checked by reading its source with :mod:`ast` (nothing is imported).

* no import cycle between the modules of ``oba/`` (lazy imports inside functions count too);
* imports point one way through the layers of :data:`LAYERS`;
* no function longer than :data:`MAX_FUNCTION_LINES` lines without a ``# long function: <reason>`` comment;
* no run of :data:`MIN_DUPLICATE_LINES` statement lines copied between two modules.

Everything is computed from the files present, so modules may come and go.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import io
import re
import tokenize
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "oba"

FOUNDATIONS, CURVATURE, CRITERIA, PRUNING, TRAINING, ORCHESTRATION, API = range(7)

LAYERS: dict[str, int] = {
    # 0 -- foundations: file and process plumbing, batches, data sets, model zoo, FLOP counting, toy networks.
    "oba.io": FOUNDATIONS,
    "oba.process_group": FOUNDATIONS,
    "oba.batches": FOUNDATIONS,
    "oba.data": FOUNDATIONS,
    "oba.data.*": FOUNDATIONS,
    "oba.models": FOUNDATIONS,
    "oba.models.*": FOUNDATIONS,
    "oba.flops": FOUNDATIONS,
    "oba.toynets": FOUNDATIONS,
    "oba.arguments": FOUNDATIONS,
    "oba.hf_layers": FOUNDATIONS,  # Hugging Face's Conv1D: its Torch-Pruning pruner, read by criteria and pruning
    # 1 -- curvature engine: Hessian/GGN/Fisher products and the decomposition of the Hessian.
    "oba.standardization": CURVATURE,
    "oba.curvature": CURVATURE,
    "oba.decompose": CURVATURE,
    # 2 -- criteria: per-parameter and per-group importances, and the registry that names them.
    "oba.importance": CRITERIA,
    "oba.group_importance": CRITERIA,
    "oba.kfac": CRITERIA,
    "oba.empirical_fisher": CRITERIA,
    "oba.cbs": CRITERIA,
    "oba.eigendamage": CRITERIA,
    "oba.masks": CRITERIA,  # unstructured masks and Fisher blocks, read by oba.criteria's weight scores
    "oba.block_taylor": CRITERIA,
    "oba.criteria": CRITERIA,
    # 3 -- pruning: structured and unstructured pruners, targets, saving and loading pruned models.
    "oba.prunable": PRUNING,
    "oba.depgraph": PRUNING,
    "oba.cached_shapes": PRUNING,
    "oba.target": PRUNING,
    "oba.prune_step": PRUNING,
    "oba.prune": PRUNING,
    "oba.pruned_io": PRUNING,
    "oba.unstructured": PRUNING,
    # 4 -- training: fine-tuning and evaluation; a side branch, see IMPORT_CEILING.
    "oba.train": TRAINING,
    # 5 -- orchestration: multi-process scoring and the experiment runners, which tie everything together.
    "oba.distributed": ORCHESTRATION,
    "oba.experiments": ORCHESTRATION,
    # 6 -- the package itself (``oba/__init__.py``): the public API re-exports; nothing inside imports it.
    "oba": API,
}
"""Layer of each module of ``oba`` (exact name, or an :mod:`fnmatch` pattern such as ``oba.data.*``).

A module may import modules of its own layer or of lower layers, never of a higher one, so that
foundations < curvature engine < criteria < pruning < training < orchestration < public API. Modules
that do not exist (yet) may be listed; every module that exists must be listed.
"""

IMPORT_CEILING: dict[str, int] = {"oba.train": FOUNDATIONS}
"""Modules that may import only up to a lower layer than their own.

Training sits above pruning (pruners never fine-tune) but is independent of the curvature engine, the
criteria and the pruners: it imports foundations only (batches, checkpoints, the process group).
"""

MAX_FUNCTION_LINES = 80
LONG_FUNCTION_COMMENT = re.compile(r"#\s*long function:\s*\S")
MIN_DUPLICATE_LINES = 6


# ---------------------------------------------------------------------------------------------------- reading


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def sources() -> dict[str, tuple[Path, str]]:
    """``{module: (path, source)}`` for every ``oba/**/*.py``."""
    return {module_name(p): (p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def trees() -> dict[str, ast.Module]:
    return {mod: ast.parse(src, filename=str(path)) for mod, (path, src) in sources().items()}


def where(mod: str, line: int) -> str:
    return f"{sources()[mod][0].relative_to(ROOT)}:{line}"


# ---------------------------------------------------------------------------------------------------- imports


class Edge(NamedTuple):
    src: str
    dst: str
    line: int

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} ({where(self.src, self.line)})"


def imported_modules(mod: str, node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """The modules of ``modules`` that ``node`` (in module ``mod``) points to.

    ``import a.b`` points to ``a.b``; ``from a import b`` to the submodule ``a.b`` when there is one, else to
    ``a`` (a name defined in ``a``). Parent packages that Python runs on the way are not arrows.
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if node.level:  # relative: the package holding ``mod`` (``mod`` itself for an __init__), then up
        package = mod.split(".") if sources()[mod][0].name == "__init__.py" else mod.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            out.append(f"{base}.{alias.name}")
        elif base in modules:
            out.append(base)
    return out


@functools.cache
def import_graph() -> dict[str, list[Edge]]:
    """``{module: [edges out of it]}`` over all imports, at module level or inside functions."""
    modules = set(sources())
    graph: dict[str, list[Edge]] = {mod: [] for mod in modules}
    for mod, tree in trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for dst in imported_modules(mod, node, modules):
                    if dst != mod:
                        graph[mod].append(Edge(mod, dst, node.lineno))
    return graph


def reachable(graph: dict[str, list[Edge]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for edge in graph[todo.pop()]:
            if edge.dst not in seen:
                seen.add(edge.dst)
                todo.append(edge.dst)
    return seen


def cycles(graph: dict[str, list[Edge]]) -> list[tuple[list[str], list[Edge]]]:
    """Strongly connected components of more than one module, each with one shortest cycle through its first."""
    reach = {mod: reachable(graph, mod) for mod in graph}
    components = {frozenset({mod} | {m for m in reach[mod] if mod in reach[m]}) for mod in graph}
    out = []
    for component in sorted(sorted(c) for c in components if len(c) > 1):
        start = component[0]
        paths: dict[str, list[Edge]] = {start: []}  # breadth-first inside the component, back to start
        todo = [start]
        while start not in [e.dst for e in paths[start]]:
            mod = todo.pop(0)
            for edge in graph[mod]:
                if edge.dst == start:
                    paths[start] = paths[mod] + [edge]
                    break
                if edge.dst in component and edge.dst not in paths:
                    paths[edge.dst] = paths[mod] + [edge]
                    todo.append(edge.dst)
        out.append((component, paths[start]))
    return out


def layer_of(mod: str) -> int | None:
    if mod in LAYERS:
        return LAYERS[mod]
    matches = [layer for pattern, layer in LAYERS.items() if fnmatch.fnmatchcase(mod, pattern)]
    return matches[0] if matches else None


def test_no_import_cycles():
    found = cycles(import_graph())
    report = "\n".join(
        f"cycle among {', '.join(component)}:\n" + "\n".join(f"    {edge}" for edge in edges)
        for component, edges in found
    )
    assert not found, f"{len(found)} import cycle(s) inside oba/:\n{report}"


def test_every_module_has_a_layer():
    missing = sorted(mod for mod in sources() if layer_of(mod) is None)
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {', '.join(missing)}"


def test_layers_point_one_way():
    violations = []
    for mod, edges in sorted(import_graph().items()):
        own = layer_of(mod)
        if own is None:  # reported by test_every_module_has_a_layer
            continue
        ceiling = IMPORT_CEILING.get(mod, own)
        for edge in edges:
            theirs = layer_of(edge.dst)
            if theirs is not None and theirs > ceiling:
                violations.append(f"{edge}: layer {own} (may import up to {ceiling}) imports layer {theirs}")
    assert not violations, f"{len(violations)} import(s) against the layers:\n" + "\n".join(violations)


# ---------------------------------------------------------------------------------------------------- long functions


def has_reason_comment(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the comment block directly above the ``def`` (or above its decorators) gives a reason."""
    tops = {node.lineno, min([node.lineno] + [d.lineno for d in node.decorator_list])}
    for top in tops:
        i = top - 2  # 0-based index of the line above
        while i >= 0 and lines[i].strip().startswith("#"):
            if LONG_FUNCTION_COMMENT.match(lines[i].strip()):
                return True
            i -= 1
    return False


def test_no_long_functions_without_a_reason():
    long = []
    for mod, tree in trees().items():
        lines = sources()[mod][1].splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not has_reason_comment(lines, node):
                    long.append(f"{node.name} ({where(mod, node.lineno)}): {length} lines")
    assert not long, (
        f"{len(long)} function(s) over {MAX_FUNCTION_LINES} lines: split them, or put "
        "'# long function: <reason>' directly above the def:\n" + "\n".join(long)
    )


# ---------------------------------------------------------------------------------------------------- duplicates


def code_lines(source: str) -> list[tuple[int, str] | None]:
    """The statement lines of ``source`` to compare, normalised, as ``(line number, text)``.

    Left out: imports, ``__all__``, docstrings, comments, blank and punctuation-only lines. A ``def`` or
    ``class`` header (decorators and signature) is left out too and shows as ``None``, so that no window of
    lines runs from one body into the next.
    """
    tree = ast.parse(source)
    skip: set[int] = set()
    headers: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            skip.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                skip.update(range(node.lineno, node.end_lineno + 1))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None  # an empty __init__.py has no body
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                skip.update(range(first.lineno, first.end_lineno + 1))
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            top = min([node.lineno] + [d.lineno for d in node.decorator_list])
            headers.update(range(top, max(node.lineno, node.body[0].lineno - 1) + 1))
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    out: list[tuple[int, str] | None] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if number in headers:
            out.append(None)
        elif number not in skip and any(ch.isalnum() for ch in text):
            out.append((number, text))
    return out


def duplicates(files: dict[str, str], size: int = MIN_DUPLICATE_LINES) -> list[str]:
    """Runs of at least ``size`` normalised statement lines that occur in two different modules of ``files``."""
    lines = {mod: code_lines(src) for mod, src in files.items()}
    windows: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for mod, seq in lines.items():
        for i in range(len(seq) - size + 1):
            window = seq[i : i + size]
            if None not in window:
                windows[tuple(text for _, text in window)].append((mod, i))
    pairs: dict[tuple[str, str], set[tuple[int, int]]] = defaultdict(set)  # window starts matching in two modules
    for places in windows.values():
        for a, i in places:
            for b, j in places:
                if a < b:
                    pairs[a, b].add((i, j))
    runs = []
    for (a, b), starts in sorted(pairs.items()):
        for i, j in sorted(starts):
            if (i - 1, j - 1) in starts:
                continue  # inside a run already reported
            k = 0
            while (i + k + 1, j + k + 1) in starts:
                k += 1
            end = size + k - 1
            runs.append(
                f"{size + k} lines: {a} lines {lines[a][i][0]}-{lines[a][i + end][0]}"
                f" == {b} lines {lines[b][j][0]}-{lines[b][j + end][0]}"
            )
    return runs


BODY = """\
    total = 0
    for item in items:
        if item.weight is None:
            continue
        total += item.weight * scale
        count = count + 1
    return total / count
"""
SIGNATURE = "def f(\n    items,\n    scale,\n    count,\n    extra_a,\n    extra_b,\n    extra_c,\n):\n"


def test_duplicate_detector_finds_a_copied_body():
    a = f'"""Module a."""\n\nimport os\n\n\ndef f(items, scale, count):\n    """Doc."""\n{BODY}'
    b = f"def g(items, scale, count):  # a copy, under another name\n{BODY}"
    assert duplicates({"a": a, "b": b}) == ["7 lines: a lines 8-14 == b lines 2-8"]


def test_duplicate_detector_ignores_shared_signatures_and_copies_inside_one_module():
    assert duplicates({"a": SIGNATURE + "    return 1\n", "b": SIGNATURE + "    return 2\n"}) == []
    one_module = f"def f(items, scale, count):\n{BODY}\n\ndef g(items, scale, count):\n{BODY}"
    assert duplicates({"a": one_module, "b": "x = 1\n"}) == []


def test_no_code_duplicated_between_modules():
    runs = duplicates({str(path.relative_to(ROOT)): src for path, src in sources().values()})
    report = "\n".join(runs)
    assert not runs, f"{len(runs)} run(s) of >= {MIN_DUPLICATE_LINES} lines duplicated between modules:\n{report}"
