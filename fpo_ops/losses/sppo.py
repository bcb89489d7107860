"""SPPO with soft win probabilities (the official trainer's ``sppo`` loss).

Source: Wu et al., "Self-Play Preference Optimization for Language Model Alignment" (2024), Eq. 4.7
and Algorithm 1; the reference is the previous iterate π_t and η = 1/β.
"""
import torch


def sppo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_win_prob: torch.Tensor,
    rejected_win_prob: torch.Tensor, beta: float,
) -> torch.Tensor:
    """``½ [(u_w - (P_w - ½)/β)² + (u_l - (P_l - ½)/β)²]``, u the log-ratio to the previous iterate.

    Each response's log-ratio is regressed to η (P - ½), P its estimated win rate against the
    current policy (e.g. from PairRM). TRL's ``sppo_hard`` is the sum (not the mean) at P_w = 1, P_l = 0.

    Args:
        chosen_logratios, rejected_logratios: [B] per-sequence log π_θ(y)/π_t(y).
        chosen_win_prob, rejected_win_prob: [B] win probabilities P_w, P_l in [0, 1].
        beta: β = 1/η.

    Returns:
        [B] per-pair loss.
    """
    winner = (chosen_logratios - (chosen_win_prob - 0.5) / beta) ** 2
    loser = (rejected_logratios - (rejected_win_prob - 0.5) / beta) ** 2
    return (winner + loser) / 2
