#!/usr/bin/env bash
# One command: set up the environment and run the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tidal train configs/quickstart.yaml "$@"
