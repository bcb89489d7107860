"""nn.Module wrappers of the loss heads: options fixed and checked at construction, tensors passed to ``forward``.

``forward`` takes the same positional arguments as the function it wraps; keyword arguments given
to ``forward`` (per-batch tensors such as ``ref_chosen_logps``, or an option to override) are
merged over the constructor's. The constructor builds the function's config dataclasses (the loss's
config and `HeadConfig`, ``function.option_groups``) from its options, so a bad option raises there,
not at the first forward; an unknown keyword raises ``TypeError``.
"""
import inspect
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .distill import distill_loss
from .kto import kto_loss
from .output import PreferenceOutput
from .preference import preference_loss


class _LossModule(nn.Module):
    function: Callable[..., Any]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        function = type(self).function
        parameters = inspect.signature(function).parameters
        unknown = [name for name in options if parameters.get(name, None) is None
                   or parameters[name].kind is not inspect.Parameter.KEYWORD_ONLY]
        if unknown:
            raise TypeError(f"{type(self).__name__}: expected keyword options of "
                            f"{function.__name__}, got unknown {unknown}")
        self.options: Dict[str, Any] = dict(options)
        # the configs, built once; forward passes them with the remaining (per-batch) keywords
        self._call_options = dict(options)
        configs = {}
        for placeholder, group in function.option_groups.items():
            keywords = {k: self._call_options.pop(k) for k in group.fields() if k in self._call_options}
            configs[placeholder] = group.build(self._call_options.pop(placeholder, None), keywords)
        self._call_options.update(configs)
        self.config, self.head_config = configs["config"], configs["head"]

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        return type(self).function(*args, **{**self._call_options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class _PolicyReferenceLoss(_LossModule):
    """A loss on a policy head and an optional reference head: ``forward(hidden, weight, labels,
    ref_hidden=None, ref_weight=None, **kw)``."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                **kwargs: Any) -> PreferenceOutput:
        return self._call(hidden, weight, labels, ref_hidden, ref_weight, **kwargs)


class PreferenceLoss(_PolicyReferenceLoss):
    """Module form of `preference_loss`: ``PreferenceLoss(loss_type="sigmoid", beta=0.1, ...)``.

    ``forward(hidden [2B, T, H], weight [V, H], labels [2B, T], ref_hidden=None, ref_weight=None, **kw)``
    returns a `PreferenceOutput`.
    """

    function = staticmethod(preference_loss)


class KTOLoss(_PolicyReferenceLoss):
    """Module form of `kto_loss`: ``KTOLoss(beta=0.1, desirable_weight=1.0, ...)``.

    ``forward(hidden [B, T, H], weight [V, H], labels [B, T], ref_hidden=None, ref_weight=None,
    desirable=..., kl_hidden=..., ...)`` returns a `PreferenceOutput`.
    """

    function = staticmethod(kto_loss)


class DistillLoss(_LossModule):
    """Module form of `distill_loss`: ``DistillLoss(beta=0.5, temperature=1.0, ...)``.

    ``forward(hidden [..., H], weight [V, H], labels [...], teacher_hidden [..., H'], teacher_weight=None,
    **kw)`` returns the [] loss.
    """

    function = staticmethod(distill_loss)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        return self._call(hidden, weight, labels, teacher_hidden, teacher_weight, **kwargs)
