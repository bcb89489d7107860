"""Sequence-level loss heads on per-token statistics: preference (DPO family, TDPO, SPO, ...), KTO, distillation."""
from .config import LOSS_TYPES
from .distill import distill_loss
from .kto import kto_loss
from .modules import DistillLoss, KTOLoss, PreferenceLoss
from .output import PreferenceOutput
from .preference import preference_loss

__all__ = [
    "LOSS_TYPES", "DistillLoss", "KTOLoss", "PreferenceLoss", "PreferenceOutput", "distill_loss", "kto_loss",
    "preference_loss",
]
