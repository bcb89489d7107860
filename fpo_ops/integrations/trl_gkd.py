"""The GKD drop-in under its own import path, so that switching a script stays one import::

    from fpo_ops.integrations.trl_gkd import FusedGKDTrainer as GKDTrainer

It lives in `fpo_ops.integrations.trl.gkd`.
"""
from .trl.gkd import FusedGKDTrainer

__all__ = ["FusedGKDTrainer"]
