"""Loss heads on per-token statistics: preference (DPO family, TDPO, SPO, ...), KTO, distillation, and
the plain cross-entropy of a linear head (`linear_cross_entropy`)."""
from .config import LOSS_TYPES, LossConfig
from .cross_entropy import LinearCrossEntropy, linear_cross_entropy
from .distill import DistillConfig, distill_loss
from .kto import KTOConfig, kto_loss
from .modules import DistillLoss, KTOLoss, PreferenceLoss
from .options import HeadConfig
from .output import PreferenceOutput
from .preference import preference_loss

__all__ = [
    "LOSS_TYPES", "DistillConfig", "DistillLoss", "HeadConfig", "KTOConfig", "KTOLoss", "LinearCrossEntropy", "LossConfig",
    "PreferenceLoss", "PreferenceOutput", "distill_loss", "kto_loss", "linear_cross_entropy", "preference_loss",
]
