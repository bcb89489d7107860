"""What every fpo-ops TRL trainer does the same way around the fused head.

A trainer module keeps only what is specific to its TRL trainer (which step it replaces, which
loss it calls); the pieces here are the ones that were otherwise repeated per trainer:

- `head_model_kwargs`: the keyword arguments of a backbone-only forward (`add_head_outputs`);
- `completion_labels`: next-token labels of the completion tokens, -100 elsewhere;
- `head_hidden`: hidden states aligned with those labels, in fp32 for ``cast_lm_head_to_fp32``;
- `reference_adapter`, `reference_forward`, `frozen_head`: the reference of a trainer (a separate
  model, or the PEFT policy with its reference adapter or none) run without a graph;
- `apply_gathered_heads`: a call on LM heads, some of them absent (no bias), some of them ZeRO-3
  partitioned (gathered for forward and for backward);
- `trainer_mode`, `log_metric`, `log_metrics`, `log_token_mean`: TRL's ``_metrics`` bookkeeping.
"""
import contextlib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..hf import HEAD_INPUTS_KWARG, HeadInputs, apply_gathered, is_peft_model, is_zero3_param


def head_model_kwargs(inputs: Mapping[str, Any], exclude: Iterable[str] = (),
                      router_logits: bool = False) -> Dict[str, Any]:
    """Keyword arguments of a forward that returns `HeadInputs` (the backbone only, no logits).

    Args:
        inputs: the collated batch.
        exclude: batch keys the model's forward does not take (collator extras).
        router_logits: also ask an MoE forward for its load-balancing loss (the policy's only: a
            frozen reference's is not needed).

    Returns:
        ``inputs`` without ``exclude``, with ``use_cache=False`` and the head-inputs flag set.
    """
    exclude = frozenset(exclude)
    kwargs = {k: v for k, v in inputs.items() if k not in exclude}
    kwargs["use_cache"] = False
    kwargs[HEAD_INPUTS_KWARG] = True
    if router_logits:
        kwargs["output_router_logits"] = True
    return kwargs


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels of the completion tokens.

    Args:
        input_ids: [B, T] token ids.
        completion_mask: [B, T] nonzero (or True) at completion tokens.

    Returns:
        [B, T-1] labels: position i is labelled with token i + 1 where that token is a completion
        token, -100 elsewhere.
    """
    return input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]


def head_hidden(parts: HeadInputs, length: Optional[int] = None, fp32: bool = False) -> torch.Tensor:
    """Hidden states of ``parts`` aligned with `completion_labels`.

    Args:
        parts: a forward's `HeadInputs`, hidden [B, T', H].
        length: the batch's sequence length T: prompt-learning PEFT prepends virtual tokens, so
            only the last ``length`` (real) positions are kept; None keeps all of them.
        fp32: return fp32 hidden states, which make `token_stats` compute the head in fp32
            (`head_precision` switches autocast off).

    Returns:
        [B, T-1, H] hidden states: the last real position, which predicts nothing, is dropped.
    """
    hidden = parts.hidden if length is None else parts.hidden[:, -length:]
    hidden = hidden[:, :-1]
    return hidden.float() if fp32 else hidden


def reference_adapter(trainer) -> contextlib.AbstractContextManager:
    """The adapter under which a PEFT policy without a separate reference model acts as its reference.

    A fresh adapter: disabling it gives the base model. A re-trained one: TRL keeps a frozen copy
    named "ref". With a reference model, or without PEFT, a null context.
    """
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(trainer, "ref_model", None) is not None or not is_peft_model(unwrapped):
        return contextlib.nullcontext()
    return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)


def frozen_head(parts: HeadInputs) -> HeadInputs:
    """``parts`` detached from any graph; ZeRO-3 parameters stay themselves so that they can be gathered."""
    weight = parts.weight if is_zero3_param(parts.weight) else parts.weight.detach()
    bias = parts.bias
    if bias is not None and not is_zero3_param(bias):
        bias = bias.detach()
    return HeadInputs(parts.hidden.detach(), weight, bias, parts.softcap, parts.logit_scale, parts.autocast_dtype)


def reference_forward(trainer, model_kwargs: Dict[str, Any]) -> HeadInputs:
    """The reference's hidden states and head for ``model_kwargs``, with no graph.

    The reference is ``trainer.ref_model`` or, without one, the PEFT policy under
    `reference_adapter`; gradient checkpointing is off for the forward.

    Raises:
        ValueError: neither a reference model nor a PEFT policy (full fine-tuning with precomputed
            reference log-probs keeps no reference; reached only by mistake).
    """
    gradient_checkpointing = trainer.args.gradient_checkpointing_kwargs
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, gradient_checkpointing):
        if trainer.ref_model is not None:
            parts = trainer.ref_model(**model_kwargs)
        elif is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
            with reference_adapter(trainer):
                parts = trainer.model(**model_kwargs)
        else:
            raise ValueError(
                "ref_model: the loss needs a reference forward but no reference model is available: "
                "expected a ref_model, a PEFT model, or precomputed reference log-probs"
            )
    return frozen_head(parts)


def apply_gathered_heads(
    fn: Callable[..., Sequence[torch.Tensor]],
    heads: Sequence[Optional[torch.Tensor]],
    *tensors: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, ...]:
    """``fn(heads, *tensors)`` with the ZeRO-3 partitioned tensors of ``heads`` gathered.

    `hf.apply_gathered` takes no None parameter; this drops the absent heads (a model without a
    bias) before the call and puts them back, as None at their place, for ``fn``.

    Args:
        fn: ``fn(heads, *tensors)`` -> sequence of tensors, ``heads`` a list like the argument.
        heads: LM-head weights and biases, e.g. ``[weight, bias, ref_weight, ref_bias]``, None allowed.
        tensors: the other inputs (hidden states, labels; None allowed).

    Returns:
        The outputs of ``fn`` as a tuple; gradients flow to every input that requires one.
    """
    present = [i for i, t in enumerate(heads) if t is not None]

    def run(*args):
        full: list = [None] * len(heads)
        for i, t in zip(present, args[:len(present)]):
            full[i] = t
        return fn(full, *args[len(present):])

    return apply_gathered(run, [heads[i] for i in present], *tensors)


def trainer_mode(trainer) -> str:
    """``"train"`` or ``"eval"``: the key of TRL's ``_metrics`` for the current step."""
    return "train" if trainer.model.training else "eval"


