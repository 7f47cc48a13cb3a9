#!/usr/bin/env bash
# Set up .venv on a fresh machine: torch 2.13.0 (CPU build here) first, then tidal and its
# dependencies. Installing torch first means no other package can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" -e ".[dev]"
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
print(f"tidal environment ready: torch {torch.__version__}")
PY
