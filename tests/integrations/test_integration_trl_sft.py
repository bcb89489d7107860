"""FusedSFTTrainer against TRL's own SFTTrainer on tiny models built in code (CPU, no downloads)."""
import pytest
import torch

pytest.importorskip("trl")

from trl import SFTConfig, SFTTrainer  # noqa: E402

from fpo_ops.integrations.trl import FusedSFTConfig, FusedSFTTrainer  # noqa: E402
from trainer_fixtures import (  # noqa: E402
    assert_default_precision_within_budget, assert_heads_run_in_autocast_dtype, assert_same_step,
    assert_within_budget, completion_dataset, one_batch, step, text_dataset, trainer_pair,
)
from hf_fixtures import bf16_exact, float64, mixed, tiny_model, tiny_tokenizer  # noqa: E402

FP32 = dict(
    per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, optim="sgd", logging_steps=1,
    report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no", seed=7,
    use_cpu=True, disable_tqdm=True, dataloader_drop_last=True,
)
METRICS = {"entropy", "mean_token_accuracy", "num_tokens"}


def pair(tmp_path, dataset=None, family="llama", base=FP32, **overrides):
    return trainer_pair(SFTTrainer, FusedSFTTrainer, SFTConfig, FusedSFTConfig, tmp_path,
                        completion_dataset(8) if dataset is None else dataset, family=family, **{**base, **overrides})


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere"])
def test_step_equals_trl(tmp_path, loss_type, family):
    theirs, ours = pair(tmp_path, family=family, loss_type=loss_type)
    batch = one_batch(theirs)
    expected, got = step(theirs, batch), step(ours, batch)
    assert set(got[1]) == METRICS
    assert_same_step(got, expected)


def test_language_modelling_text_equals_trl(tmp_path):
    theirs, ours = pair(tmp_path, dataset=text_dataset(8))
    batch = one_batch(theirs)
    assert_same_step(step(ours, batch), step(theirs, batch))


@pytest.mark.parametrize("options", [dict(padding_free=True, max_length=None), dict(packing=True, max_length=24)])
def test_padding_free_and_packing_equal_trl(tmp_path, options):
    theirs, ours = pair(tmp_path, **options)
    batch = one_batch(theirs, rows=3)
    # TRL's padding-free batches: one row, position_ids restarting per sequence, no attention mask.
    assert "position_ids" in batch and "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert_same_step(step(ours, batch), step(theirs, batch))


def test_pre_shifted_labels_equal_trl(tmp_path):
    theirs, ours = pair(tmp_path)
    batch = one_batch(theirs)
    # As passed under context parallelism: labels already shifted, the last position ignored.
    batch["shift_labels"] = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    assert_same_step(step(ours, batch), step(theirs, batch))


def test_num_items_in_batch_equals_trl(tmp_path):
    theirs, ours = pair(tmp_path)
    batch = one_batch(theirs)
    count = torch.tensor(37)
    assert_same_step(step(ours, batch, num_items_in_batch=count), step(theirs, batch, num_items_in_batch=count))


def test_training_with_accumulation_equals_trl(tmp_path):
    theirs, ours = pair(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    theirs.train()
    ours.train()
    logged = [{k: v for k, v in h.items() if k not in ("train_runtime", "train_samples_per_second",
                                                         "train_steps_per_second")} for h in ours.state.log_history]
    for got, expected in zip(logged, theirs.state.log_history):
        for name, value in got.items():
            assert value == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_all_ignored_batch_gives_a_zero_that_backpropagates(tmp_path):
    _, ours = pair(tmp_path)
    batch = one_batch(ours)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, metrics, grads = step(ours, batch)
    assert loss.item() == 0.0 and metrics["entropy"] == 0.0 and metrics["mean_token_accuracy"] == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_bf16_default_config_within_budget(tmp_path):
    """TRL's default precision (bf16 autocast, gradient checkpointing) against the fp32 step."""
    assert_default_precision_within_budget(pair, tmp_path, FP32, one_batch)


def test_plain_amp_bf16_backbone_fp32_head_within_budget(tmp_path):
    """A bf16 backbone with an fp32 head under the user's own bf16 autocast (``bf16=False``: the trainer adds
    none): the head takes mixed operands, each gradient comes back in its parameter's dtype, and the step is
    within budget of TRL's on the same model against the float64 model's."""
    base = bf16_exact(tiny_model("llama"))

    def trainer(trainer_cls, config_cls, model, name):
        return trainer_cls(model=model, args=config_cls(output_dir=str(tmp_path / name), **FP32),
                           train_dataset=completion_dataset(8), processing_class=tiny_tokenizer())

    theirs = trainer(SFTTrainer, SFTConfig, mixed(base), "trl")
    ours = trainer(FusedSFTTrainer, FusedSFTConfig, mixed(base), "fused")
    exact = trainer(SFTTrainer, SFTConfig, float64(base), "exact")
    batch = one_batch(theirs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = step(theirs, batch), step(ours, batch)
    assert set(got[1]) == METRICS
    params = dict(ours.model.named_parameters())
    assert params["lm_head.weight"].dtype == torch.float32
    assert set(got[2]) == set(params) and all(g.dtype == params[n].dtype for n, g in got[2].items())
    assert_within_budget(got, expected, step(exact, batch))


@pytest.mark.parametrize("bf16", [True, False])
def test_head_sees_the_autocast_dtype(tmp_path, monkeypatch, bf16):
    assert_heads_run_in_autocast_dtype(pair, tmp_path, monkeypatch, bf16, one_batch)


def test_bad_fused_impl_names_the_option(tmp_path):
    with pytest.raises(ValueError, match="fused_impl"):
        FusedSFTConfig(output_dir=str(tmp_path), fused_impl="cuda", use_cpu=True, report_to="none")


