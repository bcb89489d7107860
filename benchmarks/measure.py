"""Time and memory of benchmark cases: median forward, backward and forward+backward after warm-up.

A case is one (head, workload, provider, N, dtype, device); a group is the cases of one (head,
workload, N) that differ only in the provider. `run_group` times a group's providers interleaved in
this process, round after round (A B C floor, B C A floor, ...), beside the head GEMM at the case's
shape, so that a load which comes and goes while the group runs lands on every provider alike and
cancels in the ratios. `run_case` measures one case alone; `run_case_isolated` runs it in a fresh
Python process (CPU: the peak RSS of a process is only meaningful when nothing else ran in it) and
turns a crash or an out-of-memory kill into a record.
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
    # Only the peak memory of one step (after the warm-up); no timed steps.
    memory_only: bool = False


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
        fwd, bwd, both = _time_one(step, inputs, sync)
        times["fwd"].append(fwd)
        times["bwd"].append(bwd)
        times["fwd_bwd"].append(both)
        spent += both
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
        times = None if spec.memory_only else _timed_steps(step, inputs, spec, sync)
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
    if times is None:
        return {**record, "status": "ok", **memory}
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


# Largest logit buffer the floor GEMM writes at once; wider vocabularies are multiplied in column blocks.
FLOOR_GEMM_OUT_BYTES = 256 << 20


def head_gemm(inputs: CaseInputs, max_out_bytes: int = FLOOR_GEMM_OUT_BYTES) -> Callable[[], None]:
    """One ``[N, H] @ [H, V]`` head GEMM of the case's policy tensors, in their dtype and on their device.

    The logits go into preallocated buffers of at most ``max_out_bytes`` (the vocabulary in column
    blocks), so the GEMM at a Llama-3-8B head and 64k tokens neither allocates nor runs out of memory.

    Args:
        inputs: the case's tensors (hidden [B, T, H], weight [V, H]).
        max_out_bytes: bound of one output block.

    Returns:
        A closure running the GEMM once (asynchronously on CUDA).
    """
    h = inputs.hidden.detach().reshape(-1, inputs.hidden.shape[-1])
    w = inputs.weight.detach()
    n, vocab = h.shape[0], w.shape[0]
    cols = max(1, min(vocab, max_out_bytes // max(1, n * h.element_size())))
    blocks = [(c0, min(c0 + cols, vocab)) for c0 in range(0, vocab, cols)]
    outs = {width: torch.empty((n, width), dtype=h.dtype, device=h.device)
            for width in {c1 - c0 for c0, c1 in blocks}}

    def gemm() -> None:
        for c0, c1 in blocks:
            torch.mm(h, w[c0:c1].T, out=outs[c1 - c0])
    return gemm


def _build_and_warm(spec: CaseSpec, provider, workload, inputs: CaseInputs, sync):
    """(step, None) once the provider's step has run its warm-ups, or (None, failure record fields)."""
    failure = None
    try:
        step = provider.build(workload, inputs)
        for _ in range(spec.warmup):
            _clear_grads(inputs)
            step().backward()
        sync()
        return step, None
    except Exception as exc:  # one broken provider must not lose the others' results
        status = "oom" if _is_out_of_memory(exc) else "error"
        failure = {"status": status, "reason": f"{type(exc).__name__}: {exc}"[:500]}
    gc.collect()
    if inputs.hidden.device.type == "cuda":
        torch.cuda.empty_cache()
    return None, failure


def _time_one(step, inputs: CaseInputs, sync):
    _clear_grads(inputs)
    sync()
    t0 = time.perf_counter()
    loss = step()
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t2 - t0


