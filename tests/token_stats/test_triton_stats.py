"""impl="triton" (fused kernels; the Triton interpreter without CUDA) against the float64 oracle.

Every buffer the implementation allocates uninitialised is poisoned first (NaN for floats, -1 for
ints), so an element a kernel fails to write shows up as a wrong value.
"""
import pytest
import torch

import fpo_ops
from fpo_ops.token_stats import chunked, online
from fpo_ops.token_stats.kernels.utils import TileConfig, tile_config
from fpo_ops.token_stats.options import HeadOptions
from fpo_ops.token_stats.reference import reference_logits
from fpo_ops.token_stats.stats import DIFFERENTIABLE_STATS
from fpo_ops.token_stats.triton_stats import triton_backward_tiles, triton_jsd_pass, triton_vocab_partials
from stats_cases import (  # noqa: F401  (poisoned_allocations is an autouse fixture)
    ALL_STATS, GRADIENTS_ALONE, ORACLE_CASES, assert_all_ignored_gives_zeros,
    assert_extreme_logits_match_reference, assert_ignored_positions_are_zero, assert_matches_reference,
    assert_within_error_budget, largest_tensor, make_case, max_abs_err, max_rel_err, poisoned_allocations, run,
)

GRAD_STATS = tuple(sorted(DIFFERENTIABLE_STATS))
CUDA = torch.cuda.is_available()


def test_interpreter_tiles_exercise_splits_and_chunks():
    """The CPU launch shape splits the vocabulary and chunks the backward at the test sizes."""
    if CUDA:
        pytest.skip("checks the interpreter's launch shape")
    cfg = tile_config(torch.device("cpu"))
    # at least the splits that fill one wave of 4 programs, and more where the last wave would be
    # under 3/4 full (3 token blocks: 2 splits would leave 2 of 4 programs in the last wave)
    assert cfg.vocab_splits(1, 100) == (4, 32)
    assert cfg.vocab_splits(37, 100) == (4, 32)
    assert cfg.vocab_splits(4000, 100) == (2, 64)
    assert cfg.vocab_chunk(37, 100, 8) == 32
    with pytest.raises(ValueError, match="BV: expected a power of two >= 16, got 24"):
        TileConfig(BN=16, BV=24, BH_reduce=16, BH_grad=16, num_warps=1, num_stages=1,
                   target_programs=1, min_splits=1, dz_buffer_bytes=1, min_vocab_chunk=16)


# A launch shape with levels, as the 16-bit CUDA one has (`launch_tiles`): wide launches take
# [32, 32] tiles, narrow ones [16, 32], the narrowest [16, 16], so the forward, the JSD pass and the
# backward of one call run at different token blocks and vocabulary splits.
SPLIT_SHAPE = TileConfig(BN=32, BV=32, BH_reduce=16, BH_grad=16, num_warps=1, num_stages=1,
                         target_programs=4, min_splits=1, dz_buffer_bytes=1 << 10, min_vocab_chunk=32,
                         levels={"narrow": dict(BN=16), "narrowest": dict(BN=16, BV=16)})
WIDE, NARROW, NARROWEST = (32, 32), (16, 32), (16, 16)
# Levels by variant, mixed within a call (every 16-bit Hopper launch is wide now, `VARIANT_TILES`).
_REF = {"HAS_REF", "HAS_REF_BIAS", "REF_CAPPED"}
_POLICY = {"HAS_BIAS", "CAPPED"}
MIXED_LEVELS = {
    "fwd": ((frozenset(_REF | _POLICY | {"WANT_KL"}), "wide"),
            (frozenset(_REF | _POLICY | {"WANT_ENT", "WANT_S2", "WANT_SUM_Z", "WANT_M_PRE", "WANT_ARGMAX", "WANT_RKL",
                                         "WANT_KL"}), "narrow")),
    "jsd": ((frozenset(_REF | _POLICY), "narrow"),),
    "bwd": ((frozenset({"G_LOGP", "G_KL", "G_JSD"}), "wide"),
            (frozenset(_REF | _POLICY | {"G_LOGP", "G_LSE", "G_ENT", "G_KL", "G_RKL", "G_JSD", "WANT_DB"}), "narrow")),
}


