#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (Triton kernels through the CPU interpreter).
# With arguments: `pytest -q ARGS`. Without: the suite on every core (pytest-xdist, one test file
# per worker at a time), then the `process_group` tests alone. Their ranks step in lockstep, so a
# busy worker beside them stalls every collective: the ZeRO-3 engine test took 262 s beside one on
# two cores, 52 s alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
if [ $# -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
status=0
python -m pytest -q --durations=10 -n auto --dist loadfile -m "not process_group" || status=$?
python -m pytest -q --durations=10 -m process_group || status=$?
exit "$status"
