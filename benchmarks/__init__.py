"""Speed and memory of the LM-head statistics against the alternatives (not installed: it runs from the checkout,
as ``benchmarks``).

Nothing runs at import; the entry point is the ``fpo-bench`` console script (`fpo_ops.bench_cli`,
which runs `benchmarks.cli` of the checkout), or ``python -m benchmarks.cli`` from the repository root.
"""