def assert_triton_matches_oracle_at(shape, case, outputs, **extra):
    """impl="triton" at the launch shape ``shape`` equals the float64 oracle, every statistic and
    gradient to 1e-9 (relative)."""
    from fpo_ops.token_stats.kernels.utils import override_tile_config

    ref_stats, ref_grads = run(case, "reference", outputs, **extra)
    with override_tile_config(shape):
        stats, grads = run(case, "triton", outputs, **extra)
    for stat in outputs:
        assert max_rel_err(getattr(stats, stat), getattr(ref_stats, stat)) < 1e-9, stat
    assert len(grads) == len(ref_grads) > 0
    for got, expected in zip(grads, ref_grads):
        assert max_rel_err(got, expected) < 1e-9


@pytest.mark.parametrize("outputs, extra, want", [
    (("logp", "ref_logp"), {}, {"fwd": WIDE, "bwd": WIDE}),                            # dpo
    (("logp", "kl"), {}, {"fwd": WIDE, "bwd": WIDE}),                                  # tdpo
    (("jsd",), {}, {"fwd": WIDE, "jsd": NARROW, "bwd": WIDE}),                         # distillation
    (("entropy", "top1_correct", "argmax"), {}, {"fwd": NARROW, "bwd": NARROW}),
    (("logp", "kl"), dict(grad_filter_eps=1e-30), {"fwd": WIDE, "bwd": NARROWEST}),
    (ALL_STATS, {}, {"fwd": NARROW, "jsd": NARROW, "bwd": NARROW}),
])
def test_each_variant_at_its_own_tiles(monkeypatch, outputs, extra, want):
    """Each variant runs at the launch shape `launch_tiles` gives it by `MIXED_LEVELS`, and matches
    the oracle."""
    from fpo_ops.token_stats import triton_stats
    from fpo_ops.token_stats.kernels import token_stats_fwd, utils

    monkeypatch.setattr(utils, "VARIANT_TILES", MIXED_LEVELS)
    used = {}

    def recording(cfg, kernel, flags):
        chosen = utils.launch_tiles(cfg, kernel, flags)
        used[kernel] = (chosen.BN, chosen.BV)
        return chosen

    monkeypatch.setattr(token_stats_fwd, "launch_tiles", recording)
    monkeypatch.setattr(triton_stats, "launch_tiles", recording)
    case = make_case(shape=(37,), hidden_size=24, vocab=100, ref_hidden_size=16)
    # a filter at 1e-30 drops no tile of this case: the exact gradients
    assert_triton_matches_oracle_at(SPLIT_SHAPE, case, outputs, **extra)
    assert used == want


# 64-wide tiles: each epilogue in its full count of column pieces (`launch_pieces`: the forward's
# and the backward's 8, the JSD pass's 4), which the interpreter's default 16-wide tiles cap at 2.
PIECES_SHAPE = TileConfig(BN=16, BV=64, BH_reduce=16, BH_grad=16, num_warps=1, num_stages=1,
                          target_programs=4, min_splits=1, dz_buffer_bytes=1 << 12, min_vocab_chunk=64)


@pytest.mark.parametrize("outputs, case_extra, extra, want", [
    (ALL_STATS, dict(bias=True, softcap=5.0), {}, {"fwd": 8, "jsd": 4, "bwd": 8}),
    (("logp", "kl"), {}, dict(grad_filter_eps=1e-30), {"fwd": 1, "bwd": 8}),
])
def test_full_piece_counts_match_the_oracle(monkeypatch, outputs, case_extra, extra, want):
    """At 64-wide tiles (three full ones and a partial one per 200 columns) every epilogue runs in
    its full piece count, with and without gradient filtering, and matches the oracle."""
    from fpo_ops.token_stats.kernels import token_stats_bwd, token_stats_fwd, utils

    used = {}

    def recording(kernel, flags, BV):
        used[kernel] = utils.launch_pieces(kernel, flags, BV)
        return used[kernel]

    monkeypatch.setattr(token_stats_fwd, "launch_pieces", recording)
    monkeypatch.setattr(token_stats_bwd, "launch_pieces", recording)
    case = make_case(shape=(37,), hidden_size=24, vocab=200, ref_hidden_size=16, **case_extra)
    # a filter at 1e-30 drops no tile of this case: the exact gradients
    assert_triton_matches_oracle_at(PIECES_SHAPE, case, outputs, **extra)
    assert used == want


