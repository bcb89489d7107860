"""FusedGRPOTrainer and FusedRLOOTrainer against TRL's own trainers on tiny models (CPU, no downloads).

Both trainers load the policy (and TRL the reference, when ``beta > 0``) from a tiny model saved
to a temporary directory, start from the same seed and so generate the same completions.
"""
import pytest
import torch
import transformers

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from fpo_ops.integrations.trl import FusedGRPOConfig, FusedGRPOTrainer, FusedRLOOConfig, FusedRLOOTrainer  # noqa: E402
from hf_fixtures import tiny_model, tiny_tokenizer  # noqa: E402
from trainer_fixtures import completion_dataset, spy_head_calls  # noqa: E402

COMMON = dict(
    per_device_train_batch_size=4, num_generations=2, max_completion_length=5, max_steps=2, learning_rate=1e-2,
    optim="sgd", logging_steps=1, report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no",
    seed=7, use_cpu=True, disable_tqdm=True, beta=0.04, temperature=0.9,
)
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time"}


def reward_length(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def reward_digits(completions, **kwargs):
    return [float(sum(ch in "13579" for ch in c)) for c in completions]


def train_both(tmp_path, trl_cls, fused_cls, config_cls, fused_config_cls, family="llama", **overrides):
    path = tmp_path / "model"
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    prompts = completion_dataset(8).remove_columns("completion")
    trained = []
    for trainer_cls, cfg_cls, name in ((trl_cls, config_cls, "trl"), (fused_cls, fused_config_cls, "fused")):
        trainer = trainer_cls(
            model=str(path), reward_funcs=[reward_length, reward_digits], train_dataset=prompts,
            args=cfg_cls(output_dir=str(tmp_path / name), **{**COMMON, **overrides}),
            processing_class=tiny_tokenizer(),
        )
        # Trainer seeds the generator in __init__ only; both runs start from the same seed.
        transformers.set_seed(trainer.args.seed)
        trainer.train()
        trained.append(trainer)
    return trained


def assert_same_training(theirs, ours, tol=1e-5):
    assert len(ours.state.log_history) == len(theirs.state.log_history)
    assert all(h["grad_norm"] > 0 for h in theirs.state.log_history if "grad_norm" in h)
    for got, expected in zip(ours.state.log_history, theirs.state.log_history):
        assert set(got) == set(expected)
        for name in set(expected) - TIMING:
            assert got[name] == pytest.approx(expected[name], rel=tol, abs=tol, nan_ok=True), name
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"])
def test_grpo_loss_types_train_as_trl(tmp_path, loss_type):
    theirs, ours = train_both(tmp_path, GRPOTrainer, FusedGRPOTrainer, GRPOConfig, FusedGRPOConfig,
                              loss_type=loss_type)
    assert "kl" in theirs.state.log_history[0]
    assert_same_training(theirs, ours)


@pytest.mark.parametrize("options", [
    dict(num_iterations=2, epsilon_high=0.3, top_entropy_quantile=0.5, entropy_coef=0.01),
    dict(importance_sampling_level="sequence", scale_rewards="batch", mask_truncated_completions=True),
    dict(cast_lm_head_to_fp32=True, use_bias_correction_kl=True),
])
def test_grpo_options_train_as_trl(tmp_path, options):
    theirs, ours = train_both(tmp_path, GRPOTrainer, FusedGRPOTrainer, GRPOConfig, FusedGRPOConfig,
                              family="gemma2", **options)
    assert_same_training(theirs, ours)


@pytest.mark.parametrize("options", [dict(), dict(num_iterations=2, normalize_advantages=True, beta=0.0)])
def test_rloo_trains_as_trl(tmp_path, options):
    theirs, ours = train_both(tmp_path, RLOOTrainer, FusedRLOOTrainer, RLOOConfig, FusedRLOOConfig, **options)
    assert_same_training(theirs, ours)


def test_grpo_heads_are_fused(tmp_path, monkeypatch):
    seen = spy_head_calls(monkeypatch)
    train_both(tmp_path, GRPOTrainer, FusedGRPOTrainer, GRPOConfig, FusedGRPOConfig, max_steps=1)
    # Reference log-probs of the generated batch, then the policy in the loss (TRL's run calls none).
    assert seen == [torch.float32, torch.float32]
