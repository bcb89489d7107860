"""TRL DPOTrainer loss types through `preference_loss`: values, metrics and gradients vs float64 formulas."""
import pytest
import torch

import fpo_ops
from loss_batches import head_kwargs, make_batch
from loss_oracle import dpo_oracle, token_quantities

TOL = dict(rtol=1e-9, atol=1e-9)
N_PAIRS = 4

# (loss_type(s), options): every TRL loss type with its defaults, then every option.
CASES = [
    ("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.1}), ("robust", {}), ("bco_pair", {}), ("sppo_hard", {}),
    ("aot", {}), ("aot", {"label_smoothing": 0.2}), ("aot_unpaired", {"label_smoothing": 0.2}),
    ("apo_zero", {}), ("apo_down", {}), ("discopop", {}), ("discopop", {"discopop_tau": 0.7}),
    ("sft", {}), ("sigmoid_norm", {}),
    ("sigmoid", {"beta": 0.5}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("hinge", {"f_divergence_type": "js_divergence"}),
    ("ipo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("robust", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.0, "label_smoothing": 0.2}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}),
    ("exo_pair", {"f_divergence_type": "js_divergence", "label_smoothing": 0.05}),
    ("discopop", {"f_divergence_type": "forward_kl"}),
    ("sigmoid_norm", {"f_divergence_type": "js_divergence"}),
    ("sigmoid", {"ld_alpha": 0.5}), ("ipo", {"ld_alpha": 0.0}), ("apo_zero", {"ld_alpha": 0.3}),
    ("sigmoid", {"use_weighting": True}), ("ipo", {"use_weighting": True}), ("sft", {"use_weighting": True}),
    (["sigmoid", "sft"], {"loss_weights": [0.8, 0.2]}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),
    (["hinge", "nca_pair"], {}),
    (["sigmoid", "sft"], {"use_weighting": True, "ld_alpha": 0.7}),
]

MARGIN_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"]


def _types(loss_type):
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def _check(out, oracle_loss, oracle_metrics, batch, fresh, oracle_logps):
    torch.testing.assert_close(out.loss, oracle_loss, **TOL)
    assert set(out.metrics) == set(oracle_metrics)
    for name, value in oracle_metrics.items():
        torch.testing.assert_close(out.metrics[name], value.to(out.metrics[name].dtype), **TOL, msg=name)
    chosen, rejected = oracle_logps
    torch.testing.assert_close(out.chosen_logps, chosen, **TOL)
    torch.testing.assert_close(out.rejected_logps, rejected, **TOL)
    # random upstream weights on the loss and on the per-sequence log-probs
    g = torch.Generator().manual_seed(7)
    c = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    r = torch.randn(N_PAIRS, generator=g, dtype=torch.float64)
    (c * out.loss + (r * out.chosen_logps).sum()).backward()
    (c * oracle_loss + (r * chosen).sum()).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)


@pytest.mark.parametrize("loss_type,options", CASES, ids=[f"{t}-{o}" for t, o in CASES])
def test_matches_trl_formula(loss_type, options):
    batch = make_batch(rows=2 * N_PAIRS, seed=1)
    fresh = batch.fresh_leaves()
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                                  loss_type=loss_type, impl="torch", **head_kwargs(fresh), **options)
    loss, metrics, chosen, rejected = dpo_oracle(token_quantities(batch), _types(loss_type), **options)
    _check(out, loss, metrics, batch, fresh, (chosen, rejected))


@pytest.mark.parametrize("loss_type", MARGIN_TYPES + [("sigmoid", "sft")])
def test_margin_is_subtracted_in_reward_units(loss_type):
    options = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
    batch = make_batch(rows=2 * N_PAIRS, seed=2)
    fresh = batch.fresh_leaves()
    margin = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                                  loss_type=loss_type, margin=margin, beta=0.3, impl="torch", **options)
    loss, metrics, chosen, rejected = dpo_oracle(token_quantities(batch), _types(loss_type), margin=margin,
                                                 beta=0.3, **options)
    _check(out, loss, metrics, batch, fresh, (chosen, rejected))
    no_margin = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden,
                                        fresh.ref_weight, loss_type=loss_type, beta=0.3, impl="torch", **options)
    assert not torch.allclose(no_margin.loss, out.loss)


@pytest.mark.parametrize("loss_type,options", [("sigmoid", {}), ("aot", {}), ("ipo", {"ld_alpha": 0.5}),
                                               (["sigmoid", "sft"], {})])
def test_precomputed_reference_logps(loss_type, options):
    batch = make_batch(rows=2 * N_PAIRS, seed=3)
    tok = token_quantities(batch)
    _, _, ref_w, ref_l = dpo_oracle({**tok, "logp": tok["ref_logp"]}, ["sigmoid"], **options)
    fresh = batch.fresh_leaves()
    # no reference model at all: only the precomputed log-probs
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, loss_type=loss_type,
                                  ref_chosen_logps=ref_w.detach().float(), ref_rejected_logps=ref_l.detach().float(),
                                  impl="torch", **options)
    loss, metrics, chosen, rejected = dpo_oracle(tok, _types(loss_type), ref_chosen_logps=ref_w.float().double(),
                                                 ref_rejected_logps=ref_l.float().double(), **options)
    _check(out, loss, metrics, batch, fresh, (chosen, rejected))
    torch.testing.assert_close(out.ref_chosen_logps, ref_w.float().double(), **TOL)