def run_group(specs: List[CaseSpec], isolate_memory: bool = False, timeout_s: float = 1800.0) -> List[dict]:
    """Time the providers of one (head, workload, N) interleaved, beside the head GEMM at that shape.

    Every provider's step is built on the same inputs and warmed up; then each round times one
    forward + backward of every provider still running, in an order rotated by one each round, and
    one head GEMM. Rounds go on until ``min_repeats`` are done and ``time_budget_s`` per provider
    has passed, at most ``max_repeats``. Peak memory is measured after the rounds, one provider at a
    time (in its own process with ``isolate_memory``: on CPU a peak RSS needs a process of its own).

    Args:
        specs: cases of one head, workload, N, dtype and device (their repeat settings are the first's).
        isolate_memory: measure each provider's memory in a fresh process (`run_case_isolated`).
        timeout_s: limit of each such process.

    Returns:
        One record per spec, in order, as `run_case` returns, plus for "ok" records ``rounds_ms``
        (fwd+bwd of each round, for paired ratios), ``gemm_ms`` (median head GEMM), ``gemm_floor_ms``
        (that times the workload's GEMM count, DESIGN section 5) and ``x_gemm_floor`` (median over
        rounds of the step's time over that round's floor).
    """
    first = specs[0]
    if any((s.head, s.workload, s.n_tokens, s.dtype, s.device) != (first.head, first.workload, first.n_tokens,
                                                                      first.dtype, first.device) for s in specs):
        raise ValueError("specs: expected cases of one head, workload, N, dtype and device, got "
                         f"{sorted({(s.head, s.workload, s.n_tokens) for s in specs})}")
    if first.threads:
        torch.set_num_threads(first.threads)
    device, dtype = torch.device(first.device), DTYPES[first.dtype]
    head, workload = get_head(first.head), get_workload(first.workload)
    sync = _synchronize(device)
    records: List[dict] = [asdict(spec) for spec in specs]
    steps: Dict[int, Callable[[], torch.Tensor]] = {}
    inputs = make_inputs(head, workload, first.n_tokens, dtype, device, first.seed)
    for i, spec in enumerate(specs):
        provider = get_provider(spec.provider)
        reason = provider.unsupported(workload, head, device)
        if reason:
            records[i].update(status="unsupported", reason=reason)
            continue
        records[i]["flops"] = case_flops(spec)
        step, failure = _build_and_warm(spec, provider, workload, inputs, sync)
        if failure:
            records[i].update(failure)
        else:
            steps[i] = step
    if not steps:
        return records

    gemm = head_gemm(inputs)
    gemm()
    sync()
    times = {i: {"fwd": [], "bwd": [], "fwd_bwd": []} for i in steps}
    gemm_times: List[float] = []
    spent, rounds = 0.0, 0
    while steps and rounds < first.max_repeats and (rounds < first.min_repeats
                                                    or spent < first.time_budget_s * len(steps)):
        active = sorted(steps)
        shift = rounds % len(active)
        for i in active[shift:] + active[:shift]:
            try:
                fwd, bwd, total = _time_one(steps[i], inputs, sync)
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                records[i].update(status="oom", reason=f"{type(exc).__name__}: {str(exc)[:200]}")
                del steps[i], times[i]
                continue
            for key, value in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", total)):
                times[i][key].append(value)
            spent += total
        _clear_grads(inputs)
        sync()
        t0 = time.perf_counter()
        gemm()
        sync()
        gemm_times.append(time.perf_counter() - t0)
        rounds += 1

    floor_rounds = [workload.total_gemms * t for t in gemm_times]
    gemm_ms = 1e3 * statistics.median(gemm_times)
    for i, measured in times.items():
        multiples = [t / f for t, f in zip(measured["fwd_bwd"], floor_rounds)]
        records[i].update(status="ok", repeats=len(measured["fwd"]),
                          **{f"{key}_ms": 1e3 * statistics.median(v) for key, v in measured.items()},
                          rounds_ms=[round(1e3 * t, 4) for t in measured["fwd_bwd"]],
                          gemm_ms=gemm_ms, gemm_floor_ms=workload.total_gemms * gemm_ms,
                          x_gemm_floor=statistics.median(multiples))
    for i, step in list(steps.items()):
        if isolate_memory:
            continue
        try:
            records[i].update(_measure_memory(step, inputs, device))
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            records[i].update(mem_fwd_mib=None, mem_fwd_bwd_mib=None)
    steps.clear()
    inputs = gemm = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if isolate_memory:
        for i, spec in enumerate(specs):
            if records[i].get("status") != "ok":
                continue
            memory = run_case_isolated(CaseSpec(**{**asdict(spec), "memory_only": True}), timeout_s=timeout_s)
            records[i]["mem_fwd_mib"] = memory.get("mem_fwd_mib")
            records[i]["mem_fwd_bwd_mib"] = memory.get("mem_fwd_bwd_mib")
            if memory.get("status") != "ok":
                records[i]["memory_status"] = f"{memory.get('status')}: {memory.get('reason', '')}"[:500]
    return records
