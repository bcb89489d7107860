"""The benchmark machinery: heads, workload losses, the pre-timing check, memory, the fpo-bench CLI."""
import json
import math

import pytest
import torch

from benchmarks import cli
from benchmarks.check import ProviderMismatch, check_provider
from benchmarks.heads import HEADS, get_head
from benchmarks import measure
from benchmarks.measure import CaseSpec, case_flops, head_gemm, run_case, run_case_isolated, run_group
from benchmarks.memory import PeakMemory
from benchmarks.providers import PROVIDERS, get_provider
from benchmarks.providers.naive import NaiveProvider
from benchmarks.report import format_table, time_ratio
from benchmarks.workloads import IGNORE_INDEX, WORKLOADS, get_workload, make_inputs

CPU = torch.device("cpu")


def test_named_heads_have_the_model_shapes():
    assert (HEADS["llama3-8b"].hidden, HEADS["llama3-8b"].vocab) == (4096, 128256)
    assert (HEADS["qwen2.5-7b"].hidden, HEADS["qwen2.5-7b"].vocab) == (3584, 152064)
    assert (HEADS["gemma2-2b"].hidden, HEADS["gemma2-2b"].vocab, HEADS["gemma2-2b"].softcap) == (2304, 256000, 30.0)
    custom = get_head("h96v1000cap30")
    assert (custom.hidden, custom.vocab, custom.softcap) == (96, 1000, 30.0)


def test_unknown_names_raise_naming_the_argument():
    with pytest.raises(ValueError, match="head: expected"):
        get_head("llama-9")
    with pytest.raises(ValueError, match="workload: expected"):
        get_workload("ppo")
    with pytest.raises(ValueError, match="provider: expected"):
        get_provider("flash")
    with pytest.raises(ValueError, match="n_tokens: expected an even number"):
        make_inputs(get_head("tiny"), WORKLOADS["dpo"], 7, torch.float32, CPU)


@pytest.mark.parametrize("workload_name", list(WORKLOADS))
def test_workload_loss_and_grads_match_float64_oracle(workload_name):
    """fpo-torch in float32 through each workload's loss vs impl='reference' in float64."""
    workload, head = WORKLOADS[workload_name], get_head("h40v333")
    results = {}
    for provider, dtype in (("fpo-torch", torch.float32), ("reference", torch.float64)):
        inputs = make_inputs(head, workload, 34, dtype, CPU, seed=3)
        loss = get_provider(provider).build(workload, inputs)()
        loss.backward()
        results[provider] = [loss.detach(), inputs.hidden.grad, inputs.weight.grad]
    for got, expected in zip(results["fpo-torch"], results["reference"]):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_inputs_ignore_the_prompt_and_weight_tokens_randomly():
    inputs = make_inputs(get_head("tiny"), WORKLOADS["tdpo"], 40, torch.float32, CPU)
    assert inputs.hidden.shape == (2, 20, 96) and inputs.ref_hidden.shape == (2, 20, 96)
    assert (inputs.labels[:, :5] == IGNORE_INDEX).all() and (inputs.labels[:, 5:] >= 0).all()
    weights = inputs.token_weight[inputs.labels != IGNORE_INDEX]
    assert weights.unique().numel() == weights.numel()  # not all-ones
    assert (inputs.token_weight[inputs.labels == IGNORE_INDEX] == 0).all()


class _ReverseKLProvider(NaiveProvider):
    """The naive head with KL(policy || ref) where the workload means KL(ref || policy)."""

    name = "wrong-kl"

    def token_stats(self, inputs, outputs):
        stats = super().token_stats(inputs, tuple(n for n in outputs if n != "kl"))
        if "kl" in outputs:
            swapped = NaiveProvider().token_stats(
                type(inputs)(inputs.ref_hidden, inputs.ref_weight, inputs.labels, inputs.hidden,
                             inputs.weight, inputs.token_weight, inputs.softcap), ("kl",))
            stats["kl"] = swapped["kl"]
        return stats


