"""Final hidden states and LM head of a Hugging Face causal LM, without computing its logits.

A causal LM computes ``logits = cap(scale * lm_head(backbone(x)))``; the fused ops want the parts:
the backbone's last hidden state, the head's weight and bias, and the softcap and scale the family
applies. This module finds them for any ``transformers`` causal LM, through PEFT wrappers, with tied
embeddings, FSDP2 (DTensor parameters), a tensor-parallel head (a vocabulary-sharded DTensor, passed
through) and DeepSpeed ZeRO-3 (partitioned parameters).
"""
import contextlib
import inspect
import itertools
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.utils._pytree
from torch import nn

# Keyword a patched forward (`add_head_outputs`) answers to instead of computing logits.
HEAD_INPUTS_KWARG = "return_head_inputs"
# Keywords of a causal LM's forward that only make sense with logits; the backbone rejects them.
_HEAD_ONLY_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head")


@dataclass(frozen=True)
class HeadScaling:
    """How a model family transforms ``hidden @ W^T + b`` into logits: ``cap(logit_scale * x)``.

    ``softcap`` is None when the family does not cap.
    """

    softcap: Optional[float] = None
    logit_scale: float = 1.0


@dataclass
class HeadInputs:
    """What the fused ops need from one model.

    Attributes:
        hidden: [B, T, H] final hidden states (after the final norm), one per input position.
        weight: [V, H] LM-head weight: a full tensor (FSDP2's DTensors are gathered), or the
            vocabulary-sharded DTensor of a tensor-parallel head (see `lm_head_tensors`).
        bias: [V] LM-head bias or None.
        softcap: logit softcap of the family or None.
        logit_scale: multiplier of the logits before the cap.
        autocast_dtype: the autocast dtype the backbone ran under (bf16/fp16 mixed precision), None
            without autocast; `head_precision` runs the head statistics under the same one.
        aux_loss: [] Mixture-of-Experts router load-balancing loss of the forward (the model's own,
            from its router logits) when it was asked for ``output_router_logits``, else None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    logit_scale: float
    autocast_dtype: Optional[torch.dtype] = None
    aux_loss: Optional[torch.Tensor] = None


# A pytree node, so that DDP (which flattens a forward's outputs to route gradients) sees the tensors.
torch.utils._pytree.register_dataclass(HeadInputs)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast(device_type: str, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype``, or autocast off for None."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def head_scaling(config: Any) -> HeadScaling:
    """Logit softcap and scale of a model family, read from its config.

    Names read: ``final_logit_softcapping`` (Gemma-2/3, PaliGemma, nanochat), ``logit_scale`` (Cohere:
    logits multiplied), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1: multiplied),
    ``logits_scaling`` (Granite, MiniCPM3: logits divided by it; HyperCLOVA X: multiplied).

    Args:
        config: a ``transformers`` config (a multimodal config is read through its text config).

    Returns:
        HeadScaling(softcap, logit_scale).
    """
    text = _text_config(config)
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        divisor = text.logits_scaling
        scale = divisor if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / divisor
    return HeadScaling(
        softcap=None if softcap is None else float(softcap),
        logit_scale=1.0 if scale is None else float(scale),
    )


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (checked without importing peft when it was never imported)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (adapters stay injected), else ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


def find_backbone(model: nn.Module) -> nn.Module:
    """The module of a causal LM that returns the final hidden states (``last_hidden_state``).

    Looked up the way transformers families expose it: the ``base_model_prefix`` attribute (``model``
    for Llama, ``transformer`` for GPT-2, the multimodal backbone for vision-language models), else
    ``get_decoder()``, else ``.model``.

    Args:
        model: a causal LM (``...ForCausalLM``), possibly wrapped by PEFT.

    Returns:
        The backbone module.
    """
    model = unwrap_peft(model)
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if isinstance(backbone, nn.Module) and backbone is not model:
        return backbone
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    backbone = getattr(model, "model", None)
    if isinstance(backbone, nn.Module):
        return backbone
    raise TypeError(
        f"model: expected a causal LM exposing its backbone through base_model_prefix, get_decoder() or "
        f".model, got {type(model).__name__} with none of them"
    )


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # FSDP2 shards parameters as DTensors; the ops need the whole head. `full_tensor` is differentiable,
    # so the gradient flows back to the shards.
    if t is not None and hasattr(t, "full_tensor") and callable(t.full_tensor):
        return t.full_tensor()
    return t


def _managed_by_fsdp(model: nn.Module, param: torch.Tensor) -> bool:
    """True when FSDP2 manages ``param``: ``fully_shard`` was applied to a module holding it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(module, FSDPModule) and any(p is param for p in module.parameters())
               for module in model.modules())


