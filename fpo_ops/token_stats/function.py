"""The one autograd Function of `token_stats`: any backend (`fpo_ops.token_stats.backend`), one process or a
vocabulary split over a process group.

Forward: the backend folds this process's rows of the head into online partials; with a group,
the partials are combined exactly by a few all-reduces of per-token scalars
(`fpo_ops.distributed.vocab_parallel`), without one nothing is communicated. The statistics follow
(`fpo_ops.token_stats.online.finalize`), then the JSD's second pass when asked for. Backward: the backend's
tiles give this slice's dhidden share (all-reduced with a group), dweight and dbias.

`forward_pass` and `backward_pass` are also what the ``torch.library`` custom ops run
(`fpo_ops.token_stats.custom_op`), so eager and compiled calls compute the same numbers.
"""
import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .backend import Backend, backend_for
from .function_io import (
    first_order_backward, kept_names, mark_outputs, masked_outputs, reference_if_needed, save_inputs,
    saved_inputs, upstream_coefficients,
)
from .online import finalize, needed_partials
from .options import HeadOptions

Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class RunOptions:
    """The non-tensor options of one call besides `HeadOptions`: what runs the passes, and where."""

    backend: Backend
    # torch.distributed group holding the vocabulary; None: this process holds all of it
    group: Any = None
    # with a group: check the labels against the whole vocabulary (one host sync). Without one
    # the caller checks them before the call (`fpo_ops.token_stats.validation`).
    check_labels: bool = False


