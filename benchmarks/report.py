"""What a run leaves behind: the environment it ran in, the results table, and the JSON file."""
import datetime
import json
import os
import platform
import re
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

PACKAGES = ("fpo-ops", "torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> Dict[str, object]:
    """Name, model and size of the device the benchmark ran on.

    Args:
        device: the benchmarked device.

    Returns:
        A JSON-able dict: type, name, CPU model and threads, and for CUDA memory and CUDA version.
    """
    info = {"type": device.type, "cpu": _cpu_model(), "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        info["name"] = info["cpu"]
    return info


def device_slug(device: torch.device) -> str:
    """Short file-name form of the device: ``cpu`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def versions() -> Dict[str, Optional[str]]:
    """Versions of Python and of every benchmarked package (None when not installed)."""
    found = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def results_path(out_dir: Path, device: torch.device, now: datetime.datetime, name: Optional[str] = None) -> Path:
    """Where a run's JSON goes; an existing file is never overwritten (the time of day is added).

    Args:
        out_dir: results folder.
        device: the benchmarked device (names the file by default).
        now: start of the run (dates the file).
        name: file stem instead of ``<device>-<date>``.

    Returns:
        ``<out_dir>/<stem>.json``.
    """
    stem = name or f"{device_slug(device)}-{now:%Y-%m-%d}"
    path = out_dir / f"{stem}.json"
    if path.exists():
        path = out_dir / f"{stem}-{now:%H%M%S}.json"
    return path


def write_results(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        json.dump(payload, out, indent=1)
        out.write("\n")


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def time_ratio(record: dict, base: dict) -> Optional[float]:
    """``record``'s fwd+bwd time over ``base``'s (>1: slower).

    Cases timed in the same rounds (``rounds_ms`` of equal length, `measure.run_group`) give the
    median of the per-round ratios, so a load that changes between rounds cancels; otherwise the
    ratio of the medians.
    """
    a, b = record.get("rounds_ms"), base.get("rounds_ms")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return record["fwd_bwd_ms"] / base["fwd_bwd_ms"]


def format_table(records: Iterable[dict], markdown: bool = False, with_flops: bool = False) -> str:
    """One row per case: median times (ms), peak memory above inputs (MiB), the time and memory
    relative to fpo-torch on the same case (>1: the provider is slower / uses more), and the time as
    a multiple of the head GEMMs timed beside it (``x GEMM``: DESIGN section 5's GEMM count).

    Args:
        records: results of `measure.run_case`.
        markdown: a Markdown table instead of aligned text.
        with_flops: add TFLOP/s of the least work and the ratio to the GEMM floor (GPU runs).

    Returns:
        The table as text.
    """
    records = list(records)
    ours = {(r["head"], r["workload"], r["n_tokens"]): r for r in records
            if r["provider"] == "fpo-torch" and r["status"] == "ok"}
    header = ["head", "workload", "N", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd MiB", "step MiB",
              "time/ours", "mem/ours", "GEMMs ms", "x GEMM"]
    if with_flops:
        header += ["TFLOP/s", "x floor"]
    rows: List[List[str]] = []
    for r in records:
        if r["status"] == "unsupported":
            continue
        provider = r["provider"] + (" (MISMATCH)" if r.get("check") == "mismatch" else "")
        row = [r["head"], r["workload"], str(r["n_tokens"]), provider]
        if r["status"] != "ok":
            row += [r["status"].upper()] + [""] * (len(header) - len(row) - 1)
            rows.append(row)
            continue
        base = ours.get((r["head"], r["workload"], r["n_tokens"]))
        ratio = mem_ratio = None
        if base is not None:
            ratio = time_ratio(r, base)
            if r.get("mem_fwd_bwd_mib") and base.get("mem_fwd_bwd_mib"):
                mem_ratio = r["mem_fwd_bwd_mib"] / base["mem_fwd_bwd_mib"]
        row += [_fmt(r["fwd_ms"]), _fmt(r["bwd_ms"]), _fmt(r["fwd_bwd_ms"]), _fmt(r.get("mem_fwd_mib"), 0),
                _fmt(r.get("mem_fwd_bwd_mib"), 0), _fmt(ratio, 2), _fmt(mem_ratio, 2),
                _fmt(r.get("gemm_floor_ms")), _fmt(r.get("x_gemm_floor"), 2)]
        if with_flops:
            row += [_fmt(r.get("tflops"), 0), _fmt(r.get("floor_ratio"), 2)]
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
