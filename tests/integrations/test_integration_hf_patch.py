"""`apply_fused_head`: a patched Hugging Face causal LM returns its own loss and gradients without logits."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from fpo_ops.integrations import hf  # noqa: E402
from fpo_ops.integrations.patch import apply_fused_head, is_fused_head_applied, remove_fused_head  # noqa: E402
from hf_fixtures import VOCAB_SIZE, tiny_model  # noqa: E402

# Gemma-2: softcap; Qwen2: tied embeddings; Cohere: logit scale; Mixtral: router loss (coefficient 0.3).
FAMILIES = {
    "llama": {}, "gemma2": {}, "qwen2_tied": {}, "cohere": {},
    "mixtral": dict(output_router_logits=True, router_aux_loss_coef=0.3),
}


def batch(seed=1, rows=3, length=11):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[2, :5] = -100  # a prompt
    return input_ids, attention_mask, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(out_a, grads_a, out_b, grads_b, tol=1e-5):
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=tol, atol=tol)
    assert set(grads_a) == set(grads_b) and grads_b
    for name, expected in grads_b.items():
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(grads_a[name], expected, rtol=10 * tol, atol=tol * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_loss_and_every_gradient_equal_unpatched(family):
    model = tiny_model(family, **FAMILIES[family]).train()
    patched = apply_fused_head(copy.deepcopy(model), impl="torch")
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected, expected_grads = loss_and_grads(model, **inputs)
    got, got_grads = loss_and_grads(patched, **inputs)
    assert got.logits is None and expected.logits.shape == (*input_ids.shape, VOCAB_SIZE)
    assert type(got) is type(expected)
    if family == "mixtral":  # the router loss is in the loss, as the model adds it
        assert got.aux_loss is not None
        torch.testing.assert_close(got.aux_loss, expected.aux_loss)
    assert_same(got, got_grads, expected, expected_grads)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("case", ["num_items_in_batch", "shift_labels", "positional_labels", "tuple"])
def test_loss_keywords_as_transformers_reads_them(family, case):
    model = tiny_model(family).train()
    patched = apply_fused_head(copy.deepcopy(model), impl="torch")
    input_ids, attention_mask, labels = batch(seed=2)
    kwargs = dict(attention_mask=attention_mask, labels=labels)
    args = (input_ids,)
    if case == "num_items_in_batch":  # Trainer under gradient accumulation: a sum over a larger batch's count
        kwargs["num_items_in_batch"] = torch.tensor(41)
    elif case == "shift_labels":  # pre-shifted, as under context parallelism
        kwargs["shift_labels"] = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        kwargs["shift_labels"][0, 4] = -100
    elif case == "positional_labels":  # forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels)
        args, kwargs = (input_ids, attention_mask, None, None, None, labels), {}
    else:
        kwargs["return_dict"] = False
    outs = []
    for m in (patched, model):
        m.zero_grad(set_to_none=True)
        out = m(*args, **kwargs)
        loss = out[0] if case == "tuple" else out.loss
        loss.backward()
        outs.append((out, loss, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (got, got_loss, got_grads), (expected, expected_loss, expected_grads) = outs
    if case == "tuple":
        assert isinstance(got, tuple) and len(got) == len(expected) - 1  # no logits
    torch.testing.assert_close(got_loss, expected_loss, rtol=1e-5, atol=1e-5)
    for name, g in expected_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * max(g.abs().max().item(), 1.0))


def test_every_label_ignored_gives_nan_as_transformers():
    model = tiny_model("llama").train()
    patched = apply_fused_head(copy.deepcopy(model), impl="torch")
    input_ids, attention_mask, _ = batch()
    labels = torch.full_like(input_ids, -100)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    got = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.isnan(expected) and torch.isnan(got)
    got.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in patched.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_without_labels_logits_and_greedy_generation_unchanged(family):
    # (Mixtral's own generate fails with output_router_logits=True under a padded batch, patched or not.)
    model = tiny_model(family)
    patched = apply_fused_head(copy.deepcopy(model))
    input_ids, attention_mask, _ = batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   model(input_ids=input_ids, attention_mask=attention_mask).logits, rtol=0, atol=0)
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(input_ids, **kwargs), model.generate(input_ids, **kwargs))


def test_eval_mode_keeps_the_logits_unless_asked():
    model = tiny_model("llama")  # eval mode
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected = model(**inputs)
    got = apply_fused_head(copy.deepcopy(model))(**inputs)  # train_only=True: the model's own forward
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    fused = apply_fused_head(copy.deepcopy(model), train_only=False, impl="torch")(**inputs)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, expected.loss, rtol=1e-6, atol=1e-6)


def test_remove_restores_the_forward_and_patching_is_idempotent():
    model = tiny_model("llama").train()
    assert "forward" not in model.__dict__
    assert apply_fused_head(apply_fused_head(model)) is model and is_fused_head_applied(model)
    input_ids, attention_mask, labels = batch()
    assert model(input_ids=input_ids, labels=labels).logits is None
    assert remove_fused_head(model) is model
    assert "forward" not in model.__dict__ and not is_fused_head_applied(model)
    assert model(input_ids=input_ids, labels=labels).logits.shape[-1] == VOCAB_SIZE
    with pytest.raises(ValueError, match="^model: expected a model patched by apply_fused_head"):
        remove_fused_head(model)


def test_a_deep_copy_of_a_patched_model_runs_on_its_own_parameters():
    patched = apply_fused_head(tiny_model("llama").train(), impl="torch")
    copied = copy.deepcopy(patched)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    unpatched = remove_fused_head(copy.deepcopy(copied))
    expected, expected_grads = loss_and_grads(unpatched, **inputs)
    got, got_grads = loss_and_grads(copied, **inputs)
    assert got.logits is None and all(p.grad is None for p in patched.parameters())
    assert_same(got, got_grads, expected, expected_grads)


def test_reexported_from_hf():
    assert hf.apply_fused_head is apply_fused_head and hf.remove_fused_head is remove_fused_head


def test_peft_lora_model_equals_unpatched():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    base = tiny_model("llama").train()
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    torch.manual_seed(0)
    patched = apply_fused_head(peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config)), impl="torch")
    assert is_fused_head_applied(patched) and "forward" in patched.get_base_model().__dict__
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected, expected_grads = loss_and_grads(model, **inputs)
    got, got_grads = loss_and_grads(patched, **inputs)
    assert got.logits is None and any("lora" in name for name in got_grads)
    assert_same(got, got_grads, expected, expected_grads)


def test_bf16_autocast_within_budget_of_the_float64_model():
    """Under bf16 autocast the patched loss and gradients are as close to the float64 model's as the
    unpatched model's bf16 ones (DESIGN: at most 2x plus a small floor)."""
    model = tiny_model("gemma2").train()
    patched = apply_fused_head(copy.deepcopy(model), impl="torch")
    exact = copy.deepcopy(model).double()
    input_ids, _, labels = batch(seed=4)
    attention_mask = torch.ones_like(input_ids)  # (Gemma-2's float64 attention gives NaN on left padding)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    truth, truth_grads = loss_and_grads(exact, **inputs)
    results = []
    for m in (patched, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(m, **inputs))
    (got, got_grads), (theirs, their_grads) = results
    floor = 1e-4
    assert abs(got.loss.double() - truth.loss).item() <= 2 * abs(theirs.loss.double() - truth.loss).item() + floor
    for name, t in truth_grads.items():
        err_ours = (got_grads[name].double() - t).norm().item()
        err_theirs = (their_grads[name].double() - t).norm().item()
        assert err_ours <= 2 * err_theirs + floor * max(t.norm().item(), 1.0), name


