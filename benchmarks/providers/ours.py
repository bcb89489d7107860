"""fpo-ops itself: the streaming PyTorch op, the Triton kernels, and the float64-capable oracle."""
import importlib.util
from typing import Optional

import torch

from ..heads import HeadSpec
from ..workloads import IGNORE_INDEX, JSD_BETA, CaseInputs, Workload
from .base import TokenStatsProvider


class OursProvider(TokenStatsProvider):
    """``fpo_ops.token_stats`` with a fixed ``impl``."""

    supported_outputs = ("logp", "ref_logp", "kl", "reverse_kl", "entropy", "jsd")

    def __init__(self, impl: str, name: str, description: str):
        self.impl = impl
        self.name = name
        self.description = description

    def unsupported(self, workload: Workload, head: HeadSpec, device: torch.device) -> Optional[str]:
        if self.impl == "triton":
            if device.type != "cuda":
                return "Triton kernels need a CUDA device"
            if importlib.util.find_spec("fpo_ops.token_stats.triton_stats") is None:
                return "fpo_ops.token_stats.triton_stats is not part of this version"
        return super().unsupported(workload, head, device)

    def token_stats(self, inputs: CaseInputs, outputs):
        from fpo_ops import token_stats

        # Label range checks cost a host sync the other providers do not pay.
        stats = token_stats(
            inputs.hidden, inputs.weight, inputs.labels, inputs.ref_hidden, inputs.ref_weight,
            ignore_index=IGNORE_INDEX, softcap=inputs.softcap, ref_softcap=inputs.softcap,
            outputs=outputs, jsd_beta=JSD_BETA, impl=self.impl, check_labels=False,
        )
        return {name: getattr(stats, name) for name in outputs}


def ours_torch() -> OursProvider:
    return OursProvider("torch", "fpo-torch", "fpo_ops.token_stats(impl='torch'): streaming PyTorch tiles")


def ours_triton() -> OursProvider:
    return OursProvider("triton", "fpo-triton", "fpo_ops.token_stats(impl='triton'): fused Triton kernels")


def ours_reference() -> OursProvider:
    return OursProvider("reference", "reference",
                        "fpo_ops.token_stats(impl='reference'): the oracle, materialises logits, autograd")
