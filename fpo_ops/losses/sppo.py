"""SPPO with soft win probabilities: the official trainer's ``sppo`` and ``sppo_single`` losses.

Source: Wu et al., "Self-Play Preference Optimization for Language Model Alignment" (2024), Eq. 4.7
and Algorithm 1; the reference is the previous iterate π_t and η = 1/β. The official code
(uclaml/SPPO, ``sppo/trainer.py``, ``dpo_loss``) reads three dataset columns, written by its
``scripts/compute_prob.py`` from PairRM scores of K samples y_1..y_K per prompt, with y_w / y_l the
best / worst-scored sample and P(a ≻ b) = σ(score_a - score_b):

* ``chosen_probs_win`` = (1/K) Σ_k P(y_w ≻ y_k): the chosen response's win rate against the policy;
* ``chosen_probs_lose`` = (1/K) Σ_k P(y_l ≻ y_k): the rejected response's win rate;
* ``chosen_probs`` = P(y_w ≻ y_l): the pair's own preference probability (``sppo_single``).
"""
import torch


def sppo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_win_prob: torch.Tensor,
    rejected_win_prob: torch.Tensor, beta: float,
) -> torch.Tensor:
    """``½ [(u_w - (P_w - ½)/β)² + (u_l - (P_l - ½)/β)²]``, u the log-ratio to the previous iterate.

    Each response's log-ratio is regressed to η (P - ½), P its estimated win rate against the
    current policy (``chosen_probs_win``, ``chosen_probs_lose``). TRL's ``sppo_hard`` is the sum (not
    the mean) at P_w = 1, P_l = 0.

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


def sppo_single_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, pair_win_prob: torch.Tensor, beta: float,
) -> torch.Tensor:
    """``½ [(u_w - (P - ½)/β)² + (u_l + (P - ½)/β)²]`` with P = P(y_w ≻ y_l) (``chosen_probs``).

    The official ``sppo_single``: the pair's own preference probability replaces both win rates,
    the rejected response's target mirrored (its win rate against the chosen one is 1 - P).

    Args:
        chosen_logratios, rejected_logratios: [B] per-sequence log π_θ(y)/π_t(y).
        pair_win_prob: [B] P(y_w ≻ y_l) in [0, 1].
        beta: β = 1/η.

    Returns:
        [B] per-pair loss.
    """
    target = (pair_win_prob - 0.5) / beta
    return ((chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2) / 2
