"""TDPO, SPO and soft SPPO through `preference_loss` vs float64 formulas from the papers' code."""
import pytest
import torch

import fpo_ops
from loss_batches import head_kwargs, make_batch, make_labels
from loss_oracle import sppo_oracle, spo_oracle, tdpo_oracle, token_quantities

TOL = dict(rtol=1e-9, atol=1e-9)
N_PAIRS = 4


def _call(fresh, **kw):
    return fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                                   impl=kw.pop("impl", "torch"), **head_kwargs(fresh), **kw)


def _backward_both(out, oracle_loss, fresh, batch):
    g = torch.Generator().manual_seed(11)
    c = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    (c * out.loss).backward()
    (c * oracle_loss).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)


def _check_metrics(out, metrics):
    assert set(out.metrics) == set(metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(out.metrics[name], value.to(out.metrics[name].dtype), **TOL, msg=name)


@pytest.mark.parametrize("loss_type,alpha,bias,head", [
    ("tdpo1", 0.5, False, {}), ("tdpo2", 0.5, False, {}), ("tdpo2", 0.2, True, {"temperature": 0.8}),
    ("tdpo2", 1.0, False, {"softcap": 2.0, "ref_softcap": 2.0}),
])
def test_tdpo_matches_official_code(loss_type, alpha, bias, head):
    batch = make_batch(rows=2 * N_PAIRS, seed=21, bias=bias, head=head)
    fresh = batch.fresh_leaves()
    out = _call(fresh, loss_type=loss_type, tdpo_alpha=alpha, beta=0.2)
    loss, metrics = tdpo_oracle(token_quantities(batch), beta=0.2, alpha=alpha, tdpo2=loss_type == "tdpo2")
    torch.testing.assert_close(out.loss, loss, **TOL)
    _check_metrics(out, metrics)
    _backward_both(out, loss, fresh, batch)


def test_tdpo_with_margin():
    batch = make_batch(rows=2 * N_PAIRS, seed=22)
    fresh = batch.fresh_leaves()
    margin = torch.tensor([0.5, -0.5, 1.0, 0.1], dtype=torch.float64)
    out = _call(fresh, loss_type="tdpo2", margin=margin)
    loss, _ = tdpo_oracle(token_quantities(batch), beta=0.1, alpha=0.5, tdpo2=True, margin=margin)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _backward_both(out, loss, fresh, batch)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    """TDPO2's gradient is that of the formula with sg(D_w), and differs from the one without."""
    batch = make_batch(rows=2 * N_PAIRS, seed=23)
    fresh = batch.fresh_leaves()
    _call(fresh, loss_type="tdpo2", tdpo_alpha=0.7).loss.backward()

    def oracle_grad(detach):
        b = batch.fresh_leaves()
        loss, _ = tdpo_oracle(token_quantities(b), beta=0.1, alpha=0.7, tdpo2=True, detach_chosen_kl=detach)
        return torch.autograd.grad(loss, b.hidden)[0]

    with_sg, without_sg = oracle_grad(True), oracle_grad(False)
    torch.testing.assert_close(fresh.hidden.grad, with_sg, **TOL)
    assert (with_sg - without_sg).abs().max() > 1e-4  # the check above can tell them apart

    # directly: the chosen rows' gradient comes only through their log-probs, none through D_w.
    # dL/du_w = -β σ(-β z) / B with z the TDPO logit, so the chosen rows' hidden gradient must be
    # that coefficient times d(sum of chosen log-probs)/dh.
    b = batch.fresh_leaves()
    tok = token_quantities(b)
    u = tok["logp"].sum(1) - tok["ref_logp"].sum(1)
    d = (tok["kl"] * tok["mask"]).sum(1)
    u_w, u_l = u.chunk(2)
    d_w, d_l = d.chunk(2)
    z = (u_w - u_l) - 0.7 * (d_l - d_w)
    coefficient = (-0.1 * torch.sigmoid(-0.1 * z) / N_PAIRS).detach()
    through_logps_only = torch.autograd.grad((coefficient * u_w).sum(), b.hidden)[0]
    torch.testing.assert_close(fresh.hidden.grad[:N_PAIRS], through_logps_only[:N_PAIRS], **TOL)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.1), (0.5, 0.05)])
