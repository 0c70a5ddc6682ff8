#!/usr/bin/env bash
# Sets up .venv if needed, then runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
