"""The fused TRL drop-ins under DeepSpeed ZeRO-2/ZeRO-3 and FSDP2, launched as TRL users launch them.

One ``accelerate launch --config_file examples/accelerate/<engine>.yaml --num_processes 2`` per engine
(2 CPU processes, gloo, real deepspeed and accelerate) runs `engine_training.py`, which trains every
case of that engine with TRL's own trainer and with the fused one from the same seed and data. The
tests compare what the launch saved:

- with TRL's trainer under the same engine, fp32: every logged value and the final weights to 1e-5
  (DPO, SFT, KTO, GRPO, RLOO, Distillation, GKD; untied and tied embeddings, a separate reference
  model and a PEFT LoRA policy whose reference is the policy with its adapters disabled);
- under TRL's default precision (bf16, gradient checkpointing) DPO and SFT: within the bf16 budget of
  the same case's fp32 run (ours at most 2x TRL's own error, plus a small floor);
- where TRL has no counterpart: TDPO2 and SPO on greedy samples equal one process on the global batch
  (the engines are data parallel); SPO on sampled completions and the exact KL of GRPO and RLOO train;
- the engine really held the model its way: ZeRO-3 partitioned the LM head (each rank holds half),
  ZeRO-3 offload keeps the partitions in CPU memory, FSDP2 sharded the head as a DTensor ``Shard(0)``.

ZeRO-3 runs with ``stage3_param_persistence_threshold: 0``: every parameter of the tiny models is
partitioned and fetched per module, as a real model's large ones are (by default DeepSpeed keeps
parameters under 1e5 elements whole on every rank, which would hide the gathering).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

pytest.importorskip("trl")
pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

from hf_fixtures import tiny_tokenizer  # noqa: E402
from trainer_fixtures import assert_bf16_training_within_budget, assert_same_logs, assert_same_weights  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "distributed", "engine_training.py")
sys.path.insert(0, os.path.dirname(SCRIPT))

import engine_training  # noqa: E402

WORLD = 2
TRAINERS = tuple(engine_training.TRAINERS)
# Each trainer against TRL: untied, tied embeddings, PEFT LoRA policy.
COMPARED = tuple(f"{t}{v}" for t in TRAINERS for v in ("", "_tied", "_peft"))
ALONE = ("dpo_tdpo2", "dpo_spo")  # equal to one process
TRAINS = ("dpo_spo_sampled", "grpo_exact_kl", "rloo_exact_kl")
BF16 = ("dpo_bf16",)
FULL = {
    "zero2": COMPARED + ALONE + TRAINS + BF16,
    "zero3": COMPARED + ALONE + TRAINS + BF16,
    "zero3_offload": ("dpo", "dpo_tied", "sft", "sft_tied"),
    "fsdp2": COMPARED + ALONE + TRAINS + BF16,
}
# The whole matrix runs by default (about 5 minutes on 2 idle cores: ZeRO-3 2.3, ZeRO-2 1.2, FSDP2 1.0,
# offload 0.5). FPO_ENGINE_MATRIX=quick runs a subset for a quick look: every trainer under ZeRO-3 or
# FSDP2, tied embeddings and PEFT under each, the cases that once crashed.
QUICK = {
    "zero3": ("dpo", "dpo_tied", "sft_tied", "rloo_tied", "distillation_tied", "gkd", "dpo_peft", "dpo_tdpo2",
              "dpo_spo"),
    "zero3_offload": ("dpo", "sft_tied"),
    "fsdp2": ("dpo", "dpo_tied", "dpo_peft", "sft_tied", "kto_peft", "grpo_exact_kl", "distillation", "dpo_bf16",
              "dpo_spo"),
}
ENGINES = QUICK if os.environ.get("FPO_ENGINE_MATRIX") == "quick" else FULL
LAUNCH_TIMEOUT_S = 3600  # one launch trains every case of its engine
MATRIX = [(engine, case) for engine, names in ENGINES.items() for case in names]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, out: str, cases) -> None:
    """``accelerate launch`` of `engine_training.py` with the engine's config, as the CLI runs it."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # the fused heads run the streaming PyTorch path on CPU
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "examples", "accelerate", f"{engine}.yaml"),
        "--num_processes", str(WORLD), "--main_process_port", str(_free_port()),
        SCRIPT, out, *cases,
    ]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"accelerate launch ({engine}) did not finish within {LAUNCH_TIMEOUT_S} s")
    if done.returncode != 0:
        pytest.fail(f"accelerate launch ({engine}) exited with {done.returncode}:\n{done.stderr[-6000:]}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(engine, case)``: the case's ``{label: run}`` (see `engine_training._trained`); each
    engine is launched once, on first use, for all its cases."""
    root = tmp_path_factory.mktemp("engines")
    for family in ("llama", "llama_tied"):  # the RL trainers load the policy (and TRL the reference) by path
        path = str(root / "models" / family)
        engine_training.build_model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    done = {}

    def results(engine, case):
        out = root / engine
        if engine not in done:
            done[engine] = None  # launched once, whether it ends well or not
            out.mkdir()
            os.symlink(root / "models", out / "models")
            launch(engine, str(out), ENGINES[engine])
        loaded = [torch.load(p, weights_only=False) for p in sorted(out.glob(f"{case}-rank*.pt"))]
        errors = [r["error"] for r in loaded if "error" in r]
        assert not errors, f"{engine} {case}:\n" + "\n".join(errors)
        return loaded[0]

    return results


def steps(run):
    return [row for row in run["logs"] if "grad_norm" in row]




def assert_engine_held_the_model(engine, run, hidden=40, vocab=92):
    info = run["engine"]
    assert info["world"] == WORLD
    if engine.startswith("zero"):
        assert info["type"].endswith("DEEPSPEED") and info["zero_stage"] == int(engine[4])
        if info["zero_stage"] == 3:
            assert info["head_partition"] == ((vocab * hidden // WORLD,), vocab * hidden)
        assert info["offload_param"] == ("cpu" if engine.endswith("offload") else None)
    else:
        assert info["type"].endswith("FSDP") and info["fsdp_version"] == 2
        assert info["head_placements"] == "(Shard(dim=0),)" and info["head_local_shape"] == (vocab // WORLD, hidden)


def assert_trained(run):
    rows = steps(run)
    assert len(rows) == engine_training.STEPS
    for row in rows:
        assert row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))


@pytest.mark.parametrize("engine,case", [m for m in MATRIX if m[1] in COMPARED])
def test_fused_trainer_equals_trl_under_engine(launched, engine, case):
    runs = launched(engine, case)
    ours, theirs = runs["fused"], runs["trl"]
    assert_engine_held_the_model(engine, theirs)
    assert_engine_held_the_model(engine, ours)
    assert_trained(theirs)
    assert_same_logs(ours["logs"], theirs["logs"])
    assert_same_weights(ours["params"], theirs["params"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``one_process(case)``: the fused run of ``case`` on this process alone, on the global batch."""
    root = tmp_path_factory.mktemp("one-process")
    done = {}

    def run(case):
        if case not in done:
            trainer, runs = engine_training.cases()[case]
            fused, options = runs["fused"]
            fn = engine_training.TRAINERS[trainer]
            done[case] = fn(fused, out=str(root / case), **{**options, "per_device_train_batch_size": 2 * WORLD,
                                                               "ddp_backend": None})
            assert done[case]["engine"]["world"] == 1
        return done[case]

    return run


@pytest.mark.parametrize("engine,case", [m for m in MATRIX if m[1] in ALONE])
def test_fused_trainer_under_engine_equals_one_process(launched, one_process, engine, case):
    ours, alone = launched(engine, case)["fused"], one_process(case)
    assert_engine_held_the_model(engine, ours)
    assert_trained(ours)
    if case == "dpo_spo":
        assert ours["spo_generations"] == alone["spo_generations"] == 2
    assert_same_logs(ours["logs"], alone["logs"])
    assert_same_weights(ours["params"], alone["params"])


@pytest.mark.parametrize("engine,case", [m for m in MATRIX if m[1] in TRAINS])
def test_fused_trainer_trains_under_engine(launched, engine, case):
    run = launched(engine, case)["fused"]
    assert_engine_held_the_model(engine, run)
    assert_trained(run)
    for row in steps(run):
        for name in ("kl", "reverse_kl"):
            if name in row:
                assert row[name] >= 0


@pytest.mark.parametrize("engine,case", [m for m in MATRIX if m[1] in BF16])
def test_default_bf16_config_within_budget_under_engine(launched, engine, case):
    runs = launched(engine, case)
    assert runs["trl"]["precision"] == runs["fused"]["precision"] == (True, True)  # TRL's defaults
    assert runs["fp32"]["precision"] == (False, False)
    ours, theirs, exact = ((steps(runs[label]), runs[label]["params"]) for label in ("fused", "trl", "fp32"))
    assert len(exact[0]) == engine_training.STEPS
    assert theirs[0][0]["loss"] != exact[0][0]["loss"]  # a bf16 budget
    # Each bf16 run against the fp32 run: ours at most 2x TRL's own error plus a floor.
    assert_bf16_training_within_budget(ours, theirs, exact)