# ---- refusals at patch time -------------------------------------------------------------------------------

class ScaledLogitsLlama(transformers.LlamaForCausalLM):
    """A family that transforms its logits in a way its config does not say."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 2.0
        return out


class NoLogitsToKeepLlama(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def test_refuses_a_head_that_does_not_reproduce_the_logits():
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match="^model: expected ScaledLogitsLlama's logits to equal cap"):
        apply_fused_head(ScaledLogitsLlama(config))


def test_refuses_a_forward_without_logits_to_keep():
    with pytest.raises(ValueError, match=r"^model: expected NoLogitsToKeepLlama.forward to take \['logits_to_keep'\]"):
        apply_fused_head(NoLogitsToKeepLlama(tiny_model("llama").config))


def test_refuses_another_loss_function():
    model = tiny_model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(ValueError, match="^model.loss_function: expected transformers' ForCausalLMLoss"):
        apply_fused_head(model)


def test_refuses_a_moe_model_without_router_loss_coefficient(monkeypatch):
    # An MoE family that returns router logits but keeps no coefficient where transformers' families keep it.
    model = tiny_model("mixtral")
    del model.router_aux_loss_coef
    model.config.__dict__.pop("router_aux_loss_coef", None)
    monkeypatch.delattr(type(model.config), "router_aux_loss_coef", raising=False)
    assert not hasattr(model.config, "router_aux_loss_coef")
    with pytest.raises(ValueError, match="^model: MixtralForCausalLM returns router logits .* router_aux_loss_coef"):
        apply_fused_head(model)


def test_refuses_a_peft_adapter_on_the_head():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="^model: expected an LM head without a PEFT adapter"):
        apply_fused_head(model)


def test_refuses_bad_options():
    with pytest.raises(ValueError, match="^impl: expected one of"):
        apply_fused_head(tiny_model("llama"), impl="cuda")
    with pytest.raises((ValueError, TypeError), match="^grad_filter_eps"):
        apply_fused_head(tiny_model("llama"), grad_filter_eps=-1.0)
    with pytest.raises(TypeError, match="^train_only: expected a bool"):
        apply_fused_head(tiny_model("llama"), train_only="yes")
