"""The GPU run of ``scripts/gpu_check.sh``: what it measures, in what order, and how long that takes.

A GPU run is budgeted in minutes, not hours, so the default plan is sized to finish in 4 minutes of
one H200 including every compile, and ``estimate`` says so before anything runs:

    python -m benchmarks.gpu_plan estimate [--plan default]   # the cases and their seconds
    python -m benchmarks.gpu_plan tests    [--plan default]   # pytest arguments of the GPU tests
    python -m benchmarks.gpu_plan bench --out DIR [--plan default] [fpo-bench arguments]
    python -m benchmarks.gpu_plan sweep --out DIR [--plan default]

``bench`` is fpo-bench with the plan's arguments, appending ``DIR/cases.jsonl`` as each case ends;
``sweep`` times candidate launch shapes of ``impl="triton"`` (``DIR/sweep.jsonl``) and prints the
fastest one in the form ``fpo_ops.token_stats.kernels.utils.tile_config`` returns.

The estimate is the performance model of DESIGN section 5: a case's step costs its provider's head
GEMMs (``2 N H V`` FLOPs each) at a fraction of the measured bf16 GEMM rate, plus, for providers
that materialise logits, passes over ``[N, V]`` fp32 buffers at the HBM copy rate. A case whose
logits would not fit in memory is counted as a quick out-of-memory record. The fractions, compile
times and start-up costs below are assumptions (stated beside each), not measurements; the first
GPU run's ``cases.jsonl`` is what they should be checked against.
"""
import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fpo_ops.token_stats.kernels.utils import FIRST_WIDE_16BIT_STEPS, PREVIOUS_16BIT_TILES

from .heads import get_head
from .workloads import get_workload

# ---- the model's constants (H200, bf16) -----------------------------------------------------
GEMM_TFLOPS = 790.0      # bf16 GEMM rate measured on H100/H200 (DESIGN section 5)
HBM_TBPS = 4.3           # device-to-device copy rate measured on an H200 (bytes read + written)
GPU_MEMORY_GIB = 139.0   # usable memory of an H200
PYTHON_START_S = 5.0     # one Python process importing torch, triton and transformers
CASE_OVERHEAD_S = 0.3    # inputs drawn on the device, cache emptied, host work between steps
# One Triton kernel variant compiled cold (the machine's cache starts empty): the 10 variants of
# tests/support/kernel_compile_check.py compile for sm_90 in about 7 s on a 2-core CI machine; doubled.
TRITON_COMPILE_S = 1.5


@dataclass(frozen=True)
class ProviderModel:
    """How one provider spends a step, relative to the least work of its workload.

    ``extra_gemms``: head GEMMs beyond the least work (TRL projects the policy once per function;
    the materialising providers skip the backward's recompute). ``efficiency``: fraction of
    GEMM_TFLOPS its GEMMs reach. ``logit_passes``: passes over an [N, V] fp32 buffer per model;
    ``logit_buffers``: such buffers alive at the peak per model (0: never materialised).
    ``compile_s``: compile at each workload's first call, its check (Triton kernels of that set of
    statistics, torch.compile); ``recompile_s``: each further token count.
    """

    efficiency: float
    extra_gemms: Dict[str, int] = field(default_factory=dict)
    logit_passes: float = 0.0
    logit_buffers: float = 0.0
    compile_s: float = 0.0
    recompile_s: float = 0.0


