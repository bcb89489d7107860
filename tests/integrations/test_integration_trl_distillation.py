"""FusedDistillationTrainer against TRL's own DistillationTrainer on tiny models (CPU, no downloads)."""
import pytest
import torch
import transformers

pytest.importorskip("trl")

from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from fpo_ops.integrations.trl import FusedDistillationConfig, FusedDistillationTrainer  # noqa: E402
from hf_fixtures import VOCAB_SIZE  # noqa: E402
from trainer_fixtures import (  # noqa: E402
    assert_default_precision_within_budget, assert_heads_run_in_autocast_dtype, assert_same_step,
    completion_dataset, step, trainer_pair,
)

FP32 = dict(
    per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, optim="sgd", logging_steps=1,
    report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no", seed=7,
    use_cpu=True, disable_tqdm=True, max_completion_length=6,
)


def pair(tmp_path, family="llama", base=FP32, **overrides):
    prompts = completion_dataset(8).remove_columns("completion")
    return trainer_pair(DistillationTrainer, FusedDistillationTrainer, DistillationConfig, FusedDistillationConfig,
                        tmp_path, prompts, family=family, with_ref=True, ref_kwarg="teacher_model",
                        **{**base, **overrides})


def generated_batch(rows=3, prompt_len=5, completion_len=7, tool_mask=False):
    """What on-policy generation hands `compute_loss`: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(11)
    prompt_ids = torch.randint(3, VOCAB_SIZE, (rows, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, VOCAB_SIZE, (rows, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, num_items_in_batch=completion_mask.sum().float())
    if tool_mask:
        batch["tool_mask"] = torch.ones_like(completion_mask)
        batch["tool_mask"][2, 1:3] = 0
    return batch


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere"])
def test_step_equals_trl(tmp_path, beta, family):
    theirs, ours = pair(tmp_path, family=family, beta=beta, temperature=0.7)
    batch = generated_batch()
    expected, got = step(theirs, batch), step(ours, batch)
    assert set(got[1]) == {"entropy"}
    assert_same_step(got, expected)


def test_tool_mask_equals_trl(tmp_path):
    theirs, ours = pair(tmp_path, beta=0.5)
    batch = generated_batch(tool_mask=True)
    assert_same_step(step(ours, batch), step(theirs, batch))


def test_on_policy_training_equals_trl(tmp_path):
    """Same seed, same generated completions: the logged history and the trained weights agree."""
    theirs, ours = pair(tmp_path, beta=0.5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                        max_steps=2)
    # Trainer seeds the generator in __init__ only; both runs start from the same seed.
    for trainer in (theirs, ours):
        transformers.set_seed(trainer.args.seed)
        trainer.train()
    timing = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time"}
    assert len(ours.state.log_history) == len(theirs.state.log_history)
    for got, expected in zip(ours.state.log_history, theirs.state.log_history):
        for name in set(expected) - timing:
            assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bf16_default_config_within_budget(tmp_path):
    """TRL's default precision (bf16 autocast, gradient checkpointing) against the fp32 step."""
    assert_default_precision_within_budget(pair, tmp_path, FP32, lambda trainer: generated_batch(), beta=0.5)


@pytest.mark.parametrize("bf16", [True, False])
def test_divergence_runs_fused_in_the_autocast_dtype(tmp_path, monkeypatch, bf16):
    import fpo_ops.losses.distill as distill

    assert_heads_run_in_autocast_dtype(pair, tmp_path, monkeypatch, bf16, lambda trainer: generated_batch(),
                                       module=distill)


def test_bad_fused_impl_names_the_option(tmp_path):
    with pytest.raises(ValueError, match="fused_impl"):
        FusedDistillationConfig(output_dir=str(tmp_path), fused_impl="cuda", use_cpu=True, report_to="none")
