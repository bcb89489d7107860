"""FusedSFTTrainer, FusedGRPOTrainer and FusedRLOOTrainer on PEFT adapters against TRL's own trainers.

Both trainers get the same ``peft_config`` and wrap equal copies of a tiny model (built in code, CPU,
no downloads) with equal adapters: LoRA mostly, prompt and prefix tuning once each. For GRPO and
RLOO with ``beta > 0`` the reference is the policy with its adapters disabled, or for a pretrained
adapter TRL's frozen copy "ref". ``modules_to_save=["lm_head"]`` moves the head weight that trains
into the wrapper's copy (the original stays frozen and is the reference's head); TRL 1.16 refuses a
LoRA adapter on the head itself (``target_modules`` with ``lm_head``), and so do the drop-ins.
Trainable tokens of a tied model make the head a wrapper too, on which TRL's head fails: there the
model's own forward is the oracle. The exact KL (``kl_estimator="exact"``, no TRL counterpart) is
checked against a float64 KL from materialised logits of the policy and of its reference.
"""
import pytest
import torch
import transformers

peft = pytest.importorskip("peft")
pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from fpo_ops.integrations.trl import (  # noqa: E402
    FusedGRPOConfig, FusedGRPOTrainer, FusedRLOOConfig, FusedRLOOTrainer, FusedSFTConfig, FusedSFTTrainer,
)
from hf_fixtures import tiny_model, tiny_tokenizer  # noqa: E402
from test_integration_trl_rl import COMMON, assert_same_training, reward_digits, reward_length  # noqa: E402
from trainer_fixtures import (  # noqa: E402
    assert_default_precision_within_budget, completion_dataset, one_batch, step, trainer_pair,
)

SFT_FP32 = dict(
    per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, optim="sgd", logging_steps=1,
    report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no", seed=7,
    use_cpu=True, disable_tqdm=True, dataloader_drop_last=True,
)
# The usual LoRA (lora_B = 0: the policy starts as the base model) and one that moves the policy off the
# base model from the first step, so that the adapter-disabled reference differs from it at once.
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
LORA_MOVED = dict(LORA, init_lora_weights=False)
# Every linear layer but the head ("all-linear" leaves the output layer out), and a trained copy of the head.
ALL_LINEAR_HEAD_COPY = dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"],
                            init_lora_weights=False, task_type="CAUSAL_LM")
# Trained embedding rows (new tokens); with tied embeddings they are rows of the head as well. The word
# tokens of the tiny vocabulary, so that the data use them.
TRAINABLE_TOKENS = dict(LORA_MOVED, trainable_token_indices=list(range(3, 40)))
RL = {
    "grpo": (GRPOTrainer, FusedGRPOTrainer, GRPOConfig, FusedGRPOConfig),
    "rloo": (RLOOTrainer, FusedRLOOTrainer, RLOOConfig, FusedRLOOConfig),
}


def lora(options):
    return peft.LoraConfig(**options)


# Prompt learning: virtual tokens in front of the sequence (their positions carry no label).
PROMPT_LEARNING = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


def head_copy(trainer):
    """The trained copy of the head that ``modules_to_save=["lm_head"]`` makes, and the frozen original."""
    wrapper = trainer.model.get_base_model().lm_head
    return wrapper.modules_to_save["default"].weight, wrapper.original_module.weight


def assert_adapters_trained_equal(theirs, ours, before):
    """Every logged metric and every parameter equal to TRL's (`assert_same_training`); the trainable ones
    (adapters, the head copy) are exactly those PEFT made trainable, and all of them moved from ``before``."""
    assert_same_training(theirs, ours)
    trainable = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable) == set(before)
    assert all(any(part in n for part in ("lora_", "modules_to_save", "prompt_encoder", "trainable_tokens")) for n in trainable)
    for name, p in trainable.items():
        assert not torch.equal(p, before[name]), f"{name} did not train"


