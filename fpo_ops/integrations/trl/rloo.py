"""TRL's RLOOTrainer with its LM heads computed by `fpo_ops.token_stats`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedRLOOConfig as RLOOConfig, FusedRLOOTrainer as RLOOTrainer

The policy's temperature-scaled completion log-probs and entropy (training and old-policy
passes) and the reference's log-probs go through the fused head; generation (transformers or
vLLM), rewards, advantages, every loss variant and option, the KL penalty, clipping, the MoE
load-balancing loss and every metric are TRL's. ``kl_estimator="exact"`` replaces TRL's
sampled-token log-ratio in the reward by the exact per-token KL(pi_theta ‖ pi_ref) over the whole
vocabulary, from the old-policy fused pass (see `FusedRLOOConfig`).
"""
import functools
from dataclasses import dataclass, field

import torch
import trl.trainer.rloo_trainer as trl_rloo_trainer
from trl import RLOOConfig, RLOOTrainer

from .head import ExactKLRequest, FusedHeadArguments, FusedHeadTrainer, check_kl_estimator, exact_kl_of, reference_head

KL_ESTIMATORS = ("k1", "exact")


@dataclass
class FusedRLOOConfig(FusedHeadArguments, RLOOConfig):
    r"""`trl.RLOOConfig` plus ``fused_impl`` (see `FusedHeadArguments`) and the KL estimator.

    Parameters:
        kl_estimator (`str`, defaults to `"k1"`): the per-token KL that RLOO sums over each
            completion and subtracts, times ``beta``, from its reward (``reward - beta * Σ_t KL_t``,
            before the leave-one-out baseline). ``"k1"`` is TRL's estimator on the sampled token y,
            ``log p(y) - log q(y)``. ``"exact"`` is the exact
            ``KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)`` over the whole vocabulary, p the policy's
            (at generation time, the old policy) and q the reference's next-token distribution at
            ``temperature``, computed in the policy's old-log-prob fused pass from the reference's
            hidden states (the reference backbone runs once per generated batch, as with ``"k1"``;
            its head is not run apart). It is part of the reward, so, as with ``"k1"``, no gradient
            flows through it: it moves the policy only through the advantages. It is logged as
            ``kl`` (its mean per completion token). Needs ``beta != 0``. TRL takes it through its
            ``log p(y) - log q(y)`` subtraction of fp32 per-token values, so each token's KL carries
            at most half an fp32 ulp of ``|log p(y)|`` of rounding on top of the head's own.
            With a prompt-learning PEFT adapter (prompt, prefix, p-tuning) the reference runs on the
            inputs before the adapter rewrites them; a pretrained one, whose reference is TRL's frozen
            copy ``"ref"`` of its virtual tokens, is refused (ValueError at construction).
    """

    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL in the reward: 'k1' (TRL's sampled-token log-ratio) or 'exact' (whole vocabulary)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_kl_estimator(self.kl_estimator, self.beta, KL_ESTIMATORS)


class _OldPolicyKL:
    """The old-policy pass's per-token log-probs and exact KL of the batch being generated ([B, C] each)."""

    logps = None
    kl = None


class FusedRLOOTrainer(FusedHeadTrainer, RLOOTrainer):
    """`trl.RLOOTrainer` whose policy and reference heads run through `fpo_ops.token_stats`.

    Takes the same arguments as `trl.RLOOTrainer`; ``args`` may be a `FusedRLOOConfig` (a plain
    `RLOOConfig` uses ``fused_impl="auto"``). No model builds ``[tokens, vocab]`` logits in the
    loss passes (generation keeps its own logits). Precision: the heads run under the trainer's
    autocast (bf16/fp16 GEMM operands, fp32 accumulation and statistics). The exact KL runs in the
    same pass, under the same rule.
    """

    _tag_names = ["trl", "rloo", "fpo-ops"]
    trl_module = trl_rloo_trainer
    _old_policy_kl = None

    def _generate_and_score_completions(self, inputs):
        if getattr(self.args, "kl_estimator", "k1") != "exact":
            return super()._generate_and_score_completions(inputs)
        # TRL runs the old policy, then the reference, and puts their difference in the reward: the
        # first pass also computes the exact KL, the second hands TRL `old - KL` (see below).
        self._old_policy_kl = _OldPolicyKL()
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._old_policy_kl = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        pending = self._old_policy_kl
        if pending is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                               *args, **kwargs)
        if pending.kl is None:
            request = ExactKLRequest(functools.partial(reference_head, self))
            with exact_kl_of(self.accelerator.unwrap_model(model), request):
                logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
            if len(request.kls) == 0:
                raise RuntimeError("kl_estimator: the policy forward ran without the fused head: no exact KL computed")
            pending.logps = logps
            pending.kl = torch.cat([kl[:, -logits_to_keep:] for kl in request.kls]).to(logps.dtype)
            return logps, entropies, aux_loss
        # The reference pass: TRL's per-token KL is `old - ref`, so `old - KL` makes it the exact KL.
        # The reference backbone already ran inside the old-policy pass.
        return pending.logps - pending.kl, None, None
