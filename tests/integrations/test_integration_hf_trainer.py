"""A model patched by `apply_fused_head` under transformers' `Trainer` (and `FusedSFTTrainer` with label
smoothing): the same training as the unpatched model, without logits."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from fpo_ops.integrations.patch import apply_fused_head  # noqa: E402
from hf_fixtures import tiny_model, tiny_tokenizer  # noqa: E402
from trainer_fixtures import (  # noqa: E402
    assert_same_step, completion_dataset, one_batch, step, text_dataset, trainer_pair,
)

TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def tokenized(rows=10, seed=0):
    tokenizer = tiny_tokenizer()
    return text_dataset(rows, seed).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])


def spy_logit_positions(model):
    """Positions the LM head projected in each of its calls (0 on the fused path)."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape[-2]))
    return seen


def train(model, tmp_path, **overrides):
    options = dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=5e-2, optim="sgd",
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=3,
    )
    args = transformers.TrainingArguments(output_dir=str(tmp_path), **{**options, **overrides})
    collator = transformers.DataCollatorForLanguageModeling(tiny_tokenizer(), mlm=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=tokenized(), data_collator=collator)
    trainer.train()
    return trainer


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.1])
def test_trainer_with_accumulation_equals_unpatched(tmp_path, family, label_smoothing_factor):
    model = tiny_model(family).train()
    patched = apply_fused_head(copy.deepcopy(model), impl="torch")
    positions = spy_logit_positions(patched)
    theirs = train(model, tmp_path / "theirs", label_smoothing_factor=label_smoothing_factor)
    ours = train(patched, tmp_path / "ours", label_smoothing_factor=label_smoothing_factor)
    # Every training forward went through the fused head: the head projected no position.
    assert positions and set(positions) == {0}
    assert len(theirs.state.log_history) == len(ours.state.log_history) == 4
    for got, expected in zip(ours.state.log_history, theirs.state.log_history):
        for name, value in got.items():
            if name not in TIMING_KEYS:
                assert value == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.2])
def test_trainer_evaluation_and_predictions_equal_unpatched(tmp_path, label_smoothing_factor):
    """Evaluation runs the model in eval mode, where the patched model keeps its logits (``train_only``):
    the same eval loss, and the same predictions for ``compute_metrics``."""
    model = tiny_model("llama")
    patched = apply_fused_head(copy.deepcopy(model), impl="torch")
    results = []
    for m, name in ((patched, "ours"), (model, "theirs")):
        trainer = train(m, tmp_path / name, label_smoothing_factor=label_smoothing_factor, max_steps=1)
        evaluated = trainer.evaluate(tokenized(6, seed=1))["eval_loss"]
        predicted = trainer.predict(tokenized(6, seed=1))
        results.append((evaluated, predicted.metrics["test_loss"], torch.as_tensor(predicted.predictions)))
    (loss, test_loss, predictions), (their_loss, their_test_loss, their_predictions) = results
    assert loss == pytest.approx(their_loss, rel=1e-5) and test_loss == pytest.approx(their_test_loss, rel=1e-5)
    assert predictions.shape[-1] == tiny_model("llama").config.vocab_size
    torch.testing.assert_close(predictions, their_predictions, rtol=1e-5, atol=1e-5)


def test_fused_sft_label_smoothing_equals_trl(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from fpo_ops.integrations.trl import FusedSFTConfig, FusedSFTTrainer

    config = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, optim="sgd", logging_steps=1,
                  report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no", seed=7,
                  use_cpu=True, disable_tqdm=True, label_smoothing_factor=0.15)
    theirs, ours = trainer_pair(SFTTrainer, FusedSFTTrainer, SFTConfig, FusedSFTConfig, tmp_path,
                                completion_dataset(8), family="gemma2", **config)
    positions = spy_logit_positions(ours.model)
    batch = one_batch(theirs)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(23)}):
        assert_same_step(step(ours, batch, **kwargs), step(theirs, batch, **kwargs))
    assert positions and set(positions) == {0}
