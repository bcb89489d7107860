"""`apply_fused_head`: any Hugging Face causal LM computes its own loss with the fused head.

After ``apply_fused_head(model)``, ``model(input_ids, attention_mask=..., labels=...)`` returns the loss
the unpatched model returns (transformers' ``ForCausalLMLoss``: the causal shift, ``ignore_index``,
``num_items_in_batch``, ``shift_labels``; plus the Mixture-of-Experts load-balancing loss as the model
adds it) from `fpo_ops.linear_cross_entropy`, with ``logits`` None. Without labels the forward is the
model's own, so ``generate`` and evaluation see the logits as before.

The patch is generic: it runs the model's own forward with logits for no position (``logits_to_keep``
an empty index) and reads the final hidden states off the backbone with a hook, then takes the head
from `hf.lm_head_tensors` and its softcap and scale from `hf.head_scaling`. At patch time one short
forward checks that this head reproduces the model's logits, so a family that transforms its logits
in a way the config does not say is refused instead of trained wrong.

Label smoothing: transformers' ``Trainer`` with ``label_smoothing_factor`` pops the labels and smooths
the model's logits afterwards (``LabelSmoother``). `apply_fused_head` wraps ``Trainer.compute_loss`` once
so that, for a patched model, `fpo_ops.integrations.deferred.fused_label_smoothing` puts a fused smoother
in its place and the forward defers its head to it instead of projecting logits.
"""
import contextlib
import functools
import inspect
import types
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ..losses.checks import check_bool
from ..token_stats.validation import IMPLS, validate_grad_filter_eps
from .deferred import (
    _as_keywords, _as_requested, defer_forward, deferred_head_of, forward_without_logits, fused_label_smoothing,
    head_cross_entropy, sequence_parallel_loss,
)
from .hf import _head_inputs, _last_hidden, find_backbone, head_scaling, is_zero3_param, lm_head_tensors, unwrap_peft

_STATE = "_fpo_fused_head"      # attribute of a patched model: its `_PatchState`


class _PatchState:
    """What `apply_fused_head` put on a model, so that `remove_fused_head` can undo it."""

    def __init__(self, original: Callable[..., Any], previous: Optional[Callable[..., Any]],
                 options: Dict[str, Any], aux_loss_coef: Optional[float], train_only: bool):
        self.original, self.previous, self.options, self.aux_loss_coef = original, previous, options, aux_loss_coef
        self.train_only = train_only
        self.forward: Optional[Callable[..., Any]] = None


def _router_aux_loss_coef(model: nn.Module) -> Optional[float]:
    """The coefficient a Mixture-of-Experts family weighs its load-balancing loss by, None for a dense model.

    The forward of an MoE causal LM adds ``coef * aux_loss`` to its loss when it returns router logits; the
    coefficient lives on the model (``router_aux_loss_coef``, ``aux_loss_coef``) or its text config.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not hasattr(config, "output_router_logits"):
        return None
    for owner, name in ((model, "router_aux_loss_coef"), (model, "aux_loss_coef"), (config, "router_aux_loss_coef")):
        value = getattr(owner, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ValueError(
        f"model: {type(model).__name__} returns router logits (its config has output_router_logits) but no "
        "router_aux_loss_coef was found on the model or its config: expected the coefficient of its "
        "load-balancing loss, got none"
    )


def _check_patchable(model: nn.Module) -> None:
    """Raise a ValueError naming what ``model`` lacks for the fused loss."""
    name = type(model).__name__
    try:
        find_backbone(model)
    except TypeError as err:
        raise ValueError(str(err)) from None
    if model.get_output_embeddings() is None:
        raise ValueError(f"model: expected a causal LM with an output embedding (get_output_embeddings()), "
                         f"got {name} without one")
    lm_head_tensors(model)  # refuses a PEFT adapter on the head
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    missing = [p for p in ("labels", "logits_to_keep") if p not in parameters]
    if missing:
        raise ValueError(f"model: expected {name}.forward to take {missing} (the head projects no position "
                         f"through logits_to_keep), got a forward without them")
    from transformers.loss.loss_utils import ForCausalLMLoss

    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss:
        raise ValueError(f"model.loss_function: expected transformers' ForCausalLMLoss (the loss the fused head "
                         f"computes), got {getattr(loss_function, '__name__', loss_function)!r}")


def _check_precision(model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast the check's forward needs: a model whose parameters mix float dtypes (a bf16 backbone
    with an fp32 head, as plain AMP training holds it) runs only under autocast, which its head's
    ``F.linear`` needs to take bf16 hidden states with an fp32 weight; it is patched outside one."""
    if torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = [dtype for dtype in (torch.bfloat16, torch.float16) if dtype in dtypes]
    if len(dtypes) > 1 and low:
        return torch.autocast(device.type, dtype=low[0])
    return contextlib.nullcontext()


