"""TRL's GKDTrainer with the generalized JSD computed by `fpo_ops.distill_loss` on the fused head.

One import switches an existing script::

    from fpo_ops.integrations.trl_gkd import FusedGKDTrainer as GKDTrainer

Only ``compute_loss`` is replaced: on-policy generation (``lmbda``), sequence-level KD, data
collation and logging stay TRL's. Neither student nor teacher builds ``[tokens, vocab]`` logits.
"""
import torch
from trl.experimental.gkd import GKDTrainer

from ...losses import distill_loss
from ..hf import HEAD_INPUTS_KWARG, HeadInputs, add_head_outputs, head_precision
from .common import apply_gathered_heads, head_hidden
from .head import validate_impl


class FusedGKDTrainer(GKDTrainer):
    """`trl.experimental.gkd.GKDTrainer` whose loss comes from `fpo_ops.distill_loss`.

    Same arguments as `GKDTrainer`. The divergence is TRL's: ``beta`` interpolates between the
    forward KL(teacher ‖ student) (0) and the reverse KL (1), over the completion tokens
    (``labels != -100``), at temperature 1 as TRL's ``compute_loss`` (``temperature`` only samples).

    Precision: student and teacher backbones run under the trainer's autocast (``bf16``/``fp16``),
    and so does the fused head (bf16/fp16 GEMM operands, fp32 accumulation and statistics);
    ``cast_lm_head_to_fp32=True`` runs the head of both models in fp32 instead.

    Args:
        fused_impl: `fpo_ops.token_stats` implementation (``"auto"``, ``"triton"``, ``"torch"``, ``"reference"``).
        cast_lm_head_to_fp32: run both models' head statistics in fp32, outside autocast.
        args, kwargs: those of `GKDTrainer`.
    """

    _tag_names = ["trl", "gkd", "fpo-ops"]

    def __init__(self, *args, fused_impl: str = "auto", cast_lm_head_to_fp32: bool = False, **kwargs):
        validate_impl(fused_impl)
        if not isinstance(cast_lm_head_to_fp32, bool):
            raise TypeError(f"cast_lm_head_to_fp32: expected a bool, got {type(cast_lm_head_to_fp32).__name__}")
        super().__init__(*args, **kwargs)
        self.fused_impl = fused_impl
        self.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
        add_head_outputs(self.model)
        add_head_outputs(self.accelerator.unwrap_model(self.teacher_model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        student: HeadInputs = model(**model_kwargs, **{HEAD_INPUTS_KWARG: True})
        self.teacher_model.eval()
        with torch.no_grad():
            teacher: HeadInputs = self.teacher_model(**model_kwargs, **{HEAD_INPUTS_KWARG: True})
        # Position i predicts token i + 1; labels are -100 outside the completions.
        labels = inputs["labels"][:, 1:]
        hidden = head_hidden(student, fp32=self.cast_lm_head_to_fp32)  # fp32: token_stats computes both heads in fp32
        teacher_hidden = head_hidden(teacher)

        def loss_fn(heads, h, th):
            weight, bias, teacher_weight, teacher_bias = heads
            return (distill_loss(
                h, weight, labels, th, teacher_weight.detach(), bias=bias,
                teacher_bias=None if teacher_bias is None else teacher_bias.detach(), beta=self.beta,
                softcap=student.softcap, logit_scale=student.logit_scale, teacher_softcap=teacher.softcap,
                teacher_logit_scale=teacher.logit_scale, num_items_in_batch=num_items_in_batch,
                impl=self.fused_impl,
            ),)

        heads = [student.weight, student.bias, teacher.weight, teacher.bias]
        with head_precision(student, self.cast_lm_head_to_fp32):
            (loss,) = apply_gathered_heads(loss_fn, heads, hidden, teacher_hidden.detach())
        if return_outputs:
            # Logits for `compute_metrics` need an extra, unfused forward.
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss
