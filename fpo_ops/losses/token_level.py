"""Losses on token-level KL terms over the full vocabulary: TDPO (two variants) and SPO.

Sequence KLs are sums over the completion tokens of the per-token statistics of `token_stats`:
``kl`` = KL(π_ref ‖ π_θ) for TDPO, ``reverse_kl`` = KL(π_θ ‖ π_ref) for SPO.
"""
from typing import Optional, Union

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
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SPO preference term: ``-(1/α) log(π_w^α / (π_w^α + π_l^α)) = -(1/α) log σ(α (S_w - S_l))``.

    S = log π_θ(y|x) is the sequence log-prob and α the softmax exponent (the "softness": the
    optimum under a Bradley-Terry expert is a softmax of the rewards with exponent α). The 1/α in
    front keeps the gradient's scale independent of α: d/dS_w = σ(-α (S_w - S_l)), so α = 1 is the
    plain log-softmax of the pair. ``margin`` is subtracted inside, as for the other margin losses:
    ``-(1/α) log σ(α (S_w - S_l) - margin)`` (units of α·S). ``weight`` μ [B], when given,
    multiplies each pair's term (a per-comparison weighting, detached; the caller computes it).

    Sources: Sharifnassab et al., "Soft Preference Optimization: Aligning Language Models to Expert
    Distributions" (arXiv 2405.00747): a preference term with softmax exponent α plus a global KL
    regulariser. Equation numbers are not verified against the paper's full text; the 1/α normalisation
    follows published descriptions of its loss and the R-SPO write-up built on it, whose
    per-comparison term is ``-(1/α)·μ·[α log π(y_k) - logsumexp_j α log π(y_j)]`` (this form for a
    pair, with μ the optional ``weight``).

    Args:
        chosen_logps, rejected_logps: [B] sequence log-probs S_w, S_l.
        alpha: softmax exponent α > 0.
        margin: [B] tensor or float offset.
        weight: [B] per-pair weights μ or None.

    Returns:
        [B] per-pair loss.
    """
    loss = -F.logsigmoid(alpha * (chosen_logps - rejected_logps) - margin) / alpha
    return loss if weight is None else loss * weight.detach()


def spo_regularizer(sequence_reverse_kl: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SPO's regulariser ``E_y [Σ_t KL(π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t))]`` over the sequences given.

    The mean of their summed token-level reverse KL (multiplied by β by the caller), or the
    ``weights``-weighted mean (``Σ_s w_s R_s / Σ_s w_s``, weights detached).

    Args:
        sequence_reverse_kl: [S] per-sequence values R_s (sums of ``reverse_kl``, or the
            score-function surrogate of `spo_sample_terms`).
        weights: [S] non-negative sample weights or None.

    Returns:
        [] scalar.
    """
    if weights is None:
        return sequence_reverse_kl.mean()
    weights = weights.detach().to(sequence_reverse_kl.dtype)
    return (sequence_reverse_kl * weights).sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)


def spo_sample_terms(
    reverse_kl: torch.Tensor, logp: Optional[torch.Tensor], mask: torch.Tensor,
) -> torch.Tensor:
    """Per-sample regulariser terms R_s on sequences sampled from π_θ, with or without the score-function term.

    The value is always ``Σ_t KL_t`` with ``KL_t = KL(π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t))``. Its gradient:

    * ``logp`` None: ``Σ_t ∇KL_t`` only, the per-token distribution term at the sampled prefixes (the
      samples are held fixed, as when the KL is computed token by token on generated text).
    * ``logp`` given (``log π_θ(y_t|x, y_<t)`` along the sample): plus the score-function term
      ``Σ_t ∇log π_θ(y_t|·) · sg(Σ_{t'>t} KL_t')``, which makes the sample-average an unbiased
      estimate of ``∇_θ E_{y~π_θ}[Σ_t KL_t]`` when the samples are drawn from the current π_θ at
      temperature 1 (each KL_t' depends on θ through the probability of its prefix y_<t', i.e. of the
      tokens y_t with t < t'). It is added as ``logp·G - sg(logp·G)`` so the value is unchanged.

    Args:
        reverse_kl: [S, T] per-token KL(π_θ‖π_ref), 0 outside the completions.
        logp: [S, T] per-token log-probs of the sampled tokens, or None.
        mask: [S, T] bool completion mask.

    Returns:
        [S] per-sample terms.
    """
    kl = reverse_kl * mask
    terms = kl.sum(dim=1)
    if logp is None:
        return terms
    # reward-to-go: the KL of the positions strictly after t, which the token at t influences
    future = kl.detach().flip(1).cumsum(1).flip(1) - kl.detach()
    score = (logp * mask * future).sum(dim=1)
    return terms + score - score.detach()
