"""FusedDPOTrainer against TRL's own DPOTrainer on tiny models built in code (CPU, no downloads)."""
import copy

import pytest
import torch

pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402

import fpo_ops  # noqa: E402
from fpo_ops.integrations import hf  # noqa: E402
from fpo_ops.integrations.trl import FusedDPOConfig, FusedDPOTrainer  # noqa: E402
from hf_fixtures import preference_dataset, tiny_model, tiny_tokenizer  # noqa: E402

# Metrics TRL's DPOTrainer logs for every loss type.
TRL_METRICS = {
    "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
    "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
}


def make_args(config_cls, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-2,
        optim="sgd", logging_steps=1, report_to="none", bf16=False, gradient_checkpointing=False,
        save_strategy="no", beta=0.3, max_length=None, seed=7, dataloader_drop_last=True,
        use_cpu=True, disable_tqdm=True,
    )
    values.update(overrides)
    return config_cls(**values)


def make_trainer(trainer_cls, config_cls, tmp_path, family="llama", peft_config=None, dataset=None, **overrides):
    model = tiny_model(family)
    ref_model = None if peft_config is not None else copy.deepcopy(model)
    if ref_model is not None:
        # A reference that differs from the policy makes the log-ratios and rewards non-zero.
        with torch.no_grad():
            for p in ref_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return trainer_cls(
        model=model, ref_model=ref_model, args=make_args(config_cls, tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else preference_dataset(6),
        processing_class=tiny_tokenizer(), peft_config=peft_config,
    )


def one_batch(trainer, rows=4):
    examples = [trainer.train_dataset[i] for i in range(rows)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def loss_metrics_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def assert_same_step(ours, theirs, atol=2e-5, extra_metrics=frozenset()):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=atol)
    assert set(metrics_b) == TRL_METRICS and set(metrics_a) == TRL_METRICS | extra_metrics
    for name in metrics_b:
        assert metrics_a[name] == pytest.approx(metrics_b[name], rel=1e-5, abs=atol), name
    assert set(grads_a) == set(grads_b) and grads_b
    for name in grads_b:
        scale = grads_b[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_loss_metrics_and_gradients_equal_trl(tmp_path, loss_type, family):
    theirs = make_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", family=family, loss_type=loss_type)
    ours = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", family=family, loss_type=loss_type)
    batch = one_batch(theirs)
    assert (batch["completion_mask"].sum(1) > 0).all()
    expected = loss_metrics_grads(theirs, batch)
    got = loss_metrics_grads(ours, batch)
    assert abs(expected[1]["rewards/margins"]) > 1e-4  # the reference differs from the policy
    assert_same_step(got, expected)


def test_combined_losses_with_weights_equal_trl(tmp_path):
    options = dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    theirs = make_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", **options)
    ours = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", **options)
    batch = one_batch(theirs)
    # The SFT term's value is logged as well.
    assert_same_step(loss_metrics_grads(ours, batch), loss_metrics_grads(theirs, batch), extra_metrics={"nll_loss"})


def test_peft_reference_equals_trl(tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    theirs = make_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", peft_config=lora())
    ours = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", peft_config=lora())
    assert ours.ref_model is None
    batch = one_batch(theirs)
    expected = loss_metrics_grads(theirs, batch)
    got = loss_metrics_grads(ours, batch)
    assert abs(expected[1]["rewards/margins"]) > 1e-4  # adapters move the policy off the base model
    assert all("lora" in name for name in got[2])
    assert_same_step(got, expected)


def test_precomputed_reference_logps_equal_trl(tmp_path):
    theirs = make_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", precompute_ref_log_probs=True)
    ours = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", precompute_ref_log_probs=True)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(ours.train_dataset[column]), torch.tensor(theirs.train_dataset[column]),
            rtol=1e-5, atol=1e-4,
        )
    batch = one_batch(theirs)
    assert_same_step(loss_metrics_grads(ours, batch), loss_metrics_grads(theirs, batch))


def test_gradient_accumulation_step_equals_trl(tmp_path):
    options = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, loss_type="ipo")
    theirs = make_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", **options)
    ours = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", **options)
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    theirs.train()
    ours.train()
    moved = 0
    for (name, p_ours), (_, p_theirs) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(p_ours, before[name]))
    assert moved > 0
    logged_ours = {k for row in ours.state.log_history for k in row}
    assert TRL_METRICS <= logged_ours


