"""Package layout only; all metadata lives in pyproject.toml.

The Triton device code sits in the top-level folder ``kernels/`` and is installed as
``fpo_ops.kernels``. It must never be installed as a top-level ``kernels`` package: that name
belongs to another PyPI project that transformers imports.
"""
from setuptools import find_packages, setup

kernel_packages = ["fpo_ops.kernels." + name for name in find_packages(where="kernels")]
# The benchmark suite (top-level ``benchmarks/``) ships the same way, as ``fpo_ops.benchmarks``.
benchmark_packages = ["fpo_ops.benchmarks." + name for name in find_packages(where="benchmarks")]
setup(
    packages=find_packages(include=["fpo_ops", "fpo_ops.*"]) + ["fpo_ops.kernels"] + kernel_packages
    + ["fpo_ops.benchmarks"] + benchmark_packages,
    package_dir={"fpo_ops.kernels": "kernels", "fpo_ops.benchmarks": "benchmarks"},
)
