"""The ``fpo-bench`` console script runs the checkout's benchmark suite, which is not installed:
from any working directory, with nothing but the installed package on the path."""
import os
import subprocess
import sys
from pathlib import Path

from fpo_ops import bench_cli

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_finds_the_checkout():
    assert bench_cli.checkout_root() == ROOT


def test_console_script_runs_from_another_directory(tmp_path):
    results = ROOT / "benchmarks" / "results" / "cpu-2026-11-22.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; from fpo_ops.bench_cli import main; sys.exit(main(['--show', {str(results)!r}]))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| " in done.stdout and "fpo-" in done.stdout, done.stdout[:2000]
