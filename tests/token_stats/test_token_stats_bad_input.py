"""Hostile input to `token_stats`: every impl gives the float64 oracle's numbers or a clear error.

impl="triton" runs through the Triton interpreter without CUDA. Values and gradients are compared
with impl="reference" in float64 on well-formed inputs that mean the same thing.
"""
import re

import pytest
import torch

import fpo_ops
from fpo_ops.token_stats import chunked
from stats_cases import (  # noqa: F401  (poisoned_allocations is an autouse fixture)
    ALL_STATS, Case, assert_within_error_budget, ignored_value, make_case, max_abs_err, max_rel_err,
    poisoned_allocations, run,
)

IMPLS = ("torch", "triton")
ALL_IMPLS = IMPLS + ("reference",)
TOL = 1e-9


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks that do not divide the test sizes, so every partial-tile path of impl="torch" runs."""
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 8)
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 16)


def _with(case: Case, **fields) -> Case:
    """A copy of ``case`` with some fields replaced (the others shared)."""
    values = dict(hidden=case.hidden, weight=case.weight, labels=case.labels, ref_hidden=case.ref_hidden,
                  ref_weight=case.ref_weight, bias=case.bias, ref_bias=case.ref_bias, kwargs=dict(case.kwargs))
    values.update(fields)
    return Case(**values)


def _assert_same(got_run, want_run, outputs=ALL_STATS, tol=TOL):
    (stats, grads), (want_stats, want_grads) = got_run, want_run
    for stat in outputs:
        got, want = getattr(stats, stat), getattr(want_stats, stat)
        assert got.dtype == want.dtype and got.shape == want.shape, stat
        assert torch.isfinite(got).all(), stat
        assert max_rel_err(got, want) < tol, (stat, max_rel_err(got, want))
    assert len(grads) == len(want_grads)
    for got, want in zip(grads, want_grads):
        assert torch.isfinite(got).all()
        assert max_rel_err(got, want) < tol, max_rel_err(got, want)


# ---- double backward ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_raises_naming_token_stats(impl):
    """First derivatives under create_graph=True are the oracle's; a second derivative raises."""
    case = make_case(shape=(7,), hidden_size=16, vocab=37, bias=True, seed=41)
    want = run(case, "reference", ("logp", "kl", "entropy"))
    stats = fpo_ops.token_stats(case.hidden, case.weight, case.labels, case.ref_hidden, case.ref_weight,
                                bias=case.bias, outputs=("logp", "kl", "entropy"), impl=impl)
    g = torch.Generator().manual_seed(1)
    loss = sum((getattr(stats, s) * torch.randn(7, generator=g, dtype=torch.float64)).sum()
               for s in ("logp", "kl", "entropy"))
    grads = torch.autograd.grad(loss, case.leaves(), create_graph=True)
    for got, expected in zip(grads, want[1]):
        assert max_rel_err(got, expected) < TOL
    for leaf in case.leaves():
        with pytest.raises(RuntimeError, match=r"^token_stats: double backward is not supported"):
            torch.autograd.grad((grads[0] ** 2).sum() + (grads[1] ** 2).sum(), leaf)


def test_double_backward_of_the_oracle_is_autograd():
    """The reference is plain autograd: its second derivatives are exact (checked numerically)."""
    case = make_case(shape=(4,), hidden_size=3, vocab=7, ref_hidden_size=None, bias=True, seed=43)

    def fn(hidden, weight, bias):
        return fpo_ops.token_stats(hidden, weight, case.labels, bias=bias, outputs=("logp", "entropy"),
                                   impl="reference").entropy

    assert torch.autograd.gradgradcheck(fn, case.leaves())


# ---- non-finite hidden states at ignored positions ----------------------------------------------

@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_finite_hidden_at_ignored_positions(impl):
    """Ignored rows get statistic 0 and gradient 0 whatever they hold; the rest is untouched."""
    case = make_case(shape=(21,), hidden_size=16, vocab=37, bias=True, ref_bias=True, ignore_fraction=0.3, seed=44)
    ignored = case.labels == -100
    assert ignored.any() and (~ignored).any()
    hidden = case.hidden.detach().clone()
    hidden[ignored] = float("nan")
    hidden[ignored.nonzero()[0]] = float("inf")
    ref_hidden = case.ref_hidden.clone()
    ref_hidden[ignored] = float("-inf")
    dirty = _with(case, hidden=hidden.requires_grad_(), ref_hidden=ref_hidden)
    got = run(dirty, impl, ALL_STATS)
    _assert_same(got, run(case, "reference", ALL_STATS))
    stats, (grad_h, _, _) = got
    assert torch.all(grad_h[ignored] == 0)
    for stat in ALL_STATS:
        assert torch.all(getattr(stats, stat)[ignored] == ignored_value(stat)), stat


