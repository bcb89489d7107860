"""The TRL drop-ins under TRL's default configuration: bf16 mixed precision, gradient checkpointing.

Configs here leave ``bf16`` and ``gradient_checkpointing`` at TRL's defaults (both True) unless a test
is about fp32; the tiny models are built in code (CPU, no downloads).
"""
import copy
import tempfile

import pytest
import torch

pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402

import importlib  # noqa: E402
from fpo_ops.integrations.trl import FusedDPOConfig, FusedDPOTrainer  # noqa: E402
from hf_fixtures import preference_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trainer_fixtures import assert_bf16_training_within_budget  # noqa: E402

ZERO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
TOKEN_KL_METRICS = {"tdpo1": ("kl/chosen", "kl/rejected"), "tdpo2": ("kl/chosen", "kl/rejected"), "spo": ("reverse_kl",)}


def default_args(config_cls, tmp_path, **overrides):
    """TRL's defaults except what a test on CPU must set; bf16 and gradient checkpointing untouched."""
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, learning_rate=1e-2, optim="sgd",
        logging_steps=1, report_to="none", save_strategy="no", beta=0.3, max_length=None, seed=7,
        dataloader_drop_last=True, use_cpu=True, disable_tqdm=True,
    )
    values.update(overrides)
    args = config_cls(**values)
    for name in ("bf16", "gradient_checkpointing"):
        assert getattr(args, name) or name in overrides, name
    return args


def dpo_trainer(trainer_cls, config_cls, tmp_path, family="llama", perturb=0.0, num_pairs=6, precompute=False,
                **overrides):
    model = tiny_model(family)
    ref_model = None
    if not precompute:
        ref_model = copy.deepcopy(model)
        with torch.no_grad():
            for p in ref_model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return trainer_cls(
        model=model, ref_model=ref_model,
        args=default_args(config_cls, tmp_path, precompute_ref_log_probs=precompute, **overrides),
        train_dataset=preference_dataset(num_pairs), processing_class=tiny_tokenizer(),
    )


def first_log(trainer):
    trainer.train()
    return next(row for row in trainer.state.log_history if "loss" in row)


@pytest.mark.parametrize("loss_type, precompute", [
    ("sigmoid", False), ("sigmoid", True), ("ipo", False), ("ipo", True),
    ("tdpo1", False), ("tdpo2", False), ("spo", False),
])
def test_policy_equal_to_reference_gives_exact_zeros_at_step_one(tmp_path, loss_type, precompute):
    # One batch of the whole dataset: the precomputed pass sees the same padded shapes as the step.
    trainer = dpo_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path, loss_type=loss_type, num_pairs=3,
                          precompute=precompute)
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing
    row = first_log(trainer)
    for name in ZERO_METRICS + TOKEN_KL_METRICS.get(loss_type, ()):
        assert row[name] == 0.0, (name, row[name])
    if loss_type == "sigmoid":
        assert row["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)  # ln 2
    assert row["logps/chosen"] < 0 and row["grad_norm"] > 0  # a real step on a non-trivial batch


def test_precomputed_log_probs_refuse_token_level_losses(tmp_path):
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        default_args(FusedDPOConfig, tmp_path, loss_type="tdpo1", precompute_ref_log_probs=True)


class OperandSpy:
    """Records the dtypes of the GEMM operands each `token_stats` call hands to its implementation."""

    def __init__(self, monkeypatch):
        self.calls = []
        module = importlib.import_module("fpo_ops.token_stats")  # the package exports the function under that name
        resolve = module._resolve_impl

        def spying_resolve(impl, device):
            fn = resolve(impl, device)

            def spy(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts):
                self.calls.append(dict(
                    hidden=hidden.dtype, weight=weight.dtype,
                    ref_hidden=None if ref_hidden is None else ref_hidden.dtype,
                    ref_weight=None if ref_weight is None else ref_weight.dtype,
                ))
                return fn(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, opts)

            return spy

        monkeypatch.setattr(module, "_resolve_impl", spying_resolve)


@pytest.mark.parametrize("bf16, fp32_head, expected", [
    (True, False, torch.bfloat16), (False, False, torch.float32), (True, True, torch.float32),
])
def test_head_statistics_see_the_autocast_dtype(tmp_path, monkeypatch, bf16, fp32_head, expected):
    spy = OperandSpy(monkeypatch)
    trainer = dpo_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "tdpo", perturb=0.05, loss_type="tdpo2",
                          bf16=bf16, cast_lm_head_to_fp32=fp32_head)
    trainer.train()
    assert spy.calls
    for call in spy.calls:  # policy and reference heads in one call each step
        assert call == dict(hidden=expected, weight=expected, ref_hidden=expected, ref_weight=expected)

    # Precomputed reference log-probs (no reference in the training step) follow the same rule.
    spy.calls.clear()
    trainer = dpo_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "pre", loss_type="sigmoid", precompute=True,
                          bf16=bf16, cast_lm_head_to_fp32=fp32_head)
    precomputed = len(spy.calls)
    trainer.train()
    assert 0 < precomputed < len(spy.calls)
    for call in spy.calls:
        assert call == dict(hidden=expected, weight=expected, ref_hidden=None, ref_weight=None)


