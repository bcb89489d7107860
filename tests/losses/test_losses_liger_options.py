"""Options Liger-Kernel's users pass, against the float64 oracle (``impl="reference"``) in every
implementation and against Liger's own chunked loss on the same inputs (pure PyTorch, CPU; it
computes its log-softmax in fp32, hence the fp32-level tolerance against it)."""
import pytest
import torch

from fpo_ops.losses import kto_loss
from stats_cases import max_rel_err, poisoned_allocations  # noqa: F401  (autouse fixture)

liger_kto = pytest.importorskip("liger_kernel.chunked_loss.kto_loss")

IMPLS = ("reference", "torch", "triton")
LIGER_TOL = 1e-5  # Liger's fp32 log-softmax against float64


def _assert_oracle(loss, grads, want, inputs):
    """``loss`` and its ``grads`` with respect to ``inputs`` equal the float64 oracle ``want``'s."""
    want_grads = torch.autograd.grad(want, inputs)
    assert max_rel_err(loss, want) < 1e-10
    for got, ref in zip(grads, want_grads):
        assert max_rel_err(got, ref) < 1e-9


def _assert_liger(loss, grads, liger, h, w):
    """``loss`` and its gradients with respect to (h, w) equal Liger's ``liger(h, w)`` (a scalar loss,
    run on detached copies) to Liger's fp32 level."""
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    theirs = liger(h2, w2)
    liger_grads = torch.autograd.grad(theirs, (h2, w2))
    assert max_rel_err(loss, theirs) < LIGER_TOL
    for got, ref in zip(grads, liger_grads):
        assert max_rel_err(got, ref) < LIGER_TOL


def _unpaired(seed=0, n=3, t=6, hidden_size=16, vocab=21):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, t, hidden_size, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    rh = torch.randn(n, t, hidden_size, generator=g, dtype=torch.float64)
    rw = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.7
    y = torch.randint(0, vocab, (n, t), generator=g)
    y[:, :2] = -100          # prompt
    y[1, -1] = -100          # ragged completion
    return h, w, y, rh, rw


@pytest.mark.parametrize("kl_shape", [(), (3,)], ids=["scalar", "per_example"])
@pytest.mark.parametrize("impl", IMPLS)
def test_kto_precomputed_reference_point(impl, kl_shape):
    """``kl=``: Liger's precomputed reference point z, used as given (no clamp), no gradient."""
    h, w, y, rh, rw = _unpaired()
    desirable = torch.tensor([True, False, True])
    kl = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64)[: (3 if kl_shape else 1)].reshape(kl_shape)
    out = kto_loss(h, w, y, rh, rw, desirable=desirable, kl=kl, beta=0.2, impl=impl)
    grads = torch.autograd.grad(out.loss, (h, w))
    # the oracle: the formula on float64 sequence log-ratios
    logp = torch.log_softmax(h @ w.T, -1)
    logq = torch.log_softmax(rh @ rw.T, -1)
    mask = y != -100
    safe = y.clamp_min(0)[..., None]
    ratio = ((logp.gather(-1, safe)[..., 0] - logq.gather(-1, safe)[..., 0]) * mask).sum(-1)
    sign = torch.where(desirable, 1.0, -1.0).double()
    want = (1 - torch.sigmoid(0.2 * (ratio - kl) * sign)).mean()
    _assert_oracle(out.loss, grads, want, (h, w))
    # Liger's own loss on the same inputs, in one chunk (Liger broadcasts a [B] kl against each
    # chunk's examples, so only a whole-batch chunk pairs them up)
    _assert_liger(out.loss, grads, lambda h2, w2: liger_kto.LigerFusedLinearKTOFunction.apply(
        h2, w2, y, desirable, None, rh, rw, None, kl, -100, 0.2, False, True, False, 3)[0], h, w)


def test_kto_kl_bad_input():
    h, w, y, rh, rw = _unpaired()
    desirable = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match=r"kl: expected shape \(\) or \(3,\), got \(2,\)"):
        kto_loss(h, w, y, rh, rw, desirable=desirable, kl=torch.zeros(2, dtype=torch.float64), impl="torch")
    with pytest.raises(ValueError, match="kl_hidden, kl_labels, kl_ref_hidden, ref_kl_logps: expected None"):
        kto_loss(h, w, y, rh, rw, desirable=desirable, kl=torch.tensor(0.1), kl_hidden=h, kl_labels=y,
                 impl="torch")
    with pytest.raises(ValueError, match="kl: the reference point is used by loss_type 'kto' only"):
        kto_loss(h, w, y, rh, rw, desirable=desirable, kl=torch.tensor(0.1), loss_type="apo_zero_unpaired",
                 impl="torch")