PROVIDER_MODELS = {
    # per workload's set of statistics a forward and a dz kernel variant; the dh and dw kernels do
    # not depend on the statistics and are compiled by the GPU tests already
    "fpo-triton": ProviderModel(efficiency=0.55, compile_s=2 * TRITON_COMPILE_S),
    "fpo-torch": ProviderModel(efficiency=0.5),
    # logits, log-softmax, its gradient, bf16 copies: ~10 passes, ~4 buffers per model at the peak
    "naive": ProviderModel(efficiency=0.7, extra_gemms={"logp": -1, "dpo": -1, "tdpo": -2},
                           logit_passes=10.0, logit_buffers=4.0),
    # the token KL needs ChunkedDivergenceFunction: the policy is projected (and recomputed) again
    "trl": ProviderModel(efficiency=0.5, extra_gemms={"tdpo": 2}, compile_s=2 * TRITON_COMPILE_S),
    # gradients inside the forward, its chunk loop under torch.compile: compiled at the check's N,
    # recompiled once at the next N, which dynamo then marks dynamic
    "liger": ProviderModel(efficiency=0.5, compile_s=25.0, recompile_s=10.0),
    "cce": ProviderModel(efficiency=0.55, compile_s=2 * TRITON_COMPILE_S),
}


@dataclass(frozen=True)
class Plan:
    """One GPU run: the GPU tests, the provider comparison, and the tile-shape sweep."""

    name: str
    head: str
    dtype: str
    workloads: Tuple[str, ...]
    sizes: Tuple[int, ...]
    providers: Tuple[str, ...]
    warmup: int
    min_repeats: int
    max_repeats: int
    time_budget_s: float
    check_tokens: int
    test_args: Tuple[str, ...]
    tests_estimate_s: float
    sweep_workload: str
    sweep_tokens: int
    # launch shapes tried, as overrides of tile_config's choice (the first is tile_config's own)
    sweep_candidates: Tuple[Dict[str, object], ...]
    sweep_repeats: int
    # fpo-bench --isolate: "auto" (a process per case on CPU, where peak RSS needs it) or "none"
    isolate: str = "auto"

    def bench_args(self) -> List[str]:
        """fpo-bench arguments of the comparison."""
        return ["--heads", self.head, "--dtype", self.dtype, "--workloads", ",".join(self.workloads),
                "--sizes", ",".join(map(str, self.sizes)), "--providers", ",".join(self.providers),
                "--warmup", str(self.warmup), "--min-repeats", str(self.min_repeats),
                "--max-repeats", str(self.max_repeats), "--time-budget", str(self.time_budget_s),
                "--check-tokens", str(self.check_tokens), "--isolate", self.isolate]


GPU_TESTS = ("-m", "gpu", "tests/token_stats/test_triton_stats.py", "tests/token_stats/test_gemm_fp32.py")

PLANS = {
    "default": Plan(
        name="default", head="llama3-8b", dtype="bfloat16", workloads=("logp", "dpo", "tdpo"),
        sizes=(4096, 16384, 65536),
        # the anchors are run where they import (gpu_check.sh installs carried wheels first)
        providers=("fpo-triton", "fpo-torch", "naive", "trl", "liger", "cce"),
        warmup=1, min_repeats=3, max_repeats=5, time_budget_s=0.3, check_tokens=4096,
        # 7 tests: ~20 kernel variants compiled (fp32 and bf16, bias, softcap, filtering), float64
        # oracles at N 1031 x V 32003 on the GPU, one Llama-3 head at N 4096
        test_args=GPU_TESTS, tests_estimate_s=PYTHON_START_S + 20 * TRITON_COMPILE_S + 6.0,
        sweep_workload="tdpo", sweep_tokens=16384,
        # tile_config's per-variant shapes ([128, 128] tiles for both tdpo kernels), the [64, 128]
        # ones before them for every launch (levels None; the first GPU run keeps or reverts the
        # default), the per-variant shapes with 64-wide hidden steps through 3 stages, and the same
        # per-variant shapes with the weight tiles by TMA (`TileConfig.weight_tma`, off until
        # measured). Not [64, 256]: its 64x128 wgmma per warpgroup holds as many accumulator
        # registers per thread as [128, 128]
        sweep_candidates=(
            {},
            dict(PREVIOUS_16BIT_TILES, levels=None),
            FIRST_WIDE_16BIT_STEPS,
            {"weight_tma": True},
        ),
        sweep_repeats=3,
    ),
    # the same stages at CPU sizes: what CI runs to test the script itself
    "ci": Plan(
        name="ci", head="h48v200", dtype="float32", workloads=("logp", "dpo"), sizes=(32, 64),
        providers=("fpo-triton", "fpo-torch", "naive"), warmup=0, min_repeats=1, max_repeats=1,
        time_budget_s=0.0, check_tokens=32, test_args=("-m", "gpu", "tests/token_stats/test_gemm_fp32.py"),
        tests_estimate_s=PYTHON_START_S, sweep_workload="dpo", sweep_tokens=64,
        sweep_candidates=({}, {"BN": 32}), sweep_repeats=1, isolate="none",
    ),
}


