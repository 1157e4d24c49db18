"""Run the notebook series with papermill, or prepare parameterised copies for nbval.

    python scripts/notebooks.py run --out results [--params ci|paper] [--only 00_quickstart] [--force]
    python scripts/notebooks.py prepare --params ci --out build/ci-notebooks

``--notebooks DIR`` takes the series from another folder (default: the project's ``notebooks/``; its parameter
sets in ``DIR/params/``).

Parameters come from the notebook's own ``parameters`` cell (``--params default``) or are overridden by
``notebooks/params/<set>/<notebook>.yaml``; ``results_dir`` is always injected so that every figure
and metric lands under ``--out`` (``<out>/<set>/`` for a non-default set). ``run`` writes each executed
notebook to ``<out>/notebooks/`` and, when it finished, a ``.done`` marker holding the parameters; a rerun
skips finished notebooks with the same parameters, so an interrupted series resumes where it stopped
(``--force`` re-runs everything).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nbformat
import papermill
import yaml
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from oba.io import write_json

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def notebook_paths(folder: Path, only: list[str] | None) -> list[Path]:
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        unknown = set(only) - {p.stem for p in paths}
        if unknown:
            sys.exit(f"unknown notebook(s): {', '.join(sorted(unknown))}; have {', '.join(p.stem for p in paths)}")
        paths = [p for p in paths if p.stem in only]
    return paths


def parameters_for(nb: Path, param_set: str, results_dir: Path) -> dict:
    params: dict = {}
    if param_set != "default":
        file = nb.parent / "params" / param_set / f"{nb.stem}.yaml"
        if not file.exists():
            sys.exit(f"{file} is missing: every notebook needs a parameter file in notebooks/params/{param_set}/")
        params = yaml.safe_load(file.read_text()) or {}
    params["results_dir"] = str(results_dir)
    return params


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    if args.params != "default":  # keep e.g. results/paper/ apart from the default run's results/
        out = out / args.params
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    for nb in notebook_paths(Path(args.notebooks), args.only):
        params = parameters_for(nb, args.params, out)
        target = out / "notebooks" / nb.name
        marker = target.with_suffix(".done")
        if not args.force and marker.exists() and json.loads(marker.read_text()) == params:
            print(f"[oba] {nb.stem}: already done with these parameters, skipped (--force to re-run)")
            continue
        marker.unlink(missing_ok=True)
        print(f"[oba] {nb.stem}: running with {params}", flush=True)
        start = time.perf_counter()
        papermill.execute_notebook(
            str(nb), str(target), parameters=params, cwd=str(nb.parent), progress_bar=True, kernel_name="python3"
        )
        write_json(marker, params)  # atomic: a marker is whole or absent
        print(f"[oba] {nb.stem}: done in {time.perf_counter() - start:.0f} s -> {target}", flush=True)


def prepare(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.ipynb"):
        stale.unlink()
    for nb in notebook_paths(Path(args.notebooks), args.only):
        params = parameters_for(nb, args.params, out.parent / f"{out.name}-results")
        node = parameterize_notebook(load_notebook_node(str(nb)), params, kernel_name="python3")
        nbformat.write(node, out / nb.name)
    print(f"[oba] {len(list(out.glob('*.ipynb')))} notebooks parameterised ({args.params}) in {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("run", run), ("prepare", prepare)):
        p = sub.add_parser(name)
        p.add_argument("--params", default="default" if name == "run" else "ci", help="default, ci or paper")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--only", nargs="*", help="notebook names (stems) to include")
        p.add_argument("--notebooks", default=str(NOTEBOOKS), help="the folder of the series (default: notebooks/)")
        if name == "run":
            p.add_argument("--force", action="store_true", help="re-run notebooks already done")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
