"""TRL's own chunked LM-head autograd functions, called the way TRL's trainers call them.

`ChunkedLogProbFunction` (the fused head of `add_fused_lm_head`, used by DPOTrainer) gives per-token
log-probs; `ChunkedDivergenceFunction` (the distillation trainer's) gives the token divergence between
teacher and student: ``beta=0`` is KL(teacher || student), our ``kl``; ``0 < beta < 1`` the
generalised JSD with the same mixture as ours. A token-level preference loss therefore makes TRL
project the policy twice (once per function): that is the cost of building it from TRL's parts.
"""
from typing import Optional

import torch

from ..heads import HeadSpec
from ..workloads import IGNORE_INDEX, JSD_BETA, CaseInputs, Workload
from .base import TokenStatsProvider, module_missing

# Vocabulary width of one tile, as set by `trl.trainer.utils.add_fused_lm_head`.
TRL_VOCAB_CHUNK = 32768


class TRLChunkedProvider(TokenStatsProvider):
    name = "trl"
    description = "TRL ChunkedLogProbFunction (+ ChunkedDivergenceFunction for kl/jsd)"
    supported_outputs = ("logp", "ref_logp", "kl", "jsd")

    def unsupported(self, workload: Workload, head: HeadSpec, device: torch.device) -> Optional[str]:
        return module_missing("trl.kernels.chunked_divergence") or super().unsupported(workload, head, device)

    def token_stats(self, inputs: CaseInputs, outputs):
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

        labels = inputs.labels
        valid = labels != IGNORE_INDEX
        # As in add_fused_lm_head: Triton devices score only the valid positions, others every position.
        compact = _use_triton(labels.device)

        def rows(hidden: torch.Tensor) -> torch.Tensor:
            return hidden[valid] if compact else hidden.reshape(-1, hidden.shape[-1])

        def scatter(per_token: torch.Tensor) -> torch.Tensor:
            if compact:
                return per_token.new_zeros(labels.shape).masked_scatter(valid, per_token)
            return per_token.view(labels.shape).masked_fill(~valid, 0.0)

        targets = labels[valid] if compact else labels.clamp(min=0).reshape(-1)
        cap = inputs.softcap

        def log_probs(hidden, weight):
            return ChunkedLogProbFunction.apply(rows(hidden), weight, None, targets, 1.0, TRL_VOCAB_CHUNK,
                                                cap, 1.0, ())[0]

        def divergence(beta):
            return ChunkedDivergenceFunction.apply(rows(inputs.hidden), inputs.weight, None,
                                                   rows(inputs.ref_hidden), inputs.ref_weight, None,
                                                   beta, 1.0, 1.0, cap, 1.0, cap)[0]

        stats = {}
        if "logp" in outputs:
            stats["logp"] = scatter(log_probs(inputs.hidden, inputs.weight))
        if "ref_logp" in outputs:
            with torch.no_grad():
                stats["ref_logp"] = scatter(log_probs(inputs.ref_hidden, inputs.ref_weight))
        if "kl" in outputs:
            stats["kl"] = scatter(divergence(0.0))
        if "jsd" in outputs:
            stats["jsd"] = scatter(divergence(JSD_BETA))
        return stats