def test_check_passes_agreeing_providers_and_stops_a_wrong_convention(monkeypatch):
    head, workload = get_head("tiny"), WORKLOADS["tdpo"]
    result = check_provider("trl", workload, head, 48, torch.float32, CPU)
    assert set(result.errors) == {"loss", "grad_hidden", "grad_weight"}
    assert max(result.errors.values()) <= result.tolerance
    monkeypatch.setitem(PROVIDERS, "wrong-kl", _ReverseKLProvider)
    with pytest.raises(ProviderMismatch, match="wrong-kl disagrees"):
        check_provider("wrong-kl", workload, head, 48, torch.float32, CPU)


def test_unsupported_cases_say_why():
    head, softcapped = get_head("tiny"), get_head("h96v1000cap30")
    assert "kl" in get_provider("cce").unsupported(WORKLOADS["tdpo"], head, CPU)
    assert get_provider("liger").unsupported(WORKLOADS["dpo"], softcapped, CPU) == "no logit softcap"
    assert "CUDA" in get_provider("fpo-triton").unsupported(WORKLOADS["dpo"], head, CPU)
    assert get_provider("fpo-torch").unsupported(WORKLOADS["jsd"], softcapped, CPU) is None


def test_peak_memory_sees_a_temporary_allocation_above_the_baseline():
    keep = torch.ones(2**22)  # 16 MiB that is part of the baseline
    peak = PeakMemory(CPU)
    peak.start()
    temporary = torch.ones(2**24)  # 64 MiB, freed before the peak is read
    del temporary
    measured = peak.peak_mib()
    assert keep.sum() > 0
    assert measured is not None and 60 <= measured <= 72


def test_gemm_count_follows_the_performance_model():
    spec = CaseSpec(head="llama3-8b", workload="tdpo", provider="fpo-torch", n_tokens=16384,
                    dtype="bfloat16", device="cpu")
    # DESIGN section 5: 6 GEMMs of 2 N H V, 103 TFLOP at N 16k for Llama-3-8B.
    assert math.isclose(case_flops(spec)["fwd_bwd"] / 1e12, 103.3, rel_tol=1e-3)
    assert WORKLOADS["dpo"].total_gemms == 5 and WORKLOADS["logp"].total_gemms == 4


def test_run_case_in_process_and_isolated():
    spec = CaseSpec(head="tiny", workload="dpo", provider="fpo-torch", n_tokens=64, dtype="float32",
                    device="cpu", min_repeats=2, max_repeats=2)
    record = run_case(spec)
    assert record["status"] == "ok" and record["repeats"] == 2
    assert 0 < record["fwd_ms"] <= record["fwd_bwd_ms"] and record["mem_fwd_bwd_mib"] is not None
    isolated = run_case_isolated(spec, timeout_s=300)
    assert isolated["status"] == "ok" and isolated["n_tokens"] == 64
    unsupported = run_case(CaseSpec(**{**vars(spec), "provider": "liger", "workload": "tdpo"}))
    assert unsupported["status"] == "unsupported" and "tdpo" in unsupported["reason"]


def test_group_interleaves_providers_and_times_the_gemm_floor_beside_them(monkeypatch):
    order = []
    time_one = measure._time_one

    def recorded(step, inputs, sync):
        order.append(step)
        return time_one(step, inputs, sync)

    monkeypatch.setattr(measure, "_time_one", recorded)
    specs = [CaseSpec(head="tiny", workload="dpo", provider=name, n_tokens=64, dtype="float32", device="cpu",
                      min_repeats=3, max_repeats=3) for name in ("naive", "fpo-torch", "liger")]
    records = run_group(specs)
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    # rounds A B C, B C A, C A B: every provider in every position once
    a, b, c = order[:3]
    assert order == [a, b, c, b, c, a, c, a, b]
    for record in records:
        assert len(record["rounds_ms"]) == 3 and record["mem_fwd_bwd_mib"] is not None
        assert math.isclose(record["gemm_floor_ms"], WORKLOADS["dpo"].total_gemms * record["gemm_ms"])
        assert record["x_gemm_floor"] > 0
    with pytest.raises(ValueError, match="specs"):
        run_group([specs[0], CaseSpec(**{**vars(specs[1]), "n_tokens": 32})])