def _pairs(seed=1, pairs=2, t=7, hidden_size=16, vocab=23):
    h, w, y, rh, rw = _unpaired(seed, 2 * pairs, t, hidden_size, vocab)
    y[0, 2:4] = -100         # chosen and rejected lengths differ
    return h, w, y, rh, rw


def _avg_logratios(h, w, y, rh, rw):
    """Per-token-mean log-ratios [2B] from float64 logits (the oracle of average_log_prob)."""
    logp = torch.log_softmax(h @ w.T, -1)
    logq = torch.log_softmax(rh @ rw.T, -1)
    mask = y != -100
    safe = y.clamp_min(0)[..., None]
    per_token = (logp.gather(-1, safe)[..., 0] - logq.gather(-1, safe)[..., 0]) * mask
    return per_token.sum(-1) / mask.sum(-1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero", "ipo"])
@pytest.mark.parametrize("impl", IMPLS)
def test_average_log_prob(impl, loss_type):
    """Policy and reference log-probs divided by the completion length before the loss; ipo divides
    once, not twice."""
    from fpo_ops.losses import preference_loss
    liger_dpo = pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")
    h, w, y, rh, rw = _pairs()
    out = preference_loss(h, w, y, rh, rw, loss_type=loss_type, beta=0.3, average_log_prob=True, impl=impl)
    grads = torch.autograd.grad(out.loss, (h, w))
    ratios = _avg_logratios(h, w, y, rh, rw)
    delta = 0.3 * (ratios[:2] - ratios[2:])
    want = {"sigmoid": lambda: -torch.nn.functional.logsigmoid(delta),
            "apo_zero": lambda: (1 - torch.sigmoid(0.3 * ratios[:2])) + torch.sigmoid(0.3 * ratios[2:]),
            "ipo": lambda: (ratios[:2] - ratios[2:] - 1 / (2 * 0.3)) ** 2}[loss_type]().mean()
    _assert_oracle(out.loss, grads, want, (h, w))
    assert max_rel_err(out.chosen_rewards, 0.3 * ratios[:2]) < 1e-10
    if loss_type == "ipo":  # Liger refuses ipo
        return
    _assert_liger(out.loss, grads, lambda h2, w2: liger_dpo.LigerFusedLinearDPOFunction.apply(
        h2, w2, y, None, rh, rw, None, -100, 0.3, False, False, True, True, 1, loss_type)[0], h, w)


def test_average_log_prob_divides_precomputed_reference_log_probs():
    from fpo_ops.losses import preference_loss
    h, w, y, rh, rw = _pairs()
    computed = preference_loss(h, w, y, rh, rw, average_log_prob=True, impl="torch")
    sums = preference_loss(h, w, y, rh, rw, impl="torch")
    given = preference_loss(h, w, y, ref_chosen_logps=sums.ref_chosen_logps, ref_rejected_logps=sums.ref_rejected_logps,
                            average_log_prob=True, impl="torch")
    assert max_rel_err(given.loss, computed.loss) < 1e-12
    with pytest.raises(ValueError, match="ld_alpha: expected None with average_log_prob=True"):
        preference_loss(h, w, y, rh, rw, average_log_prob=True, ld_alpha=0.5, impl="torch")


@pytest.mark.parametrize("loss_type", ["orpo", "cpo"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nll_target(impl, loss_type):
    """ORPO and CPO with the NLL term on a separate target (Liger's ``nll_target``)."""
    from fpo_ops.losses import preference_loss
    liger_mod = pytest.importorskip(f"liger_kernel.chunked_loss.{loss_type}_loss")
    h, w, y, rh, rw = _pairs()
    g = torch.Generator().manual_seed(5)
    nll_target = torch.randint(0, w.shape[0], y.shape, generator=g)
    nll_target[:, :3] = -100
    out = preference_loss(h, w, y, loss_type=loss_type, beta=0.3, nll_target=nll_target, impl=impl)
    grads = torch.autograd.grad(out.loss, (h, w))
    # oracle: the same loss with the NLL term on nll_target, from float64 logits
    logp = torch.log_softmax(h @ w.T, -1)
    mask, nll_mask = y != -100, nll_target != -100
    token = logp.gather(-1, y.clamp_min(0)[..., None])[..., 0] * mask
    nll = -(logp.gather(-1, nll_target.clamp_min(0)[..., None])[..., 0] * nll_mask)[:2].sum() / nll_mask[:2].sum()
    if loss_type == "orpo":
        avg = token.sum(-1) / mask.sum(-1)
        log_odds = (avg[:2] - avg[2:]) - (torch.log1p(-avg[:2].exp()) - torch.log1p(-avg[2:].exp()))
        want = nll - 0.3 * torch.nn.functional.logsigmoid(log_odds).mean()
    else:
        seq = token.sum(-1)
        want = -torch.nn.functional.logsigmoid(0.3 * (seq[:2] - seq[2:])).mean() + nll
    _assert_oracle(out.loss, grads, want, (h, w))
    if loss_type == "cpo":  # the installed Liger's CPO has no nll_target: the oracle only
        return
    _assert_liger(out.loss, grads, lambda h2, w2: liger_mod.LigerFusedLinearORPOFunction.apply(
        h2, w2, y, None, -100, 0.3, True, nll_target, False, 1)[0], h, w)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_distill_hard_and_soft_terms(impl, temperature):
    """``weight_hard_loss * CE(labels, temperature 1) + weight_soft_loss * JSD`` over completion tokens
    (Liger's LigerFusedLinearJSDLoss)."""
    from fpo_ops.losses import distill_loss
    liger_jsd = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")
    h, w, y, rh, rw = _unpaired(seed=3, hidden_size=16)
    rw = rw[:, :16]
    rh = rh[..., :16]
    loss = distill_loss(h, w, y, rh, rw, beta=0.5, weight_hard_loss=0.3, weight_soft_loss=0.7,
                        temperature=temperature, impl=impl)
    grads = torch.autograd.grad(loss, (h, w))
    z, zt = h @ w.T, rh @ rw.T
    mask = y != -100
    logp, logq = torch.log_softmax(z / temperature, -1), torch.log_softmax(zt / temperature, -1)
    logm = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    jsd = 0.5 * (logq.exp() * (logq - logm)).sum(-1) + 0.5 * (logp.exp() * (logp - logm)).sum(-1)
    ce = -torch.log_softmax(z, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    want = ((0.3 * ce + 0.7 * jsd) * mask).sum() / mask.sum()
    _assert_oracle(loss, grads, want, (h, w))

    def liger(h2, w2):
        out = liger_jsd.LigerFusedLinearJSDFunction.apply(h2.reshape(-1, 16), w2, rh.reshape(-1, 16), rw,
                                                          y.reshape(-1), None, None, 0.3, 0.7, 0.5, -100,
                                                          temperature, False)
        return out[0] if isinstance(out, tuple) else out

    _assert_liger(loss, grads, liger, h, w)


def _same_output(got, want, inputs):
    """Equal losses, metrics and gradients with respect to ``inputs`` (same impl, same arithmetic)."""
    got_grads = torch.autograd.grad(got.loss, inputs)
    want_grads = torch.autograd.grad(want.loss, inputs)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    assert got.metrics.keys() == want.metrics.keys()
    for name in want.metrics:
        torch.testing.assert_close(got.metrics[name], want.metrics[name], rtol=0, atol=0)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_kto_module_takes_kl_in_forward(impl):
    """``KTOLoss.forward(..., kl=...)`` is `kto_loss(..., kl=...)`, and the keyword reaches the loss."""
    from fpo_ops.losses import KTOLoss
    h, w, y, rh, rw = _unpaired()
    desirable = torch.tensor([True, False, True])
    kl = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64)
    module = KTOLoss(beta=0.2, impl=impl)
    got = module(h, w, y, rh, rw, desirable=desirable, kl=kl)
    _same_output(got, kto_loss(h, w, y, rh, rw, desirable=desirable, kl=kl, beta=0.2, impl=impl), (h, w))
    without = module(h, w, y, rh, rw, desirable=desirable, kl=torch.zeros(3, dtype=torch.float64))
    assert not torch.allclose(without.loss, got.loss)


@pytest.mark.parametrize("loss_type", ["orpo", "cpo"])
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_preference_module_takes_nll_target_in_forward(impl, loss_type):
    """``PreferenceLoss(loss_type=...).forward(..., nll_target=...)`` is the function with ``nll_target``."""
    from fpo_ops.losses import PreferenceLoss, preference_loss
    h, w, y, _, _ = _pairs()
    g = torch.Generator().manual_seed(5)
    nll_target = torch.randint(0, w.shape[0], y.shape, generator=g)
    nll_target[:, :3] = -100
    module = PreferenceLoss(loss_type=loss_type, beta=0.3, impl=impl)
    got = module(h, w, y, nll_target=nll_target)
    want = preference_loss(h, w, y, loss_type=loss_type, beta=0.3, nll_target=nll_target, impl=impl)
    _same_output(got, want, (h, w))
    assert not torch.allclose(module(h, w, y).loss, got.loss)