def get_plan(name: str) -> Plan:
    if name not in PLANS:
        raise ValueError(f"plan: expected one of {sorted(PLANS)}, got {name!r}")
    return PLANS[name]


# ---- the estimate -----------------------------------------------------------------------------

def _least_gemm_flops(plan: Plan, workload: str, n_tokens: int) -> Tuple[int, float]:
    head = get_head(plan.head)
    return get_workload(workload).total_gemms, 2.0 * n_tokens * head.hidden * head.vocab


def step_seconds(plan: Plan, provider: str, workload: str, n_tokens: int) -> Optional[float]:
    """Modelled seconds of one forward + backward, or None when the logits would not fit in memory."""
    model = PROVIDER_MODELS[provider]
    gemms, gemm_flops = _least_gemm_flops(plan, workload, n_tokens)
    gemms += model.extra_gemms.get(workload, 0)
    vocab = get_head(plan.head).vocab
    models = 2 if get_workload(workload).needs_ref else 1
    logits_bytes = 4.0 * n_tokens * vocab
    if model.logit_buffers * models * logits_bytes > GPU_MEMORY_GIB * 2**30:
        return None
    gemm_s = gemms * gemm_flops / (model.efficiency * GEMM_TFLOPS * 1e12)
    memory_s = model.logit_passes * models * logits_bytes / (HBM_TBPS * 1e12)
    return gemm_s + memory_s


def _steps(plan: Plan, step_s: float) -> int:
    """Warm-up, timed repeats (until the time budget, within min/max), one memory-measuring step."""
    repeats = min(plan.max_repeats, max(plan.min_repeats, math.ceil(plan.time_budget_s / step_s)))
    return plan.warmup + repeats + 1


def estimate(plan: Plan, providers: Optional[Tuple[str, ...]] = None) -> List[Tuple[str, str, float]]:
    """Every item of the run with its modelled seconds: (stage, description, seconds).

    Args:
        plan: the plan.
        providers: the providers that will run (default all of the plan's: the upper bound).

    Returns:
        Rows in run order; their sum is the run's estimate.
    """
    providers = plan.providers if providers is None else providers
    rows = [("setup", "install fpo-ops (no deps), carried wheels, versions", PYTHON_START_S + 4.0),
            ("tests", "pytest " + " ".join(plan.test_args), plan.tests_estimate_s),
            ("bench", "start, GEMM rate", PYTHON_START_S + 1.0)]
    for provider in providers:
        if provider == "fpo-torch":
            continue
        model = PROVIDER_MODELS.get(provider)
        if model is None or not plan.head.startswith(("llama", "qwen", "gemma")):
            continue
        for workload in plan.workloads:
            if _runs(provider, workload):
                step = step_seconds(plan, provider, workload, plan.check_tokens) or 0.0
                base = step_seconds(plan, "fpo-torch", workload, plan.check_tokens)
                rows.append(("bench", f"check {provider} vs fpo-torch {workload} N={plan.check_tokens}",
                             step + base + model.compile_s))
    for workload in plan.workloads:
        for n_tokens in plan.sizes:
            for provider in providers:
                if provider not in PROVIDER_MODELS or not _runs(provider, workload):
                    continue
                step = step_seconds(plan, provider, workload, n_tokens)
                label = f"{plan.head}/{workload} N={n_tokens} {provider}"
                if step is None:
                    rows.append(("bench", label + " (out of memory)", CASE_OVERHEAD_S + 1.0))
                    continue
                second_size = [n for n in plan.sizes if n != plan.check_tokens][:1]
                compile_s = PROVIDER_MODELS[provider].recompile_s if [n_tokens] == second_size else 0.0
                rows.append(("bench", label, CASE_OVERHEAD_S + compile_s + _steps(plan, step) * step))
    sweep_step = step_seconds(plan, "fpo-triton", plan.sweep_workload, plan.sweep_tokens) or 0.0
    rows.append(("sweep", "start", PYTHON_START_S))
    for candidate in plan.sweep_candidates:
        # a new launch shape recompiles the 4 kernels (tile_config's own are cached by the bench);
        # a check step, a warm-up, the timed repeats and a memory step
        steps = 1 + plan.sweep_repeats + 2
        compile_s = 4 * TRITON_COMPILE_S if candidate else 0.0
        rows.append(("sweep", f"{plan.sweep_workload} N={plan.sweep_tokens} {candidate or 'tile_config'}",
                     compile_s + steps * sweep_step))
    rows.append(("summary", "results JSON and plot", PYTHON_START_S))
    return rows


