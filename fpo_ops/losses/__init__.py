"""Sequence-level loss heads on per-token statistics: preference (DPO family, TDPO, SPO, ...), KTO, distillation."""
from .output import PreferenceOutput
from .preference import preference_loss

__all__ = ["PreferenceOutput", "preference_loss"]
