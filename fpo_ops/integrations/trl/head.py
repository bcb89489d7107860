"""The fused LM head that every fpo-ops TRL drop-in shares.

TRL 1.16's trainers (SFT, KTO, GRPO, RLOO, ...) patch their models at ``__init__`` with
``trl.trainer.utils.add_fused_lm_head``: afterwards ``model(..., labels=labels, fused_lm_head=True)``
returns a ``FusedCausalLMOutput`` (per-token log-probs, entropy, ``log sum p^2``, mean logit,
top-1, the label mask, the NLL and the MoE load-balancing loss) computed in chunks of ``[4096 x
32768]`` fp32 logits with fp32 ``[V, H]`` gradient accumulators. `add_fused_head` gives the same
output with the same contract from `fpo_ops.token_stats`, which holds one tile of logits at a time
and no fp32 ``[V, H]`` scratch; `fused_head_in` makes a TRL trainer module install it instead of its
own, so every loss, option, metric and data path of the trainer stays TRL's.

Precision (the rule of every integration): the patched forward runs under the autocast the
trainer puts around the model's forward (``bf16``/``fp16``), so the head GEMMs take the autocast
dtype with fp32 accumulation and fp32 statistics; ``cast_lm_head_to_fp32`` runs the head in fp32.
"""
import contextlib
import functools
import inspect
import itertools
import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from ...token_stats import token_stats
from ..hf import (
    HeadInputs, find_backbone, head_inputs_of_call, head_scaling, hidden_and_head, is_peft_model, lm_head_tensors,
    unwrap_peft,
)
from ..deferred import defer_forward, deferred_head_of
from .common import apply_gathered_heads, reference_adapter

# TRL's output field -> token_stats statistic.
_TRL_OUTPUTS = {
    "log_probs": "logp", "entropy": "entropy", "log_sum_sq_probs": "log_sum_p2",
    "mean_logits": "mean_logit", "is_top1": "top1_correct",
}
IMPLS = ("auto", "triton", "torch", "reference")
# Distinct attribute names for the forward each `add_fused_head` call replaces.
_PATCH_IDS = itertools.count()


