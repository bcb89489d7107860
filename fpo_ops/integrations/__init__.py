"""Hugging Face model and TRL trainer integrations.

Nothing is imported here on purpose: `import fpo_ops` must stay free of transformers and TRL. Import
the submodules directly::

    from fpo_ops.integrations.hf import hidden_and_head
    from fpo_ops.integrations.trl import FusedDPOConfig, FusedDPOTrainer
"""
