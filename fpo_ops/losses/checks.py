"""Argument checks shared by the loss heads; every error names its argument, expected vs got."""
import math
from typing import Callable, Optional

import torch


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, " \
                   f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}: expected a finite value in {interval}, got {value}")


def number(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Callable[[str, object], None]:
    """A check ``(name, value) -> None`` of a finite number in the interval given (None allowed if ``optional``)."""
    def check(name: str, value) -> None:
        if value is None and optional:
            return
        check_number(name, value, low, high, low_open, high_open)
    return check


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def one_of(choices) -> Callable[[str, object], None]:
    """A check ``(name, value) -> None`` that ``value`` is one of ``choices``."""
    def check(name: str, value) -> None:
        if value not in choices:
            raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return check


def validate_pair_tensor(name: str, value: Optional[torch.Tensor], n_pairs: int, device: torch.device) -> None:
    """A per-pair input: None or a floating-point tensor of shape [B] on the labels' device."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [{n_pairs}], got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if tuple(value.shape) != (n_pairs,):
        raise ValueError(f"{name}: expected shape ({n_pairs},) (one value per pair), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: expected device {device}, got {value.device}")


def validate_pair_labels(labels) -> int:
    """labels must be [2B, T] with chosen rows first; returns B."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 2:
        raise ValueError(f"labels: expected shape [2B, T] (chosen rows, then rejected), got {tuple(labels.shape)}")
    rows = labels.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"labels: expected an even, non-zero number of rows (first half chosen, second half rejected), got {rows}"
        )
    return rows // 2
