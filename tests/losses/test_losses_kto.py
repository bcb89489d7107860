"""`kto_loss` vs a float64 transcription of TRL's KTOTrainer loss and metrics."""
import pytest
import torch

import fpo_ops
from loss_batches import make_batch, make_labels
from loss_oracle import kto_oracle, token_quantities

TOL = dict(rtol=1e-9, atol=1e-9)
ROWS = 6


def _kl_sequences(batch, seed):
    g = torch.Generator().manual_seed(seed)
    T, H = batch.hidden.shape[1], batch.hidden.shape[2]
    kl_hidden = torch.randn(ROWS, T, H, generator=g, dtype=torch.float64)
    kl_ref_hidden = kl_hidden - 0.5 + 0.3 * torch.randn(ROWS, T, H, generator=g, dtype=torch.float64)
    kl_labels = make_labels(ROWS, T, batch.weight.shape[0], g)
    return kl_hidden, kl_ref_hidden, kl_labels


@pytest.mark.parametrize("loss_type,options", [
    ("kto", {}), ("kto", {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7}),
    ("apo_zero_unpaired", {"beta": 0.3}),
])
def test_matches_trl(loss_type, options):
    batch = make_batch(rows=ROWS, seed=41)
    desirable = torch.tensor([True, False, True, True, False, True])  # 4 vs 2: unequal sides
    kl_hidden, kl_ref_hidden, kl_labels = _kl_sequences(batch, 42)
    fresh = batch.fresh_leaves()
    out = fpo_ops.kto_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                           desirable=desirable, kl_hidden=kl_hidden, kl_labels=kl_labels,
                           kl_ref_hidden=kl_ref_hidden, loss_type=loss_type, impl="torch", **options)
    kl_tok = token_quantities(batch, hidden=kl_hidden, ref_hidden=kl_ref_hidden, labels=kl_labels)
    loss, metrics = kto_oracle(token_quantities(batch), desirable, loss_type=loss_type, kl_tok=kl_tok,
                               **{"beta": 0.1, **options})
    if loss_type == "kto":
        assert metrics["kl"] > 0  # the clamp at 0 is not all the test sees
    torch.testing.assert_close(out.loss, loss, **TOL)
    assert set(out.metrics) == set(metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(out.metrics[name], value.to(out.metrics[name].dtype), **TOL, msg=name)
    c = torch.tensor(0.77, dtype=torch.float64)
    (c * out.loss).backward()
    (c * loss).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)


def test_reference_point_is_clamped_at_zero_and_precomputed_logps():
    batch = make_batch(rows=ROWS, seed=43)
    desirable = torch.tensor([False, True, False, False, True, False])
    kl_hidden, kl_ref_hidden, kl_labels = _kl_sequences(batch, 44)
    tok = token_quantities(batch)
    kl_tok = token_quantities(batch, hidden=kl_hidden, ref_hidden=kl_ref_hidden, labels=kl_labels)
    ref_logps = tok["ref_logp"].sum(1).detach()
    # a large precomputed reference log-prob for the mismatched sequences drives the mean KL below 0
    ref_kl_logps = kl_tok["logp"].sum(1).detach() + 3.0
    fresh = batch.fresh_leaves()
    out = fpo_ops.kto_loss(fresh.hidden, fresh.weight, fresh.labels, desirable=desirable, kl_hidden=kl_hidden,
                           kl_labels=kl_labels, ref_logps=ref_logps, ref_kl_logps=ref_kl_logps, impl="torch")
    loss, metrics = kto_oracle(tok, desirable, beta=0.1, kl_tok=kl_tok, ref_logps=ref_logps,
                               ref_kl_logps=ref_kl_logps)
    assert out.metrics["kl"].item() == 0.0
    torch.testing.assert_close(out.loss, loss, **TOL)
    for name, value in metrics.items():
        torch.testing.assert_close(out.metrics[name], value.to(out.metrics[name].dtype), **TOL, msg=name)


def test_gradients_equal_the_reference_impl():
    batch = make_batch(rows=ROWS, seed=45, bias=True)
    desirable = torch.tensor([True, True, False, True, False, False])
    kl_hidden, kl_ref_hidden, kl_labels = _kl_sequences(batch, 46)
    grads = []
    for impl in ("torch", "reference"):
        fresh = batch.fresh_leaves()
        fpo_ops.kto_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                         bias=fresh.bias, desirable=desirable, kl_hidden=kl_hidden, kl_labels=kl_labels,
                         kl_ref_hidden=kl_ref_hidden, impl=impl).loss.backward()
        grads.append([t.grad for t in fresh.leaves()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)
