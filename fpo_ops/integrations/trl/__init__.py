"""Drop-ins for TRL's trainers whose LM heads run through `fpo_ops` (no ``[tokens, vocab]`` logits).

Switching an existing TRL script is one import, e.g.::

    from fpo_ops.integrations.trl import FusedDPOConfig as DPOConfig, FusedDPOTrainer as DPOTrainer

One module per trainer (``dpo``, with the SPO/SPPO additions in ``seed``; ``sft``, ``kto``,
``grpo``, ``rloo`` on the fused head of ``head``; ``distillation``; ``gkd``) and one of pieces they
share (``common``). `FusedGKDTrainer` is loaded on first use: TRL keeps GKD in ``trl.experimental``.
"""
from .distillation import FusedDistillationConfig, FusedDistillationTrainer, fused_divergence_loss
from .dpo import TRAINER_LOSS_TYPES, FusedDPOConfig, FusedDPOTrainer, LossArguments
from .grpo import FusedGRPOConfig, FusedGRPOTrainer
from .head import FusedHeadArguments, FusedHeadTrainer, add_fused_head, fused_head_stats
from .kto import FusedKTOConfig, FusedKTOTrainer
from .rloo import FusedRLOOConfig, FusedRLOOTrainer
from .seed import SeedLossArguments
from .sft import FusedSFTConfig, FusedSFTTrainer

__all__ = [
    "FusedDPOConfig", "FusedDPOTrainer", "LossArguments", "SeedLossArguments", "TRAINER_LOSS_TYPES",
    "FusedSFTConfig", "FusedSFTTrainer", "FusedKTOConfig", "FusedKTOTrainer",
    "FusedDistillationConfig", "FusedDistillationTrainer", "fused_divergence_loss",
    "FusedGRPOConfig", "FusedGRPOTrainer", "FusedRLOOConfig", "FusedRLOOTrainer",
    "FusedHeadArguments", "FusedHeadTrainer", "add_fused_head", "fused_head_stats", "FusedGKDTrainer",
]


def __getattr__(name):
    if name == "FusedGKDTrainer":
        from .gkd import FusedGKDTrainer

        return FusedGKDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
