"""scripts/gpu_check.sh and its Python parts on CPU: the plan and its estimate, the stages, the JSON
lines written as each case ends, the record of a failed stage, and the tile-shape sweep."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_plan, tile_sweep
from benchmarks.providers import ours
from benchmarks.summary import append_jsonl, build_payload, read_jsonl
from fpo_ops.token_stats.kernels.utils import FIRST_WIDE_16BIT_STEPS, HOPPER_16BIT_TILES, PREVIOUS_16BIT_TILES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _script(*args, env=None, timeout=240):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_plan_prints_every_case_and_fits_in_four_minutes():
    done = _script("--plan")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    match = re.fullmatch(r"estimated (\d+) s", lines[-1])
    assert match and int(match.group(1)) <= 240, lines[-1]
    plan = gpu_plan.PLANS["default"]
    assert (plan.head, plan.dtype, plan.sizes) == ("llama3-8b", "bfloat16", (4096, 16384, 65536))
    for workload in ("logp", "dpo", "tdpo"):
        for n_tokens in plan.sizes:
            for provider in ("fpo-triton", "fpo-torch", "naive", "trl"):
                assert any(f"llama3-8b/{workload} N={n_tokens} {provider}" in line for line in lines)
    assert any("liger" in line and "dpo N=16384" in line for line in lines)
    assert not any("liger" in line and "tdpo N=" in line for line in lines)  # Liger has no token KL
    assert sum(line.strip().startswith("sweep") for line in lines) == 1 + len(plan.sweep_candidates)
    # the first GPU run keeps or reverts the default from times beside the shapes it replaced
    assert plan.sweep_candidates[0] == {}
    assert dict(PREVIOUS_16BIT_TILES, levels=None) in plan.sweep_candidates
    assert FIRST_WIDE_16BIT_STEPS in plan.sweep_candidates
    assert all(v != FIRST_WIDE_16BIT_STEPS[k] for k, v in HOPPER_16BIT_TILES.items() if k in FIRST_WIDE_16BIT_STEPS)


def test_estimate_follows_the_performance_model():
    plan = gpu_plan.PLANS["default"]
    # tdpo at N 16k is 6 GEMMs of 2 N H V = 103 TFLOP (DESIGN section 5)
    step = gpu_plan.step_seconds(plan, "fpo-triton", "tdpo", 16384)
    efficiency = gpu_plan.PROVIDER_MODELS["fpo-triton"].efficiency
    assert step == pytest.approx(103.3e12 / (efficiency * gpu_plan.GEMM_TFLOPS * 1e12), rel=1e-3)
    assert gpu_plan.step_seconds(plan, "fpo-triton", "tdpo", 65536) == pytest.approx(4 * step)
    # two models' [65536, 128256] fp32 logits, several buffers each: more than the GPU holds
    assert gpu_plan.step_seconds(plan, "naive", "tdpo", 65536) is None
    assert gpu_plan.step_seconds(plan, "naive", "tdpo", 4096) is not None
    rows = gpu_plan.estimate(plan)
    assert {stage for stage, _, _ in rows} == {"setup", "tests", "bench", "sweep", "summary"}
    fewer = gpu_plan.estimate(plan, providers=("fpo-triton", "fpo-torch", "naive"))
    assert sum(s for *_, s in fewer) < sum(s for *_, s in rows)
    with pytest.raises(ValueError, match="plan: expected one of"):
        gpu_plan.get_plan("weekly")


def test_stage_limits_fit_in_one_ten_minute_command():
    """Even if every stage ran to its time limit the script would end inside 10 minutes."""
    limits = [int(n) for n in re.findall(r"FPO_LIMIT_[A-Z]+:-(\d+)", SCRIPT.read_text())]
    assert len(limits) == 7 and sum(limits) + 15 <= 600, limits
    # and the plan's estimate of each stage leaves room under its limit
    rows = gpu_plan.estimate(gpu_plan.PLANS["default"])
    text = SCRIPT.read_text()
    for stage in ("tests", "bench", "sweep"):
        limit = int(re.search(rf"FPO_LIMIT_{stage.upper()}:-(\d+)", text).group(1))
        assert sum(s for st, _, s in rows if st == stage) <= 0.7 * limit, stage


def _bad_wheelhouse(tmp_path: Path) -> Path:
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip archive")
    return wheelhouse


def test_script_stages_on_cpu_record_failures_and_keep_going(tmp_path):
    """The ci plan on CPU: a broken carried wheel fails the wheels stage and the sweep finds no CUDA;
    every other stage still runs, and the cases land as JSON lines and in the results file."""
    out = tmp_path / "out"
    done = _script(str(out), env={"FPO_GPU_PLAN": "ci", "FPO_RESULTS_NAME": "ci-run",
                                  "FPO_WHEELHOUSE": str(_bad_wheelhouse(tmp_path))})
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    stages = read_jsonl(out / "stages.jsonl")
    status = {s["stage"]: (s["status"], s["rc"]) for s in stages}
    assert [s["stage"] for s in stages] == ["wheels", "install", "env", "tests", "bench", "sweep", "summary"]
    assert status["wheels"][0] == "failed" and status["sweep"] == ("failed", 2)
    assert status["install"][0] == "skipped"
    assert all(status[name] == ("ok", 0) for name in ("env", "tests", "bench", "summary"))
    # without CUDA the GPU tests are collected and skipped, none fails
    tests_log = (out / "tests.log").read_text()
    assert re.search(r"\b\d+ skipped\b", tests_log), tests_log[-2000:]
    assert not re.search(r"\b\d+ (failed|errors?)\b", tests_log), tests_log[-2000:]

    lines = read_jsonl(out / "cases.jsonl")
    assert lines[0]["kind"] == "run" and lines[0]["device"]["type"] == "cpu"
    cases = [line for line in lines if line["kind"] == "case"]
    assert len(cases) == 2 * 2 * 3  # workloads x sizes x providers
    triton = [c for c in cases if c["provider"] == "fpo-triton"]
    assert all(c["status"] == "unsupported" and "CUDA" in c["reason"] for c in triton)
    assert all(c["status"] == "ok" and c["fwd_bwd_ms"] > 0 for c in cases if c["provider"] != "fpo-triton")
    assert [line["kind"] for line in lines].count("check") == 2  # naive vs fpo-torch per workload

    payload = json.loads((out / "ci-run.json").read_text())
    assert len(payload["results"]) == len(cases) and payload["device"]["type"] == "cpu"
    assert [s["stage"] for s in payload["stages"]] == ["wheels", "install", "env", "tests", "bench", "sweep"]
    assert (out / "ci-run.png").stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # the whole output folder is copied back
    assert "sweep: launch shapes of impl='triton' are timed on a CUDA device" in (out / "bench.log").read_text()


def test_summary_of_a_run_killed_mid_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    append_jsonl(path, {"kind": "run", "device": {"type": "cuda", "name": "H"}, "dtype": "bfloat16"})
    append_jsonl(path, {"kind": "check", "provider": "trl", "status": "mismatch", "reason": "off"})
    append_jsonl(path, {"kind": "case", "provider": "trl", "status": "ok", "check": "mismatch"})
    with open(path, "a") as out:
        out.write('{"kind": "case", "provider": "na')  # the process was killed while writing
    payload = build_payload(read_jsonl(path))
    assert payload["device"]["name"] == "H" and payload["dtype"] == "bfloat16"
    assert payload["checks"] == [{"provider": "trl", "status": "mismatch", "reason": "off"}]
    assert payload["results"] == [{"provider": "trl", "status": "ok", "check": "mismatch"}]


def test_sweep_checks_and_times_each_launch_shape(tmp_path, monkeypatch, capsys):
    """Through the interpreter: each candidate matches tile_config's result, is timed, and the best is
    printed as a TileConfig (the timings are not compared: CPU interpreter times mean nothing)."""
    monkeypatch.setattr(ours.OursProvider, "unsupported", lambda self, *args: None)
    plan = dataclasses.replace(gpu_plan.PLANS["ci"], head="h16v40", sweep_tokens=16)
    code = tile_sweep.run_sweep(plan, tmp_path / "sweep.jsonl", device=torch.device("cpu"))
    assert code == 0
    records = read_jsonl(tmp_path / "sweep.jsonl")
    assert [r["overrides"] for r in records] == [{}, {"BN": 32}]
    for record in records:
        assert record["status"] == "ok", record
        assert max(record["relative_errors"].values()) < 1e-5
    assert records[1]["config"]["BN"] == 32 and records[0]["config"]["BN"] == 16
    shown = capsys.readouterr().out
    assert re.search(r"tile_config\(cpu, torch.float32\) -> TileConfig\(BN=(16|32), BV=16, ", shown)


def test_sweep_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert tile_sweep.run_sweep(gpu_plan.PLANS["ci"], None) == 2
    assert "CUDA" in capsys.readouterr().out
