#!/usr/bin/env bash
# All the tests: pytest (unit + integration) and every notebook under nbval, executed with the small
# parameters in notebooks/params/ci/. Data-dependent tests skip (with the reason) when data is absent.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$UV" run --no-sync python scripts/notebooks.py prepare --params ci --out build/ci-notebooks
"$UV" run --no-sync pytest tests build/ci-notebooks --nbval-lax -p no:cacheprovider "$@"