def test_head_gemm_in_column_blocks_writes_every_logit():
    inputs = make_inputs(get_head("tiny"), get_workload("logp"), 64, torch.float32, CPU)
    expected = inputs.hidden.detach().reshape(64, -1) @ inputs.weight.detach().T
    for max_out_bytes, widths in ((64 * 4 * 300, [100, 300]), (measure.FLOOR_GEMM_OUT_BYTES, [1000])):
        gemm = head_gemm(inputs, max_out_bytes)  # blocks of 300 columns: the last one 100 wide
        gemm()
        outs = dict(zip(gemm.__code__.co_freevars, (c.cell_contents for c in gemm.__closure__)))["outs"]
        assert sorted(outs) == widths
        torch.testing.assert_close(outs[widths[0]], expected[:, -widths[0]:])


def test_paired_ratio_cancels_load_that_changes_between_rounds():
    # the third round ran under load that tripled every time: medians of medians would see it in one
    # provider's median and not the other's; per-round ratios stay 2
    ours = {"provider": "fpo-torch", "fwd_bwd_ms": 10.0, "rounds_ms": [10.0, 10.0, 30.0, 30.0]}
    other = {"provider": "naive", "fwd_bwd_ms": 40.0, "rounds_ms": [20.0, 20.0, 60.0, 60.0]}
    assert time_ratio(other, ours) == 2.0
    assert time_ratio({"fwd_bwd_ms": 30.0}, ours) == 3.0  # an older file without rounds
    common = dict(head="tiny", workload="dpo", n_tokens=64, status="ok", fwd_ms=1.0, bwd_ms=1.0,
                  gemm_floor_ms=5.0, x_gemm_floor=1.5)
    table = format_table([{**common, **ours}, {**common, **other}])
    assert table.splitlines()[0].endswith("GEMMs ms  x GEMM") and "2.00" in table.splitlines()[2]


def test_cli_runs_checks_and_writes_json_and_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    code = cli.main(["--device", "cpu", "--heads", "tiny", "--workloads", "logp,jsd", "--sizes", "32,64",
                     "--providers", "naive,trl,liger,fpo-torch", "--isolate", "none", "--min-repeats", "1",
                     "--max-repeats", "1", "--out", str(tmp_path), "--name", "run"])
    assert code == 0
    shown = capsys.readouterr().out
    assert "check           trl vs fpo-torch on tiny/jsd" in shown and "fwd+bwd ms" in shown
    payload = json.loads((tmp_path / "run.json").read_text())
    assert payload["device"]["type"] == "cpu" and payload["versions"]["torch"] == torch.__version__
    assert payload["device"]["cpu_threads"] == 1 and torch.get_num_threads() == threads  # one thread, restored
    assert payload["command"].startswith("fpo-bench --device cpu")
    statuses = {(r["workload"], r["provider"], r["n_tokens"]): r["status"] for r in payload["results"]}
    assert statuses[("jsd", "liger", 64)] == "ok" and statuses[("logp", "liger", 32)] == "unsupported"
    assert sum(s == "ok" for s in statuses.values()) == 14
    assert (tmp_path / "run.png").stat().st_size > 0


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="provider: expected"):
        cli.main(["--device", "cpu", "--providers", "nope", "--no-save"])
    with pytest.raises(SystemExit, match="even token counts"):
        cli.main(["--device", "cpu", "--sizes", "33", "--no-save"])
    with pytest.raises(SystemExit, match="--threads: expected a count >= 0"):
        cli.main(["--device", "cpu", "--threads", "-1", "--no-save"])


class _CrashingProvider(NaiveProvider):
    """A provider whose library fails at run time (as torch.compile does without a compiler)."""

    name = "crashes"

    def token_stats(self, inputs, outputs):
        raise RuntimeError("no C++ compiler")


