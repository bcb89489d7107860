"""Names and container of the per-token statistics (DESIGN section 2)."""
from typing import NamedTuple, Optional

import torch

STAT_NAMES = (
    "logp",          # log p[y]
    "ref_logp",      # log q[y]
    "kl",            # KL(q || p), TDPO's token KL
    "reverse_kl",    # KL(p || q)
    "entropy",       # H(p)
    "jsd",           # beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p
    "log_sum_p2",    # log sum_v p_v^2 (WPO weighting)
    "mean_logit",    # mean of the policy logits over the vocabulary
    "top1_correct",  # 1.0 where the label attains the maximum policy logit
)

# Statistics that carry a gradient to the policy; the rest are constants or metrics.
DIFFERENTIABLE_STATS = frozenset({"logp", "kl", "reverse_kl", "entropy", "jsd"})
# Statistics that read the reference model.
REFERENCE_STATS = frozenset({"ref_logp", "kl", "reverse_kl", "jsd"})


class TokenStats(NamedTuple):
    """Per-token statistics, each shaped like ``labels`` (None when not requested).

    Values are float32 (float64 when the inputs are float64) and exactly 0 at ignored positions.
    """

    logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    reverse_kl: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    jsd: Optional[torch.Tensor] = None
    log_sum_p2: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None
    top1_correct: Optional[torch.Tensor] = None
