"""Plain PyTorch AMP through the Hugging Face paths: a bf16 backbone with an fp32 LM head, trained under
``torch.autocast("cpu", dtype=torch.bfloat16)`` in a custom loop.

This is what ``model.to(torch.bfloat16)`` followed by ``model.lm_head.float()`` gives: the head's GEMM
gets bf16 hidden states and an fp32 weight, which ``F.linear`` casts to bf16 under autocast. The fused
paths must accept that, return each gradient in its parameter's dtype, and train within the bf16
budget: against the float64 model, their error is at most 2x that of the unpatched mixed model under
the same autocast, plus a small floor (`assert_within_budget`).
"""
import pytest
import torch

pytest.importorskip("transformers")

import fpo_ops  # noqa: E402
from fpo_ops.integrations.hf import hidden_and_head  # noqa: E402
from fpo_ops.integrations.patch import apply_fused_head  # noqa: E402
from hf_fixtures import VOCAB_SIZE, bf16_exact, float64, mixed, tiny_model  # noqa: E402
from loss_oracle import dpo_oracle, tdpo_oracle, token_quantities_of_logits  # noqa: E402
from trainer_fixtures import assert_within_budget  # noqa: E402

STEPS = 3
LR = 0.2
BETA, TDPO_ALPHA = 0.3, 0.5
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def batch(seed=1, rows=4, length=10):
    """Rows 0..B-1 chosen, B..2B-1 rejected (`preference_loss`'s layout); left padding and prompts."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[3, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    labels[2, 4] = -100   # a rejected response one token shorter
    return input_ids, attention_mask, labels


def evaluate(model, loss_of, autocast):
    """(loss, metrics, gradients) of ``loss_of(model)``; every gradient in its parameter's dtype."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = loss_of(model)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad.dtype == p.dtype, (name, p.grad.dtype, p.dtype)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def train_within_budget(model, loss_of, plain, plain_loss_of, exact, exact_loss_of):
    """``STEPS`` SGD steps of ``loss_of(model)`` under bf16 autocast. Before each, the plain mixed model
    (under the same autocast) and the float64 model take ``model``'s parameters, exactly, and the step's
    loss, metrics and gradients are within budget: each step measures the arithmetic, not how bf16
    parameter updates round along two trajectories."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        for other in (plain, exact):
            other.load_state_dict(model.state_dict())
        ours = evaluate(model, loss_of, autocast=True)
        want = evaluate(exact, exact_loss_of, autocast=False)
        assert torch.isfinite(ours[0]), step
        assert_within_budget(ours, evaluate(plain, plain_loss_of, autocast=True), want)
        losses.append(want[0])
        optimizer.step()
    assert losses[-1] < losses[0]  # the loop trains


def causal_lm_loss(model):
    input_ids, attention_mask, labels = batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return out.loss, {}


def test_patched_model_trains_like_the_plain_mixed_model():
    base = bf16_exact(tiny_model("llama"))
    assert not base.config.tie_word_embeddings
    patched = apply_fused_head(mixed(base))
    input_ids, attention_mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is None
    train_within_budget(patched, causal_lm_loss, mixed(base), causal_lm_loss, float64(base), causal_lm_loss)


def fused_preference_loss(reference, loss_type):
    """`hidden_and_head` of the policy and the reference, then `fpo_ops.preference_loss` on the parts."""
    input_ids, attention_mask, labels = batch()

    def loss_of(policy):
        parts = hidden_and_head(policy, input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            ref = hidden_and_head(reference, input_ids=input_ids, attention_mask=attention_mask)
        out = fpo_ops.preference_loss(
            parts.hidden[:, :-1], parts.weight, labels[:, 1:], ref.hidden[:, :-1], ref.weight,
            loss_type=loss_type, beta=BETA, tdpo_alpha=TDPO_ALPHA,
        )
        return out.loss, {name: out.metrics[name] for name in REWARD_METRICS}

    return loss_of


def logits_preference_loss(reference, loss_type):
    """The same loss from the models' own logits (TRL DPOTrainer's and the TDPO code's formulas)."""
    input_ids, attention_mask, labels = batch()

    def loss_of(policy):
        z = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        with torch.no_grad():
            zr = reference(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        tok = token_quantities_of_logits(z.float() if z.dtype != torch.float64 else z,
                                         zr.float() if zr.dtype != torch.float64 else zr, labels[:, 1:])
        if loss_type == "sigmoid":
            loss, metrics, _, _ = dpo_oracle(tok, ["sigmoid"], beta=BETA)
        else:
            loss, metrics = tdpo_oracle(tok, beta=BETA, alpha=TDPO_ALPHA, tdpo2=True)
        return loss, {name: metrics[name] for name in REWARD_METRICS}

    return loss_of


@pytest.mark.parametrize("loss_type", ["sigmoid", "tdpo2"])
def test_preference_loss_on_hidden_and_head_trains_like_the_plain_mixed_model(loss_type):
    base = bf16_exact(tiny_model("llama"))
    reference = bf16_exact(tiny_model("llama", seed=1))
    train_within_budget(mixed(base), fused_preference_loss(mixed(reference).eval(), loss_type),
                        mixed(base), logits_preference_loss(mixed(reference).eval(), loss_type),
                        float64(base), logits_preference_loss(float64(reference).eval(), loss_type))
