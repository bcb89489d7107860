"""TRL's DistillationTrainer with its divergence computed by `fpo_ops.distill_loss`.

One import switches an existing script::

    from fpo_ops.integrations.trl import FusedDistillationTrainer as DistillationTrainer

Only the chunked divergence of student and teacher heads is replaced: on-policy generation
(transformers or vLLM, tools), ``beta`` (0 forward KL(teacher ‖ student), 1 reverse KL, between
them the generalised JSD), ``temperature``, tool masks, multimodal inputs, the reduction over
``num_items_in_batch``, the ``entropy`` metric and logging are TRL's.
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
import trl.trainer.distillation_trainer as trl_distillation_trainer
from trl import DistillationConfig, DistillationTrainer

from ...losses import distill_loss
from ..hf import _full
from .common import apply_gathered_heads
from .head import FusedHeadArguments


@dataclass
class FusedDistillationConfig(FusedHeadArguments, DistillationConfig):
    r"""`trl.DistillationConfig` plus ``fused_impl``, the `token_stats` implementation (`FusedHeadArguments`)."""


def fused_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    student_lm_head_bias: Optional[torch.Tensor] = None,
    teacher_lm_head_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``_chunked_divergence_loss`` (same arguments and results) on `fpo_ops.distill_loss`.

    Args:
        student_hidden_states: [B, K, H] student hidden states aligned with the completion tokens.
        teacher_hidden_states: [B, K, H'] teacher hidden states (no gradient).
        student_lm_head_weight, teacher_lm_head_weight: [V, H], [V, H'] heads (DTensors are gathered,
            ZeRO-3 partitions gathered for forward and backward).
        completion_mask: [B, K] 1 at the positions in the loss.
        beta: 0 forward KL(teacher ‖ student), 1 reverse KL, else the generalised JSD.
        num_items_in_batch: divide the token sum by it (else by the number of valid positions, at least 1).
        student_lm_head_bias, teacher_lm_head_bias: [V] or None.
        student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
            teacher_final_logit_softcapping, temperature: each model's logit transform.
        impl: `token_stats` implementation.

    Returns:
        ([] loss, [] sum of the student's per-token entropy (no gradient), [] number of valid positions).
    """
    labels = torch.where(completion_mask != 0, 0, -100).to(student_hidden_states.device)

    def run(heads, hidden, teacher_hidden):
        weight, bias, teacher_weight, teacher_bias = heads
        return distill_loss(
            hidden, weight, labels, teacher_hidden, teacher_weight.detach(), bias=bias,
            teacher_bias=None if teacher_bias is None else teacher_bias.detach(), beta=beta,
            temperature=temperature, softcap=student_final_logit_softcapping, logit_scale=student_logit_scale,
            teacher_softcap=teacher_final_logit_softcapping, teacher_logit_scale=teacher_logit_scale,
            num_items_in_batch=num_items_in_batch, impl=impl, check_inputs=False, return_entropy=True,
        )

    heads = [_full(student_lm_head_weight), _full(student_lm_head_bias),
             _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)]
    loss, entropy = apply_gathered_heads(run, heads, student_hidden_states, teacher_hidden_states.detach())
    return loss, entropy.detach().sum(), (completion_mask != 0).sum()


@contextlib.contextmanager
def _divergence_of(trainer) -> Iterator[None]:
    # TRL's `_compute_loss` calls the module-level `_chunked_divergence_loss` by name.
    original = trl_distillation_trainer._chunked_divergence_loss
    impl = getattr(trainer.args, "fused_impl", "auto")
    trl_distillation_trainer._chunked_divergence_loss = lambda *a, **k: fused_divergence_loss(*a, impl=impl, **k)
    try:
        yield
    finally:
        trl_distillation_trainer._chunked_divergence_loss = original


class FusedDistillationTrainer(DistillationTrainer):
    """`trl.DistillationTrainer` whose student–teacher divergence comes from `fpo_ops.distill_loss`.

    Same arguments as `trl.DistillationTrainer`; ``args`` may be a `FusedDistillationConfig` (a
    plain `DistillationConfig` uses ``fused_impl="auto"``). Neither head builds ``[tokens, vocab]``
    logits, and no fp32 ``[V, H]`` gradient scratch is kept. Precision: both backbones and the
    divergence run under the trainer's autocast (bf16/fp16 GEMM operands, fp32 accumulation and
    statistics).
    """

    _tag_names = ["trl", "distillation", "fpo-ops"]

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        with _divergence_of(self):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
