"""TRL's RLOOTrainer with its LM heads computed by `fpo_ops.token_stats`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedRLOOConfig as RLOOConfig, FusedRLOOTrainer as RLOOTrainer

The policy's temperature-scaled completion log-probs and entropy (training and old-policy
passes) and the reference's log-probs go through the fused head; generation (transformers or
vLLM), rewards, advantages, every loss variant and option, the KL estimator, clipping, entropy
masks, the MoE load-balancing loss and every metric are TRL's.
"""
from dataclasses import dataclass

import trl.trainer.rloo_trainer as trl_rloo_trainer
from trl import RLOOConfig, RLOOTrainer

from .head import FusedHeadArguments, FusedHeadTrainer


@dataclass
class FusedRLOOConfig(FusedHeadArguments, RLOOConfig):
    r"""`trl.RLOOConfig` plus ``fused_impl``, the `fpo_ops.token_stats` implementation (see `FusedHeadArguments`)."""


class FusedRLOOTrainer(FusedHeadTrainer, RLOOTrainer):
    """`trl.RLOOTrainer` whose policy and reference heads run through `fpo_ops.token_stats`.

    Takes the same arguments as `trl.RLOOTrainer`; ``args`` may be a `FusedRLOOConfig` (a plain
    `RLOOConfig` uses ``fused_impl="auto"``). No model builds ``[tokens, vocab]`` logits in the
    loss passes (generation keeps its own logits). Precision: the heads run under the trainer's
    autocast (bf16/fp16 GEMM operands, fp32 accumulation and statistics).
    """

    _tag_names = ["trl", "rloo", "fpo-ops"]
    trl_module = trl_rloo_trainer
