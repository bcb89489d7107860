"""FusedDPOTrainer's seed losses: SPO's regulariser on policy samples, SPPO from win-rate columns (tiny CPU models)."""
import copy

import pytest
import torch

pytest.importorskip("trl")

from fpo_ops.integrations import hf  # noqa: E402
from fpo_ops.integrations.trl import FusedDPOConfig, FusedDPOTrainer  # noqa: E402
from hf_fixtures import preference_dataset, tiny_model  # noqa: E402
from loss_batches import IGNORE, Batch  # noqa: E402
from loss_oracle import spo_oracle, sppo_oracle, token_quantities  # noqa: E402
from test_integration_trl import loss_metrics_grads, make_args, make_trainer, one_batch  # noqa: E402

SPO = dict(loss_type="spo", spo_alpha=1.5, spo_max_new_tokens=4, spo_num_samples=3, max_steps=3)


def _labels(input_ids, completion_mask):
    return input_ids.masked_fill(completion_mask == 0, IGNORE)[:, 1:]


def _float64_parts(model, ref_model, input_ids, attention_mask):
    """Hidden states and heads of both models in float64 (the policy's with autograd)."""
    policy = hf.hidden_and_head(model, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        ref = hf.hidden_and_head(ref_model, input_ids=input_ids, attention_mask=attention_mask)
    return policy, ref


def _tokens(policy, ref, labels):
    """`token_quantities` (materialised float64 logits) of one batch of sequences."""
    return token_quantities(Batch(policy.hidden[:, :-1], policy.weight, labels, ref.hidden[:, :-1], ref.weight))


def _spo_oracle_step(trainer, batch, samples):
    """Loss, regulariser and parameter gradients of the step from a float64 copy of the models."""
    model = copy.deepcopy(trainer.model).double().train()
    ref_model = copy.deepcopy(trainer.ref_model).double()
    pairs = _tokens(*_float64_parts(model, ref_model, batch["input_ids"], batch["attention_mask"]),
                    _labels(batch["input_ids"], batch["completion_mask"]))
    sample_tok = _tokens(*_float64_parts(model, ref_model, samples.input_ids, samples.attention_mask), samples.labels)
    loss, metrics = spo_oracle(pairs, beta=trainer.args.beta, alpha=trainer.args.spo_alpha, sample_tok=sample_tok)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics["reverse_kl"], grads


@pytest.mark.parametrize("sampling", ["greedy", "sample"])
def test_spo_regulariser_on_policy_samples_matches_float64_oracle_and_trains(tmp_path, sampling):
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, spo_sampling=sampling, spo_sample_every=2,
                           **SPO)
    batch = one_batch(trainer)
    torch.manual_seed(3)
    loss, metrics, grads = loss_metrics_grads(trainer, batch)
    samples = trainer._spo_samples
    assert trainer._spo_generations == 1 and samples.step == 0

    # the samples: the chosen rows' prompts (in turn), then 1..4 generated tokens, the labels on those
    n_pairs = batch["input_ids"].shape[0] // 2
    assert samples.input_ids.shape[0] == 3
    for i in range(3):
        row = i % n_pairs
        prompt = batch["input_ids"][row][(batch["attention_mask"][row] == 1) & (batch["completion_mask"][row] == 0)]
        assert torch.equal(samples.input_ids[i, :len(prompt)], prompt)
        generated = samples.labels[i][samples.labels[i] != IGNORE]
        assert 1 <= len(generated) <= 4
        assert torch.equal(generated, samples.input_ids[i, len(prompt):len(prompt) + len(generated)])
        assert (generated[:-1] != 1).all()  # only the last may be EOS
    if sampling == "greedy":
        # each generated token is the policy's argmax at its position (the samples are the policy's)
        with torch.no_grad():
            logits = trainer.model(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits[:, :-1]
        valid = samples.labels != IGNORE
        assert torch.equal(logits.argmax(-1)[valid], samples.labels[valid])
    else:
        # seeded sampling is reproducible
        torch.manual_seed(3)
        again = trainer._generate_spo_samples(trainer.model, batch, 0)
        assert torch.equal(again.input_ids, samples.input_ids) and torch.equal(again.labels, samples.labels)

    expected_loss, expected_kl, expected_grads = _spo_oracle_step(trainer, batch, samples)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    assert metrics["reverse_kl"] == pytest.approx(expected_kl.item(), rel=1e-4, abs=1e-6) and metrics["reverse_kl"] > 0
    assert set(grads) == set(expected_grads)
    for name, expected in expected_grads.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(grads[name].double(), expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m: f"{name}: {m}")

    # training: new samples at steps 0 (already drawn above) and 2, reused at step 1
    before = [p.detach().clone() for p in trainer.model.parameters()]
    generations = trainer._spo_generations
    trainer.train()
    assert trainer.state.global_step == 3 and trainer._spo_generations == generations + 1
    assert trainer._spo_samples.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all("reverse_kl" in row for row in trainer.state.log_history if "loss" in row)


def test_spo_score_function_changes_the_gradient_not_the_value(tmp_path):
    values, grads = [], []
    for score_function in (False, True):
        trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / str(score_function),
                               spo_score_function=score_function, **SPO)
        batch = one_batch(trainer)
        torch.manual_seed(5)
        loss, _, g = loss_metrics_grads(trainer, batch)
        values.append(loss)
        grads.append(g)
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-6)
    differs = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    assert differs > 1e-6


