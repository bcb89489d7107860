"""The fused TRL drop-ins under data-parallel DDP on 2 CPU processes (gloo), as multi-GPU users run them.

One launch of two processes trains every case from the same seed and data, and each rank saves its
log history and final weights; the tests then compare them, with no further process start:

- with TRL's own trainer under the same DDP: DPO (sigmoid) in fp32, with precomputed reference
  log-probs, and under TRL's default DPOConfig (bf16, gradient checkpointing); SFT; GRPO;
- with one process on the same global batch, where TRL has no counterpart or the point is the
  reduction over ranks: TDPO2, SPO on (greedy) policy samples, SFT (normalised by the token count of
  every rank), GRPO's exact KL. Each rank holds half of the global batch, equal pair (sequence)
  counts, so DDP's mean of the ranks' gradients of per-pair (or per-global-token) means is the
  gradient of the one-process step;
- between the ranks: DDP averaged the gradients, so both hold bitwise the same weights.

HF Trainer and accelerate take DDP from RANK / WORLD_SIZE / LOCAL_RANK (with ``use_cpu=True`` they
pick gloo) and join the process group the launcher has already opened.
"""
import copy
import os
import traceback

import pytest
import torch

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

pytest.importorskip("trl")

from distributed_launch import launch  # noqa: E402
from hf_fixtures import preference_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trainer_fixtures import assert_bf16_training_within_budget, assert_same_logs, assert_same_weights, completion_dataset  # noqa: E402

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 4  # pairs (DPO) or rows (SFT) per optimizer step, over all ranks
# Not compared: timings (logged names ending so), and the FLOP estimate, which counts padding (each
# rank pads to its own longest row).
TIMING = ("_runtime", "_samples_per_second", "_steps_per_second", "step_time")
# What TRL's DPOTrainer logs per step (FusedDPOTrainer too).
DPO_LOGS = {
    "loss", "grad_norm", "learning_rate", "epoch", "entropy", "num_tokens", "logits/chosen", "logits/rejected",
    "mean_token_accuracy", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
}
FP32_PRECISION = dict(bf16=False, gradient_checkpointing=False)
FP32 = dict(
    max_steps=STEPS, learning_rate=1e-2, optim="sgd", logging_steps=1, report_to="none", save_strategy="no",
    seed=7, dataloader_drop_last=True, use_cpu=True, disable_tqdm=True, **FP32_PRECISION,
)
# fp32: TRL's head and ours agree to ~1e-5.
DPO = dict(FP32, beta=0.3, max_length=None)
TDPO2 = dict(DPO, loss_type="tdpo2", tdpo_alpha=0.7)
# Greedy samples are a function of the prompts and weights alone, so each rank draws the samples one
# process draws for the same prompts (sampled ones come from each process's own generator). New
# samples at steps 0 and 2, reused at step 1.
SPO = dict(DPO, loss_type="spo", spo_alpha=1.5, spo_sampling="greedy", spo_max_new_tokens=4, spo_sample_every=2)
# TRL's default DPOConfig (bf16 autocast, gradient checkpointing: DDP then runs without
# find_unused_parameters), with the data, reference, beta and steps of the one-process test of it
# (`test_four_sgd_steps_under_bf16_within_budget_of_trl` in tests/integrations/test_integration_trl_precision.py): the
# same global batches of 2 pairs, here one pair per rank.
DPO_BF16 = dict(
    max_steps=4, learning_rate=1e-2, optim="sgd", logging_steps=1, report_to="none", save_strategy="no",
    max_length=None, seed=7, dataloader_drop_last=True, use_cpu=True, disable_tqdm=True, loss_type="sigmoid",
    beta=0.1, perturb=0.02, global_batch=2, num_pairs=6,
)
# Sampled (not greedy) completions here: each rank draws its own, so no one-process equal.
SPO_BF16 = dict(SPO, spo_sampling="sample", bf16=True, gradient_checkpointing=True)
GRPO = dict(FP32, num_generations=2, max_completion_length=5, beta=0.04, temperature=0.9)
# The exact KL to a perturbed reference, with the loss type whose normaliser is the token count of
# every rank over the rank count. Greedy completions (a function of the prompts and the weights) are
# those one process generates; the two of a group are equal, so the advantages and the policy term
# are 0 and the KL term alone trains.
GRPO_EXACT_KL = dict(kl_estimator="exact", loss_type="dapo", beta=0.3, ref_perturb=0.05,
                     generation_kwargs={"do_sample": False})


def _distributed_env(rank: int, world: int) -> None:
    # What torchrun would set. OMP_NUM_THREADS set: accelerate leaves the launcher's one thread alone.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")


def _comparable(logged: dict) -> dict:
    return {k: v for k, v in logged.items() if k != "total_flos" and not k.endswith(TIMING)}


