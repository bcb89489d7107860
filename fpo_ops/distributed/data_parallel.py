"""Explicit reductions for data-parallel training (DDP, FSDP2) with losses built on `token_stats`.

DDP and FSDP2 average gradients over the data-parallel ranks: the gradient each rank ends with is
``(1/W) sum_r dL_r``. A preference loss is a mean over the pairs (or tokens) of the *global* batch,
``L = sum_all / count_all``. Writing each rank's loss as its own mean, ``sum_r / count_r``, matches
that only when every rank holds exactly the same count; with ragged batches (packing, filtering,
uneven last batch) it silently over-weights the ranks with fewer pairs. The loss to backpropagate
on rank r is instead ``W * sum_r / count_all``, which needs one all-reduce of the counts.
"""
from typing import Union

import torch
import torch.distributed as dist


def data_parallel_mean(local_sum: torch.Tensor, local_count: Union[int, torch.Tensor],
                       group=None) -> torch.Tensor:
    """The loss to backpropagate on this rank for a mean over the whole data-parallel batch.

    Args:
        local_sum: scalar tensor, the sum over this rank's pairs (or tokens) of the per-item loss.
        local_count: int or scalar tensor, the number of pairs (or tokens) on this rank; may be 0.
        group: the data-parallel process group (None: the default group).

    Returns:
        scalar tensor ``world_size * local_sum / global_count``: under DDP's or FSDP2's gradient
        average its gradient is that of ``sum over all ranks / global_count``. Its value is this
        rank's share times ``world_size``; `mean_over_ranks` of it is the global mean, for logging.
    """
    if not torch.is_tensor(local_sum) or local_sum.dim() != 0:
        raise ValueError(f"local_sum: expected a scalar tensor, got {type(local_sum).__name__}"
                         f"{'' if not torch.is_tensor(local_sum) else ' of shape ' + str(tuple(local_sum.shape))}")
    count = torch.as_tensor(local_count, dtype=torch.float64, device=local_sum.device).detach().clone()
    if count.dim() != 0:
        raise ValueError(f"local_count: expected an int or a scalar tensor, got shape {tuple(count.shape)}")
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    # An empty global batch has loss 0 (and gradient 0), not 0/0.
    scale = dist.get_world_size(group) / count.clamp_min(1.0)
    return local_sum * scale.to(local_sum.dtype)


def mean_over_ranks(value: torch.Tensor, group=None) -> torch.Tensor:
    """Detached average of a scalar over the ranks of ``group`` (for logging a global loss).

    Args:
        value: scalar tensor.
        group: process group (None: the default group).

    Returns:
        scalar tensor, the same on every rank; no gradient.
    """
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total / dist.get_world_size(group)