def trainable_copy(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def adapter_config(options):
    """A LoRA config of ``options``, or for a key of `PROMPT_LEARNING` that config."""
    return PROMPT_LEARNING[options]() if isinstance(options, str) else lora(options)


def sft_pair(tmp_path, family="llama", base=SFT_FP32, peft_options=LORA, **overrides):
    return trainer_pair(SFTTrainer, FusedSFTTrainer, SFTConfig, FusedSFTConfig, tmp_path, completion_dataset(12),
                        family=family, peft_config=adapter_config(peft_options), **{**base, **overrides})


@pytest.mark.parametrize("family, peft_options", [
    pytest.param("llama", LORA, id="lora"), pytest.param("cohere", LORA_MOVED, id="cohere-lora_moved"),
    pytest.param("llama", ALL_LINEAR_HEAD_COPY, id="all_linear_head_copy"),
    pytest.param("llama_tied", LORA_MOVED, id="tied-lora_moved"),
    pytest.param("llama_tied", ALL_LINEAR_HEAD_COPY, id="tied-all_linear_head_copy"),
    pytest.param("llama", TRAINABLE_TOKENS, id="trainable_tokens"),
    pytest.param("llama", "prompt_tuning", id="prompt_tuning"),
    pytest.param("llama", "prefix_tuning", id="prefix_tuning"),
])
def test_sft_adapter_trains_as_trl(tmp_path, family, peft_options):
    theirs, ours = sft_pair(tmp_path, family=family, peft_options=peft_options)
    before = trainable_copy(ours)
    initial = trainable_copy(theirs)  # equal adapters to start from
    assert initial.keys() == before.keys() and all(torch.equal(before[n], p) for n, p in initial.items())
    theirs.train()
    ours.train()
    assert_adapters_trained_equal(theirs, ours, before)


def test_sft_lora_bf16_default_config_within_budget(tmp_path):
    """TRL's default precision (bf16 autocast, gradient checkpointing) against the fp32 step, on a LoRA policy."""
    assert_default_precision_within_budget(
        lambda path, base, **kw: sft_pair(path, base=base, peft_options=ALL_LINEAR_HEAD_COPY, **kw),
        tmp_path, SFT_FP32, one_batch)


def test_sft_trainable_tokens_of_a_tied_head_equal_the_model_forward(tmp_path):
    # PEFT's trainable tokens on a tied model wrap the head too, whose weight is then the embedding with the
    # trained rows replaced. TRL 1.16's own head fails on it (it reads a bias the wrapper has not), so the
    # oracle is the model's own forward: its logits, TRL's per-token mean NLL, and every gradient.
    _, ours = sft_pair(tmp_path, family="llama_tied", peft_options=TRAINABLE_TOKENS)
    assert type(ours.model.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    with torch.no_grad():  # trained rows that differ from the embedding's
        for name, p in ours.model.named_parameters():
            if "trainable_tokens_delta" in name and p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    batch = one_batch(ours)
    loss, _, grads = step(ours, batch)
    ours.model.zero_grad(set_to_none=True)
    logits = ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    delta = next(n for n in grads if "trainable_tokens_delta" in n)
    assert grads[delta].abs().max() > 0
    for name, p in ours.model.named_parameters():
        if p.requires_grad:
            scale = max(p.grad.abs().max().item(), 1.0)
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def save_tiny(tmp_path, family):
    path = tmp_path / "model"
    model = tiny_model(family)
    if model.config.tie_word_embeddings:
        # The fixture's wide head, as the input embedding too, makes the model repeat its last token with
        # near certainty: every completion of a prompt would be the same and no advantage would be non-zero.
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(0.3)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def rl_trainer(kind, fused, tmp_path, path, peft_options, pretrained=False, **overrides):
    """A GRPO or RLOO trainer (TRL's or ours) on the model saved at ``path``, given a LoRA config, or with
    ``pretrained`` a policy already wrapped with that adapter (TRL's reference is then its frozen copy "ref")."""
    trl_cls, fused_cls, config_cls, fused_config_cls = RL[kind]
    trainer_cls, cfg_cls = (fused_cls, fused_config_cls) if fused else (trl_cls, config_cls)
    # The trainer wraps the model before Trainer seeds itself: the adapter's initialisation draws from the
    # global generator as it stands.
    torch.manual_seed(0)
    if pretrained:
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path),
                                    adapter_config(peft_options))
        adapter = {}
    else:
        model, adapter = str(path), dict(peft_config=adapter_config(peft_options))
    return trainer_cls(
        model=model, reward_funcs=[reward_length, reward_digits], **adapter,
        train_dataset=completion_dataset(8).remove_columns("completion"), processing_class=tiny_tokenizer(),
        args=cfg_cls(output_dir=str(tmp_path / ("fused" if fused else "trl")), **{**COMMON, **overrides}),
    )


