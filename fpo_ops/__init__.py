"""fpo-ops: fused LM-head statistics and preference losses without materialising logits."""
from .stats import STAT_NAMES, TokenStats
from .token_stats import token_stats

__all__ = ["STAT_NAMES", "TokenStats", "token_stats"]
__version__ = "0.1.0"
