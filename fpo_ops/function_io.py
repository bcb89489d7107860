"""What every `token_stats` autograd Function shares around its passes over the vocabulary:
which inputs and per-token values it keeps, how its outputs are masked and marked, and how the
upstream gradients become per-token coefficients of the logit gradient."""
from typing import Dict, Optional, Sequence, Tuple

import torch

from .options import HeadOptions
from .stats import DIFFERENTIABLE_STATS, REFERENCE_STATS

# Per-token values, besides lse/lse_ref, that the gradient of each statistic reads (DESIGN section 2).
SAVED_FOR_GRAD = {"entropy": "entropy", "reverse_kl": "reverse_kl", "jsd": "kl_p_m"}


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


def masked_outputs(ctx, stats: Dict[str, torch.Tensor], valid: torch.Tensor,
                   opts: HeadOptions) -> Tuple[torch.Tensor, ...]:
    """The requested statistics, 0 at ignored tokens, with the gradient-free ones marked so."""
    zero = torch.zeros((), dtype=opts.accum_dtype, device=valid.device)
    results = tuple(torch.where(valid, stats[name], zero) for name in opts.outputs)
    ctx.mark_non_differentiable(*(r for name, r in zip(opts.outputs, results)
                                  if name not in DIFFERENTIABLE_STATS))
    ctx.set_materialize_grads(False)
    return results


def upstream_coefficients(grads: Sequence[Optional[torch.Tensor]], valid: torch.Tensor,
                          opts: HeadOptions) -> Dict[str, torch.Tensor]:
    """{statistic: its upstream gradient [N], 0 at ignored tokens} for each one that has one."""
    zero = torch.zeros((), dtype=opts.accum_dtype, device=valid.device)
    return {name: torch.where(valid, g.to(opts.accum_dtype), zero)
            for name, g in zip(opts.outputs, grads) if name in DIFFERENTIABLE_STATS and g is not None}