def test_spo_evaluation_samples_each_eval_batch(tmp_path):
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, per_device_eval_batch_size=2, **SPO)
    result = trainer.evaluate(preference_dataset(4, seed=1))
    assert trainer._spo_generations == 2 and trainer._spo_samples is None  # not cached for training
    assert result["eval_reverse_kl"] > 0 and torch.isfinite(torch.tensor(result["eval_loss"]))


def test_spo_samples_join_the_batch_forward(tmp_path):
    # One forward of each model per step (FSDP2 reshards a module's parameters in the backward of
    # each forward; ZeRO-3 would gather every layer twice): the samples ride in the batch's rows.
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, **SPO)
    batch = one_batch(trainer)
    calls = {"policy": [], "reference": []}
    for name, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
        model.model.register_forward_hook(
            lambda module, args, kwargs, out, seen=calls[name]: seen.append(
                (torch.is_grad_enabled(), kwargs["input_ids"].shape[0])), with_kwargs=True)
    loss_metrics_grads(trainer, batch)
    rows = batch["input_ids"].shape[0] + trainer._spo_samples.input_ids.shape[0]
    assert [c for c in calls["policy"] if c[0]] == [(True, rows)]
    assert calls["reference"] == [(False, rows)]


@pytest.mark.parametrize("extra", [{"pixel_values": torch.zeros(4, 3)},
                                   {"position_ids": torch.zeros(4, 5, dtype=torch.long)}])
def test_spo_on_policy_refuses_a_batch_it_cannot_extend(tmp_path, extra):
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, **SPO)
    batch = one_batch(trainer)
    samples = trainer._generate_spo_samples(trainer.model, batch, step=0)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    if "position_ids" in extra:
        del kwargs["attention_mask"]  # padding-free batches carry positions, no mask
    with pytest.raises(ValueError, match=r"spo_regularizer: 'on_policy'.*expected spo_regularizer='pair'"):
        trainer._spo_joint_kwargs(kwargs, samples)


def test_spo_on_policy_refuses_padding_free_at_construction(tmp_path):
    with pytest.raises(ValueError, match="expected padding_free=False or spo_regularizer='pair'"):
        make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, padding_free=True, **SPO)


def test_spo_pair_regulariser_generates_nothing(tmp_path):
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, spo_regularizer="pair", **SPO)
    loss_metrics_grads(trainer, one_batch(trainer))
    assert trainer._spo_generations == 0 and trainer._spo_samples is None


def _win_rate_dataset(num_pairs=6):
    dataset = preference_dataset(num_pairs)
    g = torch.Generator().manual_seed(9)
    for name in ("chosen_probs", "chosen_probs_win", "chosen_probs_lose"):
        dataset = dataset.add_column(name, torch.rand(num_pairs, generator=g).tolist())
    return dataset


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_single"])
def test_sppo_trains_from_win_rate_columns(tmp_path, loss_type):
    dataset = _win_rate_dataset()
    trainer = make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, loss_type=loss_type, dataset=dataset,
                           max_steps=2)
    # the columns survive TRL's processing, `remove_unused_columns` and the collator
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    for name in ("chosen_probs", "chosen_probs_win", "chosen_probs_lose"):
        assert batch[name].shape == (3,) and batch[name].dtype == torch.float32
        assert all(any(abs(v - w) < 1e-6 for w in dataset[name]) for v in batch[name].tolist())
    loss, metrics, grads = loss_metrics_grads(trainer, batch)

    model = copy.deepcopy(trainer.model).double()
    ref_model = copy.deepcopy(trainer.ref_model).double()
    tok = _tokens(*_float64_parts(model, ref_model, batch["input_ids"], batch["attention_mask"]),
                  _labels(batch["input_ids"], batch["completion_mask"]))
    probs = {k: batch[k].double() for k in ("chosen_probs", "chosen_probs_win", "chosen_probs_lose")}
    if loss_type == "sppo":
        expected = sppo_oracle(tok, beta=trainer.args.beta, p_w=probs["chosen_probs_win"],
                               p_l=probs["chosen_probs_lose"])
    else:
        expected = sppo_oracle(tok, beta=trainer.args.beta, p_pair=probs["chosen_probs"])
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    expected.backward()
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m: f"{name}: {m}")

    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert result.global_step == 2
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_sppo_without_win_rate_columns_names_them(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset: loss type 'sppo'.*chosen_probs_win.*chosen_probs_lose"):
        make_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, loss_type="sppo")


@pytest.mark.parametrize("overrides,match", [
    (dict(spo_regularizer="global"), "spo_regularizer"),
    (dict(spo_sample_every=0), "spo_sample_every"),
    (dict(spo_num_samples=0), "spo_num_samples"),
    (dict(spo_max_new_tokens=0), "spo_max_new_tokens"),
    (dict(spo_sampling="beam"), "spo_sampling"),
    (dict(spo_temperature=0.0), "spo_temperature"),
    (dict(spo_regularizer="pair", spo_score_function=True), "spo_score_function"),
])
def test_bad_spo_options_name_the_argument(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(FusedDPOConfig, tmp_path, loss_type="spo", **overrides)


def test_tiny_model_generates(tmp_path):
    """The fixture model can generate under the trainer's patched forward (generation is unchanged)."""
    model = tiny_model("llama")
    hf.add_head_outputs(model)
    out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
