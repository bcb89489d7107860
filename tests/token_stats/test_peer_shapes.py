"""The shapes and values of the peers' test suites (Liger-Kernel, Cut-Cross-Entropy): odd sizes
(N 252, H 507, V 123), planted large logits, a softcap of 30 that the logits exceed, ragged runs of
ignored tokens. Every statistic and gradient against the float64 oracle; Triton (interpreter) on a
smaller variant with the same features."""
import pytest
import torch

from fpo_ops.token_stats import chunked
from stats_cases import ALL_STATS, Case, assert_matches_reference, make_case, poisoned_allocations  # noqa: F401


def peer_case(n: int, hidden_size: int, vocab: int, seed: int = 0) -> Case:
    """Softcap 30 with logits spread ~60 (the cap bites), a few logits planted at ~1e3, ragged
    ignored runs: a prompt of random length per block of 12 tokens and a random tail."""
    case = make_case(shape=(n,), hidden_size=hidden_size, vocab=vocab, ref_hidden_size=hidden_size // 3 + 1,
                     bias=True, ref_bias=True, ignore_fraction=0.0, logit_std=60.0, seed=seed, softcap=30.0,
                     ref_softcap=30.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        rows = torch.randperm(vocab, generator=g)[:3]
        case.bias[rows] += 1e3   # planted large logits, capped to ~30
    for start in range(0, n, 12):
        prompt = int(torch.randint(0, 9, (), generator=g))
        case.labels[start:start + prompt] = -100
    case.labels[n - int(torch.randint(1, 6, (), generator=g)):] = -100
    return case


@pytest.mark.parametrize("impl, sizes", [("torch", (252, 507, 123)), ("triton", (37, 45, 61))])
def test_peer_shapes_match_the_oracle(impl, sizes, monkeypatch):
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 64)
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 32)
    case = peer_case(*sizes)
    ignored = case.labels == -100
    assert 0.1 < ignored.float().mean() < 0.6
    assert_matches_reference(case, impl, ALL_STATS)
