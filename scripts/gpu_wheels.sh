#!/usr/bin/env bash
# Builds wheelhouse/: the pure-Python wheels that let the benchmark's TRL, Liger-Kernel and
# Cut-Cross-Entropy providers run on a GPU machine that has no package registry (Python 3.12, its own
# torch, triton, transformers, accelerate, pandas, pyarrow, ...). scripts/gpu_check.sh installs
# whatever is in wheelhouse/ with `pip install --no-index --no-deps --target`, so the machine's own
# torch and triton are never replaced.
#
# What they import that such a machine lacks (an image with torch, triton, transformers, accelerate,
# peft, pandas, pyarrow, xxhash, fsspec, huggingface-hub, rich, psutil, pytest, matplotlib):
#   trl                -> datasets (trl/__init__ and trl.kernels import it)
#   datasets           -> dill, multiprocess
#   liger-kernel, cut-cross-entropy -> torch and triton only
# The versions are those installed in this checkout's .venv (what CI tests), unless given as
# NAME==VERSION arguments. Run on a machine where pip reaches the package index:
#   bash scripts/gpu_wheels.sh            # then copy wheelhouse/ to the GPU host's checkout
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] && py=.venv/bin/python
if [ "$#" -gt 0 ]; then
  pins=("$@")
else
  mapfile -t pins < <("$py" - <<'PY'
from importlib import metadata
for name in ("trl", "liger-kernel", "cut-cross-entropy", "datasets", "dill", "multiprocess"):
    print(f"{name}=={metadata.version(name)}")
PY
)
fi
rm -rf wheelhouse
mkdir -p wheelhouse
# Pure-Python wheels only (none-any); the target interpreter is CPython 3.12 on x86-64 Linux.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheelhouse "${pins[@]}"
ls -l wheelhouse
