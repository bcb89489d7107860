"""Metrics TRL's preference trainers log, built from detached per-token and per-sequence values.

Every value is a 0-d tensor (no host sync); a trainer calls ``.item()`` when it logs.
"""
from typing import Dict, Optional

import torch

from ..token_stats.stats import TokenStats
from .sequence import split_pairs


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # 0 when nothing is masked in, as TRL logs 0.0 for an empty batch
    return (values * mask).sum() / mask.sum().clamp(min=1)


def reward_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """``rewards/{chosen,rejected,accuracies,margins}`` and ``logps/{chosen,rejected}`` as in TRL's DPOTrainer.

    Args:
        chosen_rewards, rejected_rewards, chosen_logps, rejected_logps: [B].

    Returns:
        dict of 0-d detached tensors.
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def token_metrics(stats: TokenStats, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``entropy`` (mean over all completion tokens), ``logits/{chosen,rejected}`` (mean logit over
    each side's completion tokens) and ``mean_token_accuracy`` (top-1 accuracy on chosen tokens).

    Args:
        stats: TokenStats of the [2B, T] batch with ``entropy``, ``mean_logit``, ``top1_correct`` set.
        mask: [2B, T] completion mask, chosen rows first.

    Returns:
        dict of 0-d detached tensors.
    """
    chosen_mask, rejected_mask = split_pairs(mask)
    chosen_logit, rejected_logit = split_pairs(stats.mean_logit.detach())
    chosen_top1, _ = split_pairs(stats.top1_correct.detach())
    return {
        "entropy": masked_mean(stats.entropy.detach(), mask),
        "logits/chosen": masked_mean(chosen_logit, chosen_mask),
        "logits/rejected": masked_mean(rejected_logit, rejected_mask),
        "mean_token_accuracy": masked_mean(chosen_top1, chosen_mask),
    }


def optional_mean(values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if values is None else values.detach().mean()
