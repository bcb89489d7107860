"""Losses without a reference model: SimPO, CPO, ORPO and the SFT (NLL) term they share.

Inputs are [B] per-sequence policy log-probs (sums or per-token means over completion tokens);
outputs the [B] per-pair loss. ``margin`` is the reward-unit offset described in `pairwise.py`.
"""
import math
from typing import Union

import torch
import torch.nn.functional as F

Margin = Union[torch.Tensor, float]

_LOG_HALF = -math.log(2)


def _smoothed_sigmoid(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


def sft_loss(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """NLL of the chosen responses: ``-mean over all chosen completion tokens of log π(y_t)``.

    TRL's ``sft`` loss type and the NLL term of CPO and ORPO (a token mean over the whole batch).

    Args:
        chosen_token_logps: [B, T] per-token log-probs of the chosen rows (0 at ignored tokens).
        chosen_mask: [B, T] completion mask of the chosen rows.

    Returns:
        [] scalar; 0 when there is no chosen completion token.
    """
    return -chosen_token_logps.sum() / chosen_mask.sum().clamp(min=1)


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float,
    label_smoothing: float = 0.0, margin: Margin = 0.0,
) -> torch.Tensor:
    """SimPO: ``-log σ(β (ā_w - ā_l) - γ - margin)``, ā the per-token mean log-prob.

    With label smoothing ε: ``-(1-ε) log σ(x) - ε log σ(-x)`` as TRL's ``CPOTrainer(loss_type="simpo")``.
    Source: Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward" (2024), Eq. 6.
    """
    return _smoothed_sigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma - margin, label_smoothing)


def cpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, nll: torch.Tensor, beta: float,
    cpo_alpha: float, label_smoothing: float = 0.0, margin: Margin = 0.0,
) -> torch.Tensor:
    """CPO: ``-log σ(β (log π_w - log π_l) - margin) + cpo_alpha · NLL(y_w)``.

    With label smoothing as `simpo_loss`. Source: Xu et al., "Contrastive Preference Optimization:
    Pushing the Boundaries of LLM Performance in Machine Translation" (2024), Eq. 3; as TRL's
    ``CPOTrainer(loss_type="sigmoid")``. ``nll`` is the [] scalar of `sft_loss`.
    """
    return _smoothed_sigmoid(beta * (chosen_logps - rejected_logps) - margin, label_smoothing) + cpo_alpha * nll


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, switching formula at -log 2 to avoid cancellation."""
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l) with odds(y) = P/(1-P), P = exp(mean token log-prob). [B]."""
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, nll: torch.Tensor, beta: float,
) -> torch.Tensor:
    """ORPO: ``NLL(y_w) - β log σ(log odds(y_w) - log odds(y_l))``.

    Odds use the per-token mean log-probs. Source: Hong et al., "ORPO: Monolithic Preference
    Optimization without Reference Model" (2024), Eqs. 4-7; as TRL's ``ORPOTrainer`` (β = λ).
    """
    return nll - beta * F.logsigmoid(orpo_log_odds(chosen_avg_logps, rejected_avg_logps))