# SPLIT_SHAPE with the weight tiles read through TMA descriptors (`TileConfig.weight_tma`).
TMA_SHAPE = TileConfig(**{**SPLIT_SHAPE.as_kwargs(), "weight_tma": True})


@pytest.mark.parametrize("hidden_size, ref_hidden_size, tma", [(48, 16, True), (24, 18, True), (21, 16, False)])
@pytest.mark.parametrize("outputs, extra", [
    (ALL_STATS, dict(bias=True, softcap=5.0)),
    (("logp", "kl"), {}),
])
def test_weight_tiles_through_tma_descriptors(monkeypatch, hidden_size, ref_hidden_size, tma, outputs, extra):
    """The forward, the JSD pass and the backward with ``weight_tma``: equal to the oracle, over
    several vocabulary splits and backward chunks; a weight whose rows a descriptor cannot carry
    (21 float64 columns: a 168-byte row stride) takes the pointer path."""
    from fpo_ops.token_stats.kernels import token_stats_bwd, token_stats_fwd, utils

    used = []

    def recording(cfg, *weights):
        operands, w_tma = utils.weight_operands(cfg, *weights)
        used.append(w_tma)
        return operands, w_tma

    monkeypatch.setattr(token_stats_fwd, "weight_operands", recording)
    monkeypatch.setattr(token_stats_bwd, "weight_operands", recording)
    case = make_case(shape=(37,), hidden_size=hidden_size, vocab=100, ref_hidden_size=ref_hidden_size, **extra)
    assert_triton_matches_oracle_at(TMA_SHAPE, case, outputs)
    hopper = not CUDA or torch.cuda.get_device_capability()[0] >= 9  # the interpreter reads descriptors too
    assert len(used) >= 3 and set(used) == {tma and hopper}  # forward, JSD or backward chunks: every launch


# The oracle cases, some with more for the kernels to do: a bias under the softcap, one token over
# several vocabulary splits, more ignored tokens; and sizes that fill several tiles unevenly.
CASES = {
    **ORACLE_CASES,
    "softcap_temperature_scale": dict(ORACLE_CASES["softcap_temperature_scale"], bias=True),
    "single_token": dict(ORACLE_CASES["single_token"], hidden_size=16, vocab=100),
    "sizes_37_48_100": dict(shape=(37,), hidden_size=48, vocab=100, ref_hidden_size=16),
    "custom_ignore_index": dict(ORACLE_CASES["custom_ignore_index"], ignore_fraction=0.4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float64(name):
    case = make_case(**CASES[name])
    assert_matches_reference(case, "triton")


@pytest.mark.parametrize("outputs", GRADIENTS_ALONE + [("entropy", "log_sum_p2", "mean_logit", "top1_correct"),
                                                       ("ref_logp", "logp")])
def test_each_statistic_alone(outputs):
    """Each gradient formula on its own, and the kernels' subsets of accumulators."""
    case = make_case(shape=(37,), hidden_size=16, vocab=37, bias=True, softcap=5.0, seed=3)
    assert_matches_reference(case, "triton", outputs)


def test_ignored_positions_are_zero_and_get_zero_gradient():
    assert_ignored_positions_are_zero(make_case(shape=(37,), ignore_fraction=0.5, seed=7), "triton")


def test_all_ignored_gives_zeros_not_nan():
    case = make_case(shape=(37,), ignore_fraction=1.0, bias=True)
    assert len(case.leaves()) == 3
    assert_all_ignored_gives_zeros(case, "triton")


def test_strided_inputs():
    """Views with non-unit strides (a column slice of the head, transposed hidden states)."""
    case = make_case(shape=(37,), hidden_size=16, vocab=37, bias=True, seed=37)
    wide = torch.cat([case.weight.detach(), torch.randn(37, 5, dtype=torch.float64)], 1)
    weight = wide[:, :16].requires_grad_()
    hidden = case.hidden.detach().T.contiguous().T.requires_grad_()
    strided = make_case(shape=(37,), hidden_size=16, vocab=37, bias=True, seed=37)
    strided.weight, strided.hidden = weight, hidden
    assert not weight.is_contiguous() and not hidden.is_contiguous()
    ref_stats, ref_grads = run(case, "reference", ALL_STATS)
    stats, grads = run(strided, "triton", ALL_STATS)
    for stat in ALL_STATS:
        assert max_rel_err(getattr(stats, stat), getattr(ref_stats, stat)) < 1e-9, stat
    for got, want in zip(grads, ref_grads):
        assert max_rel_err(got, want) < 1e-9


def test_no_tokens():
    case = make_case(shape=(0,), bias=True)
    stats, grads = run(case, "triton", ALL_STATS)
    for stat in ALL_STATS:
        assert getattr(stats, stat).shape == (0,)
    assert grads[0].shape == case.hidden.shape
    assert torch.all(grads[1] == 0) and torch.all(grads[2] == 0)


def test_autocast_bf16_runs_gemms_in_bf16_and_returns_fp32():
    case = make_case(shape=(37,), hidden_size=32, vocab=70, seed=17).cast(torch.float32)
    outputs = ("logp", "ref_logp", "kl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_stats, auto_grads = run(case, "triton", outputs)
    bf16_stats, _ = run(case.cast(torch.bfloat16), "triton", outputs)
    fp32_stats, _ = run(case, "triton", outputs)
    for stat in outputs:
        got = getattr(auto_stats, stat)
        assert got.dtype == torch.float32
        assert torch.equal(got, getattr(bf16_stats, stat))  # the GEMMs did run in bf16 ...
        assert max_abs_err(got, getattr(fp32_stats, stat)) > 1e-5  # ... not in fp32
    assert all(g.dtype == torch.float32 for g in auto_grads)


def test_reference_gets_no_gradient_through_shared_weight():
    case = make_case(shape=(37,), shared_weight=True, bias=True, seed=2)
    case.ref_hidden.requires_grad_()
    stats = fpo_ops.token_stats(case.hidden, case.weight, case.labels, case.ref_hidden, bias=case.bias,
                                outputs=("kl", "ref_logp"), impl="triton")
    assert not stats.ref_logp.requires_grad
    grad_ref_hidden, grad_weight = torch.autograd.grad(stats.kl.sum(), (case.ref_hidden, case.weight),
                                                       allow_unused=True)
    assert grad_ref_hidden is None
    ref_stats = fpo_ops.token_stats(case.hidden, case.weight, case.labels, case.ref_hidden,
                                    bias=case.bias, outputs=("kl",), impl="reference")
    (want,) = torch.autograd.grad(ref_stats.kl.sum(), (case.weight,))
    assert max_rel_err(grad_weight, want) < 1e-9


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_extreme_logits(softcap):
    """Logits of magnitude ~1e4: finite, and equal to the oracle."""
    case = make_case(shape=(37,), logit_std=1e4, softcap=softcap, seed=11, bias=True)
    assert_extreme_logits_match_reference(case, "triton")


def test_extreme_logits_float32_finite():
    case = make_case(shape=(37,), logit_std=1e4, seed=12, bias=True).cast(torch.float32)
    stats, grads = run(case, "triton", ALL_STATS)
    for stat in ALL_STATS:
        assert torch.isfinite(getattr(stats, stat)).all(), stat
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3),
                                         (torch.float16, 1e-3)])
