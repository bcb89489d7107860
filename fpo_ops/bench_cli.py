"""The ``fpo-bench`` console script: the benchmark suite of the checkout fpo-ops is installed from.

The suite (``benchmarks/`` at the top of the repository) is not part of the installed package: it
imports TRL, Liger-Kernel and Cut-Cross-Entropy and writes its results into the checkout. This
entry point puts the checkout on ``sys.path`` and runs ``benchmarks.cli`` there, the same as
``python -m benchmarks.cli`` from the repository root.
"""
import sys
from pathlib import Path
from typing import Optional, Sequence


def checkout_root() -> Optional[Path]:
    """The repository holding this package when it is installed from a checkout (``pip install -e``)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "cli.py").is_file() else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    root = checkout_root()
    if root is None:
        print("fpo-bench: the benchmarks live in the source checkout (benchmarks/), which this installation "
              "does not come from; install fpo-ops with `pip install -e .` from a checkout, or run "
              "`python -m benchmarks.cli` in one", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.cli import main as bench_main
    return bench_main(argv)