def _check_head(model: nn.Module, forward: Callable[..., Any]) -> None:
    """One 2-token forward: the head read from the model reproduces the model's own logits."""
    seen = {}

    def keep(module, inputs, outputs):
        seen["hidden"] = _last_hidden(outputs)

    handle = find_backbone(model).register_forward_hook(keep)
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else next(model.parameters()).device
    try:
        with torch.no_grad(), _check_precision(model, device):
            logits = forward(input_ids=torch.tensor([[0, 1]], device=device), use_cache=False, return_dict=True).logits
    finally:
        handle.remove()
    with torch.no_grad():
        parts = _head_inputs(model, seen["hidden"], None)
        if is_zero3_param(parts.weight):
            return  # partitioned outside a gather: nothing to compare against here
        z = parts.hidden.float() @ parts.weight.float().T
        if parts.bias is not None:
            z = z + parts.bias.float()
        z = z * parts.logit_scale
        if parts.softcap is not None:
            z = parts.softcap * torch.tanh(z / parts.softcap)
        expected = logits.float().to(z.device)
        scale = float(expected.abs().max()) + 1.0
        error = float((z - expected).abs().max())
    # Loose on purpose (bf16 models, GEMM order): it catches a missing transform, not rounding.
    if not error <= 0.02 * scale:
        scaling = head_scaling(model.config)
        raise ValueError(
            f"model: expected {type(model).__name__}'s logits to equal cap(logit_scale * (hidden @ W^T + b)) with "
            f"the softcap {scaling.softcap} and logit_scale {scaling.logit_scale} read from its config, got a "
            f"largest difference of {error:.3g} (logits up to {scale - 1.0:.3g}): the family transforms its "
            "logits in a way the fused head does not know"
        )


