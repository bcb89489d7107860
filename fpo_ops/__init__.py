"""fpo-ops: fused LM-head statistics and preference losses without materialising logits."""
from .token_stats import STAT_NAMES, TokenStats, token_stats
from .losses import (
    DistillConfig, DistillLoss, HeadConfig, KTOConfig, KTOLoss, LinearCrossEntropy, LossConfig, PreferenceLoss,
    PreferenceOutput,
    distill_loss, kto_loss, linear_cross_entropy, preference_loss,
)

__all__ = ["STAT_NAMES", "TokenStats", "token_stats", "PreferenceOutput", "preference_loss",
           "kto_loss", "distill_loss", "linear_cross_entropy", "PreferenceLoss", "KTOLoss", "DistillLoss", "LinearCrossEntropy",
           "LossConfig", "KTOConfig", "DistillConfig", "HeadConfig"]
__version__ = "0.1.0"
