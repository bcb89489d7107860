"""``fpo-bench``: speed and memory of fpo-ops against the alternatives, in one command.

With no arguments it picks the device (CUDA when present), runs the default comparison for that
device, prints a table and writes ``benchmarks/results/<device>-<date>.json`` and a PNG beside it.
"""
import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from fpo_ops.token_stats import chunked

from .check import ProviderMismatch, check_provider
from .heads import get_head
from .measure import DTYPES, CaseSpec, gemm_tflops, run_group
from .providers import CHECK_BASELINE, get_provider, provider_names
from .report import device_info, format_table, results_path, versions, write_results
from .summary import append_jsonl, build_payload, save_plot
from .workloads import WORKLOADS, get_workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Per device: a comparison that finishes in a few minutes on a 2-core CPU, and the
# Llama-3-8B sweep on a GPU (up to 64k tokens or out of memory).
DEFAULTS = {
    "cpu": dict(heads=["cpu-small"], workloads=["dpo", "tdpo"], sizes=[256, 512, 1024, 2048],
                providers=["naive", "trl", "liger", "cce", "fpo-torch"], dtype="float32"),
    "cuda": dict(heads=["llama3-8b"], workloads=list(WORKLOADS), sizes=[4096, 8192, 16384, 32768, 65536],
                 providers=["naive", "naive-compile", "trl", "liger", "cce", "fpo-torch", "fpo-triton"],
                 dtype="bfloat16"),
}


def _csv(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _sizes(text: str) -> List[int]:
    sizes = []
    for item in _csv(text):
        scale = 1024 if item.lower().endswith("k") else 1
        sizes.append(int(item[:-1] if scale > 1 else item) * scale)
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpo-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:<i>")
    parser.add_argument("--heads", type=_csv, help="comma list of heads: llama3-8b, qwen2.5-7b, gemma2-2b, "
                        "cpu-small, cpu-medium, tiny, or h<H>v<V>[cap<C>]")
    parser.add_argument("--workloads", type=_csv, help=f"comma list from {', '.join(WORKLOADS)}")
    parser.add_argument("--providers", type=_csv, help=f"comma list from {', '.join(provider_names())}")
    parser.add_argument("--sizes", type=_sizes, help="comma list of token counts N (even; '16k' allowed)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of hidden states and weights")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    parser.add_argument("--min-repeats", type=int, default=3,
                        help="least rounds of timed steps per case (default 3)")
    parser.add_argument("--max-repeats", type=int, default=20,
                        help="most rounds of timed steps per case (default 20)")
    parser.add_argument("--time-budget", type=float, default=2.0,
                        help="seconds of timed steps per provider after which a case's rounds stop (default 2)")
    parser.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                        help="measure each case's peak memory in its own process (auto: on CPU, where peak RSS "
                             "needs it); timings are always taken in this process, the providers interleaved")
    parser.add_argument("--check-tokens", type=int, default=None,
                        help="N of the check against fpo-torch before timing (default: smallest size, <= 1024)")
    parser.add_argument("--no-check", action="store_true", help="skip the check against fpo-torch")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the JSON and PNG results")
    parser.add_argument("--name", help="file stem of the results (default <device>-<date>)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default on CPU: 1, so that other processes on the machine's cores "
                             "slow every provider alike; 0: torch's own choice)")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--jsonl", type=Path, metavar="PATH",
                        help="append one JSON line per check and per case as each ends (a killed run keeps them)")
    parser.add_argument("--show", type=Path, metavar="JSON",
                        help="print the Markdown table of a saved results file and exit")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per isolated memory measurement")
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fpo-bench: --device cuda requested but CUDA is not available")
    return device