def validate_impl(impl: Any, name: str = "fused_impl") -> None:
    """Raise a ValueError naming ``name`` unless ``impl`` is a `token_stats` implementation."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: expected one of {list(IMPLS)}, got {impl!r}")


def _load_balancing_loss(model: nn.Module, router_logits: Any, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    # The Mixtral loss, which every MoE family of transformers shares through its modular code; the
    # expert counts live on the text config (older releases: on the model).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = unwrap_peft(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    if num_experts is None:
        num_experts = getattr(model, "num_experts")
    top_k = getattr(text, "num_experts_per_tok", None) or getattr(model, "num_experts_per_tok")
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def fused_head_stats(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, outputs: Sequence[str], *,
    temperature: float = 1.0, cast_lm_head_to_fp32: bool = False, impl: str = "auto",
    reference: Optional[HeadInputs] = None,
) -> Tuple[Optional[torch.Tensor], ...]:
    """TRL's per-token head outputs of ``model`` at ``hidden`` from one `token_stats` call.

    Args:
        model: the causal LM owning the head (possibly PEFT-wrapped; a DTensor head is gathered,
            a ZeRO-3 partitioned one is gathered for forward and for backward).
        hidden: [B, T, H] final hidden states aligned with ``labels``.
        labels: [B, T] next-token ids, -100 where ignored.
        outputs: TRL field names among ``log_probs``, ``entropy``, ``log_sum_sq_probs``,
            ``mean_logits``, ``is_top1``; ``log_probs`` is always computed.
        temperature: divides the (scaled, capped) logits.
        cast_lm_head_to_fp32: compute the head in fp32 outside autocast.
        impl: `token_stats` implementation.
        reference: a frozen reference's `HeadInputs` with ``hidden`` [B, T, H'] aligned like
            ``hidden``: adds the exact per-token KL(policy ‖ reference) over the vocabulary, both
            distributions at ``temperature``, from the same pass.

    Returns:
        (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, kl), each [B, T] (fp32;
        ``is_top1`` bool) and 0 where ignored, None for the fields not requested (``kl`` without a
        reference). ``log_probs``, ``entropy`` and ``kl`` carry gradients; the others are metrics.
    """
    unknown = [name for name in outputs if name not in _TRL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs: expected names among {list(_TRL_OUTPUTS)}, got {unknown}")
    wanted = ("log_probs",) + tuple(name for name in _TRL_OUTPUTS if name in outputs and name != "log_probs")
    weight, bias = lm_head_tensors(model)
    scaling = head_scaling(unwrap_peft(model).config)
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    precision = contextlib.nullcontext()
    if cast_lm_head_to_fp32:
        hidden = hidden.float()
        precision = torch.autocast(hidden.device.type, enabled=False)

    names = tuple(_TRL_OUTPUTS[name] for name in wanted) + (("reverse_kl",) if reference is not None else ())
    heads = [weight, bias]
    if reference is not None:
        heads += [reference.weight, reference.bias]
        ref_hidden = reference.hidden.detach().to(weight.device)
        ref_hidden = ref_hidden.float() if cast_lm_head_to_fp32 else ref_hidden

    def run(full, h, y, rh):
        w, b = full[:2]
        ref = {}
        if reference is not None:
            ref_w, ref_b = full[2:]
            ref = dict(ref_weight=ref_w.detach(), ref_bias=None if ref_b is None else ref_b.detach(),
                       ref_softcap=reference.softcap, ref_logit_scale=reference.logit_scale)
        stats = token_stats(
            h, w, y, rh, bias=b, temperature=temperature, softcap=scaling.softcap, logit_scale=scaling.logit_scale,
            outputs=names, impl=impl, check_labels=False, **ref,
        )
        return tuple(getattr(stats, name) for name in names)

    with precision:
        values = apply_gathered_heads(run, heads, hidden, labels, None if reference is None else ref_hidden)
    by_name = dict(zip(wanted, values))
    if "is_top1" in by_name:
        by_name["is_top1"] = by_name["is_top1"] > 0.5
    kl = values[-1] if reference is not None else None
    return tuple(by_name.get(name) for name in _TRL_OUTPUTS) + (kl,)


def add_fused_head(
    model: nn.Module, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
    outputs: Tuple[str, ...] = ("log_probs",), impl: str = "auto",
) -> None:
    """``trl.trainer.utils.add_fused_lm_head`` with the head computed by `fpo_ops.token_stats`.

    ``model(..., labels=labels, fused_lm_head=True)`` then runs the backbone and returns TRL's
    ``FusedCausalLMOutput``: per-token fields shaped ``[B, T-1]`` (``[B, T]`` with pre-shifted
    ``shift_labels``, as TRL passes them under context or sequence parallelism), zero where the label
    is -100; ``loss`` the NLL summed over valid tokens divided by ``num_items_in_batch`` (their count
    when not given, at least 1), plus ``router_aux_loss_coef`` times the MoE load-balancing loss when
    the config asks for router logits. Without ``fused_lm_head`` the forward is the original one.

    Args:
        model: a transformers causal LM (not PEFT-wrapped: patch it before, as TRL does).
        temperature: divides the logits.
        cast_lm_head_to_fp32: run the head in fp32, outside autocast.
        outputs: the TRL fields to compute (see `fused_head_stats`).
        impl: `token_stats` implementation.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    validate_impl(impl, "impl")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    # The forward being replaced lives on the model, not in the closure: a deep copy of the model (TRL's
    # reference is a copy of the patched policy) then calls its own, rebound to the copy. Each patch has
    # its own slot, so patching a patched model (or its copy) again wraps the earlier patch.
    slot = f"_fpo_trl_original_forward_{next(_PATCH_IDS)}"
    setattr(model, slot, model.forward)
    config = unwrap_peft(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    # The wrapped signature is kept: `generate` validates its keyword arguments against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        original_forward = getattr(self, slot)
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            # Label smoothing on the fused head (`fused_label_smoothing`): the head inputs, not logits.
            deferred = deferred_head_of(self)
            if deferred is not None and labels is None:
                return defer_forward(self, original_forward, args, kwargs, deferred)
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up per call: FSDP and PEFT replace modules after the patch.
        backbone_out = find_backbone(self)(*args, **kwargs)
        hidden = backbone_out.last_hidden_state if hasattr(backbone_out, "last_hidden_state") else backbone_out[0]
        # A trainer that wants the exact KL to its reference (`exact_kl_of`) asks through this attribute.
        request = getattr(self, "_fpo_exact_kl", None)
        reference = None
        if request is not None:
            # A prompt-learning adapter rewrote the inputs (virtual tokens, a prefix cache): its reference runs
            # on the PEFT model's own inputs and gives no hidden states at the virtual tokens' positions
            # (labelled -100), which are zero-filled in front.
            ref_args, ref_kwargs = request.inputs if request.inputs is not None else (args, kwargs)
            reference = request.reference(*ref_args, **ref_kwargs)
            missing = hidden.size(1) - reference.hidden.size(1)
            if missing > 0:
                reference.hidden = torch.nn.functional.pad(reference.hidden, (0, 0, missing, 0))
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
            if reference is not None:
                reference.hidden = reference.hidden[:, :-1]
        else:
            labels = shift_labels
        log_probs, entropy, log_sum_sq, mean_logits, is_top1, kl = fused_head_stats(
            self, hidden, labels, outputs, temperature=temperature,
            cast_lm_head_to_fp32=cast_lm_head_to_fp32, impl=impl, reference=reference,
        )
        if request is not None:
            request.kl = kl
            request.kls.append(kl)
        mask = labels.to(log_probs.device) != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, backbone_out.router_logits, kwargs.get("attention_mask"))
            loss = loss + getattr(text, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
            mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss,
        )

    model.forward = types.MethodType(forward, model)


