"""Launch shapes of ``impl="triton"`` timed against each other on the GPU (the plan's tile sweep).

Each candidate is ``tile_config``'s own choice with some fields replaced (BN, BV, warps, stages).
Before it is timed its loss and gradients are compared with those of ``tile_config``'s choice on the
same inputs, so a shape that computes something else is recorded, never ranked. The fastest correct
shape is printed in the form ``fpo_ops.token_stats.kernels.utils.tile_config`` returns, ready to be written there.
"""
from pathlib import Path
from typing import List, Optional

import torch

from fpo_ops.token_stats.kernels.utils import TileConfig, override_tile_config, tile_config

from .check import CHECK_RTOL, loss_and_grads, relative_error
from .heads import get_head
from .measure import DTYPES, CaseSpec, run_case
from .summary import append_jsonl
from .workloads import get_workload

PROVIDER = "fpo-triton"


def _candidate(base: TileConfig, overrides: dict) -> TileConfig:
    return TileConfig(**{**base.as_kwargs(), **overrides})


def run_sweep(plan, jsonl: Optional[Path], device: Optional[torch.device] = None) -> int:
    """Check and time every candidate of ``plan.sweep_candidates``; one JSON line per candidate.

    Args:
        plan: a `gpu_plan.Plan` (head, dtype, sweep workload, N, candidates, repeats).
        jsonl: file the records are appended to as each candidate ends (None: not written).
        device: CUDA device (default the current one).

    Returns:
        Exit code: 0 with a best shape, 1 when no candidate ran correctly, 2 without CUDA.
    """
    if device is None:
        if not torch.cuda.is_available():
            print("sweep: launch shapes of impl='triton' are timed on a CUDA device; none is available",
                  flush=True)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[plan.dtype]
    head, workload = get_head(plan.head), get_workload(plan.sweep_workload)
    base = tile_config(device, dtype)
    where = f"{plan.head}/{plan.sweep_workload} N={plan.sweep_tokens} {plan.dtype}"
    print(f"sweep: {len(plan.sweep_candidates)} launch shapes on {where}; tile_config's: {base!r}", flush=True)
    expected = loss_and_grads(PROVIDER, workload, head, plan.sweep_tokens, dtype, device, seed=0)
    records: List[dict] = []
    for overrides in plan.sweep_candidates:
        record = {"kind": "sweep", "head": plan.head, "workload": plan.sweep_workload,
                  "n_tokens": plan.sweep_tokens, "dtype": plan.dtype, "overrides": dict(overrides)}
        try:
            cfg = _candidate(base, overrides)
            record["config"] = cfg.as_kwargs()
            with override_tile_config(cfg):
                got = loss_and_grads(PROVIDER, workload, head, plan.sweep_tokens, dtype, device, seed=0)
                errors = {key: relative_error(got[key], expected[key]) for key in expected}
                record["relative_errors"] = errors
                del got
                if max(errors.values()) > CHECK_RTOL[dtype]:
                    record.update(status="mismatch", reason=f"differs from tile_config's result: {errors}")
                else:
                    spec = CaseSpec(head=plan.head, workload=plan.sweep_workload, provider=PROVIDER,
                                    n_tokens=plan.sweep_tokens, dtype=plan.dtype, device=str(device),
                                    warmup=1, min_repeats=plan.sweep_repeats, max_repeats=plan.sweep_repeats,
                                    time_budget_s=0.0)
                    timed = run_case(spec)
                    record.update({k: timed[k] for k in ("status", "reason", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
                                                         "mem_fwd_bwd_mib") if k in timed})
        except Exception as exc:  # a shape that does not compile or launch is a result too
            record.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        records.append(record)
        append_jsonl(jsonl, record)
        timing = f"fwd+bwd {record['fwd_bwd_ms']:.1f} ms" if record.get("status") == "ok" else (
            f"{record.get('status')}: {record.get('reason', '')}")
        print(f"  {overrides or 'tile_config'}: {timing}", flush=True)
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        print("sweep: no launch shape ran correctly", flush=True)
        return 1
    best = min(ok, key=lambda r: r["fwd_bwd_ms"])
    own = next((r for r in ok if not r["overrides"]), None)
    gain = f", {own['fwd_bwd_ms'] / best['fwd_bwd_ms']:.2f}x tile_config's own" if own else ""
    print(f"best launch shape on {where}: {best['fwd_bwd_ms']:.1f} ms{gain}", flush=True)
    print(f"tile_config({device.type}, {dtype}) -> {TileConfig(**best['config'])!r}", flush=True)
    return 0
