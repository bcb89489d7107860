#!/usr/bin/env bash
# On a CUDA machine that already has torch and triton: install the package without touching
# them, run the GPU-marked tests, then the benchmark (default: the Llama-3-8B sweep on GPU).
# Usage: bash scripts/gpu_check.sh OUT_DIR [fpo-bench arguments...]
# Logs and the benchmark's JSON and PNG land in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1
python3 - <<'PY' | tee "$out/versions.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
# Only the kernel tests carry GPU cases; the other modules import optional extras.
python3 -m pytest -q -m gpu tests/test_triton_stats.py 2>&1 | tee "$out/gpu-tests.log"
python3 -m fpo_ops.benchmarks.cli --out "$out" "$@" 2>&1 | tee "$out/bench.log"
