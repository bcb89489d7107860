"""The collectives of vocabulary-parallel `token_stats` (the head's rows split over a group);
the one autograd Function (`fpo_ops.token_stats.function`) issues them when a process group is given.

Every process holds the same hidden states and labels (global token ids) and a contiguous slice of
the vocabulary rows of the policy head (and of the reference head and the biases), slices in rank
order. Each folds its slice into the online partials of `fpo_ops.token_stats.online`; the group then combines
them exactly with a few all-reduces over per-token scalars, never over logits:

    forward   all-reduce(sum)  [world]   int64   rows per rank: where each slice starts
              all-reduce(max)  [M, N]            policy and reference maxima ([1, N] when no
                                                 requested statistic reads the reference), and
                                                 for ``top1_correct`` the maximum logit before
                                                 the label (slices before the label's hold all
                                                 of their rows before it, slices after none)
              all-reduce(sum)  [K, N]            partials shifted to the global maxima (K <= 9;
                                                 the label logit comes from the one owner, others add 0)
              all-reduce(min)  [N]      int64    only for ``argmax``: the lowest global index at the
                                                 global maximum (slices below it offer none)
              all-reduce(sum)  [2, N]            only for ``jsd``: its second pass over the slices
    backward  all-reduce(sum)  [N, H]            dhidden: the slices' shares of dz @ W

in the accumulation dtype (fp32, fp64 for fp64 inputs). dweight and dbias stay local to the slice.
Every process ends with the same statistics, and with the full dhidden.
"""
from typing import Dict, Tuple

import torch
import torch.distributed as dist

from ..token_stats.online import MAXIMA, Partials, shift_partials
from ..token_stats.stats import PARTIAL_MERGE


def vocab_range(vocab_size: int, group=None) -> Tuple[int, int]:
    """This rank's rows ``[start, stop)`` of a ``vocab_size``-row head split as evenly as possible.

    The first ``vocab_size % world`` ranks get one row more. Any contiguous split in rank order
    works with ``token_stats(process_group=...)``; this is just the usual one.

    Args:
        vocab_size: rows of the whole head, at least the group's size.
        group: process group (None: the default group).

    Returns:
        (start, stop) row indices of this rank's slice.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < world:
        raise ValueError(f"vocab_size: expected an int >= the group size {world}, got {vocab_size!r}")
    base, extra = divmod(vocab_size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def slice_bounds(local_vocab: int, group, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows per rank [world] (int64, on ``device``) and the first row of this rank's slice."""
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=device)
    sizes[dist.get_rank(group)] = local_vocab
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    return sizes, sizes[: dist.get_rank(group)].sum()


def combine_partials(local: Partials, group, start=0) -> Partials:
    """Exact group-wide partials from each process's partials of its own slice (two all-reduces,
    three with ``argmax``); ``start`` is the slice's first row, which makes its indices global."""
    has_ref = "m_ref" in local
    # every partial that merges by max, the two maxima the sums are relative to first
    max_names = [key for key in MAXIMA if key in local]
    max_names += [key for key in local if PARTIAL_MERGE[key] == "max" and key not in MAXIMA]
    # A copy: the all-reduce writes in place, and the local maxima are still needed to shift.
    maxima = torch.stack([local[key] for key in max_names])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    shifted = shift_partials(local, maxima[0], maxima[1] if has_ref else None)
    names = [key for key in shifted if key not in max_names and PARTIAL_MERGE[key] == "sum"]
    sums = torch.stack([shifted[key] for key in names])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    combined = dict(zip(names, sums.unbind(0)))
    combined.update(zip(max_names, maxima.unbind(0)))
    if "argmax" in local:
        # in int64, exact for any vocabulary: a slice below the global maximum offers no index
        none = torch.iinfo(torch.int64).max
        index = torch.where(local["m"] == maxima[0], local["argmax"].to(torch.int64) + start,
                            torch.full_like(local["argmax"], none, dtype=torch.int64))
        dist.all_reduce(index, op=dist.ReduceOp.MIN, group=group)
        combined["argmax"] = index
    return combined


def check_global_labels(labels: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor) -> None:
    """Label range against the whole vocabulary, and no empty slice (one host sync, every rank)."""
    vocab = sizes.sum()
    bad = valid & ((labels < 0) | (labels >= vocab))
    empty, any_bad = torch.stack([(sizes == 0).any(), bad.any()]).tolist()
    if empty:
        raise ValueError(
            f"weight: expected at least one vocabulary row on every process of process_group, "
            f"got rows per rank {sizes.tolist()}"
        )
    if any_bad:
        raise ValueError(
            f"labels: expected values in [0, {int(vocab)}) (the vocabulary of the whole group) or "
            f"ignore_index, got {labels[bad].flatten()[0].item()}"
        )


def sum_jsd_terms(local: Dict[str, torch.Tensor], group) -> Dict[str, torch.Tensor]:
    """The JSD pass's ``jsd`` and ``kl_p_m`` [N] summed over the slices (one all-reduce): both are
    sums over the vocabulary, so the slices' values add up."""
    terms = torch.stack([local["jsd"], local["kl_p_m"]])
    dist.all_reduce(terms, op=dist.ReduceOp.SUM, group=group)
    jsd, kl_p_m = terms.unbind(0)
    return {"jsd": jsd, "kl_p_m": kl_p_m}
