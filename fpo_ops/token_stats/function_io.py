"""What the `token_stats` autograd Function (`fpo_ops.token_stats.function`) and its custom-op twin
(`fpo_ops.token_stats.custom_op`) share around the backend's passes: which inputs and per-token values they
keep, how outputs are masked and marked, and how the upstream gradients become per-token
coefficients of the logit gradient."""
import functools
from typing import Dict, Optional, Sequence, Tuple

import torch

from .options import HeadOptions
from .stats import DIFFERENTIABLE_STATS, INDEX_STATS, REFERENCE_STATS, SAVED_FOR_GRAD


def reference_if_needed(opts: HeadOptions, ref_hidden, ref_weight, ref_bias) -> Tuple:
    """The reference tensors, or Nones when no requested statistic reads the reference model."""
    if any(name in REFERENCE_STATS for name in opts.outputs):
        return ref_hidden, ref_weight, ref_bias
    return None, None, None


def kept_names(opts: HeadOptions, has_ref: bool) -> Tuple[str, ...]:
    """Names of the per-token values forward keeps for backward."""
    names = ["lse"] + (["lse_ref"] if has_ref else [])
    names += [saved for stat, saved in SAVED_FOR_GRAD.items() if opts.wants(stat)]
    return tuple(names)


def ignored_value(name: str, opts: HeadOptions, device) -> torch.Tensor:
    """What statistic ``name`` holds at ignored tokens: 0 in the accumulation dtype, or -1 (int64)
    for a vocabulary index, which has no 0 to spare."""
    if name in INDEX_STATS:
        return torch.full((), -1, dtype=torch.int64, device=device)
    return torch.zeros((), dtype=opts.accum_dtype, device=device)


def masked_outputs(stats: Dict[str, torch.Tensor], valid: torch.Tensor,
                   opts: HeadOptions) -> Tuple[torch.Tensor, ...]:
    """The requested statistics, 0 (an index: -1) at ignored tokens."""
    return tuple(torch.where(valid, stats[name], ignored_value(name, opts, valid.device)) for name in opts.outputs)


def mark_outputs(ctx, results: Sequence[torch.Tensor], opts: HeadOptions,
                 also_constant: Sequence[torch.Tensor] = ()) -> None:
    """Mark the gradient-free statistics (and ``also_constant``) so; unused outputs get None,
    not zeros, in backward."""
    ctx.mark_non_differentiable(*(r for name, r in zip(opts.outputs, results)
                                  if name not in DIFFERENTIABLE_STATS), *also_constant)
    ctx.set_materialize_grads(False)


def save_inputs(ctx, *tensors: Optional[torch.Tensor]) -> None:
    """``ctx.save_for_backward``, except that inference-mode tensors are kept as attributes.

    Autograd refuses to save a tensor made under ``torch.inference_mode`` (a frozen reference
    model's hidden states, labels): such a tensor needs no gradient, and it cannot be modified in
    place outside inference mode, so keeping a plain reference is as safe as saving it.
    """
    ctx.inference_inputs = {i: t for i, t in enumerate(tensors) if t is not None and t.is_inference()}
    ctx.save_for_backward(*(None if i in ctx.inference_inputs else t for i, t in enumerate(tensors)))


def saved_inputs(ctx) -> Tuple[Optional[torch.Tensor], ...]:
    """What `save_inputs` kept, in order."""
    saved = list(ctx.saved_tensors)
    for i, t in ctx.inference_inputs.items():
        saved[i] = t
    return tuple(saved)


DOUBLE_BACKWARD_ERROR = (
    "token_stats: double backward is not supported: its gradient is computed by a fused pass, not by "
    "differentiable operations; differentiate token_stats once (create_graph=False), or use "
    "impl='reference' for higher derivatives"
)


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on its first input; backward through it raises `DOUBLE_BACKWARD_ERROR`. The other
    inputs (those the gradient was computed from) connect it to the graph, so a second derivative
    with respect to any of them reaches this error instead of a silently missing term."""

    @staticmethod
    def forward(ctx, value, *sources):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def first_order_backward(backward):
    """Run ``backward`` without building a graph; differentiating its result again raises.

    ``torch.autograd.function.once_differentiable`` is not enough: it attaches its error only when
    an upstream gradient requires grad, and otherwise returns gradients that silently lack their
    dependence on the inputs. Here, under ``create_graph=True``, every gradient depends (through
    `_NoSecondDerivative`) on the saved inputs that require grad.
    """
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        sources = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        sources += [g for g in grads if isinstance(g, torch.Tensor) and g.requires_grad]
        if not sources:
            return results
        return tuple(_NoSecondDerivative.apply(r, *sources) if isinstance(r, torch.Tensor) else r
                     for r in results)
    return wrapper


def upstream_coefficients(grads: Sequence[Optional[torch.Tensor]], valid: torch.Tensor,
                          opts: HeadOptions) -> Dict[str, torch.Tensor]:
    """{statistic: its upstream gradient [N], 0 at ignored tokens} for each one that has one."""
    zero = torch.zeros((), dtype=opts.accum_dtype, device=valid.device)
    return {name: torch.where(valid, g.to(opts.accum_dtype), zero)
            for name, g in zip(opts.outputs, grads) if name in DIFFERENTIABLE_STATS and g is not None}