def test_error_budget_low_precision(dtype, floor):
    """Error against float64 <= 2x that of plain same-dtype PyTorch (the oracle run in dtype) + floor."""
    case64 = make_case(shape=(37,), hidden_size=48, vocab=100, ref_hidden_size=16, bias=True,
                       softcap=20.0, seed=13)
    assert_within_error_budget(case64.cast(dtype), "triton", floor=floor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_error_budget_when_the_softcap_bites(dtype):
    """Logits ~20 under softcap 30 (test_autocast_mixed_dtypes' case, no autocast): dz, scaled by the
    cap's derivative, is stored in the GEMM dtype; rounded other than to nearest (the interpreter
    truncates to bf16) its errors add up in dW and dh (3x plain PyTorch's in bf16)."""
    case64 = make_case(shape=(3, 7), hidden_size=32, vocab=53, ref_hidden_size=16, bias=True,
                       ref_bias=True, softcap=30.0, logit_std=20.0, seed=21)
    outputs = ("logp", "lse", "ref_logp", "kl", "entropy")
    assert_within_error_budget(case64.cast(dtype), "triton", outputs, floor=1e-3)


def _filtered_reference_grads(case, eps, block_n, block_v, outputs):
    """Oracle gradients with the logit gradient zeroed on every tile the filter may drop."""
    hidden, weight, labels = case.hidden.detach(), case.weight.detach(), case.labels
    opts = HeadOptions(outputs=outputs, compute_dtype=torch.float64)
    z = reference_logits(hidden, weight, case.bias.detach(), None, 1.0, opts).requires_grad_()
    z_ref = reference_logits(case.ref_hidden, case.ref_weight, case.ref_bias, None, 1.0, opts)
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)
    p, q = logp.exp().detach(), logq.exp()
    g = torch.Generator().manual_seed(1)  # the upstream gradients `run` draws
    upstream = {name: torch.randn(labels.shape, generator=g, dtype=torch.float64) for name in outputs}
    loss = (logp.gather(1, labels[:, None])[:, 0] * upstream["logp"]).sum()
    loss = loss + ((q * (logq - logp)).sum(-1) * upstream["kl"]).sum()
    (dz,) = torch.autograd.grad(loss, z)
    keep = torch.ones_like(dz, dtype=torch.bool)
    for n0 in range(0, z.shape[0], block_n):
        for v0 in range(0, z.shape[1], block_v):
            tile = (slice(n0, n0 + block_n), slice(v0, v0 + block_v))
            has_label = ((labels[tile[0]] >= v0) & (labels[tile[0]] < v0 + block_v)).any()
            if p[tile].max() < eps and q[tile].max() < eps and not has_label:
                keep[tile] = False
    dz = torch.where(keep, dz, torch.zeros_like(dz))
    return (dz @ weight, dz.T @ hidden, dz.sum(0)), (~keep).float().mean().item()


# (first frequent column, frequent columns, the rare columns' offset, share of dz entries dropped):
# the frequent tokens first;
# or a tile's width after the start of the backward's vocabulary chunk, so that a negligible tile
# precedes the labels' tile within one chunk
@pytest.mark.parametrize("first, frequent, rare_offset, dropped_within",
                         [(0, 32, 12.0, (0.2, 0.6)), (16, 16, 16.0, (0.2, 0.9))],
                         ids=["frequent-first", "labels-later-in-the-chunk"])
def test_gradient_filter_drops_exactly_the_negligible_tiles(first, frequent, rare_offset, dropped_within):
    """With filtering the gradients equal the oracle's with those tiles' gradient zeroed."""
    if CUDA:
        pytest.skip("uses the interpreter's tile shape")
    cfg = tile_config(torch.device("cpu"))
    assert first in (0, cfg.BV) and cfg.vocab_chunk(37, 100, 8) > cfg.BV  # tiles [0, BV) and [BV, 2 BV) share a chunk
    outputs = ("logp", "kl")
    case = make_case(shape=(37,), hidden_size=16, vocab=100, ignore_fraction=0.0, seed=23,
                     ref_hidden_size=16, bias=True, ref_bias=True)
    # A head like a language model's: most of the vocabulary is rare, labels are frequent tokens;
    # the rare columns sit near eps, so some of their tiles are dropped and some are kept.
    rare = torch.ones(100, dtype=torch.bool)
    rare[first:first + frequent] = False
    with torch.no_grad():
        case.bias[rare] -= rare_offset
        case.ref_bias[rare] -= rare_offset
    case.labels = first + case.labels % frequent
    eps = 1e-4
    want, dropped = _filtered_reference_grads(case, eps, cfg.BN, cfg.BV, outputs)
    assert dropped_within[0] < dropped < dropped_within[1], dropped  # real work to skip and real rare tiles to keep
    _, grads = run(case, "triton", outputs, grad_filter_eps=eps)
    for got, expected in zip(grads, want):
        assert max_rel_err(got, expected) < 1e-9
    # what it costs: every dropped entry of p and q is below eps
    _, exact = run(case, "reference", outputs)
    for got, expected in zip(grads, exact):
        assert 0 < max_rel_err(got, expected) < 1e-3


