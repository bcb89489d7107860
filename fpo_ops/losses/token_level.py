"""Losses on token-level KL terms over the full vocabulary: TDPO (two variants) and SPO.

Sequence KLs are sums over the completion tokens of the per-token statistics of `token_stats`:
``kl`` = KL(π_ref ‖ π_θ) for TDPO, ``reverse_kl`` = KL(π_θ ‖ π_ref) for SPO.
"""
from typing import Union

import torch
import torch.nn.functional as F

Margin = Union[torch.Tensor, float]


def tdpo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_seq_kl: torch.Tensor,
    rejected_seq_kl: torch.Tensor, beta: float, alpha: float = 0.5, stop_chosen_kl_grad: bool = True,
    margin: Margin = 0.0,
) -> torch.Tensor:
    """TDPO: ``-log σ(β [(u_w - u_l) - α (D_l - sg(D_w))] - margin)``.

    u = log π_θ(y)/π_ref(y); D = Σ_t KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t)) over the completion.
    TDPO1 is α = 1 without stop-gradient; TDPO2 weights by α (``tdpo_alpha``) and stops the
    gradient of the chosen side's KL (sg). Source: Zeng et al., "Token-level Direct Preference
    Optimization" (2024), Eqs. 17-18 and the official code's ``tdpo_loss``.

    Args:
        chosen_logratios, rejected_logratios: [B] sequence log-ratios.
        chosen_seq_kl, rejected_seq_kl: [B] sequence KLs D_w, D_l.
        beta: β. alpha: α of TDPO2. stop_chosen_kl_grad: detach D_w (TDPO2).
        margin: reward-unit offset (see `pairwise.py`).

    Returns:
        [B] per-pair loss.
    """
    chosen_kl = chosen_seq_kl.detach() if stop_chosen_kl_grad else chosen_seq_kl
    logits = (chosen_logratios - rejected_logratios) - alpha * (rejected_seq_kl - chosen_kl)
    return -F.logsigmoid(beta * logits - margin)


def spo_preference_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, alpha: float, margin: Margin = 0.0,
) -> torch.Tensor:
    """SPO preference term: ``-log σ(α (S_θ(y_w) - S_θ(y_l)) - margin)`` = ``-log(π_w^α / (π_w^α + π_l^α))``.

    S_θ is the sequence log-prob, α the softmax exponent. The regulariser is `spo_regularizer`.
    Source: Sharifnassab et al., "Soft Preference Optimization: Aligning Language Models to Expert
    Distributions" (2024), Eq. 4.

    Returns:
        [B] per-pair loss.
    """
    return -F.logsigmoid(alpha * (chosen_logps - rejected_logps) - margin)


def spo_regularizer(sequence_reverse_kl: torch.Tensor) -> torch.Tensor:
    """SPO's regulariser ``E_y [Σ_t KL(π_θ(·|y_<t) ‖ π_ref(·|y_<t))]``: the mean over the sequences
    given of their summed token-level reverse KL (multiplied by β by the caller).

    Args:
        sequence_reverse_kl: [S] per-sequence sums of ``reverse_kl``.

    Returns:
        [] scalar.
    """
    return sequence_reverse_kl.mean()
