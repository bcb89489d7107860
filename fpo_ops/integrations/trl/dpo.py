"""TRL's DPOTrainer with every loss computed by `fpo_ops.preference_loss` on the fused LM head.

Switching an existing TRL script is one import::

    from fpo_ops.integrations.trl import FusedDPOConfig as DPOConfig, FusedDPOTrainer as DPOTrainer

Only the step that runs the models and computes the loss (``_compute_loss``) and the reference
log-prob precomputation (``compute_ref_log_probs``) are replaced; data processing, PEFT, reference
handling, ``precompute_ref_log_probs``, gradient accumulation, metrics and logging are TRL's own.
"""
import contextlib
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import trl.trainer.dpo_trainer as trl_dpo_trainer
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ...losses import PreferenceOutput, preference_loss
from ...losses.config import LossConfig
from ...losses.registry import EXTRA_HYPER_PARAMETERS, HYPER_PARAMETERS, LOSS_TYPES, needs_reference, token_level_types
from ...losses.sequence import ld_token_weights
from ...token_stats import token_stats
from ..hf import HEAD_INPUTS_KWARG, HeadInputs, add_head_outputs, head_precision, is_zero3_param
from .common import (
    apply_gathered_heads, completion_labels, head_hidden, head_model_kwargs, log_metric, log_metrics,
    log_token_mean, reference_adapter, reference_forward, trainer_mode,
)
from .head import FusedHeadArguments
from .seed import PAIR_COLUMNS, SeedLossArguments, SeedLossesMixin

# Inputs the collator adds that the model's forward does not take.
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps") + PAIR_COLUMNS
# Loss types the trainer cannot feed.
_UNSUPPORTED_LOSS_TYPES = frozenset()
TRAINER_LOSS_TYPES = tuple(name for name in LOSS_TYPES if name not in _UNSUPPORTED_LOSS_TYPES)
# Per-token metrics of `preference_loss` and the rows of the [2B] batch whose completion tokens each averages.
_TOKEN_METRIC_ROWS = {"entropy": "all", "logits/chosen": "chosen", "logits/rejected": "rejected",
                      "mean_token_accuracy": "chosen"}


@contextlib.contextmanager
def _reference_not_loaded():
    """Within it, TRL's DPOTrainer builds no reference model from the policy's name or path.

    For reference-free losses it would load a second copy of the model only for us to drop it, and
    it cannot load one at all for a policy built from a config.
    """
    load = trl_dpo_trainer.create_model_from_path
    trl_dpo_trainer.create_model_from_path = lambda *args, **kwargs: None
    try:
        yield
    finally:
        trl_dpo_trainer.create_model_from_path = load


def _check_loss_fields(self) -> None:
    super(LossArguments, self).__post_init__()
    for param in EXTRA_HYPER_PARAMETERS:
        param.check(param.name, getattr(self, param.name))


# The hyper-parameters of the loss registry that DPOConfig lacks, with their defaults, help and checks.
LossArguments = make_dataclass(
    "LossArguments",
    [(p.name, p.type, field(default=p.default, metadata={"help": p.help})) for p in EXTRA_HYPER_PARAMETERS],
    namespace={"__post_init__": _check_loss_fields, "__module__": __name__},
)


