"""FusedKTOTrainer against TRL's own KTOTrainer on tiny models built in code (CPU, no downloads)."""
import pytest
import torch

pytest.importorskip("trl")

from trl import KTOConfig, KTOTrainer  # noqa: E402

from fpo_ops.integrations.trl import FusedKTOConfig, FusedKTOTrainer  # noqa: E402
from trainer_fixtures import (  # noqa: E402
    assert_default_precision_within_budget, assert_heads_run_in_autocast_dtype, assert_same_step,
    completion_dataset, one_batch, step, trainer_pair,
)

FP32 = dict(
    per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, optim="sgd", logging_steps=1,
    report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no", seed=7, beta=0.3,
    use_cpu=True, disable_tqdm=True, dataloader_drop_last=True, max_length=None,
)


def kto_dataset(num_rows=8):
    dataset = completion_dataset(num_rows)
    # Unpaired feedback: alternately desirable and undesirable, a batch always holds both.
    return dataset.add_column("label", [i % 2 == 0 for i in range(num_rows)])


def pair(tmp_path, family="llama", base=FP32, with_ref=True, **overrides):
    return trainer_pair(KTOTrainer, FusedKTOTrainer, KTOConfig, FusedKTOConfig, tmp_path, kto_dataset(),
                        family=family, with_ref=with_ref, **{**base, **overrides})


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_step_equals_trl(tmp_path, loss_type, family):
    theirs, ours = pair(tmp_path, family=family, loss_type=loss_type)
    batch = one_batch(theirs)
    expected, got = step(theirs, batch), step(ours, batch)
    assert {"kl", "entropy", "logits/chosen", "logps/rejected", "rewards/margins"} <= set(got[1])
    assert_same_step(got, expected)


def test_weights_and_precomputed_reference_equal_trl(tmp_path):
    theirs, ours = pair(tmp_path, precompute_ref_log_probs=True, desirable_weight=1.7, undesirable_weight=0.6)
    # The precomputed reference log-probs are a dataset column, computed by each trainer's own head.
    torch.testing.assert_close(torch.tensor(ours.train_dataset["ref_logps"]),
                               torch.tensor(theirs.train_dataset["ref_logps"]), rtol=1e-5, atol=1e-5)
    batch = one_batch(theirs)
    assert_same_step(step(ours, batch), step(theirs, batch))


def test_peft_reference_equals_trl(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    from hf_fixtures import tiny_model, tiny_tokenizer

    made = [cls(model=tiny_model("llama"), args=cfg(output_dir=str(tmp_path / cls.__name__), **FP32),
                train_dataset=kto_dataset(), processing_class=tiny_tokenizer(), peft_config=config)
            for cls, cfg in ((KTOTrainer, KTOConfig), (FusedKTOTrainer, FusedKTOConfig))]
    theirs, ours = made
    # Equal adapters, non-zero so that policy and (adapter-disabled) reference differ.
    with torch.no_grad():
        for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
            if "lora_B" in name:
                b.copy_(torch.randn_like(b) * 0.1)
            a.copy_(b)
    batch = one_batch(theirs)
    assert_same_step(step(ours, batch), step(theirs, batch))


def test_training_equals_trl(tmp_path):
    theirs, ours = pair(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    theirs.train()
    ours.train()
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    assert len(ours.state.log_history) == len(theirs.state.log_history)
    for got, expected in zip(ours.state.log_history, theirs.state.log_history):
        for name in set(expected) - set(timing):
            assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bf16_default_config_within_budget(tmp_path):
    """TRL's default precision (bf16 autocast, gradient checkpointing) against the fp32 step."""
    assert_default_precision_within_budget(pair, tmp_path, FP32, one_batch)


@pytest.mark.parametrize("bf16", [True, False])
def test_every_head_runs_fused_in_the_autocast_dtype(tmp_path, monkeypatch, bf16):
    # Policy KL completions, policy, reference KL completions, reference.
    assert_heads_run_in_autocast_dtype(pair, tmp_path, monkeypatch, bf16, one_batch, calls=4)


def test_bad_fused_impl_names_the_option(tmp_path):
    with pytest.raises(ValueError, match="fused_impl"):
        FusedKTOConfig(output_dir=str(tmp_path), fused_impl="cuda", use_cpu=True, report_to="none")