def _tensor_parallel_head(model: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """True for a head split on the vocabulary by tensor parallelism (PyTorch's ``ColwiseParallel``).

    That is a DTensor weight placed ``Shard(0)`` on a 1-D device mesh (bias None or placed alike) that
    FSDP2 does not manage. FSDP2's own parameters look the same (``Shard(0)`` on its 1-D mesh) but
    split the parameter for data parallelism, and are gathered: they are told apart by ownership, a
    module holding the parameter having been passed to ``fully_shard``.
    """
    from ..distributed.tensor_parallel import has_dtensor, is_vocab_sharded

    if not has_dtensor(weight) or not is_vocab_sharded(weight):
        return False
    if bias is not None and not (has_dtensor(bias) and bias.device_mesh == weight.device_mesh
                                 and tuple(bias.placements) == tuple(weight.placements)):
        return False
    return not _managed_by_fsdp(model, weight)


def lm_head_tensors(model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of the LM head, from ``get_output_embeddings()``.

    With tied embeddings this is the input embedding matrix itself. A head split on the vocabulary
    by tensor parallelism (a ``Shard(0)`` DTensor of ``ColwiseParallel``, not managed by FSDP2) is
    returned as it is: `fpo_ops.token_stats` runs vocabulary-parallel on it. Any other DTensor (FSDP2,
    or a head sharded another way) is gathered with ``full_tensor()``. Under DeepSpeed ZeRO-3 the
    parameters come back partitioned: read them inside `gathered_params` or pass them to `apply_gathered`.

    Args:
        model: a causal LM, possibly wrapped by PEFT.

    Returns:
        (weight [V, H], bias [V] or None).
    """
    head = unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"model: expected a causal LM with an output embedding, got {type(model).__name__} without one")
    # A PEFT tuner layer on the head keeps the original Linear as `base_layer`; its adapter would be
    # ignored by reading the weight directly, so refuse rather than train it silently wrong.
    if hasattr(head, "base_layer"):
        raise ValueError(
            "model: expected an LM head without a PEFT adapter (the fused head reads the weight directly), "
            f"got {type(head).__name__}; remove the head from the adapter's target_modules"
        )
    weight, bias = head.weight, getattr(head, "bias", None)
    if _tensor_parallel_head(model, weight, bias):
        return weight, bias
    return _full(weight), _full(bias)


def is_zero3_param(t: Optional[torch.Tensor]) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_id``)."""
    return t is not None and hasattr(t, "ds_id")


# Negative ids mark this module's holds in a parameter's ``ds_active_sub_modules`` (DeepSpeed's own
# module ids are non-negative): one per `gathered_params` block, so that nested holds stay apart.
_HOLD_IDS = itertools.count(-1, -1)


@contextlib.contextmanager
def gathered_params(*params: Optional[torch.Tensor]) -> Iterator[None]:
    """Gather DeepSpeed ZeRO-3 partitioned parameters for the duration of the block.

    The gather cooperates with DeepSpeed's own fetching: a parameter DeepSpeed already holds (fetched
    for a module that is still running, registered as an external parameter of one, tied to another
    module's weight, or persistent) is used as it is and left to DeepSpeed to release. Only the
    parameters this block fetched are partitioned again at its end, and only when no DeepSpeed module
    still uses them. For the duration of the block each parameter carries a hold in its
    ``ds_active_sub_modules``, so that DeepSpeed's modules (e.g. a tied embedding whose backward ends
    meanwhile) do not free it under the block either.

    Parameters that are not ZeRO-3 parameters (and None) are left alone; with none to gather this is
    a no-op and deepspeed is not imported. Every rank must enter the block with the same parameters
    (the fetch is a collective), as for ``deepspeed.zero.GatheredParameters``.

    Args:
        params: tensors, some of which may be ZeRO-3 parameters.
    """
    unique = list({id(p): p for p in params if is_zero3_param(p)}.values())
    if not unique:
        yield
        return
    try:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    except ImportError as err:  # pragma: no cover - only reachable with ds_id set by deepspeed itself
        raise ImportError("ZeRO-3 partitioned LM head found but deepspeed cannot be imported") from err
    in_flight = [p.ds_id for p in unique if p.ds_status == ZeroParamStatus.INFLIGHT]
    if in_flight:
        raise RuntimeError(
            f"ZeRO-3 parameters {in_flight} of the LM head are being prefetched by DeepSpeed for a module: "
            "expected them available or partitioned when the fused head reads them"
        )
    # sorted by ds_id: every rank issues the same collective in the same order
    fetched = sorted((p for p in unique if p.ds_status == ZeroParamStatus.NOT_AVAILABLE), key=lambda p: p.ds_id)
    hold = next(_HOLD_IDS)
    for p in unique:
        p.ds_active_sub_modules.add(hold)
    try:
        if fetched:
            fetched[0].all_gather(param_list=fetched)
        yield
    finally:
        for p in unique:
            p.ds_active_sub_modules.discard(hold)
        idle = [p for p in fetched if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules]
        if idle:
            idle[0].partition(param_list=idle, has_been_updated=False)


class _GatheredCall(torch.autograd.Function):
    """Runs ``fn`` with ZeRO-3 parameters gathered in forward, and again in backward to recompute.

    Partitioned parameters are emptied when the gather ends, so nothing computed from them may be
    kept for backward: forward runs without a graph and backward re-gathers, rebuilds it and
    differentiates it. ``apply`` itself must run inside the gather, so that autograd records the
    parameters' full shapes (it checks the returned gradients against them), and the backward gather
    lasts until the parameters' gradients are accumulated, which happens after ``backward`` returns.
    The recompute runs under the autocast of the forward (backward runs outside it).
    """

    @staticmethod
    def forward(ctx, fn, num_params, *tensors):
        ctx.fn, ctx.num_params = fn, num_params
        ctx.device_type = next(t.device.type for t in tensors if t is not None)
        ctx.autocast_dtype = _autocast_dtype(ctx.device_type)
        ctx.save_for_backward(*tensors[num_params:])
        ctx.params = tensors[:num_params]
        with torch.no_grad():
            outputs = tuple(fn(*tensors))
        # Gradient-free outputs (metrics) must not ask for a gradient.
        ctx.float_outputs = tuple(o.is_floating_point() for o in outputs)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        params, others = ctx.params, ctx.saved_tensors
        gather = gathered_params(*params)
        gather.__enter__()
        try:
            with torch.enable_grad(), _autocast(ctx.device_type, ctx.autocast_dtype):
                leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad)
                          for t in (*params, *others)]
                outputs = ctx.fn(*leaves)
                pairs = [
                    (o, g) for o, g, is_float in zip(outputs, grad_outputs, ctx.float_outputs)
                    if is_float and g is not None and o.requires_grad
                ]
                wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
                grads = list(torch.autograd.grad(
                    [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                )) if pairs and wanted else [None] * len(wanted)
        except BaseException:
            gather.__exit__(None, None, None)
            raise
        grads = iter(grads)
        result = [next(grads) if leaf is not None and leaf.requires_grad else None for leaf in leaves]
        accumulating = [
            p for p, g in zip(params, result) if is_zero3_param(p) and g is not None and p.requires_grad
        ]
        _release_after_accumulation(accumulating, gather)
        return (None, None, *result)


def _release_after_accumulation(params: Sequence[torch.Tensor], gather: contextlib.AbstractContextManager) -> None:
    """Ends ``gather`` once every parameter in ``params`` has accumulated its gradient."""
    if not params:
        gather.__exit__(None, None, None)
        return
    remaining = {id(p) for p in params}
    handles = []

    def on_accumulated(param: torch.Tensor) -> None:
        remaining.discard(id(param))
        if not remaining:
            for handle in handles:
                handle.remove()
            gather.__exit__(None, None, None)

    for p in {id(p): p for p in params}.values():
        handles.append(p.register_post_accumulate_grad_hook(on_accumulated))


def apply_gathered(
    fn: Callable[..., Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    *tensors: torch.Tensor,
) -> Tuple[torch.Tensor, ...]:
    """``fn(*params, *tensors)`` with ZeRO-3 ``params`` gathered for forward and for backward.

    Without ZeRO-3 parameters this is a plain call. Otherwise ``fn`` runs twice (forward, and once
    more inside backward, the price of never holding the gathered head between the two).

    Args:
        fn: function of tensors returning a sequence of tensors.
        params: tensors that may be ZeRO-3 parameters (e.g. the LM-head weight and bias); None not allowed.
        tensors: the other inputs (e.g. hidden states, labels; None allowed).

    Returns:
        The outputs of ``fn`` as a tuple; gradients flow to every input that requires one.
    """
    if not any(is_zero3_param(p) for p in params):
        return tuple(fn(*params, *tensors))
    with gathered_params(*params):
        return _GatheredCall.apply(fn, len(params), *params, *tensors)


def is_fsdp2_managed(model: nn.Module) -> bool:
    """True when FSDP2 (``fully_shard``) manages a module of ``model``: inside its forward the
    parameters are unsharded tensors whose storage FSDP2 frees when it reshards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _kept_unsharded(t: Optional[torch.Tensor], model: nn.Module) -> Optional[torch.Tensor]:
    """A frozen head tensor read inside an FSDP2 forward, copied so that it outlives the reshard.

    FSDP2 frees the unsharded storage when it reshards after a forward without gradients (a frozen
    reference) or before the next no-gradient forward of the same model (a PEFT policy acting as its
    reference); the fused pass reads the head after the forward and again in its backward recompute.
    A head that trains keeps FSDP2's own unsharded parameter: FSDP2 holds it until backward and
    reduce-scatters its gradient from there.
    """
    if t is None or (t.requires_grad and torch.is_grad_enabled()) or not is_fsdp2_managed(model):
        return t
    return t.detach().clone()


def _head_inputs(model: nn.Module, hidden: torch.Tensor, autocast_dtype: Optional[torch.dtype],
                 aux_loss: Optional[torch.Tensor] = None) -> HeadInputs:
    weight, bias = lm_head_tensors(model)
    weight, bias = _kept_unsharded(weight, model), _kept_unsharded(bias, model)
    scaling = head_scaling(unwrap_peft(model).config)
    # With the model split over devices (device_map) the backbone may end elsewhere than the head.
    return HeadInputs(hidden.to(weight.device), weight, bias, scaling.softcap, scaling.logit_scale,
                      autocast_dtype, aux_loss)


def _last_hidden(outputs: Any) -> torch.Tensor:
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


def hidden_and_head(model: nn.Module, *args: Any, **kwargs: Any) -> HeadInputs:
    """Run the backbone of a causal LM and return its hidden states and LM head, without logits.

    The backbone is called directly, under whatever autocast is active around the call (recorded in
    ``autocast_dtype``). A model whose forward carries wrappers (accelerate's mixed precision, ...)
    should go through `add_head_outputs`, which keeps them.

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT (the active adapters apply).
        args, kwargs: what the model's forward takes (``input_ids`` [B, T], ``attention_mask`` [B, T],
            ...); arguments that only concern logits or the loss (``labels``, ``logits_to_keep``) are dropped.

    Returns:
        HeadInputs(hidden [B, T, H], weight [V, H], bias [V] or None, softcap, logit_scale, autocast_dtype).
    """
    for name in _HEAD_ONLY_KWARGS:
        kwargs.pop(name, None)
    kwargs["use_cache"] = False
    hidden = _last_hidden(find_backbone(model)(*args, **kwargs))
    return _head_inputs(model, hidden, _autocast_dtype(hidden.device.type))


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _head_inputs_through_forward(model: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> HeadInputs:
    """`HeadInputs` from the model's own forward chain ``forward``, with logits for no position.

    The forward runs whole, so every wrapper on it applies (accelerate's autocast, TRL's patches), and
    so does what the model computes besides logits (the MoE load-balancing loss). ``logits_to_keep``
    set to an empty index makes the head project zero positions; the final hidden states are read
    by a hook on the backbone, along with the autocast the backbone ran under.
    """
    for name in _HEAD_ONLY_KWARGS:
        kwargs.pop(name, None)
    kwargs["use_cache"] = False
    backbone = find_backbone(model)
    seen = {}

    def keep(module, inputs, outputs):
        hidden = _last_hidden(outputs)
        seen["hidden"], seen["autocast_dtype"] = hidden, _autocast_dtype(hidden.device.type)

    # The head's device (read without gathering a sharded head), where the index must live.
    head = unwrap_peft(model).get_output_embeddings()
    logits_to_keep = torch.empty(0, dtype=torch.long, device=head.weight.device)
    if _tensor_parallel_head(model, head.weight, getattr(head, "bias", None)):
        # DTensor's sharding propagation fails on a zero-position input (torch 2.13: "integer modulo by
        # zero" reshaping [B, 0, V]): a tensor-parallel head projects the last position instead.
        logits_to_keep = 1
    handle = backbone.register_forward_hook(keep)
    try:
        outputs = forward(*args, logits_to_keep=logits_to_keep, **kwargs)
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise TypeError(f"model: expected {type(model).__name__}.forward to run its backbone, it did not")
    aux_loss = getattr(outputs, "aux_loss", None) if kwargs.get("output_router_logits") else None
    return _head_inputs(model, seen["hidden"], seen["autocast_dtype"], aux_loss)


def head_inputs_of_call(model: nn.Module, *args: Any, **kwargs: Any) -> HeadInputs:
    """`HeadInputs` of one call of ``model`` itself (its ``__call__``), with logits for no position.

    Unlike `hidden_and_head`, the hooks of the engine wrapping the model run as in any forward (FSDP2's
    root unshards the embedding the backbone reads; DeepSpeed fetches per module), without patching
    the model. The head is read after the call: an FSDP2 DTensor head is gathered whole, a ZeRO-3 one
    stays partitioned for `apply_gathered`. A model whose forward takes no ``logits_to_keep`` gets its
    backbone called directly (`hidden_and_head`).

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT.
        args, kwargs: what the model's forward takes.

    Returns:
        HeadInputs(hidden [B, T, H], weight [V, H], bias [V] or None, softcap, logit_scale, autocast_dtype).
    """
    if not _takes_logits_to_keep(unwrap_peft(model)):
        return hidden_and_head(model, *args, **kwargs)
    return _head_inputs_through_forward(model, model, *args, **kwargs)


def add_head_outputs(model: nn.Module) -> nn.Module:
    """Let ``model(..., return_head_inputs=True)`` return `HeadInputs` instead of logits.

    Going through the model's own ``__call__`` keeps the hooks of DDP, FSDP and DeepSpeed that wrap
    it, and the request runs the forward that was in place before the patch (with projection to zero
    positions), so wrappers already on ``forward`` keep applying: accelerate's mixed-precision
    autocast (which `accelerate.prepare` may have put there before this patch, as TRL does for the
    reference at ``__init__``) and TRL's own patches. A model whose forward takes no
    ``logits_to_keep`` gets its backbone called directly instead. Without the keyword the forward is
    the original one (generation is unchanged). The patch is applied to the transformers model
    inside a PEFT wrapper and is idempotent.

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT.

    Returns:
        ``model`` (patched in place).
    """
    target = unwrap_peft(model)
    if getattr(target, "_fpo_head_outputs", False):
        return model
    original_forward = target.forward
    through_forward = _takes_logits_to_keep(target)

    def forward(self, *args, **kwargs):
        if not kwargs.pop(HEAD_INPUTS_KWARG, False):
            return original_forward(*args, **kwargs)
        if through_forward:
            parts = _head_inputs_through_forward(self, original_forward, *args, **kwargs)
        else:
            parts = hidden_and_head(self, *args, **kwargs)
        # DDP with find_unused_parameters walks the graph back from the outputs and takes a parameter
        # returned as is (a leaf) for unused; a view is a node leading to it. ZeRO-3 parameters stay
        # as they are: a view would pin their empty partition, and apply_gathered needs the parameter.
        if not is_zero3_param(parts.weight):
            parts.weight = parts.weight.view_as(parts.weight)
        if parts.bias is not None and not is_zero3_param(parts.bias):
            parts.bias = parts.bias.view_as(parts.bias)
        return parts

    target.forward = types.MethodType(forward, target)
    target._fpo_head_outputs = True
    return model


def head_precision(parts: HeadInputs, fp32: bool = False) -> contextlib.AbstractContextManager:
    """The autocast under which the fused head statistics of ``parts`` run.

    The precision rule of the integrations: the head runs in the mixed precision its backbone ran
    in (``parts.autocast_dtype``: bf16/fp16 operands, fp32 accumulation, fp32 statistics, as
    `fpo_ops.token_stats` does under ``torch.autocast``), or without autocast when the backbone had
    none. ``fp32=True`` is the opt-in fp32 head (TRL GRPO's ``cast_lm_head_to_fp32``): autocast off;
    the caller passes fp32 hidden states, which make `token_stats` compute in fp32.

    Args:
        parts: the policy's (student's) `HeadInputs`.
        fp32: run the head in fp32 whatever the backbone ran in.

    Returns:
        A ``torch.autocast`` context for the device of ``parts.hidden``.
    """
    return _autocast(parts.hidden.device.type, None if fp32 else parts.autocast_dtype)


def reference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which a PEFT model acts as its own frozen reference: its adapters disabled.

    Args:
        model: the policy, possibly a PEFT model.

    Returns:
        ``model.disable_adapter()`` for a PEFT model, else a null context.
    """
    return model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()


_PATCH_NAMES = ("apply_fused_head", "remove_fused_head", "is_fused_head_applied")


def __getattr__(name: str) -> Any:
    # The loss patch of any causal LM (`fpo_ops.integrations.patch`, which imports this module) is
    # reachable from here too, loaded on first use.
    if name in _PATCH_NAMES:
        from . import patch
        return getattr(patch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
