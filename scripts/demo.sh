#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/demo.py "$@"