def _trained(trainer, eval_dataset=None) -> dict:
    """Train (then evaluate on ``eval_dataset``); the log history, the weights before and after, the
    evaluation's metrics and what a test checks of the set-up."""
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    evaluation = None
    if eval_dataset is not None:
        evaluation = _comparable(trainer.evaluate(eval_dataset))
    model = trainer.accelerator.unwrap_model(trainer.model)
    columns = trainer.train_dataset.column_names
    return dict(
        evaluation=evaluation,
        logs=[_comparable(row) for row in trainer.state.log_history],
        initial=initial, params={n: p.detach().clone() for n, p in model.named_parameters()},
        world=trainer.accelerator.num_processes, precision=(trainer.args.bf16, trainer.args.gradient_checkpointing),
        spo_generations=getattr(trainer, "_spo_generations", None),
        ref_logps=torch.tensor(trainer.train_dataset["ref_chosen_logps"]) if "ref_chosen_logps" in columns else None,
    )


def _dpo_run(trainer_cls, config_cls, out, world, perturb=0.05, global_batch=GLOBAL_BATCH, num_pairs=None,
             data_dir=None, eval_pairs=None, **config):
    """A DPO-family trainer on the tiny model against a perturbed copy (built as the one-process tests
    build it), ``global_batch`` pairs per step, ``num_pairs`` pairs (default: one epoch of the steps)
    or the dataset saved in ``data_dir``; evaluated on ``eval_pairs`` other pairs."""
    from datasets import load_from_disk

    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(perturb * torch.randn_like(p))
    args = config_cls(output_dir=out, per_device_train_batch_size=global_batch // world, **config)
    dataset = load_from_disk(data_dir) if data_dir else preference_dataset(num_pairs or global_batch * args.max_steps)
    trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                          processing_class=tiny_tokenizer())
    return _trained(trainer, eval_pairs and preference_dataset(eval_pairs, seed=1))


