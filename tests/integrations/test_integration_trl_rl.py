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
    dict(importance_sampling_level="sequence", scale_rewards="batch", delta=1.5),
    dict(cast_lm_head_to_fp32=True, use_bias_correction_kl=True),
])
def test_grpo_options_train_as_trl(tmp_path, options):
    theirs, ours = train_both(tmp_path, GRPOTrainer, FusedGRPOTrainer, GRPOConfig, FusedGRPOConfig,
                              family="gemma2", **options)
    assert_same_training(theirs, ours)


# A small step in the second case: at 1e-2 the second iteration's ratios leave the clip range (zero gradient).
@pytest.mark.parametrize("options", [dict(), dict(num_iterations=2, normalize_advantages=True, beta=0.0,
                                              learning_rate=1e-4)])
def test_rloo_trains_as_trl(tmp_path, options):
    theirs, ours = train_both(tmp_path, RLOOTrainer, FusedRLOOTrainer, RLOOConfig, FusedRLOOConfig, **options)
    assert_same_training(theirs, ours)


def test_grpo_heads_are_fused(tmp_path, monkeypatch):
    seen = spy_head_calls(monkeypatch)
    train_both(tmp_path, GRPOTrainer, FusedGRPOTrainer, GRPOConfig, FusedGRPOConfig, max_steps=1)
    # Reference log-probs of the generated batch, then the policy in the loss (TRL's run calls none).
    assert seen == [torch.float32, torch.float32]


def _exact_kl_rl_trainer(tmp_path, config_cls, trainer_cls, reward_funcs, **overrides):
    """A Gemma-2 RL trainer with kl_estimator="exact" and a reference that differs from the policy."""
    path = tmp_path / "model"
    tiny_model("gemma2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    prompts = completion_dataset(8).remove_columns("completion")
    config = config_cls(output_dir=str(tmp_path / "out"), kl_estimator="exact",
                        **{**COMMON, "beta": 0.3, **overrides})
    trainer = trainer_cls(model=str(path), reward_funcs=reward_funcs, train_dataset=prompts,
                          args=config, processing_class=tiny_tokenizer())
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


def exact_kl_trainer(tmp_path, **overrides):
    return _exact_kl_rl_trainer(tmp_path, FusedGRPOConfig, FusedGRPOTrainer, [reward_length, reward_digits],
                                **overrides)


def float64_kl(trainer, inputs):
    """Per-token KL(pi_theta || pi_ref) over the vocabulary from materialised logits, in float64."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][:, -width:]
    with torch.no_grad():
        ref_logits = trainer.ref_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][:, -width:]
    logp = torch.log_softmax(logits.double() / trainer.temperature, -1)
    logq = torch.log_softmax(ref_logits.double() / trainer.temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"])
def test_exact_kl_equals_a_float64_reference(tmp_path, loss_type):
    trainer = exact_kl_trainer(tmp_path, loss_type=loss_type, entropy_coef=0.01)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    rows = [trainer.train_dataset[i] for i in (0, 0, 1, 1)]
    inputs = trainer._prepare_inputs(rows)
    # Completions of unequal lengths, so that the loss types' reductions differ.
    inputs["completion_mask"][0, 2:] = 0
    inputs["completion_mask"][3, 4:] = 0
    mask = inputs["completion_mask"].double()

    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    kl_metric = trainer._metrics["train"]["kl"][-1]

    # Oracle: TRL's own loss without a KL term, plus beta times the float64 exact KL, reduced as the loss type says.
    trainer.model.zero_grad(set_to_none=True)
    beta, trainer.beta = trainer.beta, 0.0
    base = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    trainer.beta = beta
    kl = float64_kl(trainer, inputs)
    # TRL 1.16's reductions of a per-token term, one accumulation step, one process
    if loss_type in ("grpo", "sapo"):
        term = ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        term = (kl * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        term = (kl * mask).sum() / (mask.size(0) * trainer.max_completion_length)
    elif loss_type == "luspo":
        term = (kl * mask).sum(-1).mean()
    else:  # dapo, cispo, vespo
        term = (kl * mask).sum() / (inputs["num_items_in_batch"].double() / trainer.args.steps_per_generation)
    expected = base.double() + beta * term
    expected.backward()
    assert kl.max() > 1e-3  # the reference differs, the KL term matters
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert kl_metric == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-5, abs=1e-7)
    for name, p in trainer.model.named_parameters():
        scale = max(p.grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_exact_kl_trains(tmp_path):
    trainer = exact_kl_trainer(tmp_path, max_steps=3, learning_rate=5e-2)
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 3 and all(k > 0 and k == k for k in kls)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("config_cls", [FusedGRPOConfig, FusedRLOOConfig])
@pytest.mark.parametrize("options, name", [
    (dict(kl_estimator="exact", beta=0.0), "beta"),
    (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(fused_impl="cuda"), "fused_impl"),
])
def test_bad_rl_options_name_the_option(tmp_path, config_cls, options, name):
    with pytest.raises(ValueError, match=name):
        config_cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)


def test_rloo_refuses_the_grpo_estimator_name(tmp_path):
    with pytest.raises(ValueError, match="kl_estimator"):
        FusedRLOOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", kl_estimator="k3")


def reward_zero(completions, **kwargs):
    return [0.0 for _ in completions]


def exact_kl_rloo_trainer(tmp_path, reward_funcs, **overrides):
    return _exact_kl_rl_trainer(tmp_path, FusedRLOOConfig, FusedRLOOTrainer, reward_funcs, **overrides)


def scored_batch_with_passes(trainer, monkeypatch):
    """TRL's scoring of two prompts x two completions, with the per-token log-probs of each head pass it runs."""
    passes = []
    original = FusedRLOOTrainer._get_per_token_logps_and_entropies

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        passes.append(result[0])
        return result

    monkeypatch.setattr(FusedRLOOTrainer, "_get_per_token_logps_and_entropies", spy)
    transformers.set_seed(trainer.args.seed)
    out = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in (0, 0, 1, 1)])
    return passes, out


