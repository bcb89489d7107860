"""Argument checks for `token_stats`: every failure names the argument, expected vs got."""
import math
from typing import Sequence, Tuple

import torch

from .stats import REFERENCE_STATS, STAT_NAMES

IMPLS = ("auto", "triton", "torch", "reference")
# Largest vocabulary (per process) whose row indices fp32 holds exactly.
ARGMAX_MAX_ROWS = 2 ** 24


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _require_float_tensor(name: str, value) -> None:
    _require_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")


def _require_same(name: str, what: str, expected, got) -> None:
    if expected != got:
        error = TypeError if what.startswith("dtype") else ValueError
        raise error(f"{name}: expected {what} {expected}, got {got}")


def int64_labels(labels) -> torch.Tensor:
    """``labels`` as int64, checked to be an integer tensor first.

    Narrower integers would wrap when compared with ``ignore_index`` or the vocabulary size
    (uint8 156 != -100 yet -100 in uint8 is 156), so every comparison happens after this cast.
    """
    _require_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    return labels.long()


def _check_head(prefix: str, hidden, weight, bias, labels, sliced_vocab: bool) -> None:
    """Shapes, dtypes and devices of one model's hidden states, weight and bias."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    _require_float_tensor(h_name, hidden)
    _require_float_tensor(w_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{h_name}: expected shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{w_name}: expected shape [V, H], got {tuple(weight.shape)}")
    _require_same(w_name, "hidden size (dim 1)", hidden.shape[-1], weight.shape[1])
    if hidden.shape[-1] == 0:
        raise ValueError(f"{h_name}: expected a hidden size (last dim) >= 1, got shape {tuple(hidden.shape)}")
    # A vocabulary-parallel slice is checked by the whole group at once (see fpo_ops.distributed).
    if weight.shape[0] == 0 and not sliced_vocab:
        raise ValueError(f"{w_name}: expected at least one vocabulary row (dim 0 >= 1), got shape "
                         f"{tuple(weight.shape)}")
    _require_same(h_name, "leading shape (that of labels)", tuple(labels.shape), tuple(hidden.shape[:-1]))
    _require_same(w_name, "dtype", hidden.dtype, weight.dtype)
    _require_same(h_name, "device", labels.device, hidden.device)
    _require_same(w_name, "device", hidden.device, weight.device)
    if bias is not None:
        _require_float_tensor(b_name, bias)
        _require_same(b_name, "shape", (weight.shape[0],), tuple(bias.shape))
        _require_same(b_name, "dtype", weight.dtype, bias.dtype)
        _require_same(b_name, "device", weight.device, bias.device)


# Bounds of temperature, softcap and logit_scale: the logit transform and its gradient use
# products and ratios of up to three of them (scale / T, T / c, c / T ...), which stay normal fp32
# numbers (2^-126 .. 2^128) inside these bounds. Outside them z = cap(scale x) / T overflows or
# loses its precision to denormals for ordinary hidden states, and NaN or inf would come out.
SCALAR_MIN, SCALAR_MAX = 2.0 ** -40, 2.0 ** 40


def _check_scalar(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not 0.0 < value < math.inf:  # comparisons, not math.isfinite, so torch.compile traces them
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    if not SCALAR_MIN <= value <= SCALAR_MAX:
        raise ValueError(f"{name}: expected a value in [2^-40, 2^40] = [{SCALAR_MIN:.4g}, {SCALAR_MAX:.4g}] "
                         f"(beyond it the logits leave the float32 range), got {value}")


def normalize_outputs(outputs) -> Tuple[str, ...]:
    """Accept a name or a sequence of names; keep the first occurrence of each."""
    if isinstance(outputs, str):
        outputs = (outputs,)
    if not isinstance(outputs, Sequence) or len(outputs) == 0:
        raise ValueError(f"outputs: expected a non-empty sequence of names from {STAT_NAMES}, got {outputs!r}")
    unknown = [name for name in outputs if name not in STAT_NAMES]
    if unknown:
        raise ValueError(f"outputs: expected names from {STAT_NAMES}, got unknown {unknown}")
    return tuple(dict.fromkeys(outputs))


def validate_token_stats_args(
    hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, *, outputs: Tuple[str, ...],
    ignore_index: int, temperature, softcap, logit_scale, ref_softcap, ref_logit_scale, jsd_beta,
    impl: str, check_labels: bool, check_finite: bool, sliced_vocab: bool = False,
) -> None:
    """Raise ValueError/TypeError on anything `token_stats` cannot compute correctly.

    ``labels`` must already be int64 (`int64_labels`); ``sliced_vocab``: ``weight`` is one
    process's slice of a vocabulary-parallel head.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    _check_head("", hidden, weight, bias, labels, sliced_vocab)

    if ref_hidden is None:
        for name, value in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
            if value is not None:
                raise ValueError(f"{name}: expected None without ref_hidden, got a tensor")
        needs_ref = [name for name in outputs if name in REFERENCE_STATS]
        if needs_ref:
            raise ValueError(
                f"outputs: expected ref_hidden for the reference statistics {needs_ref}, got ref_hidden=None"
            )
    else:
        shared_weight = ref_weight is None
        _check_head("ref_", ref_hidden, weight if shared_weight else ref_weight,
                    bias if shared_weight and ref_bias is None else ref_bias, labels, sliced_vocab)
        if not shared_weight:
            _require_same("ref_weight", "vocabulary size (dim 0)", weight.shape[0], ref_weight.shape[0])
        _require_same("ref_hidden", "dtype (that of hidden)", hidden.dtype, ref_hidden.dtype)
        _require_same("ref_hidden", "device", hidden.device, ref_hidden.device)

    _check_scalar("temperature", temperature)
    _check_scalar("softcap", softcap, allow_none=True)
    _check_scalar("ref_softcap", ref_softcap, allow_none=True)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("ref_logit_scale", ref_logit_scale)
    if isinstance(jsd_beta, bool) or not isinstance(jsd_beta, (int, float)) or not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta: expected a float in [0, 1], got {jsd_beta!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")

    if ignore_index < -2 ** 63 or ignore_index >= 2 ** 63:
        raise ValueError(f"ignore_index: expected an int64 value, got {ignore_index}")
    if "argmax" in outputs and hidden.dtype != torch.float64 and weight.shape[0] > ARGMAX_MAX_ROWS:
        # the index travels in an fp32 partial, exact up to 2^24 (global ids are formed in int64)
        raise ValueError(f"weight: expected at most {ARGMAX_MAX_ROWS} rows (per process) for outputs "
                         f"'argmax' with fp32 accumulation, got {weight.shape[0]}")
    check_values(hidden, ref_hidden, labels, weight.shape[0], ignore_index, check_labels, check_finite)


def check_values(hidden, ref_hidden, labels, vocab: int, ignore_index: int, check_labels: bool,
                 check_finite: bool) -> None:
    """The checks that read the data (one host sync each): labels in [0, vocab) or ignore_index,
    finite hidden states. Meta tensors pass: they hold no data to check."""
    if check_labels and labels.device.type != "meta":
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {first}"
            )
    if check_finite:
        for name, value in (("hidden", hidden), ("ref_hidden", ref_hidden)):
            if value is not None and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}: expected finite values, got NaN or inf")


def validate_process_group(process_group, impl: str) -> None:
    """A vocabulary-parallel call needs an initialised torch.distributed group and a streaming impl."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("process_group: expected a torch build with torch.distributed, got none")
    # What dist.new_group returns on a process outside the group.
    non_member = dist.GroupMember.NON_GROUP_MEMBER
    if (isinstance(process_group, type(non_member)) and process_group == non_member) or (
            isinstance(process_group, dist.ProcessGroup) and dist.get_rank(process_group) < 0):
        raise ValueError("process_group: expected a group that contains this process, got one without it")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise ValueError("process_group: expected an initialised torch.distributed default group, "
                         "got torch.distributed not initialised")
    if impl == "reference":
        raise ValueError("impl: expected 'auto', 'torch' or 'triton' with a process_group, got 'reference'")


def validate_grad_filter_eps(value) -> None:
    """``grad_filter_eps``: a finite float in [0, 1) (a probability threshold)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"grad_filter_eps: expected a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:  # False for NaN
        raise ValueError(f"grad_filter_eps: expected a float in [0, 1), got {value}")
