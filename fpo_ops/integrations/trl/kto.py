"""TRL's KTOTrainer with its LM head computed by `fpo_ops.token_stats`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedKTOConfig as KTOConfig, FusedKTOTrainer as KTOTrainer

The policy (completion log-probs, entropy, mean logit), the reference (completion log-probs, also
when precomputed) and the no-grad KL completions all go through the fused head; the ``kto`` and
``apo_zero_unpaired`` losses, ``desirable_weight``/``undesirable_weight``, the KL reference point,
PEFT references, reference-model sync, the MoE load-balancing loss and every metric are TRL's.
"""
from dataclasses import dataclass

import trl.trainer.kto_trainer as trl_kto_trainer
from trl import KTOConfig, KTOTrainer

from .head import FusedHeadArguments, FusedHeadTrainer


@dataclass
class FusedKTOConfig(FusedHeadArguments, KTOConfig):
    r"""`trl.KTOConfig` plus ``fused_impl``, the `fpo_ops.token_stats` implementation (see `FusedHeadArguments`)."""


class FusedKTOTrainer(FusedHeadTrainer, KTOTrainer):
    """`trl.KTOTrainer` whose policy and reference heads run through `fpo_ops.token_stats`.

    Takes the same arguments as `trl.KTOTrainer`; ``args`` may be a `FusedKTOConfig` (a plain
    `KTOConfig` uses ``fused_impl="auto"``). Neither model builds ``[tokens, vocab]`` logits.
    Precision: both heads run under the trainer's autocast (bf16/fp16 GEMM operands, fp32
    accumulation and statistics), the reference log-probs precomputed under the same autocast.
    """

    _tag_names = ["trl", "kto", "fpo-ops"]
    trl_module = trl_kto_trainer
