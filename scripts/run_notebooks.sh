#!/usr/bin/env bash
# The main job: execute the notebook series at its default parameters with papermill. Executed
# notebooks go to results/notebooks/, figures and metrics to results/ (see README.md).
# Extra arguments go to scripts/notebooks.py run, e.g. --params paper or --only 00_quickstart.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$UV" run --no-sync python scripts/notebooks.py run --out results "$@"
