"""The table of statistics (`fpo_ops.token_stats.stats.STATS`) against the math it describes: what each entry
says about the reference, the gradient, the partial sums and the saved values is what the oracle
and the online math actually do."""
import pytest
import torch

import fpo_ops
from fpo_ops.token_stats import online
from fpo_ops.token_stats.reference import reference_token_stats
from fpo_ops.token_stats.options import HeadOptions
from fpo_ops.token_stats.stats import PARTIALS, STATS, TokenStats, partials_for
from stats_cases import make_case, max_rel_err

# Tile sums of one [n, V] tile with every optional partial.
ALL_KEYS = tuple(p.key for p in PARTIALS if not p.always)


def _logits(seed=0, n=6, vocab=29):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    z_ref = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    return z, z_ref, labels


def test_token_stats_fields_follow_the_table():
    assert TokenStats._fields == tuple(stat.name for stat in STATS) == fpo_ops.STAT_NAMES
    assert TokenStats() == (None,) * len(STATS)


@pytest.mark.parametrize("stat", STATS, ids=lambda s: s.name)
def test_reads_reference_matches_the_oracle(stat):
    """A statistic marked as reading the reference changes with the reference model; others do not."""
    case = make_case(ignore_fraction=0.0, seed=3)
    other = case.ref_hidden.flip(0)
    kwargs = dict(outputs=(stat.name,), impl="reference")
    first = getattr(fpo_ops.token_stats(case.hidden, case.weight, case.labels, case.ref_hidden,
                                        case.ref_weight, **kwargs), stat.name)
    second = getattr(fpo_ops.token_stats(case.hidden, case.weight, case.labels, other, case.ref_weight,
                                         **kwargs), stat.name)
    assert (not torch.equal(first, second)) == stat.reads_reference


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("stat", STATS, ids=lambda s: s.name)
def test_differentiable_matches_the_implementations(stat, impl):
    case = make_case(seed=4)
    value = getattr(fpo_ops.token_stats(case.hidden, case.weight, case.labels, case.ref_hidden,
                                        case.ref_weight, outputs=(stat.name,), impl=impl), stat.name)
    assert value.requires_grad == stat.differentiable


@pytest.mark.parametrize("stat", [s for s in STATS if s.name != "jsd"], ids=lambda s: s.name)
def test_declared_partials_are_needed_and_enough(stat):
    """``finalize`` yields the statistic from exactly the partials the table declares, and the
    value equals the oracle's; without any one of them it cannot."""
    z, z_ref, labels = _logits()
    keys = partials_for((stat.name,))
    assert keys == stat.partials
    stats = online.finalize(online.tile_partials(z, z_ref, labels, keys), z.shape[1])
    logp, logq = z.log_softmax(-1), z_ref.log_softmax(-1)
    expected = {
        "logp": logp.gather(1, labels[:, None])[:, 0], "ref_logp": logq.gather(1, labels[:, None])[:, 0],
        "kl": (logq.exp() * (logq - logp)).sum(-1), "reverse_kl": (logp.exp() * (logp - logq)).sum(-1),
        "entropy": -(logp.exp() * logp).sum(-1), "log_sum_p2": torch.logsumexp(2 * logp, -1),
        "mean_logit": z.mean(-1), "top1_correct": (z.argmax(-1) == labels).double(),
        "argmax": z.argmax(-1), "lse": torch.logsumexp(z, -1),
    }[stat.name]
    assert max_rel_err(stats[stat.name], expected) < 1e-12
    for key in keys:
        fewer = tuple(k for k in keys if k != key)
        assert stat.name not in online.finalize(online.tile_partials(z, z_ref, labels, fewer), z.shape[1])
    # and nothing of another statistic is computed on its behalf
    every = online.tile_partials(z, z_ref, labels, ALL_KEYS)
    assert set(every) - set(online.tile_partials(z, z_ref, labels, keys)) == set(ALL_KEYS) - set(keys)


@pytest.mark.parametrize("stat", [s for s in STATS if s.differentiable], ids=lambda s: s.name)
def test_saved_value_is_all_the_gradient_reads(stat):
    """The logit gradient of each statistic needs lse, lse_ref and only the value the table says
    backward saves; with it, it equals autograd's gradient of the oracle."""
    z, z_ref, labels = _logits(seed=1)
    opts = HeadOptions(outputs=tuple(s.name for s in STATS), compute_dtype=torch.float64, jsd_beta=0.3)
    stats = online.finalize(online.tile_partials(z, z_ref, labels, ALL_KEYS), z.shape[1])
    logp_all, logq_all = z.log_softmax(-1), z_ref.log_softmax(-1)
    m = torch.logaddexp(logq_all + torch.log(torch.tensor(0.3, dtype=torch.float64)),
                        logp_all + torch.log1p(torch.tensor(-0.3, dtype=torch.float64)))
    stats["kl_p_m"] = (logp_all.exp() * (logp_all - m)).sum(-1)
    saved = {"lse": stats["lse"], "lse_ref": stats["lse_ref"]}
    if stat.saved is not None:
        saved[stat.saved] = stats[stat.saved]
    g = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dz = online.tile_logit_grad(z, z_ref, labels, {stat.name: g}, saved, opts.jsd_beta)

    z_leaf = z.clone().requires_grad_()
    value = reference_token_stats(
        z_leaf, torch.eye(z.shape[1], dtype=torch.float64), None, labels, z_ref,
        torch.eye(z.shape[1], dtype=torch.float64), None,
        HeadOptions(outputs=(stat.name,), compute_dtype=torch.float64, jsd_beta=0.3))[stat.name]
    (want,) = torch.autograd.grad((value * g).sum(), z_leaf)
    assert max_rel_err(dz, want) < 1e-12