@pytest.mark.parametrize("head", [
    {"temperature": 0.7}, {"softcap": 3.0, "ref_softcap": 2.5}, {"logit_scale": 1.7, "ref_logit_scale": 0.6},
])
def test_head_options_are_forwarded(head):
    batch = make_batch(rows=2 * N_PAIRS, seed=4, bias=True, head=head)
    fresh = batch.fresh_leaves()
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                                  loss_type=["sigmoid", "sft"], use_weighting=True, impl="torch", **head_kwargs(fresh))
    loss, metrics, chosen, rejected = dpo_oracle(token_quantities(batch), ["sigmoid", "sft"], use_weighting=True)
    _check(out, loss, metrics, batch, fresh, (chosen, rejected))


def test_reference_sharing_the_policy_head_with_other_hidden_size():
    shared = make_batch(rows=2 * N_PAIRS, seed=5, shared_weight=True, bias=True)
    fresh = shared.fresh_leaves()
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, None,
                                  loss_type="sigmoid", impl="torch", bias=fresh.bias)
    loss, metrics, chosen, rejected = dpo_oracle(token_quantities(shared), ["sigmoid"])
    _check(out, loss, metrics, shared, fresh, (chosen, rejected))

    other = make_batch(rows=2 * N_PAIRS, seed=6, ref_H=11)
    fresh = other.fresh_leaves()
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                                  loss_type="apo_down", impl="torch")
    loss, metrics, chosen, rejected = dpo_oracle(token_quantities(other), ["apo_down"])
    _check(out, loss, metrics, other, fresh, (chosen, rejected))


@pytest.mark.parametrize("loss_type,options", [
    ("sigmoid", {"use_weighting": True}), ("exo_pair", {"label_smoothing": 0.01}), ("aot_unpaired", {}),
    (["ipo", "sft"], {"ld_alpha": 0.5}),
])
def test_gradients_equal_the_reference_impl(loss_type, options):
    """The same loss through impl="reference" (materialised float64 logits) and impl="torch"."""
    batch = make_batch(rows=2 * N_PAIRS, seed=8, bias=True)
    outs, grads = [], []
    for impl in ("torch", "reference"):
        fresh = batch.fresh_leaves()
        out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                                      loss_type=loss_type, impl=impl, **head_kwargs(fresh), **options)
        (out.loss * 1.3 + (torch.linspace(-1, 1, N_PAIRS, dtype=torch.float64) * out.rejected_logps).sum()).backward()
        outs.append(out)
        grads.append([t.grad for t in fresh.leaves()])
    torch.testing.assert_close(outs[0].loss, outs[1].loss, **TOL)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_twice_plain_pytorch_error(dtype):
    """Error vs the float64 formula <= 2x that of plain same-dtype PyTorch + a floor.

    Errors are summed over the loss and every per-sequence log-prob of several batches (B = 1
    included), so that one lucky cancellation in plain PyTorch does not decide the comparison.
    """
    ours_error = plain_error = 0.0
    for rows, seed in ((2, 9), (2, 14), (2 * N_PAIRS, 10), (2 * N_PAIRS, 15)):
        low, rounded = make_batch(rows=rows, seed=seed), make_batch(rows=rows, seed=seed)
        for name in ("hidden", "weight", "ref_hidden", "ref_weight"):
            setattr(low, name, getattr(low, name).detach().to(dtype))
            # the oracle sees the same rounded inputs, so only the computation's error is compared
            setattr(rounded, name, getattr(low, name).double())
        exact = dpo_oracle(token_quantities(rounded), ["sigmoid", "sft"], beta=0.5)
        plain = dpo_oracle(token_quantities(low), ["sigmoid", "sft"], beta=0.5)
        out = fpo_ops.preference_loss(low.hidden, low.weight, low.labels, low.ref_hidden, low.ref_weight,
                                      loss_type=["sigmoid", "sft"], beta=0.5, impl="torch")
        assert out.loss.dtype == torch.float32  # statistics and sums stay fp32 for low-precision inputs
        ours = (out.loss, out.chosen_logps, out.rejected_logps)
        for mine, base, ref in zip(ours, (plain[0], plain[2], plain[3]), (exact[0], exact[2], exact[3])):
            ours_error += (mine.double() - ref).abs().sum().item()
            plain_error += (base.double() - ref).abs().sum().item()
    assert ours_error <= 2 * plain_error + 1e-6


def test_all_completion_tokens_ignored():
    """No completion token: finite loss, zero gradient, zero token metrics (as TRL logs 0.0)."""
    batch = make_batch(rows=2 * N_PAIRS, seed=12)
    batch.labels = torch.full_like(batch.labels, -100)
    out = fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                  loss_type=["sigmoid", "ipo", "sft"], impl="torch")
    # every log-ratio is 0: sigmoid gives log 2, ipo (1/(2β))², sft 0
    torch.testing.assert_close(out.loss, torch.tensor(0.6931471805599453 + 25.0, dtype=torch.float64), **TOL)
    out.loss.backward()
    assert batch.hidden.grad.abs().max() == 0 and batch.weight.grad.abs().max() == 0
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert out.metrics[name].item() == 0.0


def test_without_token_metrics():
    batch = make_batch(rows=2 * N_PAIRS, seed=13)
    out = fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                  compute_metrics=False, impl="torch")
    full = fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                   impl="torch")
    assert set(full.metrics) - set(out.metrics) == {"entropy", "logits/chosen", "logits/rejected",
                                                    "mean_token_accuracy"}
    torch.testing.assert_close(out.loss, full.loss, **TOL)