def log_metric(trainer, mode: str, name: str, value: torch.Tensor) -> None:
    """Appends the mean over processes of a scalar ``value`` to TRL's ``_metrics[mode][name]``.

    Per-rank values averaged: exact on one process; across ranks each rank weighs equally.
    """
    gathered = trainer.accelerator.gather_for_metrics(value.detach().float().reshape(1))
    trainer._metrics[mode][name].append(gathered.mean().item())


def log_metrics(trainer, mode: str, metrics: Mapping[str, torch.Tensor]) -> None:
    """`log_metric` for every entry of ``metrics`` (scalar tensors by TRL's metric names)."""
    for name, value in metrics.items():
        log_metric(trainer, mode, name, value)


def log_token_mean(trainer, mode: str, name: str, mean: torch.Tensor, count: torch.Tensor) -> None:
    """Appends the token-weighted mean over processes of a per-token mean to ``_metrics[mode][name]``.

    TRL averages per-token metrics (entropy, mean logit, top-1 accuracy) over all tokens of all
    processes: it gathers each process's sum and token count, not its mean, so that ranks holding
    more tokens weigh more. The same here, from this process's ``mean`` over ``count`` tokens.

    Args:
        mean: [] this process's mean over its ``count`` tokens (0 when it has none).
        count: [] this process's number of tokens.
    """
    count = count.detach().float()
    # sum and count travel in one collective, and come back to the host in one sync
    total, tokens = trainer.accelerator.gather_for_metrics(
        torch.stack([mean.detach().float() * count, count]).reshape(1, 2)).sum(dim=0).tolist()
    # as TRL, 0.0 when no process holds a token
    trainer._metrics[mode][name].append(total / tokens if tokens > 0 else 0.0)
