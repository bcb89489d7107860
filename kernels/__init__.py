"""Triton device code of fpo-ops (installed as ``fpo_ops.kernels``)."""
