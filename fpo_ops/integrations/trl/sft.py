"""TRL's SFTTrainer with its LM head computed by `fpo_ops.token_stats`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedSFTConfig as SFTConfig, FusedSFTTrainer as SFTTrainer

Everything but the head is TRL's: the ``nll`` and ``dft`` losses, ``completion_only_loss`` and
``assistant_only_loss``, packing and padding-free batches (``position_ids``, no attention mask),
pre-shifted ``shift_labels``, the ``entropy`` and ``mean_token_accuracy`` metrics, the MoE
load-balancing loss, PEFT and gradient accumulation.
"""
from dataclasses import dataclass

import trl.trainer.sft_trainer as trl_sft_trainer
from trl import SFTConfig, SFTTrainer

from .head import FusedHeadArguments, FusedHeadTrainer


@dataclass
class FusedSFTConfig(FusedHeadArguments, SFTConfig):
    r"""`trl.SFTConfig` plus ``fused_impl``, the `fpo_ops.token_stats` implementation (see `FusedHeadArguments`)."""


class FusedSFTTrainer(FusedHeadTrainer, SFTTrainer):
    """`trl.SFTTrainer` whose per-token log-probs, entropy and top-1 come from `fpo_ops.token_stats`.

    Takes the same arguments as `trl.SFTTrainer`; ``args`` may be a `FusedSFTConfig` (a plain
    `SFTConfig` uses ``fused_impl="auto"``). The head never builds ``[tokens, vocab]`` logits and
    keeps no fp32 ``[V, H]`` gradient scratch. Precision: the head runs under the trainer's autocast
    (bf16/fp16 GEMM operands, fp32 accumulation and statistics).

    ``label_smoothing_factor > 0`` and ``compute_loss_func`` take the loss from full logits, in TRL
    as here; the fused head then only feeds the metrics.
    """

    _tag_names = ["trl", "sft", "fpo-ops"]
    trl_module = trl_sft_trainer
