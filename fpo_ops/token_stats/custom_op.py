"""`token_stats` as two ``torch.library`` custom ops, for ``torch.compile`` and meta tensors.

Dynamo cannot trace the streaming implementation (Python loops over N) nor the Triton launches
without specialising on N, and data checks such as ``check_labels`` would break the graph. As
custom ops both passes are opaque nodes with a shape-only fake implementation: a compiled
function calling `token_stats` has no graph break and, under ``dynamic=True``, no recompile for a
new N. The real implementations run the same forward and backward passes as the eager autograd
Function (``fpo_ops.token_stats.function``), over the same backends, so results are identical;
``check_labels`` and ``check_finite`` run inside the forward op, on real data. On meta tensors
the fake implementations answer: shapes and dtypes of the statistics and gradients, no data.

Non-tensor options cross the op boundary as ``outputs`` (comma-joined names), ``ignore_index``
and a list of floats (`_SCALARS`, 0.0 standing for an absent softcap, which is never 0).
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .backend import backend_for
from .function import RunOptions, backward_pass, forward_pass, local_labels_of
from .function_io import first_order_backward, kept_names, mark_outputs
from .options import HeadOptions
from .stats import INDEX_STATS, REFERENCE_STATS
from .validation import check_values

_SCALARS = ("temperature", "softcap", "logit_scale", "ref_softcap", "ref_logit_scale", "jsd_beta",
            "grad_filter_eps")
_OPTIONAL = ("softcap", "ref_softcap")


def _op_options(opts: HeadOptions) -> Tuple[str, int, List[float]]:
    scalars = [getattr(opts, name) for name in _SCALARS]
    return ",".join(opts.outputs), opts.ignore_index, [0.0 if s is None else s for s in scalars]


def _head_options(hidden: torch.Tensor, outputs: str, ignore_index: int, scalars: Sequence[float]) -> HeadOptions:
    values = {name: None if name in _OPTIONAL and s == 0.0 else s for name, s in zip(_SCALARS, scalars)}
    return HeadOptions(outputs=tuple(outputs.split(",")), ignore_index=ignore_index,
                       compute_dtype=hidden.dtype, **values)


def _n_kept(opts: HeadOptions, ref_hidden) -> int:
    uses_ref = ref_hidden is not None and any(name in REFERENCE_STATS for name in opts.outputs)
    return len(kept_names(opts, uses_ref))


@torch.library.custom_op("fpo_ops::token_stats_fwd", mutates_args=())
def token_stats_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor], ref_bias: Optional[torch.Tensor],
    impl: str, outputs: str, ignore_index: int, scalars: List[float], check_labels: bool, check_finite: bool,
) -> List[torch.Tensor]:
    """The statistics [N] of ``outputs``, then the per-token values backward reads [N]."""
    opts = _head_options(hidden, outputs, ignore_index, scalars)
    check_values(hidden, ref_hidden, labels, weight.shape[0], ignore_index, check_labels, check_finite)
    results, kept, _, _ = forward_pass(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts,
                                       RunOptions(backend_for(impl)))
    # an op's outputs may not alias its inputs or each other
    return [t.clone() for t in results + tuple(kept.values())]


@token_stats_fwd.register_fake
def _token_stats_fwd_fake(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, impl, outputs,
                          ignore_index, scalars, check_labels, check_finite):
    opts = _head_options(hidden, outputs, ignore_index, scalars)
    stats = [hidden.new_empty(labels.shape, dtype=torch.int64 if name in INDEX_STATS else opts.accum_dtype)
             for name in opts.outputs]
    return stats + [hidden.new_empty(labels.shape, dtype=opts.accum_dtype) for _ in range(_n_kept(opts, ref_hidden))]


@torch.library.custom_op("fpo_ops::token_stats_bwd", mutates_args=())
def token_stats_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor], ref_bias: Optional[torch.Tensor],
    kept: List[torch.Tensor], grads: List[Optional[torch.Tensor]], impl: str, outputs: str, ignore_index: int,
    scalars: List[float], needs: List[bool],
) -> List[torch.Tensor]:
    """[dhidden, dweight, dbias]; an empty [0] tensor for each one not in ``needs``."""
    opts = _head_options(hidden, outputs, ignore_index, scalars)
    names = kept_names(opts, ref_hidden is not None)
    local_labels, valid = local_labels_of(labels, opts)
    results = backward_pass(hidden, weight, bias, local_labels, valid, ref_hidden, ref_weight, ref_bias,
                            dict(zip(names, kept)), grads, opts, RunOptions(backend_for(impl)), *needs)
    # no upstream gradient (or nothing needed) gives None: a zero gradient of the right shape
    return [hidden.new_empty(0) if not need else torch.zeros_like(like) if r is None else r
            for r, like, need in zip(results, (hidden, weight, bias), needs)]


@token_stats_bwd.register_fake
def _token_stats_bwd_fake(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, kept, grads, impl,
                          outputs, ignore_index, scalars, needs):
    return [torch.empty_like(like) if need else hidden.new_empty(0)
            for like, need in zip((hidden, weight, bias), needs)]


_N_OP_INPUTS = 13  # arguments of token_stats_fwd


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias = inputs[:7]
    impl, outputs, ignore_index, scalars = inputs[7:11]
    opts = _head_options(hidden, outputs, ignore_index, scalars)
    n_out = len(opts.outputs)
    if not any(name in REFERENCE_STATS for name in opts.outputs):
        ref_hidden = ref_weight = ref_bias = None  # not read by backward: not kept alive either
    ctx.op_args = (impl, outputs, ignore_index, list(scalars))
    ctx.n_out = n_out
    ctx.save_for_backward(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, *output[n_out:])
    mark_outputs(ctx, output[:n_out], opts, also_constant=output[n_out:])


@first_order_backward
def _backward(ctx, grads):
    hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, *kept = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and bias is not None
    impl, outputs, ignore_index, scalars = ctx.op_args
    grad_h, grad_w, grad_b = token_stats_bwd(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias,
                                             kept, list(grads[:ctx.n_out]), impl, outputs, ignore_index,
                                             scalars, needs)
    grads_out = [g if need else None for g, need in zip((grad_h, grad_w, grad_b), needs)]
    return (*grads_out,) + (None,) * (_N_OP_INPUTS - 3)


token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


def op_token_stats(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts: HeadOptions, *,
                   impl: str, check_labels: bool, check_finite: bool):
    """Flattened inputs (as for `fpo_ops.token_stats.function.function_token_stats`) to {name: [N]} through the ops.

    ``impl`` is "torch" or "triton"; the label and finiteness checks run inside the forward op.
    """
    results = token_stats_fwd(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, impl,
                              *_op_options(opts), check_labels, check_finite)
    return dict(zip(opts.outputs, results[:len(opts.outputs)]))