def local_labels_of(labels: torch.Tensor, opts: HeadOptions,
                    start=0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels relative to a slice starting at row ``start``, -1 at ignored tokens; valid [N] bool)."""
    valid = labels != opts.ignore_index
    # -1 lies outside every slice and tile, so ignored tokens gather nothing.
    return torch.where(valid, labels - start, torch.full_like(labels, -1)), valid


def forward_pass(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts: HeadOptions,
                 run: RunOptions):
    """Statistics of one call and what backward needs.

    Args:
        hidden: [N, H]; weight: [V_r, H] (the whole head, or this rank's rows with a group);
            bias: [V_r] or None; labels: [N] int64 global ids, ``opts.ignore_index`` at ignored
            tokens; ref_hidden [N, HR], ref_weight [V_r, HR], ref_bias [V_r]: the reference or None.
        opts, run: the options of the call.

    Returns:
        (the requested statistics [N] each, 0 at ignored tokens; {name: [N]} per-token values
        backward reads (`fpo_ops.token_stats.function_io.kept_names`); local labels [N]; valid [N] bool).
    """
    from ..distributed import vocab_parallel as vp  # collectives: only issued with a group

    group = run.group
    ref_hidden, ref_weight, ref_bias = reference_if_needed(opts, ref_hidden, ref_weight, ref_bias)
    if group is None:
        vocab, start = weight.shape[0], 0
    else:
        sizes, start = vp.slice_bounds(weight.shape[0], group, hidden.device)
        vocab = sizes.sum().to(opts.accum_dtype)
    local_labels, valid = local_labels_of(labels, opts, start)
    if group is not None and run.check_labels:
        vp.check_global_labels(labels, valid, sizes)

    partials = run.backend.partials(hidden, ref_hidden, local_labels, weight, bias, ref_weight, ref_bias,
                                    needed_partials(opts), opts, valid=valid)
    if group is not None:
        partials = vp.combine_partials(partials, group, start)
    stats = finalize(partials, vocab)
    if opts.wants("jsd"):
        jsd = run.backend.jsd(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, stats, opts, valid=valid)
        if group is not None:
            jsd = vp.sum_jsd_terms(jsd, group)
        stats.update(jsd)
    # At ignored tokens these are real values (torch) or finite placeholders that backward skips
    # (triton); zeros would not do for torch, whose backward computes exp(z - lse) everywhere.
    kept = {name: stats[name] for name in kept_names(opts, ref_hidden is not None)}
    return masked_outputs(stats, valid, opts), kept, local_labels, valid


def backward_pass(hidden, weight, bias, local_labels, valid, ref_hidden, ref_weight, ref_bias,
                  kept: Dict[str, torch.Tensor], grads: Sequence[Optional[torch.Tensor]], opts: HeadOptions,
                  run: RunOptions, need_h: bool, need_w: bool, need_b: bool) -> Grads:
    """(dhidden [N, H] in hidden's dtype, the full one with a group; dweight [V_r, H]; dbias [V_r]),
    None where not needed or without an upstream gradient.

    ``local_labels``, ``valid``, ``kept`` as `forward_pass` returned them; ``grads`` one per
    output of ``opts.outputs``, or None.
    """
    coef = upstream_coefficients(grads, valid, opts)
    if not coef or not (need_h or need_w or need_b):
        return None, None, None
    ref_hidden, ref_weight, ref_bias = reference_if_needed(opts, ref_hidden, ref_weight, ref_bias)
    # Backward may run inside the caller's autocast (autograd.grad under torch.autocast): the tiles
    # are recomputed in the forward's dtype with fp32 sums, never recast to the autocast dtype.
    with _no_autocast(hidden.device.type):
        grad_h, grad_w, grad_b = run.backend.backward(
            hidden, weight, bias, local_labels, ref_hidden, ref_weight, ref_bias, coef, kept, opts,
            need_h, need_w, need_b and bias is not None, valid=valid,
        )
    if grad_h is not None:
        if run.group is not None:
            import torch.distributed as dist
            # Summed in the accumulation dtype: rounding each slice's share first would bias it.
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=run.group)
        grad_h = grad_h.to(hidden.dtype)
    return grad_h, grad_w, grad_b


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts: HeadOptions,
                run: RunOptions):
        results, kept, local_labels, valid = forward_pass(hidden, weight, bias, labels, ref_hidden, ref_weight,
                                                          ref_bias, opts, run)
        ctx.opts, ctx.run, ctx.kept_names = opts, run, tuple(kept)
        refs = reference_if_needed(opts, ref_hidden, ref_weight, ref_bias)
        save_inputs(ctx, hidden, weight, bias, local_labels, valid, *refs, *kept.values())
        mark_outputs(ctx, results, opts)
        return results

    @staticmethod
    @first_order_backward
    def backward(ctx, *grads):
        hidden, weight, bias, local_labels, valid, ref_hidden, ref_weight, ref_bias, *kept = saved_inputs(ctx)
        grad_h, grad_w, grad_b = backward_pass(
            hidden, weight, bias, local_labels, valid, ref_hidden, ref_weight, ref_bias,
            dict(zip(ctx.kept_names, kept)), grads, ctx.opts, ctx.run, *ctx.needs_input_grad[:3],
        )
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def function_token_stats(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts: HeadOptions, *,
                         impl: str, group=None, check_labels: bool = False) -> Dict[str, torch.Tensor]:
    """Flattened inputs to {name: [N]} for ``opts.outputs`` through `TokenStatsFunction`.

    Args:
        hidden: [N, H] policy hidden states (the same on every process of ``group``).
        weight: [V, H] the policy head, or with ``group`` this rank's contiguous slice of its rows
            (slices in rank order; sizes may differ, none empty); bias: [V] (slice) or None.
        labels: [N] int64 global ids, or ``opts.ignore_index``; the same on every process.
        ref_hidden: [N, HR] or None; ref_weight, ref_bias: [V, HR], [V] (the same rows as
            ``weight``), or None.
        opts: HeadOptions of the call.
        impl: "torch" or "triton", the backend that computes the passes.
        group: torch.distributed process group holding the vocabulary, or None.
        check_labels: with ``group``, check labels against the whole vocabulary (one host sync).

    Returns:
        {name: [N]}, identical on every process of ``group``; differentiable with respect to
        hidden, weight and bias (with a group: the full dhidden, this slice's dweight and dbias).
    """
    run = RunOptions(backend_for(impl), group, check_labels)
    results = TokenStatsFunction.apply(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts, run)
    return dict(zip(opts.outputs, results))
