"""The per-sequence terms of a batch of pairs, on which every loss formula of the registry is written."""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PairTerms:
    """Per-sequence quantities of one batch of B pairs; each [B] unless noted, None when not needed."""

    chosen_logps: torch.Tensor           # sums over completion tokens (LD-DPO weighted when asked)
    rejected_logps: torch.Tensor
    chosen_avg_logps: torch.Tensor       # per-token means
    rejected_avg_logps: torch.Tensor
    chosen_lengths: torch.Tensor         # completion-token counts
    rejected_lengths: torch.Tensor
    nll: torch.Tensor                    # [] mean NLL of the chosen completion tokens
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_scores: Optional[torch.Tensor] = None     # f-DPO scores of the log-ratios
    rejected_scores: Optional[torch.Tensor] = None
    chosen_seq_kl: Optional[torch.Tensor] = None     # Σ_t KL(ref ‖ policy)
    rejected_seq_kl: Optional[torch.Tensor] = None
    spo_reverse_kl: Optional[torch.Tensor] = None    # [S] Σ_t KL(policy ‖ ref) of SPO's sequences
    spo_sample_weights: Optional[torch.Tensor] = None  # [S] weights of those sequences, or None
    spo_weight: Optional[torch.Tensor] = None        # per-pair weight μ of SPO's preference term
    chosen_win_prob: Optional[torch.Tensor] = None   # SPPO win rates (chosen_probs_win / _lose)
    rejected_win_prob: Optional[torch.Tensor] = None
    pair_win_prob: Optional[torch.Tensor] = None     # P(y_w ≻ y_l) (chosen_probs) of sppo_single

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps
