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
    want_grads = torch.autograd.grad(want, (h, w))
    assert max_rel_err(out.loss, want) < 1e-10
    for got, ref in zip(grads, want_grads):
        assert max_rel_err(got, ref) < 1e-9
    # Liger's own loss on the same inputs, in one chunk (Liger broadcasts a [B] kl against each
    # chunk's examples, so only a whole-batch chunk pairs them up)
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    liger = liger_kto.LigerFusedLinearKTOFunction.apply(h2, w2, y, desirable, None, rh, rw, None, kl, -100, 0.2,
                                                       False, True, False, 3)[0]
    liger_grads = torch.autograd.grad(liger, (h2, w2))
    assert max_rel_err(out.loss, liger) < LIGER_TOL
    for got, ref in zip(grads, liger_grads):
        assert max_rel_err(got, ref) < LIGER_TOL


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