def logged_steps(trainer):
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


def test_four_sgd_steps_follow_trl_in_fp32(tmp_path):
    options = dict(loss_type="sigmoid", beta=0.1, perturb=0.02, max_steps=4, per_device_train_batch_size=2, bf16=False)
    theirs = logged_steps(dpo_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", **options))
    ours = logged_steps(dpo_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", **options))
    assert len(ours) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-5), (step, name)
    assert theirs[-1]["loss"] != theirs[0]["loss"]  # the steps move the model


def test_four_sgd_steps_under_bf16_within_budget_of_trl(tmp_path):
    # TRL's default beta (0.1) and a reference near the policy, as at the start of a DPO run. Under
    # bf16 the two trainers are different computations even at step 1 (TRL rounds its logit tiles to
    # bf16, ours stay fp32: see the head test below), so each is measured against TRL's fp32 run
    # with the precision rule: ours at most 2x TRL's own bf16 error, plus a small floor. A relative
    # agreement between the two bf16 runs would measure how TRL's extra rounding happens to cancel.
    options = dict(loss_type="sigmoid", beta=0.1, perturb=0.02, max_steps=4, per_device_train_batch_size=2)
    runs = [dpo_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", **options),
            dpo_trainer(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", **options),
            dpo_trainer(DPOTrainer, DPOConfig, tmp_path / "fp32", bf16=False, **options)]
    assert [t.args.bf16 for t in runs] == [True, True, False]
    theirs, ours, exact = ((logged_steps(t), dict(t.model.named_parameters())) for t in runs)
    assert len(exact[0]) == 4
    assert theirs[0][0]["loss"] != exact[0][0]["loss"]  # a bf16 budget
    assert_bf16_training_within_budget(ours, theirs, exact)
    assert theirs[0][-1]["loss"] != theirs[0][0]["loss"]


def test_bf16_head_log_probs_per_token_closer_to_float64_than_trls(tmp_path):
    # Step 1's head on the step's own bf16 hidden states. Both heads round the GEMM operands to bf16
    # (autocast); TRL also rounds each logit tile to bf16, ours accumulates and keeps fp32 logits.
    # So ours equals a float64 evaluation of the rounded operands, and per token it is closer to the
    # unrounded head than TRL's. Their sums over a sequence can still land either way: the rounding
    # errors of the shared operands have a sign, and TRL's tile rounding may cancel them.
    from trl.kernels import ChunkedLogProbFunction

    import fpo_ops

    trainer = dpo_trainer(DPOTrainer, DPOConfig, tmp_path, loss_type="sigmoid", beta=0.1, perturb=0.02)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
    model = trainer.model
    finals = []
    hook = model.model.norm.register_forward_hook(lambda module, args, out: finals.append(out.detach()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    mask = batch["completion_mask"][:, 1:].bool()
    hidden, labels = finals[0][:, :-1][mask], batch["input_ids"][:, 1:][mask]
    weight = model.lm_head.weight.detach()
    assert hidden.shape[0] > 50

    def float64_log_probs(h, w):
        return torch.log_softmax(h.double() @ w.double().T, dim=-1).gather(-1, labels[:, None])[:, 0]

    exact = float64_log_probs(hidden, weight)
    rounded_operands = float64_log_probs(hidden.bfloat16(), weight.bfloat16())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fpo_ops.token_stats(hidden, weight, labels, impl="torch").logp.double()
        theirs = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 4096, None, 1.0, ("log_probs",))[0]
    torch.testing.assert_close(ours, rounded_operands, rtol=0, atol=1e-5)  # fp32 accumulation only
    err_ours, err_theirs = (ours - exact).abs().mean(), (theirs.double() - exact).abs().mean()
    assert (theirs.double() - rounded_operands).abs().max() > 1e-3  # TRL's tile rounding is visible
    assert err_ours < err_theirs, (err_ours, err_theirs)


def moe_step(trainer_cls, config_cls, tmp_path, family, **overrides):
    """Loss, logged metrics and gradients of one step of a MoE policy against a perturbed copy, fp32."""
    trainer = dpo_trainer(trainer_cls, config_cls, tmp_path, family=family, perturb=0.05, bf16=False,
                          gradient_checkpointing=False, **overrides)
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("coef", [None, 0.5])  # None: the config's own (0.001), as TRL's default
def test_moe_router_aux_loss_equals_trl(tmp_path, family, coef):
    expected = moe_step(DPOTrainer, DPOConfig, tmp_path / "trl", family, router_aux_loss_coef=coef)
    got = moe_step(FusedDPOTrainer, FusedDPOConfig, tmp_path / "fused", family, router_aux_loss_coef=coef)
    assert expected[1]["aux_loss"] > 1.0  # the balanced minimum of the Switch loss is 1 (per layer)
    assert got[1]["aux_loss"] == pytest.approx(expected[1]["aux_loss"], rel=1e-6)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    for name in ("rewards/margins", "logps/chosen", "logps/rejected"):
        assert got[1][name] == pytest.approx(expected[1][name], rel=1e-5, abs=1e-6), name
    assert set(got[2]) == set(expected[2])
    router = [n for n in expected[2] if "gate" in n and "experts" not in n]
    assert router and all(expected[2][n].abs().max() > 0 for n in router)  # the aux loss trains the routers
    for name in expected[2]:
        scale = max(expected[2][name].abs().max().item(), 1.0)
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


def gkd_trainer(tmp_path, student, teacher, beta=0.5, **kwargs):
    """FusedGKDTrainer under GKDConfig's defaults (bf16, gradient checkpointing) unless overridden."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    from test_integration_trl_gkd import CHAT_TEMPLATE, chat_dataset

    from fpo_ops.integrations.trl_gkd import FusedGKDTrainer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    options = {k: kwargs.pop(k) for k in ("bf16",) if k in kwargs}
    args = gkd.GKDConfig(
        output_dir=tempfile.mkdtemp(dir=tmp_path), per_device_train_batch_size=4, max_steps=1, optim="sgd",
        report_to="none", save_strategy="no", lmbda=0.0, seq_kd=False, beta=beta, max_length=64,
        use_cpu=True, disable_tqdm=True, logging_steps=1, seed=3, **options,
    )
    assert args.gradient_checkpointing and (args.bf16 or "bf16" in options)
    return FusedGKDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=args,
                           train_dataset=chat_dataset(), processing_class=tokenizer, **kwargs)


@pytest.mark.parametrize("bf16, fp32_head, expected", [
    (True, False, torch.bfloat16), (False, False, torch.float32), (True, True, torch.float32),
])
def test_gkd_head_sees_the_autocast_dtype(tmp_path, monkeypatch, bf16, fp32_head, expected):
    spy = OperandSpy(monkeypatch)
    trainer = gkd_trainer(tmp_path, tiny_model("llama"), tiny_model("llama", seed=1), bf16=bf16,
                          cast_lm_head_to_fp32=fp32_head)
    trainer.train()
    assert spy.calls
    for call in spy.calls:  # student and teacher heads
        assert call == dict(hidden=expected, weight=expected, ref_hidden=expected, ref_weight=expected)


def test_gkd_fp32_head_option_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="cast_lm_head_to_fp32: expected a bool"):
        gkd_trainer(tmp_path, tiny_model("llama"), tiny_model("llama"), cast_lm_head_to_fp32="yes")


def test_gkd_teacher_equal_to_student_gives_zero_loss(tmp_path):
    student = tiny_model("llama")
    for beta in (0.0, 0.5, 1.0):
        loss = first_log(gkd_trainer(tmp_path, student, student, beta=beta))["loss"]
        if beta in (0.0, 1.0):  # forward and reverse KL: exactly 0
            assert loss == 0.0, (beta, loss)
        else:
            # The mixture's log, logaddexp(log q + log b, log p + log(1 - b)), rounds to within an ulp of
            # log p; TRL's own GKDTrainer gives 1.1e-9 here. A bf16/fp32 mismatch gives ~1e-3.
            assert abs(loss) < 1e-8, (beta, loss)


def test_peft_policy_with_fresh_adapter_gives_exact_zeros_at_step_one(tmp_path):
    """A fresh LoRA adapter (B = 0) leaves the policy equal to its base, the PEFT reference."""
    peft = pytest.importorskip("peft")
    trainer = FusedDPOTrainer(
        model=tiny_model("llama"), ref_model=None, args=default_args(FusedDPOConfig, tmp_path, loss_type="tdpo2"),
        train_dataset=preference_dataset(3), processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None and trainer.args.bf16
    row = first_log(trainer)
    for name in ZERO_METRICS + TOKEN_KL_METRICS["tdpo2"]:
        assert row[name] == 0.0, (name, row[name])
