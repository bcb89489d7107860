"""impl="torch" (streaming PyTorch) against the float64 oracle impl="reference"."""
import math

import pytest
import torch

import fpo_ops
from fpo_ops.token_stats import chunked
from fpo_ops.token_stats.stats import DIFFERENTIABLE_STATS
from stats_cases import (  # noqa: F401  (poisoned_allocations is an autouse fixture)
    GRADIENTS_ALONE, ORACLE_CASES, assert_all_ignored_gives_zeros, assert_extreme_logits_match_reference,
    assert_ignored_positions_are_zero, assert_matches_reference, assert_within_error_budget, largest_tensor,
    make_case, max_abs_err, poisoned_allocations, run,
)

GRAD_STATS = tuple(sorted(DIFFERENTIABLE_STATS))


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks that do not divide the test sizes, so every partial-tile path runs."""
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 8)
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 16)


@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_matches_reference_float64(name):
    case = make_case(**ORACLE_CASES[name])
    assert_matches_reference(case, "torch")


@pytest.mark.parametrize("outputs", GRADIENTS_ALONE + [("ref_logp", "logp", "log_sum_p2")])
def test_each_statistic_alone(outputs):
    """Each gradient formula on its own, and the partial sums of a subset of statistics."""
    case = make_case(bias=True, softcap=5.0, seed=3)
    assert_matches_reference(case, "torch", outputs)


def test_gradcheck():
    case = make_case(shape=(5,), hidden_size=4, vocab=21, ref_hidden_size=3, bias=True, softcap=2.0,
                     temperature=0.9, ignore_fraction=0.2, seed=5)
    upstream = torch.randn(len(GRAD_STATS), 5, dtype=torch.float64)

    def fn(hidden, weight, bias):
        stats = fpo_ops.token_stats(hidden, weight, case.labels, case.ref_hidden, case.ref_weight,
                                    bias=bias, outputs=GRAD_STATS, impl="torch", softcap=2.0,
                                    temperature=0.9, jsd_beta=0.3)
        return sum((getattr(stats, s) * u).sum() for s, u in zip(GRAD_STATS, upstream))

    assert torch.autograd.gradcheck(fn, case.leaves())


def test_ignored_positions_are_zero_and_get_zero_gradient():
    assert_ignored_positions_are_zero(make_case(ignore_fraction=0.5, seed=7), "torch")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_all_ignored_gives_zeros_not_nan(impl):
    assert_all_ignored_gives_zeros(make_case(ignore_fraction=1.0, bias=True), impl)


def test_reference_gets_no_gradient():
    case = make_case(bias=True, ref_bias=True)
    for t in (case.ref_hidden, case.ref_weight, case.ref_bias):
        t.requires_grad_()
    stats = fpo_ops.token_stats(case.hidden, case.weight, case.labels, case.ref_hidden, case.ref_weight,
                                bias=case.bias, ref_bias=case.ref_bias, outputs=("kl", "ref_logp"),
                                impl="torch")
    assert not stats.ref_logp.requires_grad
    grads = torch.autograd.grad(stats.kl.sum(), (case.ref_hidden, case.ref_weight, case.ref_bias),
                                allow_unused=True)
    assert all(g is None for g in grads)


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_extreme_logits(softcap):
    """Logits of magnitude ~1e4: finite, and equal to the oracle."""
    assert_extreme_logits_match_reference(make_case(logit_std=1e4, softcap=softcap, seed=11), "torch")


def test_extreme_logits_float32_within_budget():
    """At logits ~1e4 in fp32: finite, and as close to float64 as plain fp32 PyTorch is."""
    low = make_case(logit_std=1e4, seed=12, bias=True).cast(torch.float32)
    assert_within_error_budget(low, "torch")


SHAPES = {
    "few_tiles": dict(shape=(4, 16), hidden_size=48, vocab=150, ref_hidden_size=40),
    # 63 vocabulary blocks for dhidden and 64 token blocks for dweight: per-tile rounding adds up
    "many_tiles": dict(shape=(512,), hidden_size=32, vocab=1000, ref_hidden_size=24),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_error_budget_low_precision(dtype, floor, shape):
    """Error against float64 <= 2x that of plain same-dtype PyTorch (the oracle run in dtype) + floor."""
    case64 = make_case(**SHAPES[shape], bias=True, softcap=20.0, seed=13)
    assert_within_error_budget(case64.cast(dtype), "torch", floor=floor)


def test_autocast_bf16_runs_gemms_in_bf16_and_returns_fp32():
    case = make_case(shape=(3, 8), hidden_size=32, vocab=70, seed=17).cast(torch.float32)
    outputs = ("logp", "ref_logp", "kl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_stats, auto_grads = run(case, "torch", outputs)
        ref_auto_stats, _ = run(case, "reference", outputs)
    fp32_stats, _ = run(case, "torch", outputs)
    bf16_stats, _ = run(case.cast(torch.bfloat16), "torch", outputs)
    exact_stats, _ = run(case.cast(torch.bfloat16).cast(torch.float64), "reference", outputs)
    for stat in outputs:
        got, exact = getattr(auto_stats, stat), getattr(exact_stats, stat)
        assert got.dtype == torch.float32
        # Same numbers as an explicit bf16 run: the GEMMs did run on bf16 operands ...
        assert max_abs_err(got, getattr(bf16_stats, stat)) < 1e-5
        # ... within the error budget of plain PyTorch under the same autocast ...
        plain = max_abs_err(getattr(ref_auto_stats, stat), exact)
        assert max_abs_err(got, exact) <= 2 * plain + 1e-3 * max(1.0, exact.abs().max().item())
        # ... and differ measurably from fp32 GEMMs.
        assert max_abs_err(got, getattr(fp32_stats, stat)) > 1e-5
    assert all(g.dtype == torch.float32 for g in auto_grads)


def test_never_materialises_logits():
    n_tokens, hidden_size, vocab = 64, 8, 300
    case = make_case(shape=(n_tokens,), hidden_size=hidden_size, vocab=vocab, ref_hidden_size=8,
                     dtype=torch.float32, bias=True)
    largest = largest_tensor(case, "torch")
    tile = chunked.TOKEN_BLOCK * chunked.VOCAB_BLOCK
    largest_input = max(vocab * hidden_size, n_tokens * hidden_size)
    assert largest.numel <= max(tile, largest_input) < n_tokens * vocab


BAD_INPUTS = [
    ("hidden", lambda c: dict(hidden=c.hidden.int()), TypeError),
    ("weight", lambda c: dict(weight=c.weight[:, :-1]), ValueError),
    ("weight", lambda c: dict(weight=c.weight.float()), TypeError),
    ("weight", lambda c: dict(weight=c.weight[None]), ValueError),
    ("labels", lambda c: dict(labels=c.labels.double()), TypeError),
    ("hidden", lambda c: dict(labels=c.labels[:, :-1]), ValueError),
    ("labels", lambda c: dict(labels=torch.where(c.labels == 0, 37, c.labels).index_fill(1, torch.tensor([0]), 37)),
     ValueError),
    ("labels", lambda c: dict(labels=c.labels.index_fill(1, torch.tensor([0]), -5)), ValueError),
    ("bias", lambda c: dict(bias=torch.zeros(36, dtype=torch.float64)), ValueError),
    ("bias", lambda c: dict(bias=torch.zeros(37, dtype=torch.float32)), TypeError),
    ("ref_hidden", lambda c: dict(ref_hidden=c.ref_hidden.float(), ref_weight=c.ref_weight.float()),
     TypeError),
    ("ref_weight", lambda c: dict(ref_weight=c.ref_weight[:-1]), ValueError),
    ("ref_weight", lambda c: dict(ref_weight=c.ref_weight[:, :-1]), ValueError),
    ("ref_hidden", lambda c: dict(ref_hidden=c.ref_hidden[:, :-1]), ValueError),
    ("ref_weight", lambda c: dict(ref_hidden=None), ValueError),
    ("outputs", lambda c: dict(ref_hidden=None, ref_weight=None, outputs=("kl",)), ValueError),
    ("outputs", lambda c: dict(outputs=("logp", "perplexity")), ValueError),
    ("outputs", lambda c: dict(outputs=()), ValueError),
    ("impl", lambda c: dict(impl="cuda"), ValueError),
    ("temperature", lambda c: dict(temperature=0.0), ValueError),
    ("softcap", lambda c: dict(softcap=-1.0), ValueError),
    ("logit_scale", lambda c: dict(logit_scale=float("nan")), ValueError),
    ("jsd_beta", lambda c: dict(jsd_beta=1.5), ValueError),
    ("ignore_index", lambda c: dict(ignore_index=-100.0), TypeError),
    ("hidden", lambda c: dict(hidden=c.hidden.detach().index_fill(0, torch.tensor([1]), math.inf),
                              check_finite=True), ValueError),
]


@pytest.mark.parametrize("argument,mutate,error", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(argument, mutate, error):
    case = make_case(shape=(2, 5))
    args = dict(hidden=case.hidden, weight=case.weight, labels=case.labels, ref_hidden=case.ref_hidden,
                ref_weight=case.ref_weight, outputs=("logp", "kl"), impl="torch")
    args.update(mutate(case))
    with pytest.raises(error, match=rf"^{argument}\b.*expected"):
        fpo_ops.token_stats(**args)


def test_device_mismatch_is_reported():
    case = make_case(shape=(2, 5))
    meta_weight = case.weight.detach().to("meta")
    with pytest.raises(ValueError, match=r"^weight: expected device"):
        fpo_ops.token_stats(case.hidden, meta_weight, case.labels, check_labels=False)
