#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: set up .venv (scripts/setup.sh --vllm, then a CUDA
# build of torch if the one installed cannot see the GPU), list the GPUs, run the GPU tests
# (`pytest -m gpu tests/gpu -s -q`) and say on the last line what ran, within GPU_CHECK_BUDGET_S
# seconds in all (default 480). Without a GPU it installs and runs nothing, says so and exits 0.
#
#   bash scripts/gpu_check.sh              set up, then test
#   bash scripts/gpu_check.sh --no-setup   test with .venv as it is (no network needed)
#
# The torch that setup.sh installs is whatever the package index serves for torch==2.13.0: the CUDA
# build from PyPI on Linux, but a CPU build where pip is configured with a local wheel directory that
# holds one (it wins: 2.13.0+cpu sorts above 2.13.0). On a GPU machine this script then reinstalls
# torch==2.13.0 without the pip configuration (or from TIDAL_TORCH_INDEX_URL, if set).
set -uo pipefail
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
SETUP=1
for arg in "$@"; do
    case "$arg" in
        --no-setup) SETUP=0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (known: --no-setup)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.." || exit 2
start=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - start))); }
# A setup step, stopped so that the tests keep the last 2 minutes of the budget.
setup_step() {
    local s=$(($(left) - 120))
    [ "$s" -gt 0 ] || return 124
    timeout "$s" "$@"
}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here, nothing ran"
    exit 0
fi
nvidia-smi -L
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
nothing_ran() { echo "gpu_check: $1 on $GPU, nothing ran"; exit 1; }

if [ "$SETUP" = 1 ]; then
    setup_step bash scripts/setup.sh --vllm || nothing_ran "setup (scripts/setup.sh --vllm) failed or ran out of time"
fi
[ -x .venv/bin/python ] || nothing_ran "no .venv (run without --no-setup)"
cuda_torch() { .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
if ! cuda_torch; then
    [ "$SETUP" = 1 ] || nothing_ran "torch in .venv cannot use the GPU (run without --no-setup)"
    echo "gpu_check: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)') cannot use the GPU;" \
         "installing the CUDA build of torch 2.13.0"
    index=()
    if [ -n "${TIDAL_TORCH_INDEX_URL:-}" ]; then index=(--index-url "$TIDAL_TORCH_INDEX_URL"); fi
    setup_step env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/python -m pip install \
        --quiet --disable-pip-version-check --force-reinstall "${index[@]}" torch==2.13.0 \
        || nothing_ran "installing a CUDA torch failed or ran out of time"
    cuda_torch || nothing_ran "the torch installed cannot use the GPU either"
fi
.venv/bin/python -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)')"

budget=$(left)
[ "$budget" -ge 60 ] || nothing_ran "only ${budget}s of the ${BUDGET_S}s budget were left for the tests"
log=$(mktemp)
PYTHONUNBUFFERED=1 timeout -k 10 "$budget" .venv/bin/python -m pytest -m gpu tests/gpu -s -q -p no:cacheprovider \
    2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
summary=$(grep -E '^=*( |)[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' "$log" | tail -n 1)
rm -f "$log"
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' || echo 0; }
passed=$(count passed); failed=$(count failed); errors=$(count 'errors?'); skipped=$(count skipped)
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "gpu_check: the tests on $GPU were stopped at the ${BUDGET_S}s budget before they finished" \
         "(what passed before is above); no count"
    exit 1
fi
line="gpu_check: ran $((passed + failed + errors)) tests on $GPU: $passed passed"
[ "$failed" = 0 ] || line+=", $failed failed"
[ "$errors" = 0 ] || line+=", $errors errors"
[ "$skipped" = 0 ] || line+=", $skipped skipped"
echo "$line"
[ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"
[ "$((passed + failed + errors))" -gt 0 ] || exit 1
