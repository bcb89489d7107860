"""Triton device code of `token_stats`: the forward and backward kernels and their launchers."""