def apply_fused_head(model: nn.Module, *, impl: str = "auto", check_labels: bool = True,
                     grad_filter_eps: float = 0.0, train_only: bool = True, check_head: bool = True) -> nn.Module:
    """Make a Hugging Face causal LM compute its loss with the fused head, without logits.

    Afterwards ``model(input_ids, attention_mask=..., labels=...)`` (and any other argument the model
    takes) in training mode returns the output the unpatched model returns with ``loss`` computed by
    `fpo_ops.linear_cross_entropy` and ``logits`` None: transformers' causal-LM loss (labels shifted by
    one, or ``shift_labels`` as given; ``ignore_index``; the sum divided by ``num_items_in_batch`` when
    given, as ``Trainer`` passes it under gradient accumulation, else the mean), plus the MoE
    load-balancing loss times the family's coefficient where the model adds it. Without labels the
    forward is the model's own (``generate``, ``logits_to_keep``), and so it is in eval mode unless
    ``train_only=False`` (evaluation with ``compute_metrics`` and ``Trainer.predict`` need the logits). A
    ``Trainer`` with ``label_smoothing_factor`` smooths on the fused head too (`deferred.fused_label_smoothing`).

    The model's head is read as `hidden_and_head` reads it (tied embeddings, softcap, logit scale,
    PEFT, FSDP2 and ZeRO-3 heads), and the family is checked at patch time.

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT (the transformers model inside is patched).
        impl: `token_stats` implementation: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.
        check_labels: check that labels lie in [0, V) (one host sync per forward).
        grad_filter_eps: `token_stats`' gradient filter (``impl="triton"``; 0 is exact).
        train_only: fuse only while the model is in training mode (``model.training``), as Liger-Kernel's
            patches do; False: in eval mode too (``logits`` None there as well).
        check_head: run one 2-token forward now to check that the head read from the model reproduces
            its logits (skip it for a model that cannot run a forward yet, e.g. on the meta device).

    Returns:
        ``model``, patched in place (idempotent: a patched model is left as it is).

    Raises:
        ValueError: naming what the model lacks: a backbone, an output embedding, a forward taking
            ``labels`` and ``logits_to_keep``, transformers' causal-LM loss, a router loss coefficient
            for an MoE family, or a head that reproduces its logits.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {list(IMPLS)}, got {impl!r}")
    validate_grad_filter_eps(grad_filter_eps)
    target = unwrap_peft(model)
    if getattr(target, _STATE, None) is not None:
        return model
    _check_patchable(target)
    aux_loss_coef = _router_aux_loss_coef(target)
    original = target.forward
    if check_head:
        _check_head(target, original)
    check_bool("train_only", train_only)
    state = _PatchState(original, target.__dict__.get("forward"),
                        dict(impl=impl, check_labels=check_labels, grad_filter_eps=grad_filter_eps), aux_loss_coef,
                        train_only)

    state.forward = types.MethodType(_patched_forward(type(target)), target)
    target.forward = state.forward
    setattr(target, _STATE, state)
    _install_trainer_hook()
    return model


def _patched_forward(cls: type) -> Callable[..., Any]:
    """The patched forward of a ``cls`` model. It reads its `_PatchState` from the model at each call, so
    that a deep copy of a patched model (a TRL reference) runs its own original forward."""

    # The class forward's signature is kept: generate and Trainer inspect it.
    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        state = getattr(self, _STATE)
        if state.train_only and not self.training:
            return state.original(*args, **kwargs)
        deferred = deferred_head_of(self)
        labels_given = kwargs.get("labels") is not None or _positional(state.original, args, "labels") is not None
        keep = kwargs.get("logits_to_keep", 0)
        if (not labels_given and deferred is None) or not (isinstance(keep, int) and keep == 0):
            return state.original(*args, **kwargs)
        if not labels_given:
            return defer_forward(self, state.original, args, kwargs, deferred)
        return _fused_loss_forward(self, state, args, kwargs)

    return forward


def remove_fused_head(model: nn.Module) -> nn.Module:
    """Undo `apply_fused_head`: the model's forward is the one it had before.

    Args:
        model: a model patched by `apply_fused_head` (possibly wrapped by PEFT).

    Returns:
        ``model``, restored in place.

    Raises:
        ValueError: the model is not patched, or its forward was replaced again after the patch (undo that first).
    """
    target = unwrap_peft(model)
    state = getattr(target, _STATE, None)
    if state is None:
        raise ValueError(f"model: expected a model patched by apply_fused_head, got an unpatched "
                         f"{type(target).__name__}")
    if target.__dict__.get("forward") is not state.forward:
        raise ValueError("model: its forward was replaced after apply_fused_head (e.g. by accelerate's mixed-precision "
                         "wrapper); expected the patched forward outermost, got another one")
    if state.previous is None:
        del target.forward
    else:
        target.forward = state.previous
    setattr(target, _STATE, None)
    return model


def is_fused_head_applied(model: nn.Module) -> bool:
    """True for a model patched by `apply_fused_head` (possibly wrapped by PEFT)."""
    return getattr(unwrap_peft(model), _STATE, None) is not None


def _positional(forward: Callable[..., Any], args: tuple, name: str) -> Any:
    """The value of parameter ``name`` among the positional ``args`` of ``forward``, or None."""
    if not args:
        return None
    return _as_keywords(forward, args, {}).get(name)


def _fused_loss_forward(model: nn.Module, state: _PatchState, args: tuple, kwargs: Dict[str, Any]) -> Any:
    """The model's forward with labels: its output, with the fused causal-LM loss and no logits."""
    kwargs = _as_keywords(state.original, args, kwargs)
    labels = kwargs.pop("labels")
    return_dict = kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)
    # As ForCausalLMLoss reads them from the forward's keyword arguments (which also reach the backbone).
    shift_labels = kwargs.get("shift_labels")
    num_items_in_batch = kwargs.get("num_items_in_batch")
    ignore_index = kwargs.get("ignore_index", -100)
    outputs, parts = forward_without_logits(model, state.original, kwargs)
    if shift_labels is None:
        hidden, targets = parts.hidden[..., :-1, :], labels[..., 1:]
    else:
        hidden, targets = parts.hidden, shift_labels
    if num_items_in_batch is None:
        loss = head_cross_entropy(parts, hidden, targets, reduction="mean", ignore_index=ignore_index, **state.options)
    else:
        total = head_cross_entropy(parts, hidden, targets, reduction="sum", ignore_index=ignore_index, **state.options)
        count = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        loss = total / count
    aux_loss = outputs.get("aux_loss") if isinstance(outputs, dict) else None
    if aux_loss is not None and state.aux_loss_coef is not None:
        loss = loss + state.aux_loss_coef * aux_loss.to(loss.device)
    # A new output, so that the loss comes first in its tuple form as in the model's own.
    outputs = type(outputs)(loss=loss, **{key: value for key, value in outputs.items() if key != "loss"})
    return _as_requested(model, outputs, return_dict)


