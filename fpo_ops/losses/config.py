"""`LossConfig`: the loss options of `preference_loss`, checked once; its fields are the function's keywords.

Its fields are generated from the registry (`registry.HYPER_PARAMETERS`, plus the loss types and
their weights), and `keywords.option_keywords` makes each a keyword of `preference_loss`, so that a
loss type's hyper-parameter is declared in one place; the checks are
those of each hyper-parameter, of each chosen loss type, and of their compatibility. Every error
names its argument.
"""
import dataclasses
from typing import Optional, Sequence, Tuple, Union

from .checks import check_number, validate_pair_labels, validate_pair_tensor  # noqa: F401 (re-exported)
from .registry import HYPER_PARAMETERS, LOSS_TYPES, LOSSES, types_where  # noqa: F401 (LOSS_TYPES re-exported)

# Sets derived from the registry, under the names code outside the losses reads.
F_DIVERGENCE_LOSS_TYPES = types_where(lambda spec: spec.f_divergence)
NO_WEIGHTING_LOSS_TYPES = types_where(lambda spec: not spec.weighting)


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


def _post_init(self) -> None:
    types, weights = normalize_loss_types(self.loss_type, self.loss_weights)
    object.__setattr__(self, "loss_type", types)
    object.__setattr__(self, "loss_weights", weights)
    for param in HYPER_PARAMETERS:
        value = getattr(self, param.name)
        param.check(param.name, value)
        if param.type in (float, Optional[float]) and value is not None:
            object.__setattr__(self, param.name, float(value))
    chosen = set(types)
    for name in types:
        if LOSSES[name].check is not None:
            LOSSES[name].check(self)
    if self.f_divergence_type != "reverse_kl" and not chosen <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type: {self.f_divergence_type!r} expects loss types among "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got {list(types)}"
        )
    if self.average_log_prob and self.ld_alpha is not None:
        raise ValueError(f"ld_alpha: expected None with average_log_prob=True (LD-DPO weights summed log-probs), "
                         f"got {self.ld_alpha}")
    if self.use_weighting and chosen & NO_WEIGHTING_LOSS_TYPES:
        raise ValueError(
            f"use_weighting: expected False with {sorted(chosen & NO_WEIGHTING_LOSS_TYPES)} (sorting the batch "
            "misaligns the per-pair weights), got True"
        )


LossConfig = dataclasses.make_dataclass(
    "LossConfig",
    [("loss_type", Union[str, Sequence[str]], dataclasses.field(default="sigmoid")),
     ("loss_weights", Optional[Sequence[float]], dataclasses.field(default=None))]
    + [(p.name, p.type, dataclasses.field(default=p.default)) for p in HYPER_PARAMETERS],
    namespace={"__post_init__": _post_init, "__module__": __name__, "__doc__": (
        "The loss options of `preference_loss` (frozen): ``loss_type`` and ``loss_weights`` as tuples, "
        "then every hyper-parameter of `registry.HYPER_PARAMETERS`, checked at construction.")},
    frozen=True,
)