def expected_loss_in_float64(trainer, batch, loss_type, **loss_options):
    """The loss of the batch from the models' own hidden states, through the float64 oracle."""
    model, ref_model = trainer.model, trainer.ref_model
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        policy = hf.hidden_and_head(model, **kwargs)
        ref = hf.hidden_and_head(ref_model, **kwargs)
    return fpo_ops.preference_loss(
        policy.hidden[:, :-1].double(), policy.weight.double(), labels, ref.hidden[:, :-1].double(),
        ref.weight.double(), loss_type=loss_type, beta=trainer.args.beta, softcap=policy.softcap,
        ref_softcap=ref.softcap, impl="reference", **loss_options,
    )


@pytest.mark.parametrize("loss_type, family, extra_metrics", [
    ("tdpo2", "llama", {"kl/chosen", "kl/rejected"}),
    ("tdpo1", "gemma2", {"kl/chosen", "kl/rejected"}),
    ("spo", "llama", {"reverse_kl"}),
])
def test_token_level_losses_match_oracle_and_train(tmp_path, loss_type, family, extra_metrics):
    # SPO's local variant here: the KL on the pair (the on-policy regulariser is tested on its own)
    options = dict(tdpo_alpha=0.7, spo_alpha=1.3, spo_regularizer="pair")
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, family=family, loss_type=loss_type,
                           max_steps=3, **options)
    batch = one_batch(trainer)
    loss, metrics, grads = loss_metrics_grads(trainer, batch)
    name = "tdpo_alpha" if loss_type == "tdpo2" else "spo_alpha" if loss_type == "spo" else None
    expected = expected_loss_in_float64(trainer, batch, loss_type, **({name: options[name]} if name else {}))
    torch.testing.assert_close(loss.double(), expected.loss, rtol=1e-5, atol=1e-5)
    assert set(metrics) == TRL_METRICS | extra_metrics
    for key in ("rewards/chosen", "rewards/rejected"):
        assert metrics[key] == pytest.approx(expected.metrics[key].item(), rel=1e-4, abs=1e-5)
    for key in extra_metrics:
        assert metrics[key] == pytest.approx(expected.metrics[key].item(), rel=1e-4, abs=1e-5)
        assert metrics[key] != 0.0
    assert all(torch.isfinite(g).all() for g in grads.values())

    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert result.global_step == 3
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_skip_the_reference(tmp_path, loss_type):
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, loss_type=loss_type)
    assert trainer.ref_model is None  # never run, so released
    batch = one_batch(trainer)
    loss, metrics, _ = loss_metrics_grads(trainer, batch)
    assert "nll_loss" in metrics or loss_type == "simpo"
    model_kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        policy = hf.hidden_and_head(trainer.model, **model_kwargs)
    expected = fpo_ops.preference_loss(
        policy.hidden[:, :-1].double(), policy.weight.double(), labels, loss_type=loss_type,
        beta=trainer.args.beta, impl="reference",
    )
    torch.testing.assert_close(loss.double(), expected.loss, rtol=1e-5, atol=1e-5)


def test_reference_free_loss_needs_no_reference_model(tmp_path):
    """A policy built from a config and no ref_model: TRL alone would try to load one by name."""
    trainer = FusedDPOTrainer(
        model=tiny_model("llama"), ref_model=None,
        args=make_args(FusedDPOConfig, tmp_path, loss_type="simpo"),
        train_dataset=preference_dataset(6), processing_class=tiny_tokenizer(),
    )
    assert trainer.ref_model is None
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_reference_loss_without_reference_model_still_loads_one(tmp_path):
    """Only reference-free losses skip TRL's reference loading; sigmoid still asks TRL for one,
    which cannot load a model built from a config, and TRL's loader is left in place."""
    import trl.trainer.dpo_trainer as trl_dpo_trainer

    loader = trl_dpo_trainer.create_model_from_path
    with pytest.raises(OSError):
        FusedDPOTrainer(
            model=tiny_model("llama"), ref_model=None,
            args=make_args(FusedDPOConfig, tmp_path, loss_type="sigmoid"),
            train_dataset=preference_dataset(6), processing_class=tiny_tokenizer(),
        )
    assert trl_dpo_trainer.create_model_from_path is loader


def test_bad_config_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="loss_type: expected names among"):
        make_args(FusedDPOConfig, tmp_path, loss_type="not_a_loss")
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        make_args(FusedDPOConfig, tmp_path, loss_type="tdpo2", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="fused_impl"):
        make_args(FusedDPOConfig, tmp_path, fused_impl="cuda")


def test_evaluate_logs_eval_metrics_equal_trl(tmp_path):
    theirs = make_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", per_device_eval_batch_size=2)
    ours = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", per_device_eval_batch_size=2)
    expected = theirs.evaluate(preference_dataset(4, seed=1))
    got = ours.evaluate(preference_dataset(4, seed=1))
    for name in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_entropy", "eval_mean_token_accuracy"):
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name


