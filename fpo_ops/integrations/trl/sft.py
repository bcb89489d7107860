"""TRL's SFTTrainer with its LM head computed by `fpo_ops.token_stats`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedSFTConfig as SFTConfig, FusedSFTTrainer as SFTTrainer

Everything but the head is TRL's: the ``nll`` and ``dft`` losses, ``completion_only_loss`` and
``assistant_only_loss``, packing and padding-free batches (``position_ids``, no attention mask),
pre-shifted ``shift_labels``, the ``entropy`` and ``mean_token_accuracy`` metrics, the MoE
load-balancing loss, PEFT and gradient accumulation. ``label_smoothing_factor`` too, which TRL computes
from full logits: here the smoothed loss comes from the fused head (`fused_label_smoothing`).
"""
from dataclasses import dataclass

import trl.trainer.sft_trainer as trl_sft_trainer
from trl import SFTConfig, SFTTrainer

from ..hf import unwrap_peft
from ..deferred import fused_label_smoothing, sequence_parallel_loss
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

    ``label_smoothing_factor > 0`` (``nll`` loss) smooths on the fused head: TRL's label-smoothing step,
    with its smoother computing ``(1 - eps) nll + eps (lse - mean logit)`` from the hidden states instead
    of the logits (the metrics still take TRL's second, gradient-free forward). ``compute_loss_func``
    and a caller asking for the outputs (``return_outputs``) take full logits, in TRL as here.
    """

    _tag_names = ["trl", "sft", "fpo-ops"]
    trl_module = trl_sft_trainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        fused = (self.label_smoother is not None and self.args.loss_type == "nll" and self.compute_loss_func is None
                 and not return_outputs and not (self.model.training and sequence_parallel_loss(self)))
        if not fused:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        target = unwrap_peft(self.accelerator.unwrap_model(model))
        with fused_label_smoothing(self, target, options=dict(impl=getattr(self.args, "fused_impl", "auto"))):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