# ---- transformers.Trainer with label_smoothing_factor ------------------------------------------------

def _install_trainer_hook() -> None:
    """Wrap ``transformers.Trainer.compute_loss`` once so that a fused model's label smoothing is fused."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - apply_fused_head needs transformers models anyway
        return
    trainer_cls = transformers.Trainer
    if getattr(trainer_cls.compute_loss, "_fpo_fused", False):
        return
    original = trainer_cls.compute_loss

    @functools.wraps(original)
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = _fused_target(self, model)
        if target is None or not _smooths_causal_lm_loss(self, target, inputs, return_outputs):
            return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with fused_label_smoothing(self, target, getattr(target, _STATE).options):
            return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    compute_loss._fpo_fused = True
    trainer_cls.compute_loss = compute_loss


def _fused_target(trainer: Any, model: nn.Module) -> Optional[nn.Module]:
    """The transformers model inside ``model`` (accelerate and PEFT wrappers removed) if it is patched."""
    unwrapped = trainer.accelerator.unwrap_model(model) if hasattr(trainer, "accelerator") else model
    target = unwrap_peft(unwrapped)
    return target if getattr(target, _STATE, None) is not None else None


def _smooths_causal_lm_loss(trainer: Any, target: nn.Module, inputs: Dict[str, Any], return_outputs: bool) -> bool:
    """True where ``Trainer.compute_loss`` would smooth shifted labels on the model's logits.

    Not when the caller wants the outputs (their logits), with a ``compute_loss_func``, or under
    DeepSpeed sequence parallelism (which computes the loss its own way).
    """
    if getattr(trainer, "label_smoother", None) is None or getattr(trainer, "compute_loss_func", None) is not None:
        return False
    if return_outputs or "labels" not in inputs:
        return False
    if getattr(target, _STATE).train_only and not target.training:
        return False
    if sequence_parallel_loss(trainer):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # Trainer shifts the labels only for a model of the causal-LM mapping; elsewhere it smooths unshifted.
    return target._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