def test_gradient_filter_off_by_default_and_validated():
    case = make_case(shape=(37,), hidden_size=16, vocab=37, seed=29)
    _, exact = run(case, "triton", GRAD_STATS)
    _, zero_eps = run(case, "triton", GRAD_STATS, grad_filter_eps=0.0)
    for a, b in zip(exact, zero_eps):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        run(case, "triton", GRAD_STATS, grad_filter_eps=1.5)
    with pytest.raises(TypeError, match="grad_filter_eps"):
        run(case, "triton", GRAD_STATS, grad_filter_eps="small")


def _slice_args(case, v0, v1):
    labels = torch.where(case.labels == -100, torch.full_like(case.labels, -1), case.labels - v0)
    rows = (lambda t: None if t is None else t.detach()[v0:v1])
    return labels, rows(case.weight), rows(case.bias), rows(case.ref_weight), rows(case.ref_bias)


def test_vocabulary_slices_merge_to_the_full_result():
    """The slice entry points: partials and JSD sums of two slices combine into the oracle's values,
    and the backward of each slice matches the streaming PyTorch pass with the same inputs."""
    case = make_case(shape=(37,), hidden_size=16, vocab=100, bias=True, ref_bias=True, seed=31)
    outputs = ALL_STATS
    opts = HeadOptions(outputs=outputs, jsd_beta=0.3, compute_dtype=torch.float64)
    keys = online.needed_partials(opts)
    h, rh = case.hidden.detach(), case.ref_hidden
    slices = [(0, 45), (45, 100)]
    parts = []
    for v0, v1 in slices:
        labels, w, b, rw, rb = _slice_args(case, v0, v1)
        parts.append(triton_vocab_partials(h, rh, labels, w, b, rw, rb, keys, opts))
        want = chunked.vocab_partials(h, rh, labels, w, b, rw, rb, keys, opts)
        assert set(parts[-1]) == set(want)
        for key in want:
            # m_pre is -inf where no column of the slice lies before the label
            finite = torch.isfinite(want[key])
            assert torch.equal(parts[-1][key][~finite], want[key][~finite]), key
            assert max_rel_err(parts[-1][key][finite], want[key][finite]) < 1e-12, key
        parts[-1]["argmax"] += v0  # a slice's indices count from its first row
    stats = online.finalize(online.merge_partials(*parts), 100)
    jsd = sum(triton_jsd_pass(h, rh, *_slice_args(case, v0, v1)[1:], stats, opts)["jsd"] for v0, v1 in slices)
    ref = fpo_ops.token_stats(h, case.weight, case.labels, rh, case.ref_weight, bias=case.bias,
                              ref_bias=case.ref_bias, outputs=outputs, jsd_beta=0.3, impl="reference")
    valid = case.labels != -100
    for name in outputs:
        got = jsd if name == "jsd" else stats[name]
        assert max_rel_err(got[valid], getattr(ref, name)[valid]) < 1e-9, name

    g = torch.Generator().manual_seed(3)
    coef = {name: torch.randn(37, generator=g, dtype=torch.float64) * valid for name in GRAD_STATS}
    saved = {"lse": stats["lse"], "lse_ref": stats["lse_ref"], "entropy": stats["entropy"],
             "reverse_kl": stats["reverse_kl"], "kl_p_m": torch.rand(37, generator=g, dtype=torch.float64)}
    for v0, v1 in slices:
        labels, w, b, rw, rb = _slice_args(case, v0, v1)
        got = triton_backward_tiles(h, w, b, labels, rh, rw, rb, coef, saved, opts, True, True, True)
        want = chunked.backward_tiles(h, w, b, labels, rh, rw, rb, coef, saved, opts, True, True, True)
        assert got[0].dtype == torch.float64
        for a, e in zip(got, want):
            assert max_rel_err(a, e) < 1e-12


