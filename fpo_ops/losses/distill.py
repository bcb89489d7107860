"""`distill_loss`: generalized Jensen-Shannon distillation of TRL's ``GKDTrainer``, without logits."""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..token_stats import token_stats
from .checks import check_number
from .keywords import OptionGroup, option_keywords
from .options import HeadConfig
from .sequence import completion_mask


# Keywords of distill_loss that fill a differently named HeadConfig field.
TEACHER_RENAMES = {"teacher_softcap": "ref_softcap", "teacher_logit_scale": "ref_logit_scale"}


@dataclass(frozen=True)
class DistillConfig:
    """The loss options of `distill_loss` (checked at construction): β of the generalized JSD in
    [0, 1], and Liger's weights of the hard-label (cross-entropy) and soft (divergence) terms."""

    beta: float = 0.5
    weight_hard_loss: float = 0.0
    weight_soft_loss: float = 1.0

    def __post_init__(self) -> None:
        check_number("beta", self.beta, low=0.0, high=1.0)
        check_number("weight_hard_loss", self.weight_hard_loss, low=0.0)
        check_number("weight_soft_loss", self.weight_soft_loss, low=0.0)
        for name in ("beta", "weight_hard_loss", "weight_soft_loss"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def statistic(self) -> str:
        """The token statistic: β = 0 is KL(q ‖ p), β = 1 is KL(p ‖ q), as TRL special-cases them."""
        return "kl" if self.beta == 0 else "reverse_kl" if self.beta == 1 else "jsd"


@option_keywords(config=DistillConfig, head=OptionGroup(HeadConfig, TEACHER_RENAMES))
def distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    config: DistillConfig,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    head: HeadConfig,
    return_entropy: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Generalized JSD between student p and teacher q per completion token, averaged over tokens.

    ``JSD_β = β KL(q ‖ m) + (1-β) KL(p ‖ m)`` with ``m = β q + (1-β) p``, both distributions at
    ``temperature``. β = 0 is the forward KL(q ‖ p) (the ``kl`` statistic) and β = 1 the reverse
    KL(p ‖ q) (``reverse_kl``), as TRL special-cases them; the ``jsd`` statistic is used in between.
    Source: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD, 2024), Eq. 1; reduction as ``GKDTrainer.generalized_jsd_loss(reduction="batchmean")``.

    Args:
        hidden: [..., H] student hidden states. weight: [V, H] student head.
        labels: [...] token ids aligned with ``hidden``; ``ignore_index`` marks non-completion positions.
        teacher_hidden: [..., H'] teacher hidden states. teacher_weight: [V, H'] teacher head (None
            shares the student's).
        bias, teacher_bias: [V] biases or None.
        beta: β in [0, 1].
        temperature: divides both models' logits.
        ignore_index, softcap, logit_scale, teacher_softcap, teacher_logit_scale: head options.
        num_items_in_batch: divide the token sum by this instead of the local completion-token count
            (gradient accumulation across micro-batches, as TRL).
        impl: `token_stats` implementation. check_inputs: check label ranges (host sync).
        check_finite, process_group, grad_filter_eps: as in `token_stats` (``process_group``: each
            process holds its slice of the rows of both heads).
        config, head: a ready `DistillConfig` (``beta``) and `HeadConfig` (the head options; its
            ``ref_*`` fields are the ``teacher_*`` keywords), or None; keywords given beside one
            replace its fields (`keywords.option_keywords`).
        weight_hard_loss, weight_soft_loss: the loss is ``weight_hard_loss * CE + weight_soft_loss *
            divergence`` (Liger's names; defaults 0 and 1: GKD's divergence alone). CE is the
            student's cross-entropy on ``labels`` at temperature 1 (as Liger), from the same pass
            when ``temperature`` is 1, else from one more pass; both terms share the normaliser.
        return_entropy: also return the student's per-token entropy H(p) from the same pass (the
            metric TRL's ``DistillationTrainer`` logs; differentiable like any statistic).

    Returns:
        [] scalar: sum of the per-token divergences / max(number of completion tokens, 1); with
        ``return_entropy``, the pair (that scalar, [...] entropy, 0 at ignored positions).
    """
    if teacher_hidden is None:
        raise ValueError("teacher_hidden: expected the teacher's hidden states, got None")
    stat = config.statistic
    head_kwargs = head.token_stats_kwargs()
    hard = config.weight_hard_loss != 0.0
    same_pass = hard and head_kwargs["temperature"] == 1.0
    outputs = (stat,) + (("entropy",) if return_entropy else ()) + (("logp",) if same_pass else ())
    stats = token_stats(
        hidden, weight, labels, teacher_hidden, teacher_weight, bias=bias, ref_bias=teacher_bias,
        outputs=outputs, jsd_beta=config.beta, **head_kwargs,
    )
    total = config.weight_soft_loss * getattr(stats, stat).sum()  # 0 at ignored positions
    if hard:
        logp = stats.logp if same_pass else token_stats(
            hidden, weight, labels, bias=bias, outputs=("logp",), **dict(head_kwargs, temperature=1.0)).logp
        total = total - config.weight_hard_loss * logp.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    else:
        loss = total / completion_mask(labels, head.ignore_index).sum().clamp(min=1)
    return (loss, stats.entropy) if return_entropy else loss