def _validate(args, device: torch.device) -> None:
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key in ("heads", "workloads", "providers", "sizes", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    try:
        for name in args.heads:
            get_head(name)
        for name in args.workloads:
            get_workload(name)
        for name in args.providers:
            get_provider(name)
    except ValueError as exc:
        raise SystemExit(f"fpo-bench: {exc}")
    bad = [n for n in args.sizes if n < 2 or n % 2]
    if bad:
        raise SystemExit(f"fpo-bench: --sizes: expected even token counts >= 2, got {bad}")
    if args.threads is not None and args.threads < 0:
        raise SystemExit(f"fpo-bench: --threads: expected a count >= 0 (0: torch's own choice), got {args.threads}")


CaseKey = Tuple[str, str, str]  # (head, workload, provider)


def _check_all(args, device, dtype, emit) -> Tuple[Dict[CaseKey, str], Dict[CaseKey, str]]:
    """Check every runnable (head, workload, provider) against fpo-torch; each check is emitted.

    Returns two dicts keyed by (head, workload, provider): providers that fail to run at all (a
    missing compiler for torch.compile, say), whose cases are recorded as errors instead of timed,
    and providers that disagree beyond the dtype's tolerance, whose cases are still timed and
    carry the mismatch, so one wrong provider never costs the others' results.
    """
    n_check = args.check_tokens or min(min(args.sizes), 1024)
    broken, mismatched = {}, {}
    for head_name in args.heads:
        head = get_head(head_name)
        for workload_name in args.workloads:
            workload = get_workload(workload_name)
            for provider_name in args.providers:
                if provider_name == CHECK_BASELINE or get_provider(provider_name).unsupported(workload, head, device):
                    continue
                key = (head_name, workload_name, provider_name)
                record = dict(kind="check", head=head_name, workload=workload_name, provider=provider_name,
                              n_tokens=n_check, dtype=args.dtype)
                print(f"check {provider_name:>13} vs {CHECK_BASELINE} on {head_name}/{workload_name} N={n_check} ... ",
                      end="", flush=True)
                try:
                    result = check_provider(provider_name, workload, head, n_check, dtype, device)
                except ProviderMismatch as exc:
                    print("MISMATCH " + str(exc), flush=True)
                    mismatched[key] = str(exc)[:500]
                    emit({**record, "status": "mismatch", "reason": mismatched[key]})
                    continue
                except Exception as exc:  # the provider cannot run here; the others still can
                    reason = f"check failed: {type(exc).__name__}: {exc}"[:500]
                    print("ERROR " + reason, flush=True)
                    broken[key] = reason
                    emit({**record, "status": "error", "reason": reason})
                    continue
                print("ok  " + ", ".join(f"{k} {v:.1e}" for k, v in result.errors.items()), flush=True)
                emit({**record, "status": "ok", "tolerance": result.tolerance, "relative_errors": result.errors})
    return broken, mismatched


def _add_flops(record: dict, rate_tflops: Optional[float]) -> None:
    if record.get("status") != "ok":
        return
    record["tflops"] = record["flops"]["fwd_bwd"] / (record["fwd_bwd_ms"] * 1e-3) / 1e12
    if rate_tflops:
        floor_ms = record["flops"]["fwd_bwd"] / (rate_tflops * 1e12) * 1e3
        record["floor_ms"] = floor_ms
        record["floor_ratio"] = record["fwd_bwd_ms"] / floor_ms


def _progress_line(index: int, total: int, record: dict) -> str:
    name = f"[{index}/{total}] {record['head']}/{record['workload']} N={record['n_tokens']} {record['provider']}"
    if record.get("check") == "mismatch":
        name += " [check MISMATCH]"
    if record["status"] != "ok":
        return f"{name}: {record['status']} ({record.get('reason', '')})"
    mem = record.get("mem_fwd_bwd_mib")
    return (f"{name}: fwd {record['fwd_ms']:.1f} ms, bwd {record['bwd_ms']:.1f} ms, "
            f"fwd+bwd {record['fwd_bwd_ms']:.1f} ms ({record['x_gemm_floor']:.2f}x its GEMM floor), "
            f"peak {'-' if mem is None else f'{mem:.0f}'} MiB")


def _show(path: Path) -> int:
    payload = json.loads(path.read_text())
    print(f"{payload['device']['name']} ({payload['device']['type']}, {payload['device'].get('cpu_threads')} threads), "
          f"{payload['dtype']}, {payload['date']}: `{payload['command']}`\n")
    print(format_table(payload["results"], markdown=True, with_flops=payload["device"]["type"] == "cuda"))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark described by the command line (see ``fpo-bench --help``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.show is not None:
        return _show(args.show)
    device = _resolve_device(args.device)
    _validate(args, device)
    threads_before = torch.get_num_threads()
    try:
        return _run(args, argv, device)
    finally:
        torch.set_num_threads(threads_before)  # an in-process caller keeps its own count


def _run(args, argv: List[str], device: torch.device) -> int:
    dtype = DTYPES[args.dtype]
    # Several threads per step make a provider's time depend on how busy the other cores are, and
    # differently for different kinds of work (many short parallel operations wait at each join for
    # a descheduled thread, one large GEMM does not): under one CPU-bound process beside a 2-thread
    # run the streaming path went from 1.3x to 3.9x its GEMM floor while GEMM-bound providers held.
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    isolate = args.isolate == "process" or (args.isolate == "auto" and device.type != "cuda")
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"fpo-bench on {device_info(device)['name']} ({device}), {args.dtype}; heads {args.heads}, "
          f"workloads {args.workloads}, providers {args.providers}, N {args.sizes}", flush=True)

    lines: List[dict] = []

    def emit(line: dict) -> None:
        lines.append(line)
        append_jsonl(args.jsonl, line)

    rate = gemm_tflops(device, dtype) if device.type == "cuda" else None
    if rate:
        print(f"GEMM floor rate: {rate:.0f} TFLOP/s ({args.dtype} [4096, 4096] x [4096, 16384])", flush=True)
    emit(dict(kind="run", device=device_info(device), versions=versions(),
              date=started.isoformat(timespec="seconds"), command=shlex.join(["fpo-bench", *argv]),
              dtype=args.dtype, gemm_floor_tflops=rate))
    broken, mismatched = ({}, {}) if args.no_check else _check_all(args, device, dtype, emit)

    groups = [[CaseSpec(head=h, workload=w, provider=p, n_tokens=n, dtype=args.dtype, device=str(device),
                        warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                        time_budget_s=args.time_budget, threads=args.threads) for p in args.providers]
              for h in args.heads for w in args.workloads for n in args.sizes]
    total = sum(len(group) for group in groups)
    records = []
    for group in groups:
        runnable = [spec for spec in group
                    if (spec.head, spec.workload, spec.provider) not in broken
                    and not get_provider(spec.provider).unsupported(get_workload(spec.workload),
                                                                    get_head(spec.head), device)]
        try:
            measured = iter(run_group(runnable, isolate_memory=isolate, timeout_s=args.timeout) if runnable else [])
        except Exception as exc:  # the group's inputs could not be made (out of memory, say)
            status = "oom" if "out of memory" in str(exc) else "error"
            measured = iter([{**vars(spec), "status": status, "reason": f"{type(exc).__name__}: {exc}"[:500]}
                             for spec in runnable])
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next group starts from an empty cache, not this one's blocks
        for spec in group:
            key = (spec.head, spec.workload, spec.provider)
            reason = get_provider(spec.provider).unsupported(get_workload(spec.workload), get_head(spec.head), device)
            if reason:
                record = {**vars(spec), "status": "unsupported", "reason": reason}
            elif key in broken:
                record = {**vars(spec), "status": "error", "reason": broken[key]}
            else:
                record = next(measured)
            if key in mismatched:
                record["check"] = "mismatch"
            _add_flops(record, rate)
            records.append(record)
            emit({"kind": "case", **record})
            if record["status"] != "unsupported":
                print(_progress_line(len(records), total, record), flush=True)

    # whether fpo-torch's low-precision GEMMs returned fp32 natively (False: it fell back to fp32 GEMMs)
    emit(dict(kind="run_end", duration_s=round(time.time() - started.timestamp(), 1),
              gemm_fp32_native=dict(chunked._NATIVE_FP32_OUT)))
    print()
    print(format_table(records, with_flops=device.type == "cuda"))
    skipped = sorted({(r["provider"], r["workload"], r["reason"]) for r in records if r["status"] == "unsupported"})
    for provider, workload, reason in skipped:
        print(f"  not run: {provider} on {workload}: {reason}")
    for (head, workload, provider), reason in mismatched.items():
        print(f"  MISMATCH (timed anyway, marked in the results): {reason}")

    if not args.no_save:
        path = results_path(args.out, device, started, args.name)
        payload = build_payload(lines)
        write_results(path, payload)
        print(f"\nwrote {path}")
        png = save_plot(records, path.with_suffix(".png"),
                        f"fpo-bench on {device_info(device)['name']} ({args.dtype}), {started:%Y-%m-%d}")
        if png is not None:
            print(f"wrote {png}")
    # a disagreement is a finding, not a crash: everything was still measured and saved
    return 3 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
