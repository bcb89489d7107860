#!/usr/bin/env bash
# The GPU run: on a CUDA machine that has its own torch and triton, in stages that each save their
# output under OUT_DIR as they finish, so a stage that fails or runs out of time costs only itself.
#
#   bash scripts/gpu_check.sh --plan                 # the cases and their estimated seconds (any machine)
#   bash scripts/gpu_check.sh OUT_DIR [fpo-bench arguments...]
#
# Stages (each one line in OUT_DIR/stages.jsonl: status ok / failed / timeout / skipped, exit code, seconds):
#   wheels   installs wheelhouse/*.whl (see scripts/gpu_wheels.sh) with --no-index --no-deps into a
#            folder put on PYTHONPATH, so TRL, Liger-Kernel and Cut-Cross-Entropy can run; skipped without
#   install  pip install --no-deps -e . (skipped when fpo_ops already imports from this checkout)
#   env      versions, the device, and which benchmark anchors import           -> setup.log
#   tests    the GPU-marked tests                                               -> tests.log
#   bench    fpo-bench with the plan's cases; one JSON line per check and case,
#            appended as each ends                                   -> cases.jsonl, bench.log
#   sweep    launch shapes of impl="triton", the best printed as tile_config's value
#                                                                    -> sweep.jsonl, bench.log
#   summary  <name>.json from the JSON lines (whatever finished) and <name>.png if matplotlib imports
# Every stage runs whatever happened before it; the script exits 1 when any stage did not end ok.
# That is 8 files in OUT_DIR, so the whole folder can be copied back.
#
# Environment: FPO_GPU_PLAN (default "default"; "ci" is the CPU-sized plan CI runs), FPO_WHEELHOUSE
# (default wheelhouse), PYTHON (default
# .venv/bin/python when present, else python3), FPO_RESULTS_NAME (stem of the results files, default
# <device>-<date>-gpu-check), FPO_LIMIT_<STAGE> (seconds; defaults below keep the whole run under the
# GPU host's 10-minute command limit even if every stage runs to its limit).
set -uo pipefail
cd "$(dirname "$0")/.."
plan="${FPO_GPU_PLAN:-default}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--plan" ]; then
  exec "$PYTHON" -m benchmarks.gpu_plan estimate --plan "$plan"
fi
if [ "$#" -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh --plan | OUT_DIR [fpo-bench arguments...]" >&2
  exit 2
fi
out="$1"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"
stages="$out/stages.jsonl"
failed=0

record() {  # record NAME STATUS RC SECONDS LOG
  printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %s, "log": "%s", "plan": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$plan" >>"$stages"
  echo "== stage $1: $2 (exit $3, $4 s)"
  [ "$2" = ok ] || [ "$2" = skipped ] || failed=1
}

stage() {  # stage NAME LIMIT_S LOG COMMAND...: run it under a time limit, its output appended to LOG
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "== stage $name (at most $limit s) -> $log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]} status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  record "$name" "$status" "$rc" "$((SECONDS - start))" "$log"
}

# wheels: carried pure-Python packages, never replacing the machine's torch or triton
wheels=("${FPO_WHEELHOUSE:-wheelhouse}"/*.whl)
if [ -e "${wheels[0]}" ]; then
  site="${TMPDIR:-/tmp}/fpo-gpu-site"
  stage wheels "${FPO_LIMIT_WHEELS:-30}" setup.log \
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no ${FPO_WHEELHOUSE:-wheelhouse}/*.whl: TRL, Liger-Kernel and Cut-Cross-Entropy run only if installed" | tee -a "$out/setup.log"
  record wheels skipped 0 0 setup.log
fi

if "$PYTHON" - >/dev/null 2>&1 <<'PY'
import os
import benchmarks, fpo_ops.token_stats.kernels
assert os.path.realpath(fpo_ops.__file__).startswith(os.path.realpath("."))
PY
then
  echo "fpo-ops already imports from this checkout" | tee -a "$out/setup.log"
  record install skipped 0 0 setup.log
else
  stage install "${FPO_LIMIT_INSTALL:-60}" setup.log \
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi

stage env "${FPO_LIMIT_ENV:-30}" setup.log "$PYTHON" - <<'PY'
import importlib, platform
import numpy, torch, triton
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "numpy", numpy.__version__, "device", device)
for module in ("trl.kernels.chunked_divergence", "liger_kernel.chunked_loss", "cut_cross_entropy",
               "matplotlib", "pytest"):
    try:
        importlib.import_module(module)
        print(f"  {module}: imports")
    except Exception as exc:  # the benchmark records the provider as unsupported, with this reason
        print(f"  {module}: {type(exc).__name__}: {exc}")
PY

test_args=()
read -r -a test_args < <("$PYTHON" -m benchmarks.gpu_plan tests --plan "$plan" 2>>"$out/tests.log")
if [ "${#test_args[@]}" -gt 0 ]; then
  stage tests "${FPO_LIMIT_TESTS:-120}" tests.log "$PYTHON" -m pytest -q -p no:cacheprovider "${test_args[@]}"
else  # never the whole suite by accident
  record tests failed 1 0 tests.log
fi

stage bench "${FPO_LIMIT_BENCH:-240}" bench.log \
  "$PYTHON" -m benchmarks.gpu_plan bench --plan "$plan" --out "$out" "$@"

stage sweep "${FPO_LIMIT_SWEEP:-75}" bench.log \
  "$PYTHON" -m benchmarks.gpu_plan sweep --plan "$plan" --out "$out"

name="${FPO_RESULTS_NAME:-}"
if [ -z "$name" ]; then
  name="$("$PYTHON" -c "
import datetime, torch
from benchmarks.report import device_slug
dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
print(f'{device_slug(dev)}-{datetime.date.today():%Y-%m-%d}-gpu-check')" 2>/dev/null || echo results)"
fi
stage summary "${FPO_LIMIT_SUMMARY:-30}" bench.log \
  "$PYTHON" -m benchmarks.summary --cases "$out/cases.jsonl" --sweep "$out/sweep.jsonl" \
  --stages "$stages" --out "$out" --name "$name"
if [ -f "$out/$name.json" ]; then
  "$PYTHON" -m benchmarks.cli --show "$out/$name.json" 2>&1 | tail -n 80
fi
echo "stages:"
cat "$stages"
exit "$failed"
