"""Dispatch from a loss-type name to its per-pair loss, given the per-sequence terms of a batch."""
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .pairwise import (
    discopop_loss, exo_pair_loss, hinge_loss, ipo_loss, robust_loss, sigmoid_loss, sigmoid_norm_loss,
)
from .per_response import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from .ranked import aot_loss, aot_unpaired_loss
from .reference_free import cpo_loss, orpo_loss, simpo_loss
from .sppo import sppo_loss, sppo_single_loss
from .token_level import spo_preference_loss, spo_regularizer, tdpo_loss


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


@dataclass(frozen=True)
class LossConfig:
    beta: float
    label_smoothing: float
    discopop_tau: float
    tdpo_alpha: float
    spo_alpha: float
    simpo_gamma: float
    cpo_alpha: float


def per_pair_loss(
    loss_type: str, t: PairTerms, cfg: LossConfig, margin: Union[torch.Tensor, float] = 0.0,
) -> torch.Tensor:
    """[B] loss of each pair under ``loss_type`` (names as in `config.LOSS_TYPES`)."""
    beta, eps = cfg.beta, cfg.label_smoothing
    if loss_type in ("sigmoid", "hinge", "exo_pair", "robust", "discopop"):
        delta = t.chosen_scores - t.rejected_scores
        if loss_type == "sigmoid":
            return sigmoid_loss(delta, beta, margin)
        if loss_type == "hinge":
            return hinge_loss(delta, beta, margin)
        if loss_type == "exo_pair":
            return exo_pair_loss(delta, beta, eps, margin)
        if loss_type == "robust":
            return robust_loss(delta, beta, eps, margin)
        return discopop_loss(delta, beta, cfg.discopop_tau, margin)
    if loss_type == "ipo":
        return ipo_loss(t.chosen_scores, t.rejected_scores, t.chosen_lengths, t.rejected_lengths, beta, margin)
    if loss_type == "sigmoid_norm":
        return sigmoid_norm_loss(t.chosen_scores, t.rejected_scores, t.chosen_lengths, t.rejected_lengths, beta, margin)
    if loss_type == "nca_pair":
        return nca_pair_loss(t.chosen_logratios, t.rejected_logratios, beta)
    if loss_type == "bco_pair":
        return bco_pair_loss(t.chosen_logratios, t.rejected_logratios, beta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(t.chosen_logratios, t.rejected_logratios, beta)
    if loss_type == "apo_zero":
        return apo_zero_loss(t.chosen_logratios, t.rejected_logratios, beta)
    if loss_type == "apo_down":
        return apo_down_loss(t.chosen_logratios, t.rejected_logratios, beta)
    if loss_type == "aot":
        return aot_loss(t.chosen_logps, t.rejected_logps, t.ref_chosen_logps, t.ref_rejected_logps, beta, eps)
    if loss_type == "aot_unpaired":
        return aot_unpaired_loss(t.chosen_logratios, t.rejected_logratios, beta, eps)
    if loss_type == "sft":
        # a batch-level token mean, spread over the pairs so that its mean is the scalar
        return t.nll.expand(t.chosen_logps.shape[0])
    if loss_type in ("tdpo1", "tdpo2"):
        tdpo2 = loss_type == "tdpo2"
        return tdpo_loss(
            t.chosen_logratios, t.rejected_logratios, t.chosen_seq_kl, t.rejected_seq_kl, beta,
            alpha=cfg.tdpo_alpha if tdpo2 else 1.0, stop_chosen_kl_grad=tdpo2, margin=margin,
        )
    if loss_type == "spo":
        preference = spo_preference_loss(t.chosen_logps, t.rejected_logps, cfg.spo_alpha, margin, t.spo_weight)
        return preference + beta * spo_regularizer(t.spo_reverse_kl, t.spo_sample_weights)
    if loss_type == "sppo":
        return sppo_loss(t.chosen_logratios, t.rejected_logratios, t.chosen_win_prob, t.rejected_win_prob, beta)
    if loss_type == "sppo_single":
        return sppo_single_loss(t.chosen_logratios, t.rejected_logratios, t.pair_win_prob, beta)
    if loss_type == "simpo":
        return simpo_loss(t.chosen_avg_logps, t.rejected_avg_logps, beta, cfg.simpo_gamma, eps, margin)
    if loss_type == "cpo":
        return cpo_loss(t.chosen_logps, t.rejected_logps, t.nll, beta, cfg.cpo_alpha, eps, margin)
    if loss_type == "orpo":
        return orpo_loss(t.chosen_avg_logps, t.rejected_avg_logps, t.nll, beta)
    raise ValueError(f"loss_type: unknown loss type {loss_type!r}")
