#!/usr/bin/env bash
# The CUDA path of async saves in one command, on a machine with a GPU: pinned staging buffers
# reused across saves, device-to-host copies on a side stream ordered after the caller's queued
# work, guards that make the optimizer's stream wait on the GPU (tests/async_io/test_cuda_staging.py),
# then the async tests that run on any device. Fails (instead of skipping) when no GPU is visible.
#   bash scripts/cuda_checks.sh            # PYTHON=/path/to/python to use an interpreter with CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH=src CKPTIO_REQUIRE_CUDA=1
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device: these checks need a GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PYEOF
"$PY" -m pytest -q -rs tests/async_io/test_cuda_staging.py "$@"
"$PY" -m pytest -q -rs tests/async_io "$@"
