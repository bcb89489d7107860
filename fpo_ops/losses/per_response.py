"""DPO-family losses that score each response's log-ratio on its own (TRL ``DPOTrainer`` loss types).

Inputs are the [B] per-sequence log-ratios ``u_w = log π(y_w)/π_ref(y_w)`` and ``u_l``; outputs the
[B] per-pair loss.
"""
import torch
import torch.nn.functional as F


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA: ``-log σ(β u_w) - ½ log σ(-β u_w) - ½ log σ(-β u_l)``.

    Source: Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards" (2024).
    """
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """BCO on pairs, as TRL computes it: ``-log σ(β u_w) - log σ(-β u_l)``.

    Source: Jung et al., "Binary Classifier Optimization for Large Language Model Alignment" (2024).
    """
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (1 for the winner, 0 for the loser), as TRL:
    ``(u_w - 1/(2β))² + (u_l + 1/(2β))²`` (a sum; twice `sppo_loss` at P_w = 1, P_l = 0).

    Source: Wu et al., "Self-Play Preference Optimization for Language Model Alignment" (2024), Eq. 4.7.
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def apo_zero_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero: ``(1 - σ(β u_w)) + σ(β u_l)``: raise chosen, lower rejected likelihood.

    Source: D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions" (2024), Eq. 7.
    """
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down: ``σ(β u_w) + (1 - σ(β (u_w - u_l)))``: lower both, the rejected more.

    Source: D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions" (2024), Eq. 8.
    """
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