class ExactKLRequest:
    """What a trainer hands the fused head to get the exact KL(policy ‖ reference) of one forward.

    Attributes:
        reference: called with the forward's arguments, returns the reference's `HeadInputs`
            (hidden [B, T, H'], no graph) for the same inputs.
        inputs: (args, kwargs) of the PEFT model's forward when a prompt-learning adapter rewrites them
            before the head's forward (set by `exact_kl_of`); the reference is called with these.
        kl: set by the forward: [B, T-1] per-token KL (0 where ignored), differentiable in the policy.
        kls: every forward's ``kl`` in call order (a trainer that runs its batch in chunks concatenates them).
    """

    def __init__(self, reference):
        self.reference = reference
        self.inputs: Optional[Tuple[tuple, dict]] = None
        self.kl: Optional[torch.Tensor] = None
        self.kls: list = []


def check_kl_estimator(kl_estimator: Any, beta: float, choices: Sequence[str]) -> None:
    """Raise a ValueError naming the option unless ``kl_estimator`` is one of ``choices`` and an
    ``"exact"`` estimator has a weight ``beta != 0``."""
    if kl_estimator not in choices:
        raise ValueError(f"kl_estimator: expected one of {list(choices)}, got {kl_estimator!r}")
    if kl_estimator == "exact" and beta == 0.0:
        raise ValueError("beta: kl_estimator='exact' is a penalty weighted by beta: expected beta != 0, got 0.0")


def reference_head(trainer: Any, *args: Any, **kwargs: Any) -> HeadInputs:
    """The reference's hidden states and head of a TRL RL trainer for a policy forward's inputs (no graph).

    The reference is TRL's: ``trainer.ref_model``, else for a PEFT policy the frozen copy ``"ref"``
    TRL makes of a pretrained adapter, else the policy with its adapters disabled.
    """
    with torch.no_grad():
        if trainer.ref_model is not None:
            # Through the reference's own call, not its backbone alone: its FSDP2 root unshards the embedding.
            return head_inputs_of_call(trainer.accelerator.unwrap_model(trainer.ref_model), *args, **kwargs)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if not is_peft_model(unwrapped):
            raise ValueError("kl_estimator: 'exact' needs a reference model or a PEFT policy, got neither")
        with reference_adapter(trainer):
            return hidden_and_head(unwrapped, *args, **kwargs)