def rl_cases():
    cases = []
    for kind in ("grpo", "rloo"):
        cases += [
            pytest.param(kind, "llama", ALL_LINEAR_HEAD_COPY, False, {}, id=f"{kind}-all_linear_head_copy"),
            pytest.param(kind, "llama_tied", LORA_MOVED, False, {}, id=f"{kind}-tied-lora"),
            # A pretrained adapter starts equal to its copy "ref": a third step, so that two see a KL.
            pytest.param(kind, "llama", ALL_LINEAR_HEAD_COPY, True, dict(max_steps=3), id=f"{kind}-pretrained"),
        ]
    return cases + [
        pytest.param("grpo", "llama", "prompt_tuning", False, {}, id="grpo-prompt_tuning"),
        # The old-policy pass of a second iteration, and TRL's fp32 head on the head copy.
        pytest.param("grpo", "llama", ALL_LINEAR_HEAD_COPY, False, dict(num_iterations=2, cast_lm_head_to_fp32=True),
                     id="grpo-iterations-fp32_head"),
        # Gradient checkpointing (the reference forward turns it off) and gradient accumulation.
        pytest.param("grpo", "llama", LORA_MOVED, False,
                     dict(gradient_checkpointing=True, per_device_train_batch_size=2, gradient_accumulation_steps=2),
                     id="grpo-checkpointing-accumulation"),
        # A small step: at 1e-2 the second iteration's ratios leave the clip range (zero gradient).
        pytest.param("rloo", "llama", ALL_LINEAR_HEAD_COPY, False,
                     dict(gradient_checkpointing=True, num_iterations=2, learning_rate=1e-4),
                     id="rloo-checkpointing-iterations"),
    ]


@pytest.mark.parametrize("kind, family, peft_options, pretrained, options", rl_cases())
def test_rl_adapter_with_its_reference_trains_as_trl(tmp_path, kind, family, peft_options, pretrained, options):
    path = save_tiny(tmp_path, family)
    theirs, ours = (rl_trainer(kind, fused, tmp_path, path, peft_options, pretrained, beta=0.3, **options)
                    for fused in (False, True))
    # The reference is the policy with its adapters disabled, or its pretrained adapter's frozen copy: no
    # reference model.
    assert theirs.ref_model is None and ours.ref_model is None and ours.beta == 0.3
    assert ("ref" in ours.model.peft_config) == pretrained
    before = trainable_copy(ours)
    for trainer in (theirs, ours):
        transformers.set_seed(trainer.args.seed)  # both runs generate the same completions
        trainer.train()
    # The reference is used: TRL's sampled-token KL is not 0 (a pretrained adapter starts as its copy, at 0).
    kls = [h["kl"] for h in theirs.state.log_history if "kl" in h]
    assert all(abs(kl) > 1e-4 for kl in kls[1 if pretrained else 0:])
    assert_adapters_trained_equal(theirs, ours, before)


@pytest.mark.parametrize("kind", ["sft", "grpo", "rloo"])
@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_lora_on_the_head_is_refused_as_trl_does(tmp_path, kind, family):
    # TRL 1.16 computes log-probs from the head's weight directly, so it refuses an adapter on the head rather
    # than ignore it; the drop-ins inherit the check, and their own head reads refuse one as well.
    options = dict(LORA, target_modules=["q_proj", "lm_head"])
    path = save_tiny(tmp_path, family)
    for fused in (False, True):
        with pytest.raises(ValueError, match="lm_head"):
            if kind == "sft":
                trainer_cls, config_cls = (FusedSFTTrainer, FusedSFTConfig) if fused else (SFTTrainer, SFTConfig)
                trainer_cls(model=str(path), args=config_cls(output_dir=str(tmp_path / str(fused)), **SFT_FP32),
                            train_dataset=completion_dataset(4), processing_class=tiny_tokenizer(),
                            peft_config=lora(options))
            else:
                rl_trainer(kind, fused, tmp_path, path, options)


