"""Hidden states and LM head taken from Hugging Face models reproduce the models' own logits."""
import copy
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")

import fpo_ops  # noqa: E402
from fpo_ops.integrations import hf  # noqa: E402
from hf_fixtures import VOCAB_SIZE, tiny_model  # noqa: E402

FAMILIES = ["llama", "llama_tied", "gemma2", "cohere", "granite"]


def logits_from_parts(parts: hf.HeadInputs) -> torch.Tensor:
    z = parts.hidden @ parts.weight.T
    if parts.bias is not None:
        z = z + parts.bias
    z = z * parts.logit_scale
    if parts.softcap is not None:
        z = parts.softcap * torch.tanh(z / parts.softcap)
    return z


def random_batch(seed=1, batch=2, length=9):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding on one row
    return input_ids, attention_mask


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_reproduce_model_logits(family):
    model = tiny_model(family)
    input_ids, attention_mask = random_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        parts = hf.hidden_and_head(model, input_ids=input_ids, attention_mask=attention_mask)
    # Same float32 GEMM as the model's nn.Linear; only the order of scale/cap ops may differ.
    torch.testing.assert_close(logits_from_parts(parts), expected, rtol=1e-5, atol=1e-5)


def test_scaling_read_from_config_names():
    assert hf.head_scaling(tiny_model("gemma2").config) == hf.HeadScaling(softcap=0.7, logit_scale=1.0)
    assert hf.head_scaling(tiny_model("cohere").config) == hf.HeadScaling(None, 0.37)
    assert hf.head_scaling(tiny_model("granite").config) == hf.HeadScaling(None, 1.0 / 3.0)
    assert hf.head_scaling(tiny_model("llama").config) == hf.HeadScaling(None, 1.0)
    falcon_like = types.SimpleNamespace(lm_head_multiplier=0.25)
    assert hf.head_scaling(falcon_like) == hf.HeadScaling(None, 0.25)
    hyperclova_like = types.SimpleNamespace(logits_scaling=2.0, model_type="hyperclovax")
    assert hf.head_scaling(hyperclova_like) == hf.HeadScaling(None, 2.0)


def test_tied_head_is_the_embedding_matrix():
    model = tiny_model("llama_tied")
    weight, bias = hf.lm_head_tensors(model)
    assert weight is model.get_input_embeddings().weight and bias is None
    assert hf.find_backbone(model) is model.model


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_token_logp_from_parts_equals_log_softmax_of_model_logits(family):
    model = tiny_model(family)
    input_ids, attention_mask = random_batch(seed=2)
    labels = input_ids[:, 1:].clone()
    labels[0, :3] = -100
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.double(), -1)
        parts = hf.hidden_and_head(model, input_ids=input_ids, attention_mask=attention_mask)
    expected = expected[:, :-1].gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected.masked_fill(labels == -100, 0.0)
    stats = fpo_ops.token_stats(
        parts.hidden[:, :-1], parts.weight, labels, bias=parts.bias,
        softcap=parts.softcap, logit_scale=parts.logit_scale, impl="torch",
    )
    torch.testing.assert_close(stats.logp.double(), expected, rtol=1e-5, atol=2e-5)


def test_patched_forward_returns_parts_and_keeps_logits_path():
    model = tiny_model("llama")
    input_ids, attention_mask = random_batch(seed=3)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hf.add_head_outputs(model)
        hf.add_head_outputs(model)  # idempotent
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
        parts = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids,
                      return_head_inputs=True)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert isinstance(parts, hf.HeadInputs)
    torch.testing.assert_close(logits_from_parts(parts), before, rtol=1e-5, atol=1e-5)


def test_peft_adapters_apply_and_reference_disables_them():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    input_ids, attention_mask = random_batch(seed=4)
    with torch.no_grad():
        base_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = peft.get_peft_model(model, config)
    hf.add_head_outputs(policy)
    with torch.no_grad():
        adapted_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        parts = policy(input_ids=input_ids, attention_mask=attention_mask, return_head_inputs=True)
        with hf.reference_context(policy):
            ref_parts = policy(input_ids=input_ids, attention_mask=attention_mask, return_head_inputs=True)
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(logits_from_parts(parts), adapted_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_from_parts(ref_parts), base_logits, rtol=1e-5, atol=1e-5)


def test_peft_adapter_on_head_is_refused():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    policy = peft.get_peft_model(tiny_model("llama"), config)
    with pytest.raises(ValueError, match="model: expected an LM head without a PEFT adapter"):
        hf.lm_head_tensors(policy)