def test_spo_on_the_pair(alpha, beta):
    batch = make_batch(rows=2 * N_PAIRS, seed=24)
    fresh = batch.fresh_leaves()
    out = _call(fresh, loss_type="spo", spo_alpha=alpha, beta=beta)
    loss, metrics = spo_oracle(token_quantities(batch), beta=beta, alpha=alpha)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _check_metrics(out, metrics)
    _backward_both(out, loss, fresh, batch)


def test_spo_with_on_policy_samples_and_margin():
    batch = make_batch(rows=2 * N_PAIRS, seed=25)
    g = torch.Generator().manual_seed(26)
    samples, T = 3, 5
    sample_hidden = torch.randn(samples, T, 16, generator=g, dtype=torch.float64)
    sample_ref_hidden = sample_hidden + 0.3 * torch.randn(samples, T, 16, generator=g, dtype=torch.float64)
    sample_labels = make_labels(samples, T, 37, g)
    margin = torch.tensor([0.2, 0.0, -0.4, 1.0], dtype=torch.float64)
    fresh = batch.fresh_leaves()
    s_fresh = sample_hidden.clone().requires_grad_(True)
    out = _call(fresh, loss_type="spo", spo_alpha=0.8, beta=0.3, margin=margin, sample_hidden=s_fresh,
                sample_ref_hidden=sample_ref_hidden, sample_labels=sample_labels)
    s_oracle = sample_hidden.clone().requires_grad_(True)
    sample_tok = token_quantities(batch, hidden=s_oracle, ref_hidden=sample_ref_hidden, labels=sample_labels)
    loss, metrics = spo_oracle(token_quantities(batch), beta=0.3, alpha=0.8, sample_tok=sample_tok, margin=margin)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _check_metrics(out, metrics)
    _backward_both(out, loss, fresh, batch)
    torch.testing.assert_close(s_fresh.grad, s_oracle.grad, **TOL)


def test_sppo_soft_win_rates():
    batch = make_batch(rows=2 * N_PAIRS, seed=27)
    fresh = batch.fresh_leaves()
    p_w = torch.tensor([0.9, 0.6, 0.55, 1.0], dtype=torch.float64)
    p_l = torch.tensor([0.1, 0.5, 0.45, 0.0], dtype=torch.float64)
    out = _call(fresh, loss_type="sppo", beta=0.5, chosen_win_prob=p_w, rejected_win_prob=p_l)
    loss = sppo_oracle(token_quantities(batch), beta=0.5, p_w=p_w, p_l=p_l)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _backward_both(out, loss, fresh, batch)


def test_sppo_at_hard_win_rates_is_half_of_trl_sppo_hard():
    batch = make_batch(rows=2 * N_PAIRS, seed=28)
    ones, zeros = torch.ones(N_PAIRS, dtype=torch.float64), torch.zeros(N_PAIRS, dtype=torch.float64)
    soft = _call(batch, loss_type="sppo", chosen_win_prob=ones, rejected_win_prob=zeros).loss
    hard = _call(batch, loss_type="sppo_hard").loss
    torch.testing.assert_close(2 * soft, hard, **TOL)


@pytest.mark.parametrize("loss_type", ["tdpo2", "spo"])
def test_gradients_equal_the_reference_impl(loss_type):
    batch = make_batch(rows=2 * N_PAIRS, seed=29, bias=True)
    losses, grads = [], []
    for impl in ("torch", "reference"):
        fresh = batch.fresh_leaves()
        out = _call(fresh, loss_type=loss_type, impl=impl)
        out.loss.backward()
        losses.append(out.loss)
        grads.append([t.grad for t in fresh.leaves()])
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)