def _sft_run(trainer_cls, config_cls, out, world):
    # Prompt-completion rows of 1 to 8 completion tokens: the ranks hold different token counts.
    args = config_cls(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // world, **FP32)
    return _trained(trainer_cls(model=tiny_model("llama"), args=args, processing_class=tiny_tokenizer(),
                                train_dataset=completion_dataset(GLOBAL_BATCH * STEPS)))


def reward_length(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def reward_word_ids(completions, **kwargs):
    # varies between completions of one prompt, so that the group advantages are not all zero
    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]


def _grpo_run(trainer_cls, config_cls, out, world, model_path, ref_perturb=0.0, **config):
    """A GRPO trainer on the tiny model saved at ``model_path`` (TRL loads the policy and the
    reference by path), 8 completions per step (4 prompts x 2 generations) over all ranks; the
    reference perturbed by ``ref_perturb``."""
    import transformers

    args = config_cls(output_dir=out, per_device_train_batch_size=8 // world, **{**GRPO, **config})
    trainer = trainer_cls(model=model_path, reward_funcs=[reward_length, reward_word_ids], args=args,
                          train_dataset=completion_dataset(8 * STEPS).remove_columns("completion"),
                          processing_class=tiny_tokenizer())
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in trainer.ref_model.parameters():
            p.add_(ref_perturb * torch.randn(p.shape, generator=g))
    transformers.set_seed(args.seed)  # seeded in __init__ only: both trainers generate from the same state
    return _trained(trainer)


def _cases(out: str, world: int, model_path=None) -> dict:
    """Every case: name -> {label: a function that trains one trainer on ``world`` processes}."""
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from fpo_ops.integrations.trl import (
        FusedDPOConfig, FusedDPOTrainer, FusedGRPOConfig, FusedGRPOTrainer, FusedSFTConfig, FusedSFTTrainer,
    )

    def run(trainer_cls, config_cls, name, label, **config):
        return lambda: _dpo_run(trainer_cls, config_cls, os.path.join(out, name, label), world, **config)

    def dpo(name, **config):
        return {"trl": run(DPOTrainer, DPOConfig, name, "trl", **config),
                "fused": run(FusedDPOTrainer, FusedDPOConfig, name, "fused", **config)}

    def sft(label, trainer_cls, config_cls):
        return lambda: _sft_run(trainer_cls, config_cls, os.path.join(out, "sft", label), world)

    def grpo(label, trainer_cls, config_cls, **config):
        return lambda: _grpo_run(trainer_cls, config_cls, os.path.join(out, "grpo", label), world, model_path,
                                 **config)

    # TRL caches precomputed reference log-probs next to the dataset (and, for a dataset in memory,
    # in a temporary folder of rank 0 alone, which rank 1 cannot open): each trainer reads its own
    # copy of a dataset saved to disk.
    def precomputed(label, trainer_cls, config_cls):
        return run(trainer_cls, config_cls, "precomputed", label, data_dir=os.path.join(out, f"pairs-{label}"),
                   loss_type="sigmoid", precompute_ref_log_probs=True, **DPO)

    return {
        # 5 evaluation pairs, 2 per rank and batch: the last batch is uneven (accelerate pads it)
        "dpo": dpo("dpo", loss_type="sigmoid", eval_pairs=5, per_device_eval_batch_size=2, **DPO),
        "dpo_precomputed": {"trl": precomputed("trl", DPOTrainer, DPOConfig),
                            "fused": precomputed("fused", FusedDPOTrainer, FusedDPOConfig)},
        # with the fp32 run of the same case: the truth both bf16 runs are measured against
        "dpo_bf16": {**dpo("dpo_bf16", **DPO_BF16),
                     "fp32": run(FusedDPOTrainer, FusedDPOConfig, "dpo_bf16", "fp32", **DPO_BF16, **FP32_PRECISION)},
        "tdpo2": {"fused": run(FusedDPOTrainer, FusedDPOConfig, "tdpo2", "fused", **TDPO2)},
        "spo": {"fused": run(FusedDPOTrainer, FusedDPOConfig, "spo", "fused", **SPO)},
        "spo_bf16": {"fused": run(FusedDPOTrainer, FusedDPOConfig, "spo_bf16", "fused", **SPO_BF16)},
        "sft": {"trl": sft("trl", SFTTrainer, SFTConfig), "fused": sft("fused", FusedSFTTrainer, FusedSFTConfig)},
        "grpo": {"trl": grpo("trl", GRPOTrainer, GRPOConfig),
                 "fused": grpo("fused", FusedGRPOTrainer, FusedGRPOConfig)},
        "grpo_exact_kl": {"fused": grpo("exact", FusedGRPOTrainer, FusedGRPOConfig, **GRPO_EXACT_KL)},
    }


def _worker(rank: int, world: int, out: str, model_path: str) -> None:
    _distributed_env(rank, world)
    for name, runs in _cases(out, world, model_path).items():
        # A failing case is recorded, not raised: the other cases still run and report. Both ranks
        # run the same code on the same shapes, so they fail at the same place.
        try:
            result = {label: run() for label, run in runs.items()}
        except Exception:
            result = {"error": traceback.format_exc()}
        torch.save(result, os.path.join(out, f"{name}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """``ddp(case)``: [rank 0's, rank 1's] ``{label: run}`` of the case (see `_trained`)."""
    out = tmp_path_factory.mktemp("ddp-trainers")
    model_path = str(out / "model")
    tiny_model("llama").save_pretrained(model_path)
    tiny_tokenizer().save_pretrained(model_path)
    for label in ("trl", "fused"):
        preference_dataset(GLOBAL_BATCH * STEPS).save_to_disk(str(out / f"pairs-{label}"))
    launch(_worker, WORLD, str(out), model_path, timeout_s=600)

    def results(case):
        loaded = [torch.load(out / f"{case}-rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
        for rank, result in enumerate(loaded):
            assert "error" not in result, f"rank {rank}:\n{result['error']}"
        for label in loaded[0]:
            assert all(r[label]["world"] == WORLD for r in loaded), label  # the trainers did run data-parallel
            assert_ranks_hold_the_same_weights(loaded, label)
        return loaded

    results.model_path = model_path
    return results


def one_process(case: str, tmp_path, model_path=None) -> dict:
    """The fused trainer of ``case`` on this process alone (not distributed), on the whole global batch."""
    run = _cases(str(tmp_path), 1, model_path)[case]["fused"]()
    assert run["world"] == 1
    return run


def assert_ranks_hold_the_same_weights(results, label):
    rank0, rank1 = (r[label]["params"] for r in results)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), (label, name)
    assert any(not torch.equal(rank0[n], results[0][label]["initial"][n]) for n in rank0), label  # it trained


def steps(run):
    return [row for row in run["logs"] if "grad_norm" in row]


def test_dpo_equals_trl_under_ddp(ddp):
    ours, theirs = ddp("dpo")[0]["fused"], ddp("dpo")[0]["trl"]
    assert len(steps(theirs)) == STEPS and set(steps(theirs)[0]) == DPO_LOGS | {"step"}
    # per-token metrics are means over the tokens of both ranks, as TRL logs them
    assert_same_logs(ours["logs"], theirs["logs"])
    assert_same_weights(ours["params"], theirs["params"])
    assert set(ours["evaluation"]) == set(theirs["evaluation"]) >= {"eval_loss", "eval_entropy", "eval_logps/chosen"}
    for name, value in theirs["evaluation"].items():
        assert ours["evaluation"][name] == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_dpo_with_precomputed_reference_log_probs_equals_trl_under_ddp(ddp):
    # Each rank computes the log-probs of its share of the dataset; they are gathered for all rows.
    ours, theirs = ddp("dpo_precomputed")[0]["fused"], ddp("dpo_precomputed")[0]["trl"]
    assert theirs["ref_logps"].shape == (GLOBAL_BATCH * STEPS,)
    torch.testing.assert_close(ours["ref_logps"], theirs["ref_logps"], rtol=1e-5, atol=1e-4)
    assert_same_logs(ours["logs"], theirs["logs"])
    assert_same_weights(ours["params"], theirs["params"])


def test_dpo_bf16_default_config_follows_trl_under_ddp(ddp):
    runs = ddp("dpo_bf16")[0]
    assert runs["trl"]["precision"] == runs["fused"]["precision"] == (True, True)  # TRL's defaults
    ours, theirs, exact = ((steps(runs[label]), runs[label]["params"]) for label in ("fused", "trl", "fp32"))
    assert len(exact[0]) == 4
    assert theirs[0][0]["loss"] != exact[0][0]["loss"]  # a bf16 budget
    # The two bf16 runs are different computations from step 1 on (TRL rounds its logit tiles to bf16,
    # ours stay fp32; tests/integrations/test_integration_trl_precision.py), so each is measured
    # against the fp32 run with the precision rule: ours at most 2x TRL's own bf16 error, plus a floor.
    assert_bf16_training_within_budget(ours, theirs, exact)
    assert theirs[0][-1]["loss"] != theirs[0][0]["loss"]


def test_tdpo2_under_ddp_equals_one_process(ddp, tmp_path):
    ours, alone = ddp("tdpo2")[0]["fused"], one_process("tdpo2", tmp_path)
    assert set(steps(ours)[0]) == DPO_LOGS | {"kl/chosen", "kl/rejected", "step"}
    assert all(row["kl/rejected"] > 0 for row in steps(ours))
    assert_same_logs(ours["logs"], alone["logs"])
    assert_same_weights(ours["params"], alone["params"])


def test_spo_on_policy_samples_under_ddp_equal_one_process(ddp, tmp_path):
    # The SPO step runs the DDP-wrapped policy twice before backward (pairs, then samples).
    ours, alone = ddp("spo")[0]["fused"], one_process("spo", tmp_path)
    assert ours["spo_generations"] == alone["spo_generations"] == 2
    assert all(row["reverse_kl"] > 0 for row in steps(ours))
    assert_same_logs(ours["logs"], alone["logs"])
    assert_same_weights(ours["params"], alone["params"])


def test_spo_sampled_under_the_bf16_default_config_trains_under_ddp(ddp):
    # Gradient checkpointing: DDP without find_unused_parameters, and generation with it switched off.
    run = ddp("spo_bf16")[0]["fused"]
    assert run["precision"] == (True, True) and run["spo_generations"] == 2 and len(steps(run)) == STEPS
    for row in steps(run):
        assert row["reverse_kl"] > 0 and row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))


def test_sft_equals_trl_under_ddp(ddp):
    ours, theirs = ddp("sft")[0]["fused"], ddp("sft")[0]["trl"]
    assert set(steps(theirs)[0]) >= {"loss", "entropy", "mean_token_accuracy", "num_tokens"}
    assert_same_logs(ours["logs"], theirs["logs"])
    assert_same_weights(ours["params"], theirs["params"])


def test_sft_under_ddp_equals_one_process(ddp, tmp_path):
    # TRL divides each rank's sum of the fused head's per-token losses by the token count of both ranks
    # (num_items_in_batch) and multiplies by the rank count, so the DDP step is the one-process step
    # although the ranks hold different token counts.
    ours, alone = ddp("sft")[0]["fused"], one_process("sft", tmp_path)
    assert_same_logs(ours["logs"], alone["logs"])
    assert_same_weights(ours["params"], alone["params"])


def test_grpo_equals_trl_under_ddp(ddp):
    ours, theirs = ddp("grpo")[0]["fused"], ddp("grpo")[0]["trl"]
    assert len(steps(theirs)) == STEPS and all(row["grad_norm"] > 0 for row in steps(theirs))
    assert steps(theirs)[-1]["kl"] > 0  # the policy has moved off its reference
    assert_same_logs(ours["logs"], theirs["logs"])
    assert_same_weights(ours["params"], theirs["params"])


def test_grpo_exact_kl_under_ddp_equals_one_process(ddp, tmp_path):
    ours, alone = ddp("grpo_exact_kl")[0]["fused"], one_process("grpo_exact_kl", tmp_path, ddp.model_path)
    assert len(steps(ours)) == STEPS and all(row["kl"] > 0 and row["grad_norm"] > 0 for row in steps(ours))
    assert_same_logs(ours["logs"], alone["logs"])
    assert_same_weights(ours["params"], alone["params"])
