"""pytest-benchmark entry points at a small head (``pytest benchmarks/``; not part of ``tests/``).

Each case is first checked against fpo-torch (loss and both gradients), so a benchmark of a wrong
result fails instead of producing a number.
"""
import pytest
import torch

from benchmarks.check import check_provider
from benchmarks.heads import get_head
from benchmarks.providers import get_provider, provider_names
from benchmarks.workloads import WORKLOADS, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEAD = get_head("tiny")
N_TOKENS = 256


@pytest.mark.parametrize("provider_name", provider_names())
@pytest.mark.parametrize("workload_name", list(WORKLOADS))
def test_fwd_bwd(benchmark, workload_name, provider_name):
    workload = WORKLOADS[workload_name]
    reason = get_provider(provider_name).unsupported(workload, HEAD, DEVICE)
    if reason:
        pytest.skip(reason)
    check_provider(provider_name, workload, HEAD, N_TOKENS, torch.float32, DEVICE)

    inputs = make_inputs(HEAD, workload, N_TOKENS, torch.float32, DEVICE)
    step = get_provider(provider_name).build(workload, inputs)

    def clear_grads():
        inputs.hidden.grad = None
        inputs.weight.grad = None

    def fwd_bwd():
        step().backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = workload_name
    benchmark.pedantic(fwd_bwd, setup=clear_grads, rounds=5, warmup_rounds=1)
    assert torch.isfinite(inputs.hidden.grad).all() and torch.isfinite(inputs.weight.grad).all()
