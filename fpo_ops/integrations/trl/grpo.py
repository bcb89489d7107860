"""TRL's GRPOTrainer with its LM heads computed by `fpo_ops.token_stats`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedGRPOConfig as GRPOConfig, FusedGRPOTrainer as GRPOTrainer

The policy's temperature-scaled completion log-probs and entropy (training and old-policy
passes) and the reference's log-probs go through the fused head; generation (transformers or
vLLM), rewards, advantages, every loss variant and option, the KL estimator, clipping, entropy
masks, the MoE load-balancing loss and every metric are TRL's. ``kl_estimator="exact"`` replaces
TRL's sampled-token k3 KL estimate by the exact per-token KL(pi_theta ‖ pi_ref) over the whole
vocabulary, from the same fused pass (see `FusedGRPOConfig`).
"""
import functools
from dataclasses import dataclass, field

import torch
import trl.trainer.grpo_trainer as trl_grpo_trainer
from trl import GRPOConfig, GRPOTrainer

from .common import trainer_mode
from .head import ExactKLRequest, FusedHeadArguments, FusedHeadTrainer, check_kl_estimator, exact_kl_of, reference_head

KL_ESTIMATORS = ("k3", "exact")


@dataclass
class FusedGRPOConfig(FusedHeadArguments, GRPOConfig):
    r"""`trl.GRPOConfig` plus ``fused_impl`` (see `FusedHeadArguments`) and the KL estimator.

    Parameters:
        kl_estimator (`str`, defaults to `"k3"`): the per-token KL penalty weighted by ``beta``.
            ``"k3"`` is TRL's estimator on the sampled token y, ``exp(r) - r - 1`` with
            ``r = log q(y) - log p(y)``. ``"exact"`` is the exact
            ``KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)`` over the whole vocabulary, p the policy's and
            q the reference's next-token distribution at ``temperature``, computed in the policy's
            fused head pass from the reference's hidden states (one more reference backbone forward
            per loss step, without graph). Its gradient with respect to the policy's
            temperature-scaled logits z is ``∂KL/∂z_v = p_v (log p_v - log q_v - KL)``, so it pulls
            the whole distribution toward q, not only the sampled token's probability. It enters
            the loss where TRL adds ``beta * k3`` (after clipping and masks, with the loss type's
            aggregation) and is logged as ``kl``. Needs ``beta != 0``. ``use_bias_correction_kl``
            (TRL's importance weight making the sampled-token estimator's gradient the reverse-KL
            gradient) does not apply to it: its gradient is the exact one at every position.
            With a prompt-learning PEFT adapter (prompt, prefix, p-tuning) the reference runs on the
            inputs before the adapter rewrites them; a pretrained one, whose reference is TRL's frozen
            copy ``"ref"`` of its virtual tokens, is refused (ValueError at construction).
    """

    kl_estimator: str = field(
        default="k3",
        metadata={"help": "Per-token KL penalty: 'k3' (TRL's sampled-token estimator) or 'exact' (whole vocabulary)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_kl_estimator(self.kl_estimator, self.beta, KL_ESTIMATORS)


class FusedGRPOTrainer(FusedHeadTrainer, GRPOTrainer):
    """`trl.GRPOTrainer` whose policy and reference heads run through `fpo_ops.token_stats`.

    Takes the same arguments as `trl.GRPOTrainer`; ``args`` may be a `FusedGRPOConfig` (a plain
    `GRPOConfig` uses ``fused_impl="auto"``). No model builds ``[tokens, vocab]`` logits in the
    loss passes (generation keeps its own logits). Precision: the heads run under the trainer's
    autocast (bf16/fp16 GEMM operands, fp32 accumulation and statistics), or in fp32 with ``cast_lm_head_to_fp32``.
    """

    _tag_names = ["trl", "grpo", "fpo-ops"]
    trl_module = trl_grpo_trainer

    def _compute_loss(self, model, inputs):
        if getattr(self.args, "kl_estimator", "k3") != "exact":
            return super()._compute_loss(model, inputs)
        mode = trainer_mode(self)
        logged = len(self._metrics[mode].get("policy_loss", ()))
        beta, self.beta = self.beta, 0.0  # TRL's loss without its k3 term; the exact term is added below
        try:
            with exact_kl_of(self.accelerator.unwrap_model(model), ExactKLRequest(functools.partial(reference_head, self))) as request:
                loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
        if request.kl is None:
            raise RuntimeError("kl_estimator: the policy forward ran without the fused head: no exact KL computed")
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        per_token_kl = request.kl[:, -mask.size(1):]
        as_logged, as_trained = self._aggregate(per_token_kl, mask, inputs, mode)
        loss = loss + beta * as_trained
        if len(self._metrics[mode].get("policy_loss", ())) > logged:
            # TRL's policy_loss metric includes the KL term.
            kl_part = self.accelerator.gather(as_logged.detach()).nanmean().item()
            self._metrics[mode]["policy_loss"][-1] += beta * kl_part
        totals = self.accelerator.reduce(torch.stack([(per_token_kl.detach() * mask).sum(), mask.sum().float()]),
                                         reduction="sum")
        self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, inputs, mode: str):
        """TRL's reduction of a per-token loss term for ``self.loss_type`` (``GRPOTrainer._compute_loss``).

        Returns:
            ([] the term as TRL's ``policy_loss`` metric counts it, [] the term as it enters the loss).
        """
        masked = per_token * mask
        if self.loss_type in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            term = masked.sum() / normalizer
            return term, term
        if self.loss_type in ("grpo", "sapo"):
            term = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type == "bnpo":
            term = masked.sum() / mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            term = masked.sum() / (per_token.size(0) * self.max_completion_length)
        elif self.loss_type == "luspo":
            term = masked.sum(-1).mean()
        else:
            raise ValueError(f"loss_type: expected a GRPO loss type, got {self.loss_type!r}")
        return term, term / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)