# The second case scores the generated batch in two chunks of two.
@pytest.mark.parametrize("options", [dict(), dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)])
def test_rloo_exact_kl_reward_equals_a_float64_reference(tmp_path, monkeypatch, options):
    # A zero reward leaves only the KL term: reward_i = -beta * KL_i, advantage_i = reward_i - mean of its group's others.
    trainer = exact_kl_rloo_trainer(tmp_path, [reward_zero], **options)
    trainer.model.train()
    # Per-token KL as TRL puts it in the reward: old-policy minus "reference" log-probs of the passes it runs.
    passes, out = scored_batch_with_passes(trainer, monkeypatch)
    assert len(passes) == 2
    mask = out["completion_mask"].double()
    assert mask.sum(-1).min() >= 1

    kl = float64_kl(trainer, out) * mask
    per_sequence = kl.sum(-1)
    assert kl.max() > 1e-3  # the reference differs, the KL term matters
    # fp32 budget: the head's fp32 statistics plus TRL's `old - ref` subtraction (half an ulp of |log p| per token).
    logps = passes[0].double()
    floor = (torch.finfo(torch.float32).eps * logps.abs() * mask).sum(-1)
    as_rewarded = ((passes[0] - passes[1]).double() * mask).sum(-1)
    torch.testing.assert_close(as_rewarded, per_sequence, rtol=1e-5, atol=floor.max().item() + 1e-7)
    # The old-policy log-probs of the loss are the pass's own, untouched by the KL.
    torch.testing.assert_close(out["old_logps"], (passes[0] * out["completion_mask"]).sum(-1), rtol=0, atol=0)

    grouped = (-trainer.beta * per_sequence).view(-1, 2)
    expected_advantages = (grouped - grouped.flip(-1)).view(-1)
    torch.testing.assert_close(out["advantages"].double(), expected_advantages, rtol=1e-5,
                               atol=trainer.beta * 2 * floor.max().item() + 1e-7)
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx((kl.sum() / mask.sum()).item(), rel=1e-5, abs=1e-7)


def test_rloo_exact_kl_under_bf16_is_within_the_bf16_budget(tmp_path, monkeypatch):
    # The precision rule: the KL's head runs under the trainer's bf16 autocast, like TRL's own heads.
    trainer = exact_kl_rloo_trainer(tmp_path, [reward_zero], bf16=True)
    trainer.model.train()
    passes, out = scored_batch_with_passes(trainer, monkeypatch)
    mask = out["completion_mask"].double()
    # accelerate wrapped the reference's forward in the trainer's bf16 autocast: the oracle needs it without.
    trainer.accelerator.unwrap_model(trainer.ref_model, keep_fp32_wrapper=False)
    # Per token (sums of signed errors may cancel in one and not the other).
    ours = (passes[0] - passes[1]).double() * mask
    oracle = float64_kl(trainer, out) * mask
    with torch.autocast("cpu", dtype=torch.bfloat16):  # plain bf16 PyTorch: bf16 logits, KL from them
        plain = float64_kl(trainer, out) * mask
    assert (plain - oracle).abs().max() > 1e-5  # the budget is a bf16 one
    assert (ours - oracle).abs().max() <= 2 * (plain - oracle).abs().max() + 1e-5


def test_rloo_exact_kl_trains(tmp_path):
    trainer = exact_kl_rloo_trainer(tmp_path, [reward_length, reward_digits], max_steps=3, learning_rate=5e-2)
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 3 and all(k > 0 and k == k for k in kls)
    assert any(h["grad_norm"] > 0 for h in trainer.state.log_history if "grad_norm" in h)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("trainer_cls, config_cls", [(FusedGRPOTrainer, FusedGRPOConfig),
                                                     (FusedRLOOTrainer, FusedRLOOConfig)])
def test_exact_kl_of_a_pretrained_adapter_is_to_its_initial_copy(tmp_path, trainer_cls, config_cls):
    # TRL's reference for a PEFT policy with a pretrained adapter is the adapter's frozen copy "ref",
    # not the base model: before any step the policy is its reference and the exact KL is 0.
    peft = pytest.importorskip("peft")
    policy = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    config = config_cls(output_dir=str(tmp_path), kl_estimator="exact", **{**COMMON, "beta": 0.3})
    trainer = trainer_cls(model=policy, reward_funcs=[reward_length, reward_digits], train_dataset=completion_dataset(8)
                          .remove_columns("completion"), args=config, processing_class=tiny_tokenizer())
    assert "ref" in trainer.model.peft_config
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    rows = [trainer.train_dataset[i] for i in (0, 0, 1, 1)]
    inputs = trainer._prepare_inputs(rows)
    assert inputs["advantages"].abs().max() > 0
    trainer.compute_loss(trainer.model, inputs).backward()
    # The reference switch inside the policy's forward leaves the adapter trained and its copy frozen.
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(p.grad is None for n, p in lora.items() if ".ref." in n)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in lora.items() if ".default." in n)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad(), trainer.model.disable_adapter():
        base = trainer.model(input_ids=ids).logits
    assert (trainer.model(input_ids=ids).logits - base).abs().max() > 1e-3  # the adapter moves the policy
    assert all(abs(k) < 1e-6 for k in trainer._metrics["train"]["kl"])
    assert all(p.requires_grad == (".default." in n) for n, p in lora.items())