def test_head_reads_refuse_an_adapter_on_the_head():
    from fpo_ops.integrations.hf import lm_head_tensors

    model = peft.get_peft_model(tiny_model("llama"), lora(dict(LORA, target_modules=["lm_head"])))
    with pytest.raises(ValueError, match="LM head without a PEFT adapter"):
        lm_head_tensors(model)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("adapter", sorted(PROMPT_LEARNING))
def test_exact_kl_refuses_a_pretrained_prompt_learning_adapter(tmp_path, kind, adapter):
    # Its reference is TRL's frozen copy "ref" of the virtual tokens, which the exact KL's reference forward (the
    # base model's backbone on the PEFT model's inputs) is not; TRL's estimator trains as TRL does (above).
    with pytest.raises(ValueError, match="kl_estimator"):
        rl_trainer(kind, True, tmp_path, save_tiny(tmp_path, "llama"), adapter, pretrained=True,
                   kl_estimator="exact", beta=0.3)


def float64_kl_to_the_reference_adapter(trainer, inputs):
    """Per-token KL(pi_theta || pi_ref) over the vocabulary from materialised logits, in float64, pi_ref TRL's
    reference of a PEFT policy: its frozen copy "ref" of a pretrained adapter, else the policy with its adapters
    disabled (and so with the original head in place of a ``modules_to_save`` copy)."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    model = trainer.model
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            ref_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logp, logq = (torch.log_softmax(z[:, :-1][:, -width:].double() / trainer.temperature, -1)
                  for z in (logits, ref_logits))
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("family, peft_options, pretrained", [
    pytest.param("llama", ALL_LINEAR_HEAD_COPY, False, id="head_copy"),
    pytest.param("llama_tied", ALL_LINEAR_HEAD_COPY, False, id="tied-head_copy"),
    pytest.param("llama", ALL_LINEAR_HEAD_COPY, True, id="pretrained-head_copy"),
    pytest.param("llama", "prompt_tuning", False, id="prompt_tuning"),
    pytest.param("llama", "prefix_tuning", False, id="prefix_tuning"),
])
def test_exact_kl_to_the_reference_adapter_equals_a_float64_reference(tmp_path, kind, family, peft_options,
                                                                       pretrained):
    trainer = rl_trainer(kind, True, tmp_path, save_tiny(tmp_path, family), peft_options, pretrained,
                         kl_estimator="exact", beta=0.3)
    assert trainer.ref_model is None and ("ref" in trainer.model.peft_config) == pretrained
    head = None
    if peft_options is ALL_LINEAR_HEAD_COPY:
        # The head copy differs from the reference's head (the original, or the "ref" adapter's copy of the
        # head): the policy must read its own copy, the reference its head.
        head = head_copy(trainer)
        with torch.no_grad():
            head[0].add_(0.2 * torch.randn(head[0].shape, generator=torch.Generator().manual_seed(1)))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    transformers.set_seed(trainer.args.seed)
    inputs = trainer._prepare_inputs([trainer.train_dataset[i] for i in (0, 0, 1, 1)])  # RLOO logs its KL here
    if kind == "grpo":
        trainer.compute_loss(trainer.model, inputs).backward()  # GRPO logs its KL in the loss
        if head is not None:
            assert head[0].grad is not None and head[0].grad.abs().max() > 0 and head[1].grad is None
    mask = inputs["completion_mask"].double()
    kl = float64_kl_to_the_reference_adapter(trainer, inputs)
    assert (kl * mask).max() > 1e-2  # the adapter (and the head copy) move the policy off its reference
    expected = ((kl * mask).sum() / mask.sum()).item()
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(expected, rel=1e-5, abs=1e-7)
