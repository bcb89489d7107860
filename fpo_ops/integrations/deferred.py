"""The head inputs of a forward in place of its logits, and the loss computed from them afterwards.

A caller that computes the loss outside the model's forward (transformers' ``Trainer`` with
``label_smoothing_factor``, TRL's SFT) reads the forward's logits. `fused_label_smoothing` makes the
model's next label-free forward defer its head instead: it projects logits for no position and leaves
its `HeadInputs` in a `DeferredHead`, from which a `FusedLabelSmoother` (transformers' ``LabelSmoother``
on the fused head) computes the same loss with `fpo_ops.linear_cross_entropy`. The forwards that defer
are those patched by `fpo_ops.integrations.patch.apply_fused_head` and by the TRL drop-ins' fused head.
"""
import contextlib
import inspect
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from ..losses.cross_entropy import linear_cross_entropy
from .hf import (
    HeadInputs, _autocast_dtype, _head_inputs, _last_hidden, apply_gathered, find_backbone, head_precision, unwrap_peft,
)

_DEFERRED = "_fpo_deferred"     # attribute of a model whose next label-free forward defers its head


class DeferredHead:
    """Filled by a forward asked for no logits: the head inputs the loss is computed from afterwards.

    Attributes:
        parts: `HeadInputs` of the last forward (hidden [B, T, H] with its graph), None before one ran.
    """

    def __init__(self):
        self.parts: Optional[HeadInputs] = None