def _runs(provider: str, workload: str) -> bool:
    """The workloads each anchor implements (see its provider's `unsupported`)."""
    if provider == "liger":
        return workload in ("dpo", "jsd")
    if provider == "cce":
        return workload in ("logp", "dpo")
    return True


def print_estimate(plan: Plan) -> float:
    rows = estimate(plan)
    print(f"GPU plan {plan.name!r}: {plan.head} {plan.dtype}, workloads {','.join(plan.workloads)}, "
          f"N {','.join(map(str, plan.sizes))}, providers {','.join(plan.providers)} (anchors only where "
          f"they import; all counted here)")
    print(f"model: head GEMMs at a per-provider fraction of {GEMM_TFLOPS:.0f} TFLOP/s, [N, V] fp32 passes at "
          f"{HBM_TBPS} TB/s, {GPU_MEMORY_GIB:.0f} GiB, {TRITON_COMPILE_S:.0f} s per cold Triton kernel, "
          f"{PYTHON_START_S:.0f} s per Python start")
    for stage, description, seconds in rows:
        print(f"  {stage:<8} {description:<60} {seconds:6.1f} s")
    total = sum(seconds for _, _, seconds in rows)
    for stage in dict.fromkeys(stage for stage, _, _ in rows):
        print(f"  stage {stage}: {sum(s for st, _, s in rows if st == stage):.0f} s")
    print(f"estimated {math.ceil(total)} s")
    return total


# ---- running it -----------------------------------------------------------------------------

def run_bench(plan: Plan, out: Path, extra: List[str]) -> int:
    from . import cli

    return cli.main(plan.bench_args() + ["--jsonl", str(out / "cases.jsonl"), "--no-save"] + extra)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("estimate", "tests", "bench", "sweep"))
    parser.add_argument("--plan", default="default", help=f"one of {', '.join(PLANS)}")
    parser.add_argument("--out", type=Path, help="folder of the JSON-lines files (bench, sweep)")
    args, extra = parser.parse_known_args(argv)
    try:
        plan = get_plan(args.plan)
    except ValueError as exc:
        raise SystemExit(f"gpu_plan: {exc}")
    if args.command == "estimate":
        print_estimate(plan)
        return 0
    if args.command == "tests":
        print(" ".join(plan.test_args))
        return 0
    if args.out is None:
        raise SystemExit(f"gpu_plan {args.command}: --out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "bench":
        return run_bench(plan, args.out, extra)
    from .tile_sweep import run_sweep

    return run_sweep(plan, args.out / "sweep.jsonl")


if __name__ == "__main__":
    sys.exit(main())
