"""f-DPO scores: the derivative f'(π/π_ref) of the f-divergence regulariser, as a function of log π/π_ref.

Source: Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints" (f-DPO, 2023); formulas, names and the loss types they are allowed with as in
TRL 1.16's ``DPOTrainer`` (later TRL changed the offsets and the restriction; a test pins 1.16's
against TRL's own code). Two deviations from the paper, both TRL's: the alpha-divergence's α is
mirrored (the paper's f'(u) = (1 - u^{-α})/α is the score below at α_TRL = 1 - α_paper), and the
forward KL's f' = -1/u is offset by the constant 1 (it cancels in the score difference).
"""
import math

import torch
import torch.nn.functional as F

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# exp() of the alpha-divergence score is clamped here so it stays finite (TRL clamps at 80 in fp32).
_ALPHA_EXP_CLAMP = 80.0


def f_divergence_score(logratio: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """Maps per-sequence log-ratios u = log π(y)/π_ref(y) to f-DPO scores f'(e^u).

    ``reverse_kl``: u (standard DPO). ``forward_kl``: 1 - e^{-u}. ``js_divergence``:
    log 2 + log σ(u). ``alpha_divergence``: (e^{(α-1) u} - 1) / (α - 1), with the exponent clamped at
    80 and α ≈ 1 falling back to reverse KL (its limit).

    Args:
        logratio: [B] per-sequence log-ratios u.
        f_divergence_type: one of ``F_DIVERGENCE_TYPES``.
        alpha: α of ``alpha_divergence`` (``f_alpha_divergence_coef``), in [0, 1].

    Returns:
        [B] scores, same dtype as ``logratio``.
    """
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = torch.clamp((alpha - 1.0) * logratio, max=_ALPHA_EXP_CLAMP)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type: expected one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}")
