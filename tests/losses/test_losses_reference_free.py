"""SimPO, CPO and ORPO through `preference_loss` vs TRL's CPOTrainer / ORPOTrainer formulas in float64."""
import pytest
import torch

import fpo_ops
from loss_batches import make_batch
from loss_oracle import cpo_oracle, orpo_oracle, token_quantities

TOL = dict(rtol=1e-9, atol=1e-9)
N_PAIRS = 4


def _compare(out, loss, metrics, fresh, batch):
    torch.testing.assert_close(out.loss, loss, **TOL)
    assert set(out.metrics) == set(metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(out.metrics[name], value.to(out.metrics[name].dtype), **TOL, msg=name)
    g = torch.Generator().manual_seed(31)
    r = torch.randn(N_PAIRS, generator=g, dtype=torch.float64)
    (out.loss + (r * out.rejected_logps).sum()).backward()
    return r  # the caller applies the same upstream weights to the oracle


def _oracle_rejected_logps(tok, mean):
    m = tok["mask"].to(tok["logp"].dtype)
    logps = tok["logp"].sum(1) / (m.sum(1) if mean else 1)
    return logps.chunk(2)[1]


@pytest.mark.parametrize("options", [
    {"beta": 2.0, "simpo_gamma": 0.5}, {"beta": 2.5, "simpo_gamma": 1.4, "label_smoothing": 0.1},
    {"beta": 2.0, "simpo_gamma": 0.5, "margin": torch.tensor([0.1, 0.4, -0.3, 0.0], dtype=torch.float64)},
])
def test_simpo(options):
    batch = make_batch(rows=2 * N_PAIRS, seed=31)
    fresh = batch.fresh_leaves()
    # no reference at all
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, loss_type="simpo", impl="torch", **options)
    tok = token_quantities(batch)
    loss, metrics = cpo_oracle(tok, **options)
    r = _compare(out, loss, metrics, fresh, batch)
    (loss + (r * _oracle_rejected_logps(tok, mean=True)).sum()).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)


@pytest.mark.parametrize("options", [{}, {"cpo_alpha": 0.3, "label_smoothing": 0.2, "beta": 0.4},
                                     {"cpo_alpha": 0.0, "margin": torch.tensor([1.0, 0.0, 0.2, -0.2],
                                                                               dtype=torch.float64)}])
def test_cpo(options):
    batch = make_batch(rows=2 * N_PAIRS, seed=32)
    fresh = batch.fresh_leaves()
    # a reference given but unused: CPO stays reference-free, as its trainer
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                                  loss_type="cpo", impl="torch", **options)
    tok = token_quantities(batch)
    loss, metrics = cpo_oracle(tok, **{"beta": 0.1, **options})
    r = _compare(out, loss, metrics, fresh, batch)
    (loss + (r * _oracle_rejected_logps(tok, mean=False)).sum()).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)
    assert out.ref_chosen_logps is None


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo(beta):
    batch = make_batch(rows=2 * N_PAIRS, seed=33, bias=True)
    fresh = batch.fresh_leaves()
    out = fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, loss_type="orpo", beta=beta,
                                  bias=fresh.bias, impl="torch")
    tok = token_quantities(batch)
    loss, metrics = orpo_oracle(tok, beta=beta)
    r = _compare(out, loss, metrics, fresh, batch)
    (loss + (r * _oracle_rejected_logps(tok, mean=True)).sum()).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)


def test_orpo_gradients_equal_the_reference_impl():
    batch = make_batch(rows=2 * N_PAIRS, seed=34)
    grads = []
    for impl in ("torch", "reference"):
        fresh = batch.fresh_leaves()
        fpo_ops.preference_loss(fresh.hidden, fresh.weight, fresh.labels, loss_type=["orpo", "simpo"],
                                loss_weights=[1.0, 0.5], impl=impl).loss.backward()
        grads.append([t.grad for t in fresh.leaves()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)
