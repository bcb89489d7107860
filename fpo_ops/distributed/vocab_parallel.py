"""Vocabulary-parallel `token_stats`: the head's rows are split over the processes of a group.

Every process holds the same hidden states and labels (global token ids) and a contiguous slice of
the vocabulary rows of the policy head (and of the reference head and the biases), slices in rank
order. Each folds its slice into the online partials of `fpo_ops.online`; the group then combines
them exactly with a few all-reduces over per-token scalars, never over logits:

    forward   all-reduce(sum)  [world]   int64   rows per rank: where each slice starts
              all-reduce(max)  [2, N]            policy and reference maxima ([1, N] when no
                                                 requested statistic reads the reference)
              all-reduce(sum)  [K, N]            partials shifted to the global maxima (K <= 9;
                                                 the label logit comes from the one owner, others add 0)
              all-reduce(sum)  [2, N]            only for ``jsd``: its second pass over the slices
    backward  all-reduce(sum)  [N, H]            dhidden: the slices' shares of dz @ W

in the accumulation dtype (fp32, fp64 for fp64 inputs). dweight and dbias stay local to the slice.
Every process ends with the same statistics, and with the full dhidden.
"""
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist

from ..function_io import (
    first_order_backward, kept_names, mark_outputs, masked_outputs, reference_if_needed, save_inputs,
    saved_inputs, upstream_coefficients,
)
from ..online import MAXIMA, Partials, finalize, needed_partials, shift_partials
from ..options import HeadOptions
from .slice_passes import SlicePasses, passes_for


@dataclass(frozen=True)
class GroupOptions:
    """The non-tensor options of one vocabulary-parallel call besides `HeadOptions`."""

    group: Any  # the torch.distributed process group holding the vocabulary
    passes: SlicePasses  # what computes each slice ("torch" or "triton")
    check_labels: bool


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


def combine_partials(local: Partials, group) -> Partials:
    """Exact group-wide partials from each process's partials of its own slice (two all-reduces)."""
    has_ref = "m_ref" in local
    # A copy: the all-reduce writes in place, and the local maxima are still needed to shift.
    maxima = torch.stack([local["m"], local["m_ref"]] if has_ref else [local["m"]])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    shifted = shift_partials(local, maxima[0], maxima[1] if has_ref else None)
    names = [key for key in shifted if key not in MAXIMA]
    sums = torch.stack([shifted[key] for key in names])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    combined = dict(zip(names, sums.unbind(0)))
    combined["m"] = maxima[0]
    if has_ref:
        combined["m_ref"] = maxima[1]
    return combined


def _check_global(labels: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor) -> None:
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


class VocabParallelTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts: HeadOptions,
                par: GroupOptions):
        group, passes = par.group, par.passes
        ref_hidden, ref_weight, ref_bias = reference_if_needed(opts, ref_hidden, ref_weight, ref_bias)
        valid = labels != opts.ignore_index
        sizes, start = slice_bounds(weight.shape[0], group, hidden.device)
        if par.check_labels:
            _check_global(labels, valid, sizes)
        # -1 lies outside every slice, so ignored tokens gather nothing.
        local_labels = torch.where(valid, labels - start, torch.full_like(labels, -1))

        local = passes.partials(hidden, ref_hidden, local_labels, weight, bias, ref_weight, ref_bias,
                                needed_partials(opts), opts, valid=valid)
        stats = finalize(combine_partials(local, group), sizes.sum().to(opts.accum_dtype))
        if opts.wants("jsd"):
            local_jsd = passes.jsd(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, stats, opts,
                                   valid=valid)
            # Both are sums over the vocabulary, so the slices' values add up.
            jsd_terms = torch.stack([local_jsd["jsd"], local_jsd["kl_p_m"]])
            dist.all_reduce(jsd_terms, op=dist.ReduceOp.SUM, group=group)
            stats["jsd"], stats["kl_p_m"] = jsd_terms.unbind(0)

        ctx.opts, ctx.par = opts, par
        ctx.kept_names = kept_names(opts, ref_hidden is not None)
        # At ignored tokens these are real values (torch) or placeholders that backward skips
        # (triton); zeros would not do for torch, whose backward computes exp(z - lse) everywhere.
        save_inputs(ctx, hidden, weight, bias, local_labels, valid, ref_hidden, ref_weight, ref_bias,
                    *(stats[name] for name in ctx.kept_names))
        results = masked_outputs(stats, valid, opts)
        mark_outputs(ctx, results, opts)
        return results

    @staticmethod
    @first_order_backward
    def backward(ctx, *grads):
        opts: HeadOptions = ctx.opts
        hidden, weight, bias, local_labels, valid, ref_hidden, ref_weight, ref_bias, *kept = saved_inputs(ctx)
        coef = upstream_coefficients(grads, valid, opts)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none_for_rest = (None,) * 6
        if not coef or not (need_h or need_w or need_b):
            return (None, None, None) + none_for_rest
        grad_h, grad_w, grad_b = ctx.par.passes.backward(
            hidden, weight, bias, local_labels, ref_hidden, ref_weight, ref_bias, coef,
            dict(zip(ctx.kept_names, kept)), opts, need_h, need_w, need_b and bias is not None, valid=valid,
        )
        if need_h:
            # Summed in the accumulation dtype: rounding each slice's share first would bias it.
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=ctx.par.group)
            grad_h = grad_h.to(hidden.dtype)
        return (grad_h, grad_w, grad_b) + none_for_rest


def vocab_parallel_token_stats(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias,
                               opts: HeadOptions, *, group, impl: str,
                               check_labels: bool = True) -> Dict[str, torch.Tensor]:
    """Flattened inputs to {name: [N]} with the vocabulary split over the processes of ``group``.

    Args:
        hidden: [N, H] policy hidden states, the same on every process of the group.
        weight: [V_r, H] this rank's contiguous slice of the policy head's rows (slices in rank
            order; sizes may differ, none empty).
        bias: [V_r] this rank's slice of the policy bias, or None.
        labels: [N] global token ids in [0, sum of V_r), or ``opts.ignore_index``; same everywhere.
        ref_hidden: [N, H'] reference hidden states, or None.
        ref_weight, ref_bias: [V_r, H'], [V_r] this rank's slice of the reference head (the same
            rows as ``weight``), or None.
        opts: the options of the call.
        group: the torch.distributed process group that holds the vocabulary.
        impl: "torch" or "triton": what computes each slice.
        check_labels: check the labels against the whole vocabulary (one host sync).

    Returns:
        {name: [N]} for ``opts.outputs``, identical on every process. Backward gives each process
        the gradient of its own weight/bias slice and the full dhidden (summed over the group), so
        the loss built on the statistics must be the same on every process of the group.
    """
    results = VocabParallelTokenStats.apply(hidden, weight, bias, labels, ref_hidden, ref_weight,
                                            ref_bias, opts, GroupOptions(group, passes_for(impl), check_labels))
    return dict(zip(opts.outputs, results))