def _is_prompt_learning(model: nn.Module) -> bool:
    """True for a PEFT model whose active adapter is prompt learning (prompt, prefix or p-tuning)."""
    return is_peft_model(model) and model.active_peft_config.is_prompt_learning


def check_exact_kl_reference(trainer: Any) -> None:
    """Raise a ValueError naming ``kl_estimator`` where the exact KL cannot reach the trainer's reference.

    A pretrained prompt-learning PEFT adapter (prompt, prefix or p-tuning) whose reference is TRL's frozen
    copy "ref": the reference's hidden states come from the base model's backbone on the PEFT model's
    inputs, which is the reference of a fresh adapter (disabled) but not the copy's virtual tokens.
    TRL's own estimators run the reference forward apart and are unaffected.
    """
    if getattr(trainer.args, "kl_estimator", None) != "exact" or getattr(trainer, "ref_model", None) is not None:
        return
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if _is_prompt_learning(unwrapped) and "ref" in unwrapped.peft_config:
        raise ValueError(
            "kl_estimator: 'exact' with a pretrained prompt-learning PEFT adapter "
            f"({unwrapped.active_peft_config.peft_type}) would need its frozen copy 'ref' as the reference: "
            "expected a fresh adapter (peft_config), a LoRA-style adapter or a ref_model; use TRL's estimator "
            "(the default) with it"
        )


@contextlib.contextmanager
def exact_kl_of(model: nn.Module, request: ExactKLRequest) -> Iterator[ExactKLRequest]:
    """Within it, every ``fused_lm_head=True`` forward of ``model`` (patched by `add_fused_head`) also
    computes the exact KL to the reference of ``request`` and stores it in ``request.kl``.

    For a prompt-learning PEFT ``model`` the arguments of each of its forwards are kept in
    ``request.inputs``: the head's forward sees them only as the adapter rewrote them.
    """
    target = unwrap_peft(model)
    target._fpo_exact_kl = request
    hook = None
    if _is_prompt_learning(model):
        def keep_inputs(module, args, kwargs):
            request.inputs = (args, kwargs)

        hook = model.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        yield request
    finally:
        target._fpo_exact_kl = None
        if hook is not None:
            hook.remove()


@contextlib.contextmanager
def fused_head_in(trainer_module: types.ModuleType, impl: str = "auto") -> Iterator[None]:
    """Within it, a TRL trainer module's ``add_fused_lm_head`` installs `add_fused_head` instead.

    TRL's trainers patch their models only in ``__init__``; run ``__init__`` inside this.

    Args:
        trainer_module: e.g. ``trl.trainer.sft_trainer``, which imported ``add_fused_lm_head``.
        impl: `token_stats` implementation for every head the trainer patches.
    """
    original = trainer_module.add_fused_lm_head
    trainer_module.add_fused_lm_head = functools.partial(add_fused_head, impl=impl)
    try:
        yield
    finally:
        trainer_module.add_fused_lm_head = original


@dataclass
class FusedHeadArguments:
    """The option every fused trainer config adds to its TRL config (a dataclass mixin).

    Parameters:
        fused_impl (`str`, defaults to `"auto"`): `fpo_ops.token_stats` implementation: ``"auto"``
            (Triton on CUDA, streaming PyTorch elsewhere), ``"triton"``, ``"torch"`` or ``"reference"``.
    """

    fused_impl: str = field(
        default="auto",
        metadata={"help": "fpo_ops.token_stats implementation: 'auto', 'triton', 'torch' or 'reference'."},
    )

    def __post_init__(self):
        super().__post_init__()
        validate_impl(self.fused_impl)


class FusedHeadTrainer:
    """Mixin before a TRL trainer class: its ``__init__`` installs `add_fused_head` on every model.

    Subclasses set ``trl_module`` to the TRL module that imported ``add_fused_lm_head``. The
    implementation is ``args.fused_impl`` (``"auto"`` for a plain TRL config). A config asking for the
    exact KL is checked against the trainer's reference (`check_exact_kl_reference`).
    """

    trl_module: types.ModuleType

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        config = bound.arguments.get("args")
        with fused_head_in(self.trl_module, getattr(config, "fused_impl", "auto")):
            super().__init__(*args, **kwargs)
        check_exact_kl_reference(self)
