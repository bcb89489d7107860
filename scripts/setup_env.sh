#!/usr/bin/env bash
# Creates .venv (once) and installs the package with everything the tests and benchmarks use.
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${FPO_TORCH_VERSION:-2.13.0}"
fi
# DS_BUILD_OPS=0: deepspeed compiles none of its CUDA ops at install (the CPU tests need none; its
# CPU communication op is built at run time with ninja and g++).
DS_BUILD_OPS=0 python -m pip install -q -e ".[test,bench,trl,distributed]"
