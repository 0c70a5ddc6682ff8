#!/usr/bin/env bash
# Creates .venv in the repository root if it is missing and installs ckptio with its dev
# dependencies. Idempotent: reinstalls only when pyproject.toml or the constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON_BIN --version 2>&1)"
    "$PYTHON_BIN" -m venv .venv
fi
stamp=.venv/.ckptio-installed
want=$(cat pyproject.toml scripts/constraints-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[setup] installing ckptio and its dev dependencies into .venv (log: .venv/install.log)"
    pip_install() {
        .venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints-dev.txt "$@" \
            >> .venv/install.log 2>&1 || { cat .venv/install.log >&2; echo "[setup] pip install failed" >&2; exit 1; }
    }
    pip_install torch
    pip_install -e ".[dev]"
    # torchtitan only for its CheckpointManager in tests: without its training stack's requirements.
    pip_install --no-deps torchtitan spmd_types
    echo "$want" > "$stamp"
fi
