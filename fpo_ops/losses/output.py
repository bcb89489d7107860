"""The result of a sequence-level loss head: the loss, TRL-named metrics and per-sequence values."""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


@dataclass
class PreferenceOutput:
    """What `preference_loss` and `kto_loss` return.

    Attributes:
        loss: [] scalar loss (carries the gradient).
        metrics: detached 0-d tensors keyed by the names TRL's trainers log (``"rewards/chosen"``,
            ``"rewards/rejected"``, ``"rewards/accuracies"``, ``"rewards/margins"``, ``"logps/chosen"``,
            ``"logps/rejected"``, ``"logits/chosen"``, ``"logits/rejected"``, ``"entropy"``,
            ``"mean_token_accuracy"``, plus loss-specific ones such as ``"kl/chosen"``, ``"nll_loss"``).
            Tensors, not floats, so that building them never synchronises with the device.
        chosen_logps: [B] per-sequence policy log-probs of the chosen responses as the loss uses them
            (sums over completion tokens, or means for length-normalised losses; with gradient).
        rejected_logps: [B] the same for the rejected responses.
        ref_chosen_logps, ref_rejected_logps: [B] reference log-probs (detached) or None when the loss
            ran without a reference.
        chosen_rewards, rejected_rewards: [B] detached implicit rewards behind the ``rewards/*`` metrics.
        per_sequence_loss: [B] detached loss of each pair (weighted sum over the loss types).
    """

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    chosen_logps: Optional[torch.Tensor] = None
    rejected_logps: Optional[torch.Tensor] = None
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_rewards: Optional[torch.Tensor] = None
    rejected_rewards: Optional[torch.Tensor] = None
    per_sequence_loss: Optional[torch.Tensor] = None