def forward_without_logits(model: nn.Module, forward: Callable[..., Any],
                           kwargs: Dict[str, Any]) -> Tuple[Any, HeadInputs]:
    """Run ``forward(**kwargs)`` projecting logits for no position; return (its output without
    ``logits``, the `HeadInputs` of the final hidden states).

    Everything else the forward computes (the cache, hidden states and attentions when asked, the MoE
    router logits and load-balancing loss) stays in the output.
    """
    backbone = find_backbone(model)
    seen = {}

    def keep(module, inputs, outputs):
        hidden = _last_hidden(outputs)
        seen["hidden"], seen["autocast_dtype"] = hidden, _autocast_dtype(hidden.device.type)

    # The index must live where the head does (read without gathering a sharded head).
    device = unwrap_peft(model).get_output_embeddings().weight.device
    handle = backbone.register_forward_hook(keep)
    try:
        outputs = forward(**kwargs, return_dict=True, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise ValueError(f"model: expected {type(model).__name__}.forward to run its backbone "
                         f"{type(backbone).__name__}, it did not")
    fields = {key: value for key, value in outputs.items() if key != "logits"}
    return type(outputs)(**fields), _head_inputs(model, seen["hidden"], seen["autocast_dtype"])


def head_cross_entropy(parts: HeadInputs, hidden: torch.Tensor, labels: torch.Tensor, *, reduction: str = "sum",
                       label_smoothing: float = 0.0, ignore_index: int = -100, impl: str = "auto",
                       check_labels: bool = True, grad_filter_eps: float = 0.0) -> torch.Tensor:
    """`linear_cross_entropy` of ``hidden`` against ``labels`` on the head of ``parts``.

    The head runs in the precision its backbone ran in (`hf.head_precision`); a ZeRO-3 partitioned head
    is gathered for forward and for backward (`hf.apply_gathered`).

    Args:
        parts: a forward's `HeadInputs` (its head, softcap and scale are used; ``parts.hidden`` is not).
        hidden: [..., H] hidden states aligned with ``labels``.
        labels: [...] next-token ids.
        reduction, label_smoothing, ignore_index, impl, check_labels, grad_filter_eps: as in
            `linear_cross_entropy`.

    Returns:
        The loss, reduced as asked, float32.
    """
    has_bias = parts.bias is not None
    params = [parts.weight] + ([parts.bias] if has_bias else [])

    def run(weight, *rest):
        bias = rest[0] if has_bias else None
        h, y = rest[-2:]
        return (linear_cross_entropy(
            h, weight, y, bias=bias, softcap=parts.softcap, logit_scale=parts.logit_scale, reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, impl=impl,
            # a partitioned head holds no rows outside the gather; labels are checked inside it
            check_labels=check_labels, grad_filter_eps=grad_filter_eps),)

    device = parts.weight.device
    with head_precision(parts):
        (loss,) = apply_gathered(run, params, hidden.to(device), labels.to(device))
    return loss


class FusedLabelSmoother:
    """transformers' ``LabelSmoother`` on the fused head: the same loss, from the head inputs a
    deferred forward left in ``deferred`` instead of the logits.

    ``(1 - eps) * sum(nll) / n + eps * sum(lse - mean_v z_v) / n`` over the positions whose label is not
    ``ignore_index``, ``n`` being ``num_items_in_batch`` when given, else their count.
    """

    def __init__(self, epsilon: float, ignore_index: int, deferred: DeferredHead, options: Dict[str, Any]):
        self.epsilon, self.ignore_index, self.deferred, self.options = epsilon, ignore_index, deferred, options

    def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
        parts = self.deferred.parts
        if parts is None:
            raise RuntimeError("FusedLabelSmoother: the model's forward ran without deferring its head")
        self.deferred.parts = None
        hidden = parts.hidden
        if shift_labels:
            hidden, labels = hidden[..., :-1, :], labels[..., 1:]
        total = head_cross_entropy(parts, hidden, labels, reduction="sum", label_smoothing=self.epsilon,
                                   ignore_index=self.ignore_index, **self.options)
        if num_items_in_batch is None:
            count = (labels != self.ignore_index).sum().to(total.device)
        else:
            count = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        return total / count


@contextlib.contextmanager
def fused_label_smoothing(trainer: Any, model: nn.Module, options: Dict[str, Any]) -> Iterator[None]:
    """Within it, ``trainer.label_smoother`` is a `FusedLabelSmoother` and the label-free forward of
    ``model`` (patched by `apply_fused_head`, or by the TRL drop-ins' fused head) defers its head to it.

    Args:
        trainer: a ``transformers.Trainer`` whose ``label_smoother`` is set.
        model: the transformers model that computes the head (PEFT and accelerate wrappers removed).
        options: `head_cross_entropy` options (impl, check_labels, grad_filter_eps).
    """
    smoother = trainer.label_smoother
    deferred = DeferredHead()
    trainer.label_smoother = FusedLabelSmoother(smoother.epsilon, smoother.ignore_index, deferred, options)
    setattr(model, _DEFERRED, deferred)
    try:
        yield
    finally:
        trainer.label_smoother = smoother
        setattr(model, _DEFERRED, None)


def deferred_head_of(model: nn.Module) -> Optional[DeferredHead]:
    """The `DeferredHead` a label-free forward of ``model`` must fill, or None (compute logits)."""
    return getattr(model, _DEFERRED, None)


def defer_forward(model: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: Dict[str, Any],
                  deferred: DeferredHead) -> Any:
    """A label-free forward that fills ``deferred`` and returns its output without logits."""
    kwargs = _as_keywords(forward, args, kwargs)
    return_dict = kwargs.pop("return_dict", None)
    outputs, deferred.parts = forward_without_logits(model, forward, kwargs)
    return _as_requested(model, outputs, return_dict)


def _as_keywords(forward: Callable[..., Any], args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``args`` bound to their parameter names of ``forward`` and merged into ``kwargs``."""
    if not args:
        return dict(kwargs)
    names = [p.name for p in inspect.signature(forward).parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"forward: expected at most {len(names)} positional arguments, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def _as_requested(model: nn.Module, outputs: Any, return_dict: Optional[bool]) -> Any:
    """A tuple where the caller (or the config) asks for one, as transformers' ``can_return_tuple`` does."""
    if return_dict is None:
        return_dict = getattr(getattr(model, "config", None), "return_dict", True)
    return outputs if return_dict else outputs.to_tuple()


def sequence_parallel_loss(trainer: Any) -> bool:
    """True where the trainer runs DeepSpeed sequence parallelism, whose loss is computed its own way."""
    pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    return pc is not None and getattr(pc, "sp_backend", None) == "deepspeed" and bool(getattr(pc, "sp_enabled", False))
