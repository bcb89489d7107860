"""fpo-ops: fused LM-head statistics and preference losses without materialising logits."""
from .token_stats import STAT_NAMES, TokenStats, token_stats
from .losses import (
    DistillLoss, KTOLoss, PreferenceLoss, PreferenceOutput, distill_loss, kto_loss, preference_loss,
)

__all__ = ["STAT_NAMES", "TokenStats", "token_stats", "PreferenceOutput", "preference_loss",
           "kto_loss", "distill_loss", "PreferenceLoss", "KTOLoss", "DistillLoss"]
__version__ = "0.1.0"
