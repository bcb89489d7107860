"""The one table of per-token statistics (docs/DESIGN.md section 2), and what is derived from it.

Each `Stat` says what the code around the math needs to know: whether it reads the reference
model, whether it carries a gradient to the policy, which online partial sums it is finalised
from (`PARTIALS`), and which per-token value its gradient formula reads in backward. The names,
`TokenStats`, the partial-sum keys a call needs (`fpo_ops.token_stats.online.needed_partials`), the rows of
the Triton kernels' buffers (`PARTIAL_KEYS`, `GRAD_KEYS`, `SAVED_KEYS`) and what backward saves
(`SAVED_FOR_GRAD`) all come from here. A new statistic is one `Stat` (plus, when it needs a new
sum, one `Partial`) and its math: the tile sums and `finalize` in `fpo_ops/token_stats/online.py`, the
accumulator in the forward kernel, the oracle, and, when differentiable, its term of the logit
gradient. This module imports nothing of the package, so the kernels can read it too.
"""
from typing import NamedTuple, Optional, Tuple

import torch


class Partial(NamedTuple):
    """One online partial over the vocabulary (see `fpo_ops.token_stats.online`)."""

    key: str
    reads_reference: bool
    # m, s, z_label (and their reference twins) are kept by every call; the others on request
    always: bool
    # how the partials of disjoint vocabulary blocks combine: "sum" (relative to the common
    # maxima, see `online.shift_partials`), "max" (a maximum, never shifted), "min" (the smallest
    # among the blocks that attain the common maximum m: the first maximal index)
    merge: str = "sum"


PARTIALS = (
    Partial("m", False, True, "max"),      # max z
    Partial("s", False, True),             # sum e^{z-m}
    Partial("z_label", False, True),       # z[y]
    Partial("ent", False, False),          # sum e^{z-m} (z-m)
    Partial("s2", False, False),           # sum e^{2(z-m)}
    Partial("sum_z", False, False),        # sum z
    Partial("m_pre", False, False, "max"),  # max z_v over v < y (-inf when y is the first index)
    # first v with z_v == max z; held in the accumulation dtype (exact below 2^24 rows per pass)
    Partial("argmax", False, False, "min"),
    Partial("m_ref", True, True, "max"),   # max z'
    Partial("s_ref", True, True),          # sum e^{z'-m'}
    Partial("z_ref_label", True, True),    # z'[y]
    Partial("rkl", True, False),           # sum e^{z-m} ((z-m) - (z'-m'))
    Partial("kl", True, False),            # sum e^{z'-m'} ((z'-m') - (z-m))
)


class Stat(NamedTuple):
    """One per-token statistic."""

    name: str
    reads_reference: bool
    differentiable: bool
    # optional partial sums (`PARTIALS`, ``always=False``) it is finalised from
    partials: Tuple[str, ...] = ()
    # the per-token value, besides lse/lse_ref, that its gradient formula reads
    saved: Optional[str] = None
    # a vocabulary index: int64, and -1 (no token) at ignored positions instead of 0
    index: bool = False


STATS = (
    Stat("logp", False, True),                                        # log p[y]
    Stat("lse", False, True),                                         # log sum_v e^{z_v}; d/dz = p
    Stat("ref_logp", True, False),                                    # log q[y]
    Stat("kl", True, True, partials=("kl",)),                         # KL(q || p), TDPO's token KL
    Stat("reverse_kl", True, True, partials=("rkl",), saved="reverse_kl"),  # KL(p || q)
    Stat("entropy", False, True, partials=("ent",), saved="entropy"),        # H(p)
    # beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p: a second pass
    Stat("jsd", True, True, saved="kl_p_m"),
    Stat("log_sum_p2", False, False, partials=("s2",)),               # log sum_v p_v^2 (WPO weighting)
    Stat("mean_logit", False, False, partials=("sum_z",)),            # mean of the policy logits over V
    # 1.0 where y is the first index attaining max z (torch.argmax's and TRL's tie rule)
    Stat("top1_correct", False, False, partials=("m_pre",)),
    # the predicted token (first maximal index; a global id under vocabulary parallelism)
    Stat("argmax", False, False, partials=("argmax",), index=True),
)

STAT_NAMES = tuple(stat.name for stat in STATS)
STAT_BY_NAME = {stat.name: stat for stat in STATS}
# Statistics that carry a gradient to the policy; the rest are constants or metrics.
DIFFERENTIABLE_STATS = frozenset(stat.name for stat in STATS if stat.differentiable)
# Statistics that read the reference model.
REFERENCE_STATS = frozenset(stat.name for stat in STATS if stat.reads_reference)
# Gradients whose formula reads the reference distribution q (backward recomputes its tiles).
REFERENCE_GRADS = frozenset(DIFFERENTIABLE_STATS & REFERENCE_STATS)
# Statistics that are vocabulary indices (int64, -1 at ignored positions).
INDEX_STATS = frozenset(stat.name for stat in STATS if stat.index)
# {statistic: the per-token value its gradient reads} (besides lse/lse_ref).
SAVED_FOR_GRAD = {stat.name: stat.saved for stat in STATS if stat.saved is not None}

# Rows of the Triton kernels' buffers: partials [splits, PARTIAL_KEYS, N], upstream gradients
# [GRAD_KEYS, N] and saved per-token values [SAVED_KEYS, N].
PARTIAL_KEYS = tuple(partial.key for partial in PARTIALS)
# How each partial combines over vocabulary blocks, splits and slices.
PARTIAL_MERGE = {partial.key: partial.merge for partial in PARTIALS}
GRAD_KEYS = tuple(stat.name for stat in STATS if stat.differentiable)
SAVED_KEYS = ("lse", "lse_ref") + tuple(SAVED_FOR_GRAD.values())


def partials_for(outputs) -> Tuple[str, ...]:
    """The optional partial sums the statistics ``outputs`` are finalised from, in `PARTIALS` order."""
    wanted = {key for name in outputs for key in STAT_BY_NAME[name].partials}
    return tuple(partial.key for partial in PARTIALS if partial.key in wanted)


def present_partials(keys, has_ref: bool) -> Tuple[str, ...]:
    """Every partial a pass returns for the optional ``keys``, in `PARTIALS` order."""
    return tuple(p.key for p in PARTIALS if (p.always or p.key in keys) and (has_ref or not p.reads_reference))


def _check_table() -> None:
    known = set(PARTIAL_KEYS)
    odd = [p.key for p in PARTIALS if p.merge not in ("sum", "max", "min")]
    if odd:
        raise ValueError(f"PARTIALS: {odd} merge: expected 'sum', 'max' or 'min'")
    for stat in STATS:
        unknown = [key for key in stat.partials if key not in known]
        if unknown:
            raise ValueError(f"STATS: {stat.name} names unknown partials {unknown}")


_check_table()

TokenStats = NamedTuple("TokenStats", [(name, Optional[torch.Tensor]) for name in STAT_NAMES])
TokenStats.__new__.__defaults__ = (None,) * len(STAT_NAMES)
TokenStats.__doc__ = """Per-token statistics, each shaped like ``labels`` (None when not requested).

One field per entry of `STATS`, in that order. Values are float32 (float64 when the inputs are
float64) and exactly 0 at ignored positions, except the index ``argmax``: int64, -1 at ignored
positions.
"""
