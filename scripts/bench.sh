#!/usr/bin/env bash
# Sets up .venv if needed, then runs the default benchmark (the CPU path on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec fpo-bench "$@"
