"""DPO-family losses on the reward difference of a pair (TRL ``DPOTrainer`` loss types).

Every function here takes the f-DPO scores of the chosen and rejected responses (``delta`` =
chosen score - rejected score, see `fdivergence.py`) and returns the [B] per-pair loss. ``margin``
is a per-pair offset in reward units subtracted from the scaled difference, ``β·delta - margin``
(see `preference_loss` for its use in Sequential Preference Optimization); 0 reproduces TRL.
"""
from typing import Union

import torch
import torch.nn.functional as F

Margin = Union[torch.Tensor, float]


def sigmoid_loss(delta: torch.Tensor, beta: float, margin: Margin = 0.0) -> torch.Tensor:
    """DPO: ``-log σ(β·delta - margin)``.

    Source: Rafailov et al., "Direct Preference Optimization" (2023), Eq. 7.
    """
    return -F.logsigmoid(beta * delta - margin)


def hinge_loss(delta: torch.Tensor, beta: float, margin: Margin = 0.0) -> torch.Tensor:
    """SLiC hinge: ``relu(1 - (β·delta - margin))``.

    Source: Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (2023).
    """
    return torch.relu(1 - (beta * delta - margin))


def ipo_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor, beta: float, margin: Margin = 0.0,
) -> torch.Tensor:
    """IPO: ``(s_w/|y_w| - s_l/|y_l| - margin/β - 1/(2β))²``.

    Scores are divided by the number of completion tokens (clamped at 1), as TRL does after
    confirming with the authors. Source: Azar et al., "A General Theoretical Paradigm to Understand
    Learning from Human Preferences" (2023), Eq. 17, β being the paper's τ.
    """
    delta = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
    return (delta - margin / beta - 1 / (2 * beta)) ** 2


def exo_pair_loss(delta: torch.Tensor, beta: float, label_smoothing: float, margin: Margin = 0.0) -> torch.Tensor:
    """EXO-pref: ``KL([σ(x), σ(-x)] ‖ [1-ε, ε])`` with ``x = β·delta - margin``, ε = label_smoothing > 0.

    Source: Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment" (2024), Eq. 16.
    """
    x = beta * delta - margin
    log_pw = torch.log1p(torch.tensor(-label_smoothing, dtype=delta.dtype, device=delta.device))
    log_pl = torch.log(torch.tensor(label_smoothing, dtype=delta.dtype, device=delta.device))
    return torch.sigmoid(x) * (F.logsigmoid(x) - log_pw) + torch.sigmoid(-x) * (F.logsigmoid(-x) - log_pl)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float, margin: Margin = 0.0) -> torch.Tensor:
    """Robust DPO: ``(-(1-ε) log σ(x) + ε log σ(-x)) / (1 - 2ε)`` with ``x = β·delta - margin``.

    ε = label_smoothing in [0, 0.5) is the label-flip rate. Source: Chowdhury et al., "Provably
    Robust DPO: Aligning Language Models with Noisy Feedback" (2024), Eq. 7.
    """
    x = beta * delta - margin
    clean = -(1 - label_smoothing) * F.logsigmoid(x)
    flipped = -label_smoothing * F.logsigmoid(-x)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def discopop_loss(delta: torch.Tensor, beta: float, tau: float, margin: Margin = 0.0) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated): with ``x = β·delta - margin`` and ``m = σ(x/τ)``,
    ``(1 - m)·(-log σ(x)) + m·e^{-x}``.

    Source: Chan et al., "Discovering Preference Optimization Algorithms with and for Large Language
    Models" (2024), Eq. 5.
    """
    x = beta * delta - margin
    modulation = torch.sigmoid(x / tau)
    return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation


def sigmoid_norm_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor, beta: float, margin: Margin = 0.0,
) -> torch.Tensor:
    """Length-normalised DPO: ``-log σ(β (s_w/|y_w| - s_l/|y_l|) - margin)`` (lengths clamped at 1).

    As TRL's ``sigmoid_norm`` (DPO, Rafailov et al. 2023, on per-token average log-ratios).
    """
    delta = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(beta * delta - margin)
