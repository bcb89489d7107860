"""A run's JSON lines (written as each check, case and sweep candidate ends) -> results JSON + PNG.

``fpo-bench --jsonl`` appends one line per event, so a run that is killed part-way still leaves every
finished case on disk; this module turns whatever lines exist into the same results file that a
complete run writes, and the plot when matplotlib is installed:

    python -m benchmarks.summary --cases OUT/cases.jsonl [--sweep OUT/sweep.jsonl]
        [--stages OUT/stages.jsonl] --out OUT --name NAME
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .report import write_results


def read_jsonl(path: Optional[Path]) -> List[dict]:
    """Every complete JSON line of ``path`` ([] when it does not exist); a cut-off last line is skipped."""
    if path is None or not Path(path).exists():
        return []
    lines = []
    for text in Path(path).read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue  # the line a killed process was writing
    return lines


def append_jsonl(path: Optional[Path], record: dict) -> None:
    """Append ``record`` as one line and close the file, so it survives a later kill of the process."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


def build_payload(lines: Sequence[dict], sweep: Sequence[dict] = (), stages: Sequence[dict] = ()) -> dict:
    """The results file's content from a run's lines.

    Args:
        lines: dicts with ``kind`` "run" (device, versions, date, command, dtype, floor), "run_end"
            (duration, fpo-torch's GEMM path), "check" (one provider check) or "case" (one timed case).
        sweep: tile-shape sweep records (``kind`` "sweep"), if any.
        stages: gpu_check.sh stage records, if any.

    Returns:
        {device, versions, date, command, dtype, gemm_floor_tflops, ..., checks, results[, sweep, stages]}.
    """
    header = {"device": {}, "versions": {}}
    for line in lines:  # the run's start, then what its end adds (duration, GEMM path)
        if line.get("kind") in ("run", "run_end"):
            header.update({k: v for k, v in line.items() if k != "kind"})
    strip = (lambda line: {k: v for k, v in line.items() if k != "kind"})
    payload = {**header, "checks": [strip(line) for line in lines if line.get("kind") == "check"],
               "results": [strip(line) for line in lines if line.get("kind") == "case"]}
    if sweep:
        payload["sweep"] = [strip(line) for line in sweep]
    if stages:
        payload["stages"] = [strip(line) for line in stages]
    return payload


def save_plot(records: List[dict], path: Path, title: str) -> Optional[Path]:
    """The PNG of `plot.plot_results`, or None (with a note) when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"no plot: matplotlib is not installed ({path.name} not written)", flush=True)
        return None
    from .plot import plot_results

    return plot_results(records, path, title)


def write_summary(cases: Path, out_dir: Path, name: str, sweep: Optional[Path] = None,
                  stages: Optional[Path] = None) -> Dict[str, Optional[Path]]:
    """Write ``<out_dir>/<name>.json`` (and ``.png``) from the JSON-lines files.

    Returns:
        {"json": path, "png": path or None}.
    """
    payload = build_payload(read_jsonl(cases), read_jsonl(sweep), read_jsonl(stages))
    path = Path(out_dir) / f"{name}.json"
    write_results(path, payload)
    device = payload.get("device", {}).get("name", "unknown device")
    png = save_plot(payload["results"], path.with_suffix(".png"),
                    f"fpo-bench on {device} ({payload.get('dtype')}), {str(payload.get('date', ''))[:10]}")
    return {"json": path, "png": png}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, required=True)
    parser.add_argument("--sweep", type=Path)
    parser.add_argument("--stages", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    written = write_summary(args.cases, args.out, args.name, args.sweep, args.stages)
    payload = json.loads(written["json"].read_text())
    print(f"wrote {written['json']}: {len(payload['results'])} cases, {len(payload['checks'])} checks, "
          f"{len(payload.get('sweep', []))} sweep candidates")
    if written["png"] is not None:
        print(f"wrote {written['png']}")
    return 0 if payload["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
