"""`HeadConfig`: the head options every loss function forwards to `token_stats`, collected and checked once.

`preference_loss`, `kto_loss` and `distill_loss` keep their explicit keywords; each collects its
head keywords into a `HeadConfig` (checked at construction: the same checks and messages as
`token_stats`) and forwards `token_stats_kwargs()`. The `nn.Module` wrappers build one at
construction, so a bad option raises there rather than at the first forward.
"""
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional

from ..token_stats.options import HeadOptions
from ..token_stats.validation import IMPLS, _check_scalar, validate_grad_filter_eps, validate_process_group


@dataclass(frozen=True)
class HeadConfig(HeadOptions):
    """How both heads' logits are formed (the fields of `fpo_ops.token_stats.options.HeadOptions`) and how
    `token_stats` runs.

    Logits are ``cap(logit_scale * (h @ W^T + b)) / temperature`` (``ref_`` for the reference or
    teacher), ``cap(x) = softcap * tanh(x / softcap)`` when a softcap is given. The op-internal
    fields of `HeadOptions` (``outputs``, ``jsd_beta``, ``compute_dtype``) are the loss's to choose
    per call and are not forwarded.

    Attributes (beyond `HeadOptions`'):
        impl: `token_stats` implementation.
        check_inputs: check label ranges (one host sync; `token_stats`'s ``check_labels``).
        check_finite: check that the hidden states are finite (one host sync).
        process_group: vocabulary-parallel group (each process holds a slice of the head rows), or None.
    """

    impl: str = "auto"
    check_inputs: bool = True
    check_finite: bool = False
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {self.impl!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index: expected an int, got {type(self.ignore_index).__name__}")
        _check_scalar("temperature", self.temperature)
        _check_scalar("softcap", self.softcap, allow_none=True)
        _check_scalar("ref_softcap", self.ref_softcap, allow_none=True)
        _check_scalar("logit_scale", self.logit_scale)
        _check_scalar("ref_logit_scale", self.ref_logit_scale)
        validate_grad_filter_eps(self.grad_filter_eps)
        if self.process_group is not None:
            validate_process_group(self.process_group, self.impl)

    @classmethod
    def pick(cls, options: Mapping[str, Any], renames: Optional[Mapping[str, str]] = None) -> "HeadConfig":
        """The head options among ``options`` (keyword name -> value). ``renames`` maps a function's
        keyword to the field it fills (``teacher_softcap`` -> ``ref_softcap``); errors name the keyword."""
        renames = dict(renames or {})
        names = {f.name for f in fields(cls)} - _OP_INTERNAL
        values = {renames.get(k, k): v for k, v in options.items() if renames.get(k, k) in names}
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            message = str(error)
            for keyword, field in renames.items():
                if message.startswith(f"{field}:"):
                    raise type(error)(keyword + message[len(field):]) from None
            raise

    def token_stats_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of `token_stats` these options stand for."""
        return dict(
            ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap,
            logit_scale=self.logit_scale, ref_softcap=self.ref_softcap, ref_logit_scale=self.ref_logit_scale,
            impl=self.impl, check_labels=self.check_inputs, check_finite=self.check_finite,
            process_group=self.process_group, grad_filter_eps=self.grad_filter_eps,
        )


# HeadOptions fields a loss function sets itself, per call.
_OP_INTERNAL = frozenset({"outputs", "jsd_beta", "compute_dtype"})


def pick_fields(cls, options: Mapping[str, Any]):
    """``cls(**the options that are fields of the dataclass cls)``: a loss config from a module's options."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names})