# ---- narrow integer labels ---------------------------------------------------------------------

# (dtype, vocabulary, label values to include): values a wrapped comparison gets wrong.
NARROW = {
    "uint8": (torch.uint8, 300, [255, 156, 0]),  # 156 is -100 wrapped to uint8; 255 < V
    "int8": (torch.int8, 200, [100, 127, -100]),  # 100 < V although 200 wraps in int8
    "int16": (torch.int16, 200, [150, 199, -100]),
    "int32": (torch.int32, 200, [150, 199, -100]),
}


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("name", list(NARROW))
def test_narrow_integer_labels(impl, name):
    """Labels of any integer dtype mean what their int64 values mean."""
    dtype, vocab, values = NARROW[name]
    case = make_case(shape=(13,), hidden_size=16, vocab=vocab, ignore_fraction=0.0, seed=45)
    labels = case.labels % min(vocab, 127)
    labels[:len(values)] = torch.tensor(values)
    wide = _with(case, labels=labels)
    narrow = _with(case, labels=labels.to(dtype))
    assert torch.equal(narrow.labels.long(), labels)
    _assert_same(run(narrow, impl, ALL_STATS), run(wide, "reference", ALL_STATS))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_narrow_labels_out_of_range_are_reported(impl):
    case = make_case(shape=(5,), hidden_size=16, vocab=50, ref_hidden_size=None, ignore_fraction=0.0, seed=46)
    labels = case.labels.to(torch.int8)
    labels[2] = 100
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 50\) .*got 100"):
        fpo_ops.token_stats(case.hidden, case.weight, labels, impl=impl)


# ---- tensors made under inference mode -----------------------------------------------------------

@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_reference_and_labels_from_inference_mode(impl):
    """A frozen reference run under torch.inference_mode (and its labels) needs no gradient."""
    case = make_case(shape=(2, 7), hidden_size=16, vocab=37, bias=True, ref_bias=True, seed=47)
    with torch.inference_mode():
        frozen = {name: getattr(case, name).clone() for name in ("labels", "ref_hidden", "ref_weight", "ref_bias")}
    assert all(t.is_inference() for t in frozen.values())
    _assert_same(run(_with(case, **frozen), impl, ALL_STATS), run(case, "reference", ALL_STATS))


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_head_reference_from_inference_mode(impl):
    case = make_case(shape=(9,), hidden_size=16, vocab=37, shared_weight=True, bias=True, seed=48)
    with torch.inference_mode():
        ref_hidden = case.ref_hidden.clone()
    _assert_same(run(_with(case, ref_hidden=ref_hidden), impl, ALL_STATS), run(case, "reference", ALL_STATS))


# ---- meta tensors --------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_meta_tensors_give_shapes_and_dtypes(impl):
    """On meta tensors the statistics and gradients have the shapes and dtypes of a real run."""
    case = make_case(shape=(2, 5), hidden_size=16, vocab=37, bias=True, seed=49)
    real_stats, real_grads = run(case, impl, ALL_STATS)

    def meta(t, grad):
        return None if t is None else t.detach().to("meta").requires_grad_(grad)
    on_meta = Case(meta(case.hidden, True), meta(case.weight, True), case.labels.to("meta"),
                   meta(case.ref_hidden, False), meta(case.ref_weight, False), meta(case.bias, True))
    stats = fpo_ops.token_stats(on_meta.hidden, on_meta.weight, on_meta.labels, on_meta.ref_hidden,
                                on_meta.ref_weight, bias=on_meta.bias, outputs=ALL_STATS, impl=impl)
    loss = sum(getattr(stats, s).sum() for s in ("logp", "kl", "reverse_kl", "entropy", "jsd"))
    grads = torch.autograd.grad(loss, on_meta.leaves())
    for stat in ALL_STATS:
        got, want = getattr(stats, stat), getattr(real_stats, stat)
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype, stat
    assert [(g.device.type, g.shape, g.dtype) for g in grads] == [("meta", g.shape, g.dtype) for g in real_grads]


# ---- empty vocabulary or hidden size ---------------------------------------------------------------

@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_vocabulary_or_hidden_size(impl):
    case = make_case(shape=(3,), hidden_size=16, vocab=37, seed=50)
    hidden, weight, labels = case.hidden, case.weight, case.labels.clamp(min=0)
    with pytest.raises(ValueError, match=r"^weight: expected at least one vocabulary row.*got shape \(0, 16\)"):
        fpo_ops.token_stats(hidden, weight[:0], labels, impl=impl, check_labels=False)
    with pytest.raises(ValueError, match=r"^hidden: expected a hidden size .*>= 1, got shape \(3, 0\)"):
        fpo_ops.token_stats(hidden[:, :0], weight[:, :0], labels, impl=impl)
    with pytest.raises(ValueError, match=r"^ref_hidden: expected a hidden size .*>= 1, got shape \(3, 0\)"):
        fpo_ops.token_stats(hidden, weight, labels, case.ref_hidden[:, :0], case.ref_weight[:, :0],
                            outputs=("kl",), impl=impl)


# ---- temperature, softcap and scale bounds ----------------------------------------------------------

SCALARS = ("temperature", "softcap", "ref_softcap", "logit_scale", "ref_logit_scale")


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("name", SCALARS)
@pytest.mark.parametrize("value", [1e-40, 2.0 ** -41, 2.0 ** 41, 1e300])
def test_unrepresentable_logit_transform_is_rejected(impl, name, value):
    case = make_case(shape=(3,), hidden_size=16, vocab=37, seed=51)
    expected = rf"^{name}: expected a value in \[2\^-40, 2\^40\].*got {re.escape(str(value))}$"
    with pytest.raises(ValueError, match=expected):
        fpo_ops.token_stats(case.hidden, case.weight, case.labels, case.ref_hidden, case.ref_weight,
                            outputs=("logp", "kl"), impl=impl, **{name: value})


# At the bounds: the smallest temperature (logits ~1e12) and the smallest softcap (near-uniform p).
AT_BOUNDS = {
    "temperature_min": dict(temperature=2.0 ** -40),
    "softcap_min": dict(softcap=2.0 ** -40, ref_softcap=2.0 ** -40),
    "scale_max_softcap": dict(logit_scale=2.0 ** 40, softcap=30.0),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(AT_BOUNDS))
def test_logit_transform_at_the_bounds_float32(impl, name):
    """fp32 at the accepted extremes: finite, within 2x plain fp32 PyTorch's error + a floor."""
    case64 = make_case(shape=(13,), hidden_size=16, vocab=37, bias=True, seed=52, **AT_BOUNDS[name])
    assert_within_error_budget(case64.cast(torch.float32), impl)


# ---- unchecked labels outside the vocabulary ----------------------------------------------------------

@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_unchecked_out_of_range_labels_agree_in_forward_and_backward(impl):
    """check_labels=False: a label outside [0, V) other than ignore_index counts with label logit 0
    (log p = -lse) in every impl, and its gradient is that of the same value."""
    case = make_case(shape=(11,), hidden_size=16, vocab=37, bias=True, ignore_fraction=0.2, seed=53)
    labels = case.labels.clone()
    labels[:4] = torch.tensor([-5, -1, 37, 1000])
    assert (labels == -100).any()
    odd = _with(case, labels=labels)
    stats, grads = run(odd, impl, ALL_STATS, check_labels=False)
    _assert_same((stats, grads), run(odd, "reference", ALL_STATS, check_labels=False))
    # The definition itself: logp = -logsumexp of the oracle's logits, with gradient -p to them.
    in_range = torch.where(labels == -100, labels, labels.clamp(0, 36))
    valid_logits = run(_with(case, labels=in_range), "reference", ("logp",))[0].logp
    z = case.hidden.detach()[:4] @ case.weight.detach().T + case.bias.detach()
    lse = torch.logsumexp(z, -1)
    assert max_abs_err(stats.logp[:4], -lse) < 1e-12
    assert max_abs_err(stats.logp[4:], valid_logits[4:]) < 1e-12
