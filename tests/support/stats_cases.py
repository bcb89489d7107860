"""Input builders and comparison helpers shared by the statistic tests."""
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fpo_ops
from fpo_ops.token_stats.stats import DIFFERENTIABLE_STATS, INDEX_STATS, STAT_NAMES

ALL_STATS = STAT_NAMES


def ignored_value(stat: str) -> int:
    """What a statistic holds at ignored positions: 0, or -1 for a vocabulary index."""
    return -1 if stat in INDEX_STATS else 0

# `make_case` keywords of the inputs every implementation is compared with the float64 oracle on:
# each head option, a shared head, one token, three dimensions, the JSD endpoints.
ORACLE_CASES = {
    "plain": dict(),
    "bias": dict(bias=True, ref_bias=True),
    "softcap_temperature_scale": dict(softcap=2.5, ref_softcap=4.0, temperature=0.7, logit_scale=1.3,
                                      ref_logit_scale=0.8),
    "shared_weight": dict(shared_weight=True, bias=True),
    "single_token": dict(shape=(1,), ignore_fraction=0.0),
    "three_dims_odd_sizes": dict(shape=(2, 3, 5), hidden_size=7, vocab=53, ref_hidden_size=11),
    "custom_ignore_index": dict(ignore_index=3),
    "jsd_beta_0": dict(jsd_beta=0.0),
    "jsd_beta_1": dict(jsd_beta=1.0),
    "jsd_beta_0.2_softcap": dict(jsd_beta=0.2, softcap=3.0),
}

# Each gradient formula on its own (the other statistics' terms absent).
GRADIENTS_ALONE = [("logp",), ("lse",), ("kl",), ("reverse_kl", "entropy"), ("jsd",)]


@dataclass
class Case:
    """One set of inputs for `token_stats` (leaves are float64 unless cast)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: Optional[torch.Tensor] = None
    ref_weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    ref_bias: Optional[torch.Tensor] = None
    kwargs: Dict = field(default_factory=dict)

    def leaves(self) -> Tuple[torch.Tensor, ...]:
        """The tensors that receive gradients."""
        return tuple(t for t in (self.hidden, self.weight, self.bias) if t is not None)

    def cast(self, dtype: torch.dtype) -> "Case":
        def c(t):
            return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
        return Case(c(self.hidden), c(self.weight), self.labels, c(self.ref_hidden),
                    c(self.ref_weight), c(self.bias), c(self.ref_bias), dict(self.kwargs))


def make_case(
    shape: Sequence[int] = (2, 9), hidden_size: int = 19, vocab: int = 37, *,
    ref_hidden_size: Optional[int] = 23, bias: bool = False, ref_bias: bool = False,
    shared_weight: bool = False, ignore_fraction: float = 0.25, logit_std: float = 3.0,
    seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs,
) -> Case:
    """Random inputs with logits of roughly ``logit_std`` spread and some ignored labels."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    w_scale = logit_std / hidden_size ** 0.5
    hidden = randn(*shape, hidden_size).requires_grad_()
    weight = randn(vocab, hidden_size, scale=w_scale).requires_grad_()
    labels = torch.randint(0, vocab, tuple(shape), generator=g)
    labels[torch.rand(tuple(shape), generator=g) < ignore_fraction] = kwargs.get("ignore_index", -100)
    case = Case(hidden, weight, labels, kwargs=kwargs)
    if bias:
        case.bias = randn(vocab).requires_grad_()
    if ref_hidden_size is not None:
        if shared_weight:
            case.ref_hidden = randn(*shape, hidden_size)
        else:
            case.ref_hidden = randn(*shape, ref_hidden_size)
            case.ref_weight = randn(vocab, ref_hidden_size, scale=logit_std / ref_hidden_size ** 0.5)
        if ref_bias:
            case.ref_bias = randn(vocab)
    return case


def run(case: Case, impl: str, outputs: Sequence[str], upstream_seed: int = 1, **extra):
    """Statistics and gradients of sum(stat * random upstream) over the differentiable stats."""
    stats = fpo_ops.token_stats(
        case.hidden, case.weight, case.labels, case.ref_hidden, case.ref_weight,
        bias=case.bias, ref_bias=case.ref_bias, outputs=outputs, impl=impl, **case.kwargs, **extra,
    )
    g = torch.Generator().manual_seed(upstream_seed)
    loss = 0.0
    for name in outputs:
        value = getattr(stats, name)
        if name in DIFFERENTIABLE_STATS:
            # drawn on the CPU generator, so every device and dtype sees the same upstream values
            upstream = torch.randn(value.shape, generator=g, dtype=torch.float64)
            loss = loss + (value * upstream.to(device=value.device, dtype=value.dtype)).sum()
    grads = ()
    if torch.is_tensor(loss) and loss.requires_grad:
        grads = torch.autograd.grad(loss, case.leaves(), allow_unused=True)
    return stats, grads


def assert_matches_reference(case: Case, impl: str, outputs: Sequence[str] = ALL_STATS,
                             rtol: float = 1e-9) -> None:
    """Values and gradients of ``impl`` equal the float64 oracle's, statistic by statistic."""
    ref_stats, ref_grads = run(case, "reference", outputs)
    stats, grads = run(case, impl, outputs)
    for stat in fpo_ops.STAT_NAMES:
        got, want = getattr(stats, stat), getattr(ref_stats, stat)
        if stat not in outputs:
            assert got is None, stat
            continue
        assert got.dtype == want.dtype and got.shape == case.labels.shape, stat
        assert max_rel_err(got, want) < rtol, stat
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        assert max_rel_err(got, want) < rtol


