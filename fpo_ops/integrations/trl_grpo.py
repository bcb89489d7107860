"""TRL's GRPOTrainer with its LM heads computed by `fpo_ops.token_stats`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedGRPOConfig as GRPOConfig, FusedGRPOTrainer as GRPOTrainer

The policy's temperature-scaled completion log-probs and entropy (training and old-policy
passes) and the reference's log-probs go through the fused head; generation (transformers or
vLLM), rewards, advantages, every loss variant and option, the KL estimator, clipping, entropy
masks, the MoE load-balancing loss and every metric are TRL's.
"""
from dataclasses import dataclass

import trl.trainer.grpo_trainer as trl_grpo_trainer
from trl import GRPOConfig, GRPOTrainer

from .trl_head import FusedHeadArguments, FusedHeadTrainer


@dataclass
class FusedGRPOConfig(FusedHeadArguments, GRPOConfig):
    r"""`trl.GRPOConfig` plus ``fused_impl``, the `fpo_ops.token_stats` implementation (see `FusedHeadArguments`)."""


class FusedGRPOTrainer(FusedHeadTrainer, GRPOTrainer):
    """`trl.GRPOTrainer` whose policy and reference heads run through `fpo_ops.token_stats`.

    Takes the same arguments as `trl.GRPOTrainer`; ``args`` may be a `FusedGRPOConfig` (a plain
    `GRPOConfig` uses ``fused_impl="auto"``). No model builds ``[tokens, vocab]`` logits in the
    loss passes (generation keeps its own logits). Precision: the heads run under the trainer's
    autocast (bf16/fp16 GEMM operands, fp32 accumulation and statistics), or in fp32 with ``cast_lm_head_to_fp32``.
    """

    _tag_names = ["trl", "grpo", "fpo-ops"]
    trl_module = trl_grpo_trainer
