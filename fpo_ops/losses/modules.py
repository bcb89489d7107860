"""nn.Module wrappers of the loss heads: options fixed at construction, tensors passed to ``forward``.

``forward`` takes the same positional arguments as the function it wraps; keyword arguments given
to ``forward`` (per-batch tensors such as ``ref_chosen_logps``, or an option to override) are
merged over the constructor's.
"""
from typing import Any, Optional

import torch
from torch import nn

from .distill import distill_loss
from .kto import kto_loss
from .output import PreferenceOutput
from .preference import preference_loss


class _LossModule(nn.Module):
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = dict(options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class PreferenceLoss(_LossModule):
    """Module form of `preference_loss`: ``PreferenceLoss(loss_type="sigmoid", beta=0.1, ...)``.

    ``forward(hidden [2B, T, H], weight [V, H], labels [2B, T], ref_hidden=None, ref_weight=None, **kw)``
    returns a `PreferenceOutput`.
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                **kwargs: Any) -> PreferenceOutput:
        return preference_loss(hidden, weight, labels, ref_hidden, ref_weight, **{**self.options, **kwargs})


class KTOLoss(_LossModule):
    """Module form of `kto_loss`: ``KTOLoss(beta=0.1, desirable_weight=1.0, ...)``.

    ``forward(hidden [B, T, H], weight [V, H], labels [B, T], ref_hidden=None, ref_weight=None,
    desirable=..., kl_hidden=..., ...)`` returns a `PreferenceOutput`.
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                **kwargs: Any) -> PreferenceOutput:
        return kto_loss(hidden, weight, labels, ref_hidden, ref_weight, **{**self.options, **kwargs})


class DistillLoss(_LossModule):
    """Module form of `distill_loss`: ``DistillLoss(beta=0.5, temperature=1.0, ...)``.

    ``forward(hidden [..., H], weight [V, H], labels [...], teacher_hidden [..., H'], teacher_weight=None,
    **kw)`` returns the [] loss.
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        return distill_loss(hidden, weight, labels, teacher_hidden, teacher_weight, **{**self.options, **kwargs})
