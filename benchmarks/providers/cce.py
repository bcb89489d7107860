"""Apple's Cut-Cross-Entropy: per-token log-probs (negated cross-entropy), nothing else.

Its fused ``cce`` implementation is Triton for CUDA; on other devices the package's only
implementation is ``torch_compile``, which materialises the logits, so on CPU this provider is a
second compiled naive baseline rather than the fused kernel.
"""
from typing import Optional

import torch

from ..heads import HeadSpec
from ..workloads import IGNORE_INDEX, CaseInputs, Workload
from .base import TokenStatsProvider, module_missing


class CCEProvider(TokenStatsProvider):
    name = "cce"
    description = "cut_cross_entropy.linear_cross_entropy(reduction='none'); impl cce on CUDA, torch_compile elsewhere"
    supported_outputs = ("logp", "ref_logp")

    def unsupported(self, workload: Workload, head: HeadSpec, device: torch.device) -> Optional[str]:
        return module_missing("cut_cross_entropy") or super().unsupported(workload, head, device)

    def token_stats(self, inputs: CaseInputs, outputs):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if inputs.hidden.device.type == "cuda" else "torch_compile"

        def log_probs(hidden, weight):
            return -linear_cross_entropy(hidden, weight, inputs.labels, ignore_index=IGNORE_INDEX,
                                         softcap=inputs.softcap, reduction="none", impl=impl)

        stats = {}
        if "logp" in outputs:
            stats["logp"] = log_probs(inputs.hidden, inputs.weight)
        if "ref_logp" in outputs:
            with torch.no_grad():
                stats["ref_logp"] = log_probs(inputs.ref_hidden, inputs.ref_weight)
        return stats
