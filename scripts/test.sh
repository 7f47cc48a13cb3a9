#!/usr/bin/env bash
# One command: set up the environment (with the vLLM engine and verifiers, whose tests would skip
# without them) and run the test suite. By default the per-commit tiers (everything but `slow`), which
# must finish within a budget of 15 minutes of tests on a 2-core machine (the run fails past it, naming its slowest tests);
# `--all` adds the slow evidence runs (the 300-step quickstart, the full chaos run, the bitwise
# killed-run resume, ...), with no budget. Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
TIER=(-m "not slow" --budget-s="${TIDAL_TEST_BUDGET_S:-900}")
ARGS=()
for arg in "$@"; do
    if [ "$arg" = --all ]; then TIER=(); else ARGS+=("$arg"); fi
done
bash scripts/setup.sh --vllm --verifiers
.venv/bin/ruff check tidal tests bench
.venv/bin/ruff format --check tidal tests bench
# -X faulthandler: a crash, in a test or at exit, prints every thread's stack.
exec .venv/bin/python -X faulthandler -m pytest "${TIER[@]}" "${ARGS[@]}"
