"""Time and memory of one case: median forward, backward and forward+backward after warm-up.

A case is one (head, workload, provider, N, dtype, device). `run_case` measures in the current
process; `run_case_isolated` runs it in a fresh Python process (CPU: the peak RSS of a process is
only meaningful when nothing else ran in it) and turns a crash or an out-of-memory kill into a record.
"""
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .heads import get_head
from .memory import PeakMemory
from .providers import get_provider
from .workloads import CaseInputs, get_workload, make_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
RESULT_PREFIX = "FPO_BENCH_RESULT "


@dataclass
class CaseSpec:
    head: str
    workload: str
    provider: str
    n_tokens: int
    dtype: str
    device: str
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 20
    # Repeats stop once this many seconds of timed steps have run (and min_repeats are done).
    time_budget_s: float = 3.0
    seed: int = 0
    threads: Optional[int] = None


def case_flops(spec: CaseSpec) -> Dict[str, float]:
    """FLOPs of the least work (DESIGN section 5), ``2 N H V`` per head GEMM.

    Args:
        spec: the case (its head, workload and N).

    Returns:
        {"fwd": FLOPs of the forward GEMMs, "fwd_bwd": FLOPs of the whole step}.
    """
    head, workload = get_head(spec.head), get_workload(spec.workload)
    gemm = 2.0 * spec.n_tokens * head.hidden * head.vocab
    return {"fwd": workload.forward_gemms * gemm, "fwd_bwd": workload.total_gemms * gemm}


def _synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _clear_grads(inputs: CaseInputs) -> None:
    inputs.hidden.grad = None
    inputs.weight.grad = None


# torch.OutOfMemoryError is recent; older torch only has the CUDA one.
_OOM_TYPES = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None),
                               MemoryError) if t is not None)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, _OOM_TYPES) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _timed_steps(step, inputs: CaseInputs, spec: CaseSpec, sync) -> Dict[str, List[float]]:
    times = {"fwd": [], "bwd": [], "fwd_bwd": []}
    spent = 0.0
    while len(times["fwd"]) < spec.max_repeats and (len(times["fwd"]) < spec.min_repeats
                                                     or spent < spec.time_budget_s):
        _clear_grads(inputs)
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        times["fwd"].append(t1 - t0)
        times["bwd"].append(t2 - t1)
        times["fwd_bwd"].append(t2 - t0)
        spent += t2 - t0
        del loss
    return times


def _measure_memory(step, inputs: CaseInputs, device: torch.device) -> Dict[str, Optional[float]]:
    """Peak above the inputs during the forward, and during the whole step (returned gradients included)."""
    _clear_grads(inputs)
    peak = PeakMemory(device)
    peak.start()
    loss = step()
    mem_fwd = peak.peak_mib()
    loss.backward()
    mem_step = peak.peak_mib()
    del loss
    _clear_grads(inputs)
    return {"mem_fwd_mib": mem_fwd, "mem_fwd_bwd_mib": mem_step}


def run_case(spec: CaseSpec) -> dict:
    """Measure one case in this process.

    Args:
        spec: the case.

    Returns:
        A JSON-able record: the spec, ``status`` ("ok", "oom", "unsupported", "error"), and for "ok"
        ``fwd_ms``/``bwd_ms``/``fwd_bwd_ms`` (medians), ``repeats``, ``mem_fwd_mib``,
        ``mem_fwd_bwd_mib`` (peak above inputs) and the least-work FLOP counts.
    """
    record = asdict(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    head, workload = get_head(spec.head), get_workload(spec.workload)
    provider = get_provider(spec.provider)
    reason = provider.unsupported(workload, head, device)
    if reason:
        return {**record, "status": "unsupported", "reason": reason}
    record["flops"] = case_flops(spec)
    sync = _synchronize(device)
    out_of_memory = None
    try:
        inputs = make_inputs(head, workload, spec.n_tokens, dtype, device, spec.seed)
        step = provider.build(workload, inputs)
        for _ in range(spec.warmup):
            step().backward()
        sync()
        times = _timed_steps(step, inputs, spec, sync)
        memory = _measure_memory(step, inputs, device)
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        out_of_memory = f"{type(exc).__name__}: {str(exc)[:200]}"
    if out_of_memory is not None:
        # Outside the except block, so the traceback no longer pins the case's tensors.
        inputs = step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**record, "status": "oom", "reason": out_of_memory}
    medians = {f"{key}_ms": 1e3 * statistics.median(values) for key, values in times.items()}
    return {**record, "status": "ok", "repeats": len(times["fwd"]), **medians, **memory}


def run_case_isolated(spec: CaseSpec, timeout_s: float = 1800.0) -> dict:
    """`run_case` in a fresh Python process; a crash, kill or timeout becomes the record's status.

    Args:
        spec: the case.
        timeout_s: wall-clock limit of the child process.

    Returns:
        The child's record, or the spec with status "oom" (killed by SIGKILL, as the kernel's OOM killer
        does), "timeout" or "error" and a reason.
    """
    record = asdict(spec)
    command = [sys.executable, "-m", "benchmarks.run_case", json.dumps(record)]
    # the suite is not installed: the child imports it from this checkout, whatever its cwd
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join([root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
    except subprocess.TimeoutExpired:
        return {**record, "status": "timeout", "reason": f"exceeded {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    if done.returncode == -9:
        return {**record, "status": "oom", "reason": "process killed by SIGKILL (out of memory)"}
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {**record, "status": "error", "reason": f"exit {done.returncode}: " + " | ".join(tail)}


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 4096, hidden: int = 4096,
                vocab: int = 16384, repeats: int = 5) -> float:
    """Achieved rate of one head-shaped GEMM ``[n, hidden] @ [hidden, vocab]``: the floor's rate.

    Args:
        device, dtype: where and in which dtype the GEMM runs.
        n, hidden, vocab: GEMM sizes.
        repeats: timed GEMMs after one warm-up (the median counts).

    Returns:
        TFLOP/s.
    """
    a = torch.randn(n, hidden, device=device).to(dtype)
    b = torch.randn(vocab, hidden, device=device).to(dtype)
    sync = _synchronize(device)
    a @ b.T
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b.T
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * n * hidden * vocab / statistics.median(times) / 1e12
