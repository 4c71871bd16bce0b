# Sourced by ci/main.sh and ci/test.sh: make ./.venv (once, or again when pyproject.toml changes)
# and activate it. torch is pinned to 2.13.0 in the same pip command: on a CPU-only machine that
# resolves to the local CPU build instead of pulling ~5 GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
stamp=.venv/.sspo-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q torch==2.13.0 -e '.[test,bench,trl,verl]'
    echo "$want" > "$stamp"
fi