def test_cli_records_a_provider_that_cannot_run_and_one_that_mismatches(tmp_path, monkeypatch, capsys):
    """Neither stops the run: the broken provider's cases are errors, the mismatching one's are timed
    and marked, the JSON lines and the results file hold both, and the exit code says so."""
    monkeypatch.setitem(PROVIDERS, "crashes", _CrashingProvider)
    monkeypatch.setitem(PROVIDERS, "wrong-kl", _ReverseKLProvider)
    common = ["--device", "cpu", "--heads", "tiny", "--workloads", "tdpo", "--sizes", "32", "--isolate", "none",
              "--min-repeats", "1", "--max-repeats", "1", "--out", str(tmp_path)]
    assert cli.main(common + ["--providers", "crashes,fpo-torch", "--name", "crash"]) == 0
    assert "ERROR check failed: RuntimeError: no C++ compiler" in capsys.readouterr().out
    records = {r["provider"]: r for r in json.loads((tmp_path / "crash.json").read_text())["results"]}
    assert records["crashes"]["status"] == "error" and records["fpo-torch"]["status"] == "ok"

    jsonl = tmp_path / "mismatch.jsonl"
    code = cli.main(common + ["--providers", "wrong-kl,fpo-torch", "--name", "mismatch", "--jsonl", str(jsonl)])
    assert code == 3
    shown = capsys.readouterr().out
    assert "MISMATCH wrong-kl disagrees with fpo-torch" in shown and "wrong-kl (MISMATCH)" in shown
    payload = json.loads((tmp_path / "mismatch.json").read_text())
    (check,) = payload["checks"]
    assert check["status"] == "mismatch" and "relative errors" in check["reason"]
    wrong = next(r for r in payload["results"] if r["provider"] == "wrong-kl")
    assert wrong["status"] == "ok" and wrong["check"] == "mismatch" and wrong["fwd_bwd_ms"] > 0
    kinds = [json.loads(line)["kind"] for line in jsonl.read_text().splitlines()]
    assert kinds == ["run", "check", "case", "case", "run_end"]
    assert payload["gemm_fp32_native"] == {}  # fp32 operands never need it


@pytest.mark.parametrize("workload_name", ["dpo", "tdpo", "jsd"])
def test_bf16_checks_pass_for_agreeing_providers(workload_name):
    """The bf16 tolerance sits above bf16 rounding of every anchor that follows our conventions (GPU runs
    check in bf16; the CPU default is fp32), and still below a wrong KL direction."""
    workload, head = WORKLOADS[workload_name], get_head("h256v4099")
    for provider in ("naive", "trl", "liger"):
        if get_provider(provider).unsupported(workload, head, CPU):
            continue
        result = check_provider(provider, workload, head, 256, torch.bfloat16, CPU)
        assert max(result.errors.values()) <= result.tolerance / 2, (provider, result.errors)
    if workload_name == "tdpo":
        with pytest.raises(ProviderMismatch):
            with pytest.MonkeyPatch.context() as patch:
                patch.setitem(PROVIDERS, "wrong-kl", _ReverseKLProvider)
                check_provider("wrong-kl", workload, head, 256, torch.bfloat16, CPU)


def test_cli_without_matplotlib_writes_the_json_and_says_no_plot(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert cli.main(["--device", "cpu", "--heads", "tiny", "--workloads", "logp", "--sizes", "32",
                     "--providers", "fpo-torch", "--isolate", "none", "--min-repeats", "1", "--max-repeats", "1",
                     "--out", str(tmp_path), "--name", "noplot"]) == 0
    assert "no plot: matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "noplot.json").exists() and not (tmp_path / "noplot.png").exists()


def test_triton_provider_agrees_with_fpo_torch():
    """The fpo-triton provider's call (through the interpreter on CPU; its timing is GPU-only)."""
    result = check_provider("fpo-triton", WORKLOADS["tdpo"], get_head("h40v333"), 32, torch.float32, CPU)
    assert max(result.errors.values()) <= result.tolerance
