"""Loss-type catalogue and the configuration checks of `preference_loss` (every error names its argument)."""
import math
from typing import Optional, Sequence, Tuple

import torch

from .fdivergence import F_DIVERGENCE_TYPES

# TRL DPOTrainer's loss types, in TRL's order.
TRL_DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
EXTRA_LOSS_TYPES = ("tdpo1", "tdpo2", "spo", "sppo", "sppo_single", "simpo", "cpo", "orpo")
LOSS_TYPES = TRL_DPO_LOSS_TYPES + EXTRA_LOSS_TYPES

# Losses on log-ratios to the reference: need reference log-probs (computed or precomputed).
NEEDS_REFERENCE_LOGPS = frozenset(
    {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
     "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "tdpo1", "tdpo2", "sppo",
     "sppo_single"}
)
# Losses on a token-level KL over the vocabulary: need the reference model's hidden states.
NEEDS_REFERENCE_MODEL = frozenset({"tdpo1", "tdpo2", "spo"})
# Losses with a β·(chosen - rejected) - margin logit, where a per-pair margin is meaningful.
MARGIN_LOSS_TYPES = frozenset(
    {"sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm", "tdpo1", "tdpo2",
     "spo", "simpo", "cpo"}
)
# TRL: the f-DPO reparameterisation only cancels log Z(x) in the reward difference of these.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# TRL: sorting the batch would misalign WPO's per-pair weights.
NO_WEIGHTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
# Losses of the CPO/ORPO trainers, which log rewards on the policy log-probs even with a reference at hand.
REFERENCE_FREE_LOSS_TYPES = frozenset({"simpo", "cpo", "orpo"})
# Losses whose policy log-prob is the per-token mean (SimPO, ORPO) rather than the sum.
MEAN_LOGP_LOSS_TYPES = frozenset({"simpo", "orpo"})


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


def normalize_loss_types(loss_type, loss_weights) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """``loss_type`` (a name or a sequence of names) and ``loss_weights`` -> two equal-length tuples."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type: expected a loss name or a non-empty list of names, got an empty list")
    for name in types:
        if name not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {list(LOSS_TYPES)}, got {name!r}")
    if loss_weights is None:
        return types, (1.0,) * len(types)
    weights = tuple(loss_weights)
    if len(weights) != len(types):
        raise ValueError(
            f"loss_weights: expected {len(types)} weights (one per loss_type {list(types)}), got {len(weights)}"
        )
    for i, w in enumerate(weights):
        check_number(f"loss_weights[{i}]", w)
    return types, tuple(float(w) for w in weights)


def validate_options(
    types: Sequence[str], *, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, ld_alpha,
    use_weighting, discopop_tau, tdpo_alpha, spo_alpha, simpo_gamma, cpo_alpha,
) -> None:
    """Scalar options of `preference_loss` and their compatibility with the loss types."""
    chosen = set(types)
    check_number("beta", beta, low=0.0, low_open=True)
    check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    if "robust" in chosen:
        check_number("label_smoothing (robust)", label_smoothing, low=0.0, high=0.5, high_open=True)
    if "exo_pair" in chosen and label_smoothing <= 0.0:
        raise ValueError(
            "label_smoothing: expected a value in (0, 1) for 'exo_pair' (the EXO paper uses 1e-3), "
            f"got {label_smoothing}"
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type: expected one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and not chosen <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type: {f_divergence_type!r} expects loss types among {sorted(F_DIVERGENCE_LOSS_TYPES)}, "
            f"got {list(types)}"
        )
    check_number("f_alpha_divergence_coef", f_alpha_divergence_coef, low=0.0, high=1.0)
    if ld_alpha is not None:
        check_number("ld_alpha", ld_alpha, low=0.0, high=1.0)
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting: expected a bool, got {type(use_weighting).__name__}")
    if use_weighting and chosen & NO_WEIGHTING_LOSS_TYPES:
        raise ValueError(
            f"use_weighting: expected False with {sorted(chosen & NO_WEIGHTING_LOSS_TYPES)} (sorting the batch "
            "misaligns the per-pair weights), got True"
        )
    check_number("discopop_tau", discopop_tau, low=0.0, low_open=True)
    check_number("tdpo_alpha", tdpo_alpha, low=0.0)
    check_number("spo_alpha", spo_alpha, low=0.0, low_open=True)
    check_number("simpo_gamma", simpo_gamma)
    check_number("cpo_alpha", cpo_alpha, low=0.0)


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