@dataclass
class FusedDPOConfig(SeedLossArguments, LossArguments, FusedHeadArguments, DPOConfig):
    r"""`trl.DPOConfig` plus the parameters of the extra loss types of `fpo_ops.preference_loss`.

    ``loss_type`` accepts every TRL name and ``"tdpo1"``, ``"tdpo2"``, ``"spo"``, ``"sppo"``,
    ``"sppo_single"``, ``"simpo"``, ``"cpo"``, ``"orpo"`` (a list combines them with ``loss_weights``,
    as in TRL). SPO's regulariser options (``spo_regularizer``, ``spo_sample_every``, ...) are those
    of `seed.SeedLossArguments`.

    Parameters:
        tdpo_alpha (`float`, defaults to `0.5`): α of TDPO2, weight of the rejected response's
            token-level KL (Zeng et al. 2024, "Token-level Direct Preference Optimization").
        spo_alpha (`float`, defaults to `1.0`): softmax exponent α of SPO's preference term.
        simpo_gamma (`float`, defaults to `0.5`): target reward margin γ of SimPO.
        cpo_alpha (`float`, defaults to `1.0`): weight of the NLL term of CPO.
        fused_impl (`str`, defaults to `"auto"`): `fpo_ops.token_stats` implementation: ``"auto"``
            (Triton on CUDA, streaming PyTorch elsewhere), ``"triton"``, ``"torch"`` or ``"reference"``.
        cast_lm_head_to_fp32 (`bool`, defaults to `False`): run the fused head statistics of the policy
            and of the reference (also when precomputed) in fp32, outside the bf16/fp16 autocast the
            backbones run under (TRL GRPO's option of the same name). By default the head takes the
            autocast dtype, with fp32 accumulation and fp32 statistics.
    """

    cast_lm_head_to_fp32: bool = field(
        default=False,
        metadata={"help": "Run the fused LM-head statistics of both models in fp32, outside mixed-precision autocast."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in self.loss_type:
            if name not in TRAINER_LOSS_TYPES:
                raise ValueError(f"loss_type: expected names among {list(TRAINER_LOSS_TYPES)}, got {name!r}")
        token_level = token_level_types(self.loss_type)
        if token_level and self.precompute_ref_log_probs:
            raise ValueError(
                f"precompute_ref_log_probs: loss types {token_level} need the reference model's token "
                "distributions at every step, which precomputed log-probs cannot give: expected False, got True"
            )


class FusedDPOTrainer(SeedLossesMixin, DPOTrainer):
    """`trl.DPOTrainer` whose losses and metrics come from `fpo_ops.preference_loss`.

    Neither the policy nor the reference ever builds ``[tokens, vocab]`` logits: both models run their
    backbone only, and the LM-head statistics (log-probs, token KL, entropy, mean logit, top-1) are
    streamed over the vocabulary. Takes the same arguments as `trl.DPOTrainer`; ``args`` should be a
    `FusedDPOConfig` (a plain `DPOConfig` works for TRL's own loss types).

    Precision: both backbones run under the trainer's autocast (``bf16``/``fp16``), and so do the
    fused head statistics (bf16/fp16 GEMM operands, fp32 accumulation and statistics), also for
    precomputed reference log-probs; ``cast_lm_head_to_fp32`` keeps the head of both models in fp32.
    Mixture-of-Experts models add the router load-balancing loss times ``router_aux_loss_coef``
    (logged as ``aux_loss``), computed by the policy's forward as in TRL (with SPO's on-policy
    regulariser the samples' rows are part of that forward, and so of the load-balancing loss).

    ``spo`` regularises on completions sampled from the policy and ``sppo`` / ``sppo_single`` read
    SPPO's win-rate columns (see `fpo_ops.integrations.trl.seed`).
    """

    _tag_names = ["trl", "dpo", "fpo-ops"]

    def __init__(self, model, ref_model=None, args: Optional[DPOConfig] = None, *rest, **kwargs):
        if args is not None and not isinstance(args, FusedDPOConfig):
            for name in args.loss_type:
                if name not in TRAINER_LOSS_TYPES:
                    raise ValueError(f"loss_type: expected names among {list(TRAINER_LOSS_TYPES)}, got {name!r}")
        # A policy given by name is loaded through the same function, so it is left alone.
        reference_free = (args is not None and ref_model is None and not isinstance(model, str)
                          and not needs_reference(args.loss_type))
        with _reference_not_loaded() if reference_free else contextlib.nullcontext():
            super().__init__(model, ref_model, args, *rest, **kwargs)
        self._loss_kwargs = self._preference_kwargs(self.args)
        self._needs_reference = needs_reference(self.loss_types)
        if not self._needs_reference:
            # Reference-free losses (SimPO, CPO, ORPO, SFT) never run it: free its memory.
            self.ref_model = None
        add_head_outputs(self.model)
        if self.ref_model is not None:
            add_head_outputs(self.accelerator.unwrap_model(self.ref_model))
        self._setup_seed_losses()

    @staticmethod
    def _preference_kwargs(args: DPOConfig) -> Dict[str, Any]:
        # Every registry hyper-parameter the config has (a plain DPOConfig lacks the extra ones),
        # checked together with the loss types once, at __init__.
        options = {p.name: getattr(args, p.name) for p in HYPER_PARAMETERS if hasattr(args, p.name)}
        config = LossConfig(loss_type=list(args.loss_type), loss_weights=args.loss_weights, **options)
        return dict(config=config, impl=getattr(args, "fused_impl", "auto"))

    # ----------------------------------------------------------------------------------------------
    # Model calls
    # ----------------------------------------------------------------------------------------------
    def _model_kwargs(self, inputs: Dict[str, Any], router_logits: bool = False) -> Dict[str, Any]:
        return head_model_kwargs(inputs, _NON_MODEL_KEYS, router_logits)

    @property
    def _fp32_head(self) -> bool:
        # A property: the reference log-probs are precomputed inside DPOTrainer.__init__.
        return bool(getattr(self.args, "cast_lm_head_to_fp32", False))

    def _head_hidden(self, parts: HeadInputs, length: int) -> torch.Tensor:
        return head_hidden(parts, length, self._fp32_head)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch through the fused head ([B] chosen, [B] rejected)."""
        model_kwargs = self._model_kwargs(inputs)
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            reference_adapter(self),
            self.accelerator.autocast(),
        ):
            add_head_outputs(self.accelerator.unwrap_model(model))
            parts = model(**model_kwargs)
            hidden = self._head_hidden(parts, inputs["input_ids"].shape[1])

            def logp(heads):
                weight, bias = heads
                return (token_stats(
                    hidden, weight, labels, bias=bias, softcap=parts.softcap, logit_scale=parts.logit_scale,
                    impl=getattr(self.args, "fused_impl", "auto"),
                ).logp,)

            # The precision rule of the policy's head in training, not just the ambient autocast.
            with head_precision(parts, self._fp32_head):
                (per_token,) = apply_gathered_heads(logp, [parts.weight, parts.bias])
        weights = ld_token_weights(labels != -100, self.ld_alpha, per_token.dtype)
        return (per_token * weights).sum(dim=1).chunk(2, dim=0)

    # ----------------------------------------------------------------------------------------------
    # Loss and metrics
    # ----------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = trainer_mode(self)
        model_kwargs = self._model_kwargs(inputs)
        input_length = inputs["input_ids"].shape[1]
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        samples = self._spo_step_samples(model, inputs)
        # SPO's sample rows join the batch's forwards
        forward_kwargs = model_kwargs if samples is None else self._spo_joint_kwargs(model_kwargs, samples)
        forward_length = forward_kwargs["input_ids"].shape[1]

        policy = model(**head_model_kwargs(forward_kwargs, router_logits=self.aux_loss_enabled))
        hidden = self._head_hidden(policy, forward_length)
        reference: Optional[HeadInputs] = None
        ref_logps: Dict[str, torch.Tensor] = {}
        if self.precompute_ref_logps:
            ref_logps = dict(ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"])
        elif self._needs_reference:
            reference = reference_forward(self, forward_kwargs)

        ref_hidden = None if reference is None else head_hidden(reference, forward_length)
        ref_logps.update(self._seed_loss_inputs(inputs, hidden.device))
        if samples is not None:
            hidden, ref_hidden, sample_inputs = self._split_spo_rows(samples, hidden, ref_hidden, labels.shape[0],
                                                                     input_length)
            ref_logps.update(sample_inputs)
        with head_precision(policy, self._fp32_head):
            output = self._fused_preference_loss(policy, hidden, labels, reference, ref_hidden, ref_logps)
        loss = output.loss
        if self.aux_loss_enabled:
            if policy.aux_loss is None:
                raise ValueError(
                    f"router_aux_loss_coef: expected the MoE forward of {type(self.accelerator.unwrap_model(model)).__name__} "
                    f"to return its load-balancing loss (it takes no logits_to_keep or ignores output_router_logits); "
                    f"set router_aux_loss_coef=0.0, got {self.router_aux_loss_coef}"
                )
            # TRL's MoE term: the policy forward's router load-balancing loss, weighted and logged as in TRL.
            loss = loss + self.router_aux_loss_coef * policy.aux_loss
            log_metric(self, mode, "aux_loss", policy.aux_loss)
        self._log_metrics(mode, inputs, output, labels)

        if return_outputs:
            # Deprecated in TRL as well: logits for `compute_metrics` need an extra, unfused forward.
            with torch.no_grad():
                plain_kwargs = {k: v for k, v in model_kwargs.items() if k != HEAD_INPUTS_KWARG}
                outputs = model(**plain_kwargs)
            return loss, outputs
        return loss

    def _fused_preference_loss(
        self, policy: HeadInputs, hidden: torch.Tensor, labels: torch.Tensor,
        reference: Optional[HeadInputs], ref_hidden: Optional[torch.Tensor], ref_logps: Dict[str, torch.Tensor],
    ) -> PreferenceOutput:
        kwargs = dict(self._loss_kwargs, softcap=policy.softcap, logit_scale=policy.logit_scale, **ref_logps)
        if reference is not None:
            kwargs.update(ref_softcap=reference.softcap, ref_logit_scale=reference.logit_scale)
        heads = [policy.weight, policy.bias] + ([reference.weight, reference.bias] if reference else [None, None])
        if not any(is_zero3_param(t) for t in heads):
            return preference_loss(
                hidden, policy.weight, labels, ref_hidden, None if reference is None else reference.weight,
                bias=policy.bias, ref_bias=None if reference is None else reference.bias, **kwargs,
            )
        return _zero3_preference_loss(heads, hidden, labels, ref_hidden, kwargs)

    def _log_metrics(self, mode: str, inputs: Dict[str, Any], output: PreferenceOutput, labels: torch.Tensor) -> None:
        """TRL's metrics of the step: per-token means weighted by every process's token count, the rest
        (per-pair means; each process holds the same number of pairs) averaged over processes."""
        tokens = (labels != -100).sum(dim=1)
        chosen, rejected = tokens.chunk(2, dim=0)
        counts = {"all": tokens.sum(), "chosen": chosen.sum(), "rejected": rejected.sum()}
        per_token = {n: v for n, v in output.metrics.items() if n in _TOKEN_METRIC_ROWS}
        for name, value in per_token.items():
            log_token_mean(self, mode, name, value, counts[_TOKEN_METRIC_ROWS[name]])
        log_metrics(self, mode, {n: v for n, v in output.metrics.items() if n not in per_token})
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _zero3_preference_loss(heads, hidden, labels, ref_hidden, kwargs) -> PreferenceOutput:
    """`preference_loss` with ZeRO-3 partitioned heads gathered for forward and recompute."""
    names: Tuple[str, ...] = ()
    # Tensor keywords (SPO's samples, per-pair columns) go through the gathered call as its inputs:
    # a tensor captured by ``run`` would get no gradient from the recompute in backward.
    tensor_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    options = {k: v for k, v in kwargs.items() if k not in tensor_names}

    def run(full, h, y, rh, *tensor_values):
        nonlocal names
        out = preference_loss(h, full[0], y, rh, full[2], bias=full[1], ref_bias=full[3], **options,
                              **dict(zip(tensor_names, tensor_values)))
        names = tuple(out.metrics)
        return (out.loss, out.chosen_logps, out.rejected_logps, out.chosen_rewards, out.rejected_rewards,
                out.per_sequence_loss, *(out.metrics[n] for n in names))

    values = apply_gathered_heads(run, heads, hidden, labels, ref_hidden, *(kwargs[k] for k in tensor_names))
    loss, chosen, rejected, chosen_rewards, rejected_rewards, per_sequence = values[:6]
    return PreferenceOutput(
        loss=loss, metrics=dict(zip(names, values[6:])), chosen_logps=chosen, rejected_logps=rejected,
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, per_sequence_loss=per_sequence,
    )
