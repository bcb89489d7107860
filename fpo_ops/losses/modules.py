"""nn.Module wrappers of the loss heads: options fixed and checked at construction, tensors passed to ``forward``.

``forward`` takes the same positional arguments as the function it wraps; keyword arguments given
to ``forward`` (per-batch tensors such as ``ref_chosen_logps``, or an option to override) are
merged over the constructor's. The constructor collects its options into the same dataclasses the
function does (`HeadConfig` and the loss's config), so a bad option raises there, not at the first
forward; an unknown keyword raises ``TypeError``.
"""
import inspect
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from .config import LossConfig
from .distill import TEACHER_RENAMES, DistillConfig, distill_loss
from .kto import KTOConfig, kto_loss
from .options import HeadConfig, pick_fields
from .output import PreferenceOutput
from .preference import preference_loss


class _LossModule(nn.Module):
    function: Callable[..., Any]
    loss_config: type
    head_renames: Mapping[str, str] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__()
        parameters = inspect.signature(type(self).function).parameters
        unknown = [name for name in options if parameters.get(name, None) is None
                   or parameters[name].kind is not inspect.Parameter.KEYWORD_ONLY]
        if unknown:
            raise TypeError(f"{type(self).__name__}: expected keyword options of "
                            f"{type(self).function.__name__}, got unknown {unknown}")
        self.head_config = HeadConfig.pick(options, self.head_renames)
        self.config = pick_fields(self.loss_config, options)
        self.options: Dict[str, Any] = dict(options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class _PolicyReferenceLoss(_LossModule):
    """A loss on a policy head and an optional reference head: ``forward(hidden, weight, labels,
    ref_hidden=None, ref_weight=None, **kw)``."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                **kwargs: Any) -> PreferenceOutput:
        return type(self).function(hidden, weight, labels, ref_hidden, ref_weight, **{**self.options, **kwargs})


class PreferenceLoss(_PolicyReferenceLoss):
    """Module form of `preference_loss`: ``PreferenceLoss(loss_type="sigmoid", beta=0.1, ...)``.

    ``forward(hidden [2B, T, H], weight [V, H], labels [2B, T], ref_hidden=None, ref_weight=None, **kw)``
    returns a `PreferenceOutput`.
    """

    function = staticmethod(preference_loss)
    loss_config = LossConfig


class KTOLoss(_PolicyReferenceLoss):
    """Module form of `kto_loss`: ``KTOLoss(beta=0.1, desirable_weight=1.0, ...)``.

    ``forward(hidden [B, T, H], weight [V, H], labels [B, T], ref_hidden=None, ref_weight=None,
    desirable=..., kl_hidden=..., ...)`` returns a `PreferenceOutput`.
    """

    function = staticmethod(kto_loss)
    loss_config = KTOConfig


class DistillLoss(_LossModule):
    """Module form of `distill_loss`: ``DistillLoss(beta=0.5, temperature=1.0, ...)``.

    ``forward(hidden [..., H], weight [V, H], labels [...], teacher_hidden [..., H'], teacher_weight=None,
    **kw)`` returns the [] loss.
    """

    function = staticmethod(distill_loss)
    loss_config = DistillConfig
    head_renames = TEACHER_RENAMES

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        return distill_loss(hidden, weight, labels, teacher_hidden, teacher_weight, **{**self.options, **kwargs})
