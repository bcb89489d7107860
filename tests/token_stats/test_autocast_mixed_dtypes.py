"""Plain PyTorch AMP: under ``torch.autocast`` (bf16 or fp16) the hidden states are low precision
while the head stays fp32. `token_stats` takes the mixed operands as ``F.linear`` does (cast to the
autocast dtype), computes within the error budget of plain same-dtype PyTorch against the float64
oracle, and returns each gradient in its input's own dtype. Outside autocast a mismatch is an error.
"""
import pytest
import torch

import fpo_ops
from fpo_ops.token_stats import chunked
from stats_cases import Case, make_case, max_abs_err, poisoned_allocations, run  # noqa: F401

OUTPUTS = ("logp", "lse", "ref_logp", "kl", "entropy", "top1_correct")
FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _mixed(amp: torch.dtype) -> Case:
    """Low-precision hidden states (both models), fp32 heads and biases."""
    case = make_case(shape=(3, 7), hidden_size=32, vocab=53, ref_hidden_size=16, bias=True, ref_bias=True,
                     seed=21, softcap=30.0, logit_std=20.0)

    def to(t, dtype):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
    return Case(to(case.hidden, amp), to(case.weight, torch.float32), case.labels, to(case.ref_hidden, amp),
                to(case.ref_weight, torch.float32), to(case.bias, torch.float32), to(case.ref_bias, torch.float32),
                dict(case.kwargs))


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 8)
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 16)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_same_numbers_as_inputs_rounded_by_hand(impl, amp):
    """Under autocast every implementation computes exactly what it computes on the operands
    rounded to the autocast dtype beforehand, forward and backward (backward runs under the
    caller's autocast here: it must not recast its tiles either)."""
    case = _mixed(amp)
    with torch.autocast("cpu", dtype=amp):
        stats, grads = run(case, impl, OUTPUTS)
    by_hand_stats, by_hand_grads = run(case.cast(amp), impl, OUTPUTS)
    for stat in OUTPUTS:
        assert torch.equal(getattr(stats, stat), getattr(by_hand_stats, stat)), stat
    assert [g.dtype for g in grads] == [amp, torch.float32, torch.float32]
    for got, want in zip(grads, by_hand_grads):
        assert torch.equal(got.to(want.dtype), want)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_mixed_operands_under_autocast(impl, amp):
    # softcap 30 bites here (logits ~20): the gradients go through its derivative and a bf16 dz
    case = _mixed(amp)
    with torch.autocast("cpu", dtype=amp):
        stats, grads = run(case, impl, OUTPUTS)
    # what autocast multiplies: every operand rounded to its dtype
    rounded = case.cast(amp)
    exact_stats, exact_grads = run(rounded.cast(torch.float64), "reference", OUTPUTS)
    plain_stats, plain_grads = run(rounded, "reference", OUTPUTS)
    for stat in OUTPUTS:
        got, want = getattr(stats, stat), getattr(exact_stats, stat)
        assert got.dtype == torch.float32, stat
        ours, plain = max_abs_err(got, want), max_abs_err(getattr(plain_stats, stat), want)
        assert ours <= 2 * plain + FLOOR[amp] * max(1.0, want.abs().max().item()), (stat, ours, plain)
    # gradients in each input's own dtype: low-precision hidden, fp32 weight and bias
    assert [g.dtype for g in grads] == [amp, torch.float32, torch.float32]
    for got, plain, want in zip(grads, plain_grads, exact_grads):
        ours, base = max_abs_err(got, want), max_abs_err(plain, want)
        assert ours <= 2 * base + FLOOR[amp] * want.abs().max().item(), (ours, base)


def test_outside_autocast_a_mismatch_is_an_error():
    case = _mixed(torch.bfloat16)
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.bfloat16, got torch.float32"):
        fpo_ops.token_stats(case.hidden, case.weight, case.labels, impl="torch")


def _loss_calls():
    from fpo_ops.losses import DistillLoss, KTOLoss, PreferenceLoss, distill_loss, kto_loss, preference_loss
    desirable = torch.tensor([True, False, True])
    return {
        "preference_loss": lambda h, w, y, rh, rw: preference_loss(h, w, y, rh, rw, loss_type="tdpo2", impl="torch"),
        "PreferenceLoss": lambda h, w, y, rh, rw: PreferenceLoss(loss_type="sigmoid", impl="torch")(h, w, y, rh, rw),
        "kto_loss": lambda h, w, y, rh, rw: kto_loss(h, w, y, rh, rw, desirable=desirable, kl_hidden=h.flip(0),
                                                     kl_labels=y.flip(0), kl_ref_hidden=rh.flip(0), impl="torch"),
        "KTOLoss": lambda h, w, y, rh, rw: KTOLoss(loss_type="apo_zero_unpaired", impl="torch")(
            h, w, y, rh, rw, desirable=desirable),
        "distill_loss": lambda h, w, y, rh, rw: distill_loss(h, w, y, rh, rw, impl="torch"),
        "DistillLoss": lambda h, w, y, rh, rw: DistillLoss(impl="torch")(h, w, y, rh, rw),
    }


@pytest.mark.parametrize("name", ["preference_loss", "PreferenceLoss", "kto_loss", "KTOLoss", "distill_loss",
                                  "DistillLoss"])
def test_losses_and_modules_take_mixed_operands_under_autocast(name):
    """bf16 hidden states with fp32 heads under autocast: the same loss and gradients as on operands
    rounded by hand, gradients in each input's dtype."""
    call = _loss_calls()[name]
    case = _mixed(torch.bfloat16)
    # the preference losses take pairs (an even number of rows); KTO's desirable flags are three
    rows = 2 if "reference" in name.lower() else 3
    h, rh = case.hidden[:rows].detach().requires_grad_(), case.ref_hidden[:rows]
    w, rw, y = case.weight, case.ref_weight, case.labels[:rows]
    def loss_of(out):
        return getattr(out, "loss", out)  # the distillation losses return the loss itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(call(h, w, y, rh, rw))
    grads = torch.autograd.grad(loss, (h, w))
    h16, w16 = h.detach().requires_grad_(), w.detach().to(torch.bfloat16).requires_grad_()
    by_hand = loss_of(call(h16, w16, y, rh, rw.to(torch.bfloat16)))
    want = torch.autograd.grad(by_hand, (h16, w16))
    assert loss.dtype == torch.float32 and torch.equal(loss, by_hand)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32]
    for got, ref in zip(grads, want):
        assert torch.equal(got.to(ref.dtype), ref)
