"""AOT: DPO on sorted log-ratios (optimal transport between the two margin distributions).

Source: Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport" (2024);
formulas as TRL's ``aot`` and ``aot_unpaired`` loss types. Sorting runs over the batch, so these
losses couple the pairs of one batch.
"""
import torch
import torch.nn.functional as F


def _smoothed_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float,
) -> torch.Tensor:
    """AOT (paired): ``d = sort(log π_w - log π_l) - sort(log π_ref,w - log π_ref,l)`` over the batch,
    loss ``-(1-ε) log σ(β d) - ε log σ(-β d)``.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] sequence log-probs.
        beta: β. label_smoothing: ε.

    Returns:
        [B] loss per sorted position.
    """
    logratios, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(logratios - ref_logratios, beta, label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, label_smoothing: float,
) -> torch.Tensor:
    """AOT (unpaired): ``d = sort(u_w) - sort(u_l)`` over the batch, loss as `aot_loss`.

    Args:
        chosen_logratios, rejected_logratios: [B] per-sequence log-ratios to the reference.

    Returns:
        [B] loss per sorted position.
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return _smoothed_sigmoid(chosen_sorted - rejected_sorted, beta, label_smoothing)