def assert_within_error_budget(low: Case, impl: str, outputs: Sequence[str] = ALL_STATS,
                               floor: float = 1e-6) -> None:
    """``impl`` on low-precision inputs: finite fp32 statistics and gradients in the input dtype,
    whose error against the float64 oracle (on the same rounded inputs) is at most 2x that of plain
    same-dtype PyTorch (the oracle run in the input dtype) plus ``floor`` on the scale."""
    exact_stats, exact_grads = run(low.cast(torch.float64), "reference", outputs)
    plain_stats, plain_grads = run(low, "reference", outputs)
    stats, grads = run(low, impl, outputs)
    for stat in outputs:
        got, want = getattr(stats, stat), getattr(exact_stats, stat)
        if stat in INDEX_STATS:
            # an index has no error size: at low precision it may pick another near-maximal
            # logit; it must be an index where the float64 oracle's is, and -1 where not
            assert got.dtype == torch.int64 and torch.equal(got < 0, want < 0), stat
            continue
        assert got.dtype == torch.float32, stat
        assert torch.isfinite(got).all(), stat
        ours, plain = max_abs_err(got, want), max_abs_err(getattr(plain_stats, stat), want)
        assert ours <= 2 * plain + floor * max(1.0, want.abs().max().item()), (stat, ours, plain)
    assert len(grads) == len(plain_grads) == len(exact_grads)
    for got, plain, want in zip(grads, plain_grads, exact_grads):
        assert got.dtype == low.hidden.dtype
        assert torch.isfinite(got).all()
        ours, base = max_abs_err(got, want), max_abs_err(plain, want)
        assert ours <= 2 * base + floor * want.abs().max().item(), (ours, base)


def assert_extreme_logits_match_reference(case: Case, impl: str) -> None:
    """Every statistic and gradient of ``impl`` finite and equal to the oracle's at 1e-9 (logits ~1e4)."""
    ref_stats, ref_grads = run(case, "reference", ALL_STATS)
    stats, grads = run(case, impl, ALL_STATS)
    for stat in ALL_STATS:
        got, want = getattr(stats, stat), getattr(ref_stats, stat)
        assert torch.isfinite(got).all(), stat
        assert max_abs_err(got, want) <= 1e-9 * max(1.0, want.abs().max().item()), stat
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert max_rel_err(got, want) < 1e-9


def assert_ignored_positions_are_zero(case: Case, impl: str) -> None:
    """Every statistic and the hidden-state gradient are 0 at ignored positions (``case`` has some
    of both kinds and no bias); every other position gets a non-zero gradient."""
    ignored = case.labels == -100
    assert ignored.any() and (~ignored).any()
    stats, (grad_h, _) = run(case, impl, ALL_STATS)
    for stat in ALL_STATS:
        assert torch.all(getattr(stats, stat)[ignored] == ignored_value(stat)), stat
    assert torch.all(grad_h[ignored] == 0)
    assert torch.all(grad_h[~ignored].abs().sum(-1) > 0)


def assert_all_ignored_gives_zeros(case: Case, impl: str) -> None:
    """With every label ignored, every statistic and every gradient is exactly 0 (not NaN)."""
    stats, grads = run(case, impl, ALL_STATS)
    for stat in ALL_STATS:
        assert torch.all(getattr(stats, stat) == ignored_value(stat)), stat
    assert len(grads) == len(case.leaves())
    for grad in grads:
        assert torch.all(grad == 0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces, in elements (``numel``) and in bytes."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(max |e|, tiny): one scale for a whole tensor."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(-1)
    return t


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Uninitialised allocations come back poisoned (NaN, or -1 for ints), so an element an
    implementation fails to write shows up as a wrong value. Autouse in every module importing it."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(new_empty(self, *a, **k)))


def largest_tensor(case: Case, impl: str) -> _LargestTensor:
    """The largest tensor made while ``impl`` computes every statistic of ``case`` and its gradients:
    ``.numel`` elements, ``.bytes`` bytes."""
    with _LargestTensor() as mode:
        run(case, impl, ALL_STATS)
    return mode


# Cases of the multi-process tests (a vocabulary split over processes, a DTensor head): every head
# option, a shared head, odd sizes, extreme logits, the JSD endpoints, one token, all ignored.
SPLIT_CASES = {
    "all_options": dict(bias=True, ref_bias=True, softcap=2.5, ref_softcap=4.0, temperature=0.7,
                        logit_scale=1.3, ref_logit_scale=0.8, jsd_beta=0.3),
    "shared_weight": dict(shared_weight=True, bias=True),
    "three_dims_odd_sizes": dict(shape=(2, 3, 5), hidden_size=7, vocab=53, ref_hidden_size=11),
    "extreme_logits": dict(logit_std=1e4, softcap=50.0, seed=11),
    "jsd_beta_0": dict(jsd_beta=0.0, seed=4),
    "jsd_beta_1": dict(jsd_beta=1.0, seed=5),
    "single_token": dict(shape=(1,), ignore_fraction=0.0, seed=6),
    "all_ignored": dict(ignore_fraction=1.0, bias=True),
}
