#!/usr/bin/env bash
# One command: set up the environment (with the vLLM engine, whose tests would skip without it) and
# run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --vllm
.venv/bin/ruff check tidal tests bench
exec .venv/bin/python -m pytest "$@"
