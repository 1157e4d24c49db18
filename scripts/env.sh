# Sourced by the other scripts: make sure uv exists and the project environment (.venv) is in sync.
# Needs only python3 (>= 3.10) on a fresh machine; uv is installed into .tools/ when not on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if command -v uv >/dev/null 2>&1; then
    UV=uv
elif [ -x .tools/bin/uv ]; then
    UV=.tools/bin/uv
else
    echo "[oba] installing uv into .tools/ ..." >&2
    if python3 -m venv .tools >/dev/null 2>&1; then
        .tools/bin/python -m pip install --quiet --disable-pip-version-check uv
    else  # no venv module (e.g. Debian without python3-venv): a user install instead
        rm -rf .tools
        python3 -m pip install --quiet --user uv || python3 -m pip install --quiet --user --break-system-packages uv
        mkdir -p .tools/bin && ln -sf "$(python3 -m site --user-base)/bin/uv" .tools/bin/uv
    fi
    UV=.tools/bin/uv
fi

# The environment (resolved from pyproject.toml; uv.lock is not committed): torch, torchvision, torch-pruning + the
# notebook, model-zoo (timm, transformers) and development extras.
"$UV" sync --extra notebooks --extra models --extra dev --quiet

# Real data: an explicit OBA_DATA_DIR wins; else a ../shared/data beside the checkout; else data/.
if [ -z "${OBA_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    export OBA_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export OBA_DATA_DIR="${OBA_DATA_DIR:-$PWD/data}"
export PYTHONUNBUFFERED=1
echo "[oba] data directory: $OBA_DATA_DIR" >&2
