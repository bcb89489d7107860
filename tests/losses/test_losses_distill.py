"""`distill_loss` vs TRL GKDTrainer.generalized_jsd_loss run on materialised float64 logits."""
import pytest
import torch

import fpo_ops
from loss_batches import IGNORE, make_batch
from loss_oracle import teacher_student_logits

gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")

TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_trl_generalized_jsd(beta, temperature):
    batch = make_batch(rows=5, seed=51, ref_H=13, bias=True)
    fresh = batch.fresh_leaves()
    out = fpo_ops.distill_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                               bias=fresh.bias, teacher_bias=fresh.ref_bias, beta=beta, temperature=temperature,
                               impl="torch")
    student, teacher = teacher_student_logits(batch)
    expected = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=batch.labels, beta=beta,
                                                   temperature=temperature)
    assert expected.item() > 0
    torch.testing.assert_close(out, expected, **TOL)
    c = torch.tensor(1.7, dtype=torch.float64)
    (c * out).backward()
    (c * expected).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)


def test_num_items_in_batch_and_empty_batch():
    batch = make_batch(rows=3, seed=52)
    out = fpo_ops.distill_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                               num_items_in_batch=torch.tensor(40), impl="torch")
    student, teacher = teacher_student_logits(batch)
    expected = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=batch.labels,
                                                   num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(out, expected, **TOL)
    empty = torch.full_like(batch.labels, IGNORE)
    zero = fpo_ops.distill_loss(batch.hidden, batch.weight, empty, batch.ref_hidden, batch.ref_weight, impl="torch")
    assert zero.item() == 0.0
    zero.backward()
    assert batch.hidden.grad.abs().max() == 0


def test_gradients_equal_the_reference_impl():
    batch = make_batch(rows=4, seed=53, head={"softcap": 4.0, "ref_softcap": 3.0})
    grads = []
    for impl in ("torch", "reference"):
        fresh = batch.fresh_leaves()
        fpo_ops.distill_loss(fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight,
                             beta=0.4, temperature=0.9, softcap=4.0, teacher_softcap=3.0, impl=impl).backward()
        grads.append([t.grad for t in fresh.leaves()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_return_entropy_matches_the_oracle_with_gradients(beta):
    batch = make_batch(rows=4, seed=53, ref_H=13, bias=True)
    fresh = batch.fresh_leaves()
    loss, entropy = fpo_ops.distill_loss(
        fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight, bias=fresh.bias,
        teacher_bias=fresh.ref_bias, beta=beta, temperature=0.8, impl="torch", return_entropy=True)
    expected_loss = fpo_ops.distill_loss(
        batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight, bias=batch.bias,
        teacher_bias=batch.ref_bias, beta=beta, temperature=0.8, impl="reference")
    expected_entropy = fpo_ops.token_stats(
        batch.hidden, batch.weight, batch.labels, bias=batch.bias, temperature=0.8, outputs=("entropy",),
        impl="reference").entropy
    torch.testing.assert_close(loss, expected_loss, **TOL)
    torch.testing.assert_close(entropy, expected_entropy, **TOL)
    assert (entropy[batch.labels == IGNORE] == 0).all() and (entropy[batch.labels != IGNORE] > 0).all()
    upstream = torch.randn(entropy.shape, dtype=entropy.dtype, generator=torch.Generator().manual_seed(5))
    (1.3 * loss + (upstream * entropy).sum()).backward()
    (1.3 * expected_loss + (upstream * expected_entropy).sum()).backward()
    for mine, ref in zip(fresh.leaves(), batch.leaves()):
        if ref.grad is not None:
            torch.testing.assert_close(mine.grad, ref.grad, **TOL)