def test_never_materialises_logits():
    """The largest buffer is an input or a gradient, far below N x V."""
    n_tokens, hidden_size, vocab = 48, 16, 200
    case = make_case(shape=(n_tokens,), hidden_size=hidden_size, vocab=vocab, ref_hidden_size=16,
                     dtype=torch.float32, bias=True)
    largest = largest_tensor(case, "triton")
    # in bytes: the interpreter copies buffers as bytes
    fp32 = 4
    assert largest.bytes <= fp32 * max(vocab * hidden_size, n_tokens * 4 * tile_config(case.hidden.device).BV)
    assert largest.bytes < fp32 * n_tokens * vocab / 2


# ---- GPU: realistic shapes, compiled kernels -------------------------------------------------

def _gpu_case(n_tokens, hidden_size, vocab, dtype, seed=0, **kwargs):
    case = make_case(shape=(n_tokens,), hidden_size=hidden_size, vocab=vocab,
                     ref_hidden_size=hidden_size, seed=seed, logit_std=4.0, **kwargs)
    low = case.cast(dtype)

    def to_cuda(t):
        return None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)
    low.hidden, low.weight, low.bias = to_cuda(low.hidden), to_cuda(low.weight), to_cuda(low.bias)
    low.ref_hidden, low.ref_weight = to_cuda(low.ref_hidden), to_cuda(low.ref_weight)
    low.labels = low.labels.cuda()
    return low


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.bfloat16, 1e-3), (torch.float32, 1e-6)])
@pytest.mark.parametrize("n_tokens", [8, 1031])
def test_gpu_error_budget(dtype, floor, n_tokens):
    """Error against the float64 oracle <= 2x plain same-dtype PyTorch + floor at a real head size."""
    low = _gpu_case(n_tokens, 2048, 32003, dtype, bias=True, softcap=30.0)
    outputs = ("logp", "ref_logp", "kl", "reverse_kl", "entropy", "jsd")
    assert_within_error_budget(low, "triton", outputs, floor)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic():
    low = _gpu_case(2048, 1024, 16001, torch.bfloat16, bias=True)
    _, first = run(low, "triton", ("logp", "kl"))
    _, second = run(low, "triton", ("logp", "kl"))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_gradient_filter_error_is_small():
    low = _gpu_case(1024, 1024, 32000, torch.bfloat16)
    exact = low.cast(torch.float64)
    _, exact_grads = run(exact, "reference", ("logp", "kl"))
    _, plain_grads = run(low, "reference", ("logp", "kl"))
    _, grads = run(low, "triton", ("logp", "kl"), grad_filter_eps=1e-6)
    for got, plain, want in zip(grads, plain_grads, exact_grads):
        ours, base = max_abs_err(got, want), max_abs_err(plain, want)
        assert ours <= 2 * base + 1e-3 * want.abs().max().item(), (ours, base)


@pytest.mark.gpu
def test_gpu_memory_is_a_few_floats_per_token_plus_buffers():
    """Llama-3-8B head, bf16, N=4096: forward keeps O(N) floats; backward adds only its buffers."""
    n_tokens, hidden_size, vocab = 4096, 4096, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)
    hidden = randn(n_tokens, hidden_size).requires_grad_()
    weight = randn(vocab, hidden_size, scale=hidden_size ** -0.5).requires_grad_()
    ref_hidden = randn(n_tokens, hidden_size)
    ref_weight = randn(vocab, hidden_size, scale=hidden_size ** -0.5)
    labels = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = fpo_ops.token_stats(hidden, weight, labels, ref_hidden, ref_weight,
                                outputs=("logp", "ref_logp", "kl"), impl="triton")
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - base
    # per token: 8 vocabulary splits x 11 partial sums (352 B), their merge, the statistics
    assert forward_extra < 2048 * n_tokens, forward_extra
    torch.cuda.reset_peak_memory_stats()
    before_backward = torch.cuda.memory_allocated()
    (stats.logp.sum() + 0.1 * stats.kl.sum()).backward()
    torch.cuda.synchronize()
    backward_extra = torch.cuda.max_memory_allocated() - before_backward
    gradients = hidden.numel() * 2 + weight.numel() * 2
    # the dz chunk buffer (128 MiB), the fp32 dhidden, O(N) vectors
    buffers = (128 << 20) + hidden.numel() * 4 + 64 * n_tokens
    assert backward_extra <= gradients + buffers, (backward_extra, gradients, buffers)
