"""Per-token statistics -> per-sequence values: completion-token sums, means and LD-DPO weighting."""
from typing import Optional, Tuple

import torch


def completion_mask(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[B, T] bool mask of the completion tokens (labels not equal to ``ignore_index``)."""
    return labels != ignore_index


def sequence_sum(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] values -> [B] sums over the masked tokens (token_stats already returns 0 elsewhere)."""
    return (token_values * mask).sum(dim=1)


def sequence_mean(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] values -> [B] means over the masked tokens; 0 for a sequence without completion tokens."""
    return sequence_sum(token_values, mask) / mask.sum(dim=1).clamp(min=1)


def ld_token_weights(mask: torch.Tensor, ld_alpha: Optional[float], dtype: torch.dtype) -> torch.Tensor:
    """Token weights of LD-DPO (Liu et al., "Length Desensitization in Direct Preference Optimization", 2024).

    Within each pair the first ``min(len_chosen, len_rejected)`` completion tokens (the shared length)
    weigh 1 and the longer response's tail weighs ``ld_alpha``, so that
    ``logps = shared_logps + ld_alpha * tail_logps`` as in TRL's ``DPOTrainer``.

    Args:
        mask: [2B, T] completion mask, chosen rows first.
        ld_alpha: tail weight in [0, 1], or None for plain sums.
        dtype: dtype of the log-probs the weights multiply.

    Returns:
        [2B, T] weights of ``dtype``, 0 outside completions.
    """
    weights = mask.to(dtype)
    if ld_alpha is None:
        return weights
    position = mask.cumsum(dim=1)  # 1-based index among the completion tokens of each row
    lengths = mask.sum(dim=1)
    chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)
    tail = position > shared
    return torch.where(tail, weights * ld_alpha, weights)


def split_pairs(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[2B, ...] -> ([B, ...] chosen, [B, ...] rejected): the first half of dim 0 is chosen."""
    return values.chunk(2, dim=0)
