"""Speed and memory of the LM-head statistics against the alternatives (installed as ``fpo_ops.benchmarks``).

Nothing runs at import; the entry point is the ``fpo-bench`` console script (`fpo_ops.benchmarks.cli`).
"""
