"""Test set-up shared by every test module.

Without CUDA the Triton kernels run through the interpreter, which must be chosen before anything
imports triton; hence this happens at conftest import time.
"""
import os

# pytest-xdist runs a worker per core (scripts/test.sh): one thread each, in the processes they
# launch too, keeps the workers' OpenMP threads from spinning against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
