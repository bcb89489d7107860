"""`linear_cross_entropy` against float64 `F.cross_entropy` on the materialised logits, every option and impl."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fpo_ops

# Odd sizes: V not a multiple of any block, H not a power of two.
B, T, H, V = 2, 7, 20, 37
HEADS = {
    "plain": dict(),
    "biased_capped": dict(bias=True, softcap=2.5, logit_scale=1.3, temperature=0.7),
}


def make_inputs(head, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(B, T, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if head.get("bias") else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -1] = -100
    return hidden, weight, bias, labels


def oracle(hidden, weight, bias, labels, *, reduction, label_smoothing, z_loss, shift, softcap=None,
           logit_scale=1.0, temperature=1.0):
    """(loss, lse) from float64 logits and F.cross_entropy, lse 0 where ignored."""
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    valid = labels != -100
    lse = torch.where(valid, torch.logsumexp(z, -1), torch.zeros((), dtype=z.dtype))
    ce = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), label_smoothing=label_smoothing,
                         reduction="none").reshape(labels.shape)
    per_token = ce + z_loss * lse * lse
    if reduction == "none":
        return per_token, lse
    if reduction == "sum":
        return per_token.sum(), lse
    # F.cross_entropy's own mean, so that the check is against torch's reduction rule
    mean = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), label_smoothing=label_smoothing)
    return mean + z_loss * (lse * lse).sum() / valid.sum(), lse


def run(fn, hidden, weight, bias, labels, return_lse, **options):
    """Loss, lse and the gradients of a random combination of both."""
    out = fn(hidden, weight, labels, bias=bias, return_lse=return_lse, **options)
    loss, lse = out if return_lse else (out, None)
    g = torch.Generator().manual_seed(11)
    upstream = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) + 1.5
    total = (upstream * loss).sum()
    if lse is not None:
        total = total + (torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype) * lse).sum()
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    return loss, lse, torch.autograd.grad(total, inputs)


def ours(impl, head):
    options = {k: v for k, v in head.items() if k != "bias"}

    def fn(hidden, weight, labels, **kwargs):
        return fpo_ops.linear_cross_entropy(hidden, weight, labels, impl=impl, **options, **kwargs)
    return fn


def reference_fn(head, **fixed):
    options = {k: v for k, v in head.items() if k != "bias"}

    def fn(hidden, weight, labels, bias=None, return_lse=False, **kwargs):
        loss, lse = oracle(hidden, weight, bias, labels, **options, **fixed, **kwargs)
        return (loss, lse) if return_lse else loss
    return fn


def check(impl, head, reduction, label_smoothing, z_loss, shift, return_lse, dtype=torch.float64, tol=1e-10):
    hidden, weight, bias, labels = make_inputs(head, dtype)
    options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, shift=shift)
    got = run(ours(impl, head), hidden, weight, bias, labels, return_lse, **options)
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    exact_bias = None if bias is None else bias.detach().double().requires_grad_()
    want = run(reference_fn(head), *exact, exact_bias, labels, return_lse, **options)
    assert got[0].shape == want[0].shape == (() if reduction != "none" else labels[..., 1:].shape if shift
                                             else labels.shape)
    torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol)
    if return_lse:
        torch.testing.assert_close(got[1].double(), want[1], rtol=tol, atol=tol)
    for name, a, b in zip(("hidden", "weight", "bias"), got[2], want[2]):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale, msg=lambda m: f"d{name}: {m}")


GRID = list(itertools.product(list(HEADS), ["mean", "sum", "none"], [0.0, 0.2], [0.0, 1e-2], [False, True]))


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("head,reduction,label_smoothing,z_loss,shift", GRID)
def test_float64_equals_cross_entropy_of_the_logits(impl, head, reduction, label_smoothing, z_loss, shift):
    check(impl, HEADS[head], reduction, label_smoothing, z_loss, shift, return_lse=False)


# Triton through the interpreter: fp32 at small shapes, each option on at least once.
TRITON_CASES = [
    ("plain", "mean", 0.0, 0.0, False, False),
    ("biased_capped", "sum", 0.2, 0.0, True, False),
    ("biased_capped", "none", 0.1, 0.0, False, False),
    ("biased_capped", "mean", 0.3, 1e-2, True, True),
    ("plain", "none", 0.0, 1e-2, False, True),
]


@pytest.mark.parametrize("head,reduction,label_smoothing,z_loss,shift,return_lse", TRITON_CASES)
def test_triton_float32_within_tolerance_of_float64(head, reduction, label_smoothing, z_loss, shift, return_lse):
    pytest.importorskip("triton")
    check("triton", HEADS[head], reduction, label_smoothing, z_loss, shift, return_lse, dtype=torch.float32, tol=2e-5)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_lse_is_the_log_sum_exp_with_its_gradient(impl, reduction):
    check(impl, HEADS["biased_capped"], reduction, 0.1, 1e-2, True, return_lse=True)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_extreme_logits_and_a_single_token(impl):
    head = HEADS["plain"]
    hidden, weight, bias, labels = make_inputs(head, scale=300.0)  # logits of order 1e4
    options = dict(reduction="mean", label_smoothing=0.1, z_loss=0.0, shift=False)
    got = run(ours(impl, head), hidden, weight, bias, labels, False, **options)
    want = run(reference_fn(head), hidden, weight, bias, labels, False, **options)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-8)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(b.abs().max().item(), 1.0))
    one = fpo_ops.linear_cross_entropy(hidden[0, 4], weight, labels[0, 4], impl=impl, label_smoothing=0.3)
    torch.testing.assert_close(one, F.cross_entropy(hidden[0, 4] @ weight.T, labels[0, 4], label_smoothing=0.3))


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_position_ignored_as_torch(impl, reduction):
    """Mean: NaN, as F.cross_entropy (0 / 0); sum: 0; none: zeros. Gradients are 0 in every case."""
    hidden, weight, _, labels = make_inputs(HEADS["plain"])
    labels = torch.full_like(labels, -100)
    got = fpo_ops.linear_cross_entropy(hidden, weight, labels, impl=impl, label_smoothing=0.2, reduction=reduction)
    want = F.cross_entropy((hidden @ weight.T).reshape(-1, V), labels.reshape(-1), label_smoothing=0.2,
                           reduction=reduction).reshape(got.shape)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert (torch.isnan(got).all() if reduction == "mean" else not torch.isnan(got).any())
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_custom_ignore_index_and_exported():
    hidden, weight, _, labels = make_inputs(HEADS["plain"])
    labels = labels.masked_fill(labels == -100, 5)
    labels[0, 0] = 7
    got = fpo_ops.linear_cross_entropy(hidden, weight, labels, ignore_index=7, impl="torch")
    want = F.cross_entropy((hidden @ weight.T).reshape(-1, V), labels.reshape(-1), ignore_index=7)
    torch.testing.assert_close(got, want)
    assert fpo_ops.losses.linear_cross_entropy is fpo_ops.linear_cross_entropy


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(reduction="avg"), ValueError, r"^reduction: expected one of \['mean', 'sum', 'none'\], got 'avg'"),
    (dict(label_smoothing=1.5), ValueError, r"^label_smoothing: expected a finite value in \[0.0, 1.0\], got 1.5"),
    (dict(label_smoothing=-0.1), ValueError, r"^label_smoothing: expected"),
    (dict(z_loss=-1e-4), ValueError, r"^z_loss: expected a finite value in \[0.0, inf"),
    (dict(label_smoothing="0.1"), TypeError, r"^label_smoothing: expected a float, got str"),
    (dict(shift=1), TypeError, r"^shift: expected a bool"),
])
def test_bad_options_name_the_argument(kwargs, error, match):
    hidden, weight, _, labels = make_inputs(HEADS["plain"])
    with pytest.raises(error, match=match):
        fpo_ops.linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_module_fixes_the_options_and_checks_them_at_construction():
    hidden, weight, bias, labels = make_inputs(HEADS["plain"])
    module = fpo_ops.LinearCrossEntropy(label_smoothing=0.1, reduction="sum", shift=True, impl="torch")
    torch.testing.assert_close(module(hidden, weight, labels), fpo_ops.linear_cross_entropy(
        hidden, weight, labels, label_smoothing=0.1, reduction="sum", shift=True, impl="torch"))
    torch.testing.assert_close(module(hidden, weight, labels, reduction="mean"), fpo_ops.linear_cross_entropy(
        hidden, weight, labels, label_smoothing=0.1, shift=True, impl="torch"))
    with pytest.raises(ValueError, match=r"^label_smoothing: expected"):
        fpo_ops.LinearCrossEntropy(label_smoothing=2.0)
    with pytest.raises(TypeError, match=r"^LinearCrossEntropy: expected keyword options .* \['lse_square_scale'\]"):
        fpo_ops.LinearCrossEntropy(lse_square_scale=1e-4)


def test_shift_needs_two_positions():
    hidden, weight, _, labels = make_inputs(HEADS["plain"])
    with pytest.raises(ValueError, match=r"^shift: expected labels with at least 2 positions"):
        fpo_ops.linear_cross_entropy(hidden[:, :1], weight, labels[:, :1], shift=True)
    with pytest.raises(ValueError, match=r"^shift: expected hidden of shape \[..., T, H\]"):
        fpo_ops.linear_cross_entropy(hidden[0, 0], weight, labels[0, :2], shift=True)


def _vocab_parallel_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    from fpo_ops.token_stats import chunked

    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 5, 4  # several partial tiles on each slice
    head = HEADS["biased_capped"]
    hidden, weight, bias, labels = make_inputs(head)
    start, stop = (0, V // 3) if rank == 0 else (V // 3, V)  # uneven slices
    options = dict(reduction="mean", label_smoothing=0.2, z_loss=1e-2, shift=True)
    local_w = weight.detach()[start:stop].clone().requires_grad_()
    local_b = bias.detach()[start:stop].clone().requires_grad_()
    fn = ours("torch", head)
    got = run(lambda *a, **k: fn(*a, process_group=dist.group.WORLD, **k), hidden, local_w, local_b, labels,
              True, **options)
    want = run(reference_fn(head), hidden, weight, bias, labels, True, **options)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)  # the whole vocabulary's lse
    # dhidden whole on every process, dweight and dbias this slice's rows
    for a, b in zip(got[2], (want[2][0], want[2][1][start:stop], want[2][2][start:stop])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * max(b.abs().max().item(), 1.0))


@pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)
def test_vocab_parallel_head_equals_one_process():
    """Label smoothing, z-loss and lse over a vocabulary split (log V and lse the whole vocabulary's), on 2
    gloo processes, equal to the float64 oracle with dhidden whole and dweight/dbias per slice."""
    from distributed_launch import launch

    launch(_vocab_parallel_worker, 2)
