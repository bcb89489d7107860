#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (Triton kernels through the CPU interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
