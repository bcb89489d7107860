"""Before anything is timed: does the provider compute the same loss and gradients as fpo-ops?

A provider that follows another convention (which KL direction, which JSD mixture, which rows are
chosen) or drops ignored positions differently is off by O(1); rounding in the compute dtype is off
by a few units of that dtype's precision. The tolerance sits between the two, so a mismatch here is
a real disagreement and the benchmark stops instead of timing it.
"""
from dataclasses import dataclass
from typing import Dict

import torch

from .heads import HeadSpec
from .providers import CHECK_BASELINE, get_provider
from .workloads import Workload, make_inputs

# Relative (norm-wise) disagreement allowed between two providers in each compute dtype.
CHECK_RTOL = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}


class ProviderMismatch(AssertionError):
    """A provider's loss or gradients disagree with fpo-ops beyond rounding."""


@dataclass
class CheckResult:
    provider: str
    errors: Dict[str, float]
    tolerance: float


def loss_and_grads(provider_name: str, workload: Workload, head: HeadSpec, n_tokens: int,
                   dtype: torch.dtype, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
    """One step of ``provider_name``: {"loss": [1], "grad_hidden": [B, T, H], "grad_weight": [V, H]} in fp32."""
    inputs = make_inputs(head, workload, n_tokens, dtype, device, seed)
    loss = get_provider(provider_name).build(workload, inputs)()
    loss.backward()
    return {"loss": loss.detach().float().reshape(1), "grad_hidden": inputs.hidden.grad.float(),
            "grad_weight": inputs.weight.grad.float()}


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error.

    Args:
        value, expected: tensors of one shape.

    Returns:
        ||value - expected|| / ||expected|| (the absolute norm when expected is 0).
    """
    scale = expected.norm().item()
    diff = (value - expected).norm().item()
    return diff / scale if scale > 0 else diff


def check_provider(provider_name: str, workload: Workload, head: HeadSpec, n_tokens: int,
                   dtype: torch.dtype, device: torch.device, seed: int = 0) -> CheckResult:
    """Compare a provider's loss, dL/dhidden and dL/dweight with fpo-ops' on the same inputs.

    Args:
        provider_name: provider to check.
        workload, head: the case.
        n_tokens: N of the check (small: the check is not timed).
        dtype, device: as in the timed cases.
        seed: input seed.

    Returns:
        CheckResult with the relative error of each quantity.

    Raises:
        ProviderMismatch: when any relative error exceeds the dtype's tolerance.
    """
    got = loss_and_grads(provider_name, workload, head, n_tokens, dtype, device, seed)
    if provider_name == CHECK_BASELINE:
        return CheckResult(provider_name, {}, 0.0)
    expected = loss_and_grads(CHECK_BASELINE, workload, head, n_tokens, dtype, device, seed)
    tolerance = CHECK_RTOL[dtype]
    errors = {key: relative_error(got[key], expected[key]) for key in expected}
    bad = {key: err for key, err in errors.items() if not err <= tolerance}
    if bad:
        raise ProviderMismatch(
            f"{provider_name} disagrees with {CHECK_BASELINE} on {workload.name}/{head.name} N={n_tokens} "
            f"{dtype}: relative errors {bad}, expected <= {tolerance:g}"
        )
    return CheckResult(provider_name, errors, tolerance)
