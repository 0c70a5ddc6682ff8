#!/usr/bin/env bash
# Sets up .venv if needed, then runs the benchmark (see README "Performance"); flags pass through,
# e.g. `bash scripts/bench.sh --size-gb 0.25 --repeats 5`. Run as root for cold-cache loads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python benchmarks/run.py "$@"
