"""Plain PyTorch with the [N, V] logits materialised, eagerly and under torch.compile.

This is what TRL's DPOTrainer did before its fused head: full logits from the head GEMM, an fp32
log-softmax, a gather of the chosen token, and the token KL from both full distributions.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..workloads import IGNORE_INDEX, JSD_BETA, CaseInputs
from .base import TokenStatsProvider


def _log_softmax_logits(hidden, weight, softcap: Optional[float]) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.log_softmax(logits, dim=-1)


def naive_token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor],
                      softcap: Optional[float], outputs: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
    """Per-token statistics from materialised logits.

    Args:
        hidden: [B, T, H]; weight: [V, H]; labels: [B, T] (ignore_index -100);
        ref_hidden: [B, T, H] or None; ref_weight: [V, H] or None.
        softcap: tanh cap of both models' logits or None.
        outputs: names among logp, ref_logp, kl, jsd.

    Returns:
        {name: [B, T] float32}, 0 at ignored positions.
    """
    valid = labels != IGNORE_INDEX
    index = labels.clamp(min=0).unsqueeze(-1)
    logp_all = _log_softmax_logits(hidden, weight, softcap)
    stats = {}
    if "logp" in outputs:
        stats["logp"] = logp_all.gather(-1, index).squeeze(-1)
    if ref_hidden is not None:
        with torch.no_grad():
            logq_all = _log_softmax_logits(ref_hidden, ref_weight, softcap)
        if "ref_logp" in outputs:
            stats["ref_logp"] = logq_all.gather(-1, index).squeeze(-1)
        if "kl" in outputs:
            stats["kl"] = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
        if "jsd" in outputs:
            logm = torch.logaddexp(logq_all + math.log(JSD_BETA), logp_all + math.log1p(-JSD_BETA))
            stats["jsd"] = (JSD_BETA * (logq_all.exp() * (logq_all - logm)).sum(-1)
                            + (1 - JSD_BETA) * (logp_all.exp() * (logp_all - logm)).sum(-1))
    return {name: torch.where(valid, stats[name], 0.0) for name in outputs}


class NaiveProvider(TokenStatsProvider):
    name = "naive"
    description = "PyTorch eager, [N, V] logits materialised, fp32 log-softmax"
    supported_outputs = ("logp", "ref_logp", "kl", "jsd")

    def token_stats(self, inputs: CaseInputs, outputs):
        return naive_token_stats(inputs.hidden, inputs.weight, inputs.labels, inputs.ref_hidden,
                                 inputs.ref_weight, inputs.softcap, outputs)


class CompiledNaiveProvider(NaiveProvider):
    name = "naive-compile"
    description = "the naive PyTorch code under torch.compile (inductor)"

    def __init__(self):
        self._compiled = None

    def token_stats(self, inputs: CaseInputs, outputs):
        if self._compiled is None:
            self._compiled = torch.compile(naive_token_stats)
        return self._compiled(inputs.hidden, inputs.weight, inputs.labels, inputs.ref_hidden,
                              inputs.ref_weight, inputs.softcap, outputs)