def test_model_without_backbone_is_a_type_error():
    with pytest.raises(TypeError, match="model: expected a causal LM"):
        hf.find_backbone(torch.nn.Linear(3, 3))


def test_dtensor_head_is_gathered_and_gets_sharded_gradient(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DeviceMesh, DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        dense = model.lm_head.weight.detach().clone().requires_grad_(True)
        mesh = DeviceMesh("cpu", [0])
        # FSDP2's Shard(0) parameters are gathered (a tensor-parallel Shard(0) head is not: see
        # tests/distributed/test_distributed_tensor_parallel.py).
        fully_shard(model, mesh=mesh)
        assert isinstance(model.lm_head.weight, DTensor) and model.lm_head.weight.placements == (Shard(0),)
        weight, _ = hf.lm_head_tensors(model)
        assert type(weight) is torch.Tensor
        hidden = torch.randn(5, dense.shape[1])
        upstream = torch.randn(5, dense.shape[0])
        ((hidden @ weight.T) * upstream).sum().backward()
        ((hidden @ dense.T) * upstream).sum().backward()
        torch.testing.assert_close(model.lm_head.weight.grad.full_tensor(), dense.grad, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_ddp_forward_returns_parts_and_gradients_match(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        plain = copy.deepcopy(model)
        hf.add_head_outputs(model)
        # find_unused_parameters makes DDP walk the outputs to find the tensors the loss uses.
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        input_ids, attention_mask = random_batch(seed=5)
        labels = input_ids[:, 1:]
        upstream = torch.randn(labels.shape)

        def loss_of(parts):
            stats = fpo_ops.token_stats(parts.hidden[:, :-1], parts.weight, labels, impl="torch")
            return (stats.logp * upstream).sum()

        parts = ddp(input_ids=input_ids, attention_mask=attention_mask, return_head_inputs=True)
        assert isinstance(parts, hf.HeadInputs)
        loss_of(parts).backward()
        loss_of(hf.hidden_and_head(plain, input_ids=input_ids, attention_mask=attention_mask)).backward()
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_plain_params_are_not_gathered(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it would fail
    weight = torch.randn(4, 3, requires_grad=True)
    (out,) = hf.apply_gathered(lambda w, h: (h @ w.T,), [weight], torch.randn(2, 3))
    assert out.grad_fn is not None


def test_importing_fpo_ops_imports_neither_trl_nor_transformers():
    code = (
        "import sys, fpo_ops, fpo_ops.integrations\n"
        "bad = [m for m in ('trl', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_patched_forward_keeps_an_autocast_wrapper_put_on_it_before():
    """accelerate's mixed precision wraps ``forward`` in autocast; TRL does so for the reference before
    the head patch. The head request must run inside that wrapper, not call the backbone around it."""
    model = tiny_model("llama")
    input_ids, attention_mask = random_batch(seed=6)
    calls = []
    inner = model.forward

    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("logits_to_keep"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(*args, **kwargs)

    model.forward = wrapped
    hf.add_head_outputs(model)
    with torch.no_grad():
        parts = model(input_ids=input_ids, attention_mask=attention_mask, return_head_inputs=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = hf.hidden_and_head(model, input_ids=input_ids, attention_mask=attention_mask)
        plain = hf.hidden_and_head(model, input_ids=input_ids, attention_mask=attention_mask)
    assert len(calls) == 1 and calls[0].numel() == 0  # through the wrapper, with logits for no position
    assert parts.autocast_dtype == torch.bfloat16 and plain.autocast_dtype is None
    torch.testing.assert_close(parts.hidden, expected.hidden, rtol=0, atol=0)
    assert (parts.hidden - plain.hidden).abs().max() > 1e-4  # the bf16 backbone differs from the fp32 one


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_patched_forward_returns_the_moe_load_balancing_loss(family):
    model = tiny_model(family)
    input_ids, attention_mask = random_batch(seed=7)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        hf.add_head_outputs(model)
        parts = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True,
                      return_head_inputs=True)
        dense = model(input_ids=input_ids, attention_mask=attention_mask, return_head_inputs=True)
    torch.testing.assert_close(parts.aux_loss, expected.aux_loss, rtol=0, atol=0)
    assert dense.aux_loss is None
    torch.testing.assert_close(logits_from_parts(parts), expected.logits, rtol=1e-5, atol=1e-5)
