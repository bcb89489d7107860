"""TDPO, SPO and soft SPPO through `preference_loss` vs float64 formulas from the papers' code."""
import pytest
import torch

import fpo_ops
from loss_batches import head_kwargs, make_batch, make_labels
from loss_oracle import spo_exact_regulariser, sppo_oracle, spo_oracle, tdpo_oracle, token_quantities

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


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.05), (1.0, 0.1), (2.0, 0.2)])
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


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_spo_preference_term_is_one_over_alpha_log_softmax(alpha):
    """-(1/α) log(π_w^α / (π_w^α + π_l^α)) with the regulariser weighted out (per-pair weights μ), and
    its gradient scale: at equal log-probs d/dS_w = 1/2 whatever α."""
    batch = make_batch(rows=2 * N_PAIRS, seed=30)
    fresh = batch.fresh_leaves()
    mu = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    out = _call(fresh, loss_type="spo", spo_alpha=alpha, beta=0.2, spo_weight=mu)
    loss, metrics = spo_oracle(token_quantities(batch), beta=0.2, alpha=alpha, pair_weight=mu)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _check_metrics(out, metrics)
    _backward_both(out, loss, fresh, batch)
    from fpo_ops.losses.token_level import spo_preference_loss
    s = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    spo_preference_loss(s, torch.zeros(1, dtype=torch.float64), alpha).sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([-0.5], dtype=torch.float64), **TOL)


def _toy_sequence_model(seed, V, H, T):
    g = torch.Generator().manual_seed(seed)
    tables = [torch.randn(V, H, generator=g, dtype=torch.float64), torch.randn(T, H, generator=g, dtype=torch.float64)]
    ref_tables = [t + 0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64) for t in tables]
    return tables, ref_tables


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_spo_regulariser_on_policy_samples_with_the_score_function_is_the_exact_gradient(impl):
    """All V^T sequences of a toy autoregressive policy as the samples, weighted by π_θ(y): the
    regulariser's value is E_{y~π_θ}[Σ_t KL(π_θ‖π_ref)] and, with the score-function term, its gradient
    is the exact gradient of that expectation (summed in float64 over every sequence); without it the
    gradient is only the per-token distribution term, which differs."""
    V, H, T = 7, 16, 3
    batch = make_batch(rows=2 * N_PAIRS, seed=31, V=V, H=H)
    (embed, position), (ref_embed, ref_position) = _toy_sequence_model(32, V, H, T)
    beta, alpha = 0.3, 1.5

    def ours(score_function):
        fresh = batch.fresh_leaves()
        e, p = embed.clone().requires_grad_(True), position.clone().requires_grad_(True)
        _, sequences, hidden, ref_hidden, probs = spo_exact_regulariser(
            e, p, fresh.weight, ref_embed, ref_position, batch.ref_weight, start=0)
        out = fpo_ops.preference_loss(
            fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight, loss_type="spo",
            beta=beta, spo_alpha=alpha, sample_hidden=hidden, sample_ref_hidden=ref_hidden, sample_labels=sequences,
            sample_weights=probs.detach(), spo_score_function=score_function, impl=impl,
        )
        out.loss.backward()
        return out, [fresh.hidden.grad, fresh.weight.grad, e.grad, p.grad]

    oracle_batch = batch.fresh_leaves()
    e, p = embed.clone().requires_grad_(True), position.clone().requires_grad_(True)
    exact, *_ = spo_exact_regulariser(e, p, oracle_batch.weight, ref_embed, ref_position, batch.ref_weight, start=0)
    preference, _ = spo_oracle(token_quantities(oracle_batch), beta=beta, alpha=alpha,
                               sample_tok={"reverse_kl": torch.zeros(1, 1, dtype=torch.float64)})
    oracle_loss = preference + beta * exact
    oracle_loss.backward()
    expected = [oracle_batch.hidden.grad, oracle_batch.weight.grad, e.grad, p.grad]

    out, grads = ours(score_function=True)
    torch.testing.assert_close(out.loss, oracle_loss, **TOL)
    torch.testing.assert_close(out.metrics["reverse_kl"], exact.detach(), **TOL)
    for mine, ref in zip(grads, expected):
        torch.testing.assert_close(mine, ref, **TOL)
    out, grads = ours(score_function=False)
    torch.testing.assert_close(out.loss, oracle_loss, **TOL)
    assert (grads[2] - expected[2]).abs().max() > 1e-3  # the score-function term matters


def test_spo_regulariser_on_samples_without_score_function_holds_the_samples_fixed():
    """Sampled sequences as given (uniform weights): gradient of Σ_t KL(π_θ‖π_ref) at the fixed prefixes."""
    V, H, T = 7, 16, 3
    batch = make_batch(rows=2 * N_PAIRS, seed=33, V=V, H=H)
    (embed, position), (ref_embed, ref_position) = _toy_sequence_model(34, V, H, T)
    g = torch.Generator().manual_seed(35)
    sequences = torch.randint(0, V, (5, T), generator=g)
    sequences[1, 2] = -100                         # a shorter sample
    previous = torch.cat([torch.zeros(5, 1, dtype=torch.long), sequences.clamp(min=0)[:, :-1]], dim=1)
    fresh = batch.fresh_leaves()
    hidden = (embed[previous] + position).requires_grad_(True)
    ref_hidden = ref_embed[previous] + ref_position
    out = _call(fresh, loss_type="spo", beta=0.4, spo_alpha=0.5, sample_hidden=hidden, sample_ref_hidden=ref_hidden,
                sample_labels=sequences)
    oracle_hidden = hidden.detach().clone().requires_grad_(True)
    sample_tok = token_quantities(batch, hidden=oracle_hidden, ref_hidden=ref_hidden, labels=sequences)
    loss, metrics = spo_oracle(token_quantities(batch), beta=0.4, alpha=0.5, sample_tok=sample_tok)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _check_metrics(out, metrics)
    _backward_both(out, loss, fresh, batch)
    torch.testing.assert_close(hidden.grad, oracle_hidden.grad, **TOL)


def test_sppo_soft_win_rates():
    batch = make_batch(rows=2 * N_PAIRS, seed=27)
    fresh = batch.fresh_leaves()
    p_w = torch.tensor([0.9, 0.6, 0.55, 1.0], dtype=torch.float64)
    p_l = torch.tensor([0.1, 0.5, 0.45, 0.0], dtype=torch.float64)
    out = _call(fresh, loss_type="sppo", beta=0.5, chosen_win_prob=p_w, rejected_win_prob=p_l)
    loss = sppo_oracle(token_quantities(batch), beta=0.5, p_w=p_w, p_l=p_l)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _backward_both(out, loss, fresh, batch)


def test_sppo_single_pair_probability():
    batch = make_batch(rows=2 * N_PAIRS, seed=36)
    fresh = batch.fresh_leaves()
    p = torch.tensor([0.9, 0.6, 0.3, 1.0], dtype=torch.float64)
    out = _call(fresh, loss_type="sppo_single", beta=0.4, pair_win_prob=p)
    loss = sppo_oracle(token_quantities(batch), beta=0.4, p_pair=p)
    torch.testing.assert_close(out.loss, loss, **TOL)
    _backward_both(out, loss, fresh, batch)
    # P = 1 gives the targets ±1/(2β) of the hard version: half of TRL's sppo_hard
    ones = torch.ones(N_PAIRS, dtype=torch.float64)
    hard = _call(batch, loss_type="sppo_hard", beta=0.4).loss
    soft = _call(batch, loss_type="sppo_single", beta=0.4, pair_win_prob=ones).loss
    torch.testing.assert_close(2 * soft, hard, **TOL)


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
