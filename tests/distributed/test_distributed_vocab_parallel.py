"""Vocabulary-parallel token_stats on 2 and 4 gloo processes equals the single-process op.

Every process builds the same float64 inputs (seeded), computes the single-process statistics and
gradients itself (the same impl, and the float64 oracle), then the vocabulary-parallel ones from its
own slice of the head, and compares: statistics, the full dhidden, and its slice of dweight/dbias.
impl="torch" runs every case on an even and an uneven split, impl="triton" (the Triton interpreter
without CUDA) a subset on the uneven split.
"""
import pytest
import torch
import torch.distributed as dist

import fpo_ops
from fpo_ops.token_stats import chunked
from fpo_ops.distributed import vocab_range
from distributed_launch import launch
from fpo_ops.token_stats.stats import INDEX_STATS
from stats_cases import ALL_STATS, SPLIT_CASES as CASES, Case, make_case, max_abs_err, max_rel_err, run

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

TOL = 1e-9

SUBSETS = [("logp",), ("kl", "ref_logp"), ("reverse_kl", "entropy"), ("jsd", "mean_logit")]
# The Triton interpreter is slow on CPU: its slices run the cases that differ in code path.
TRITON_CASES = ("all_options", "shared_weight", "extreme_logits", "all_ignored")
TRITON_SUBSETS = [("logp",), ("reverse_kl", "entropy")]


def _uneven_split(vocab: int, world: int, rank: int):
    """A lopsided contiguous split: rank 0 holds one row, the rest share the remainder unevenly."""
    sizes = [1] + [(vocab - 1) // (world - 1) + (1 if r == 1 else 0) for r in range(1, world)]
    sizes[-1] = vocab - sum(sizes[:-1])
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _slice_case(case: Case, start: int, stop: int) -> Case:
    """This process's view: the same hidden states and labels, rows [start, stop) of each head."""
    def rows(t, grad):
        return None if t is None else t.detach()[start:stop].clone().requires_grad_(grad)
    return Case(case.hidden.detach().clone().requires_grad_(), rows(case.weight, True), case.labels,
                case.ref_hidden, rows(case.ref_weight, False), rows(case.bias, True),
                rows(case.ref_bias, False), dict(case.kwargs))


def _labels_on_every_slice(case: Case, bounds) -> None:
    """Point some tokens at the first and last row of every slice, so every rank owns a label."""
    flat = case.labels.view(-1)
    targets = [row for start, stop in bounds for row in (start, stop - 1)]
    for i, row in enumerate(targets[: flat.numel()]):
        flat[i] = row


def _check(name: str, case: Case, outputs, group, start: int, stop: int, impl: str) -> None:
    name = f"{impl}/{name}"
    single_stats, single_grads = run(case, impl, outputs)
    oracle_stats, oracle_grads = run(case, "reference", outputs)
    local = _slice_case(case, start, stop)
    stats, grads = run(local, impl, outputs, process_group=group)
    for stat in outputs:
        got = getattr(stats, stat)
        want_dtype = torch.int64 if stat in INDEX_STATS else torch.float64
        assert got.dtype == want_dtype and got.shape == case.labels.shape, (name, stat)
        for want in (getattr(single_stats, stat), getattr(oracle_stats, stat)):
            assert max_rel_err(got, want) < TOL, (name, stat, max_rel_err(got, want))
    for other in set(ALL_STATS) - set(outputs):
        assert getattr(stats, other) is None
    # Leaves are (hidden, weight[, bias]): full dhidden, then this slice's rows of the rest.
    assert len(grads) == len(single_grads)
    for i, (got, full, oracle) in enumerate(zip(grads, single_grads, oracle_grads)):
        rows = slice(None) if i == 0 else slice(start, stop)
        assert got.shape == full[rows].shape, (name, i)
        # Errors relative to the whole gradient's scale, as single-process tests measure them: a
        # slice of a gradient may hold only entries many orders of magnitude below its maximum.
        for want in (full, oracle):
            err = max_abs_err(got, want[rows]) / want.abs().max().clamp_min(1e-30).item()
            assert err < TOL, (name, i, err)


def _bounds(vocab: int, world: int, split: str):
    if split == "even":
        return [_even(vocab, world, r) for r in range(world)]
    return [_uneven_split(vocab, world, r) for r in range(world)]


def _even(vocab: int, world: int, rank: int):
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _all_cases_worker(rank: int, world: int) -> None:
    for impl in ("torch", "triton"):
        _check_cases(rank, world, impl)
    _check_subgroups(rank, world)
    _check_low_precision(rank, world)
    _check_collectives(rank, world)
    _check_no_tokens(rank, world)
    _check_bad_input(rank, world, dist.group.WORLD)
    _check_hostile_values(rank, world)


def _check_hostile_values(rank: int, world: int) -> None:
    """Inputs that must not give a silent wrong number, on a vocabulary split as on one process:
    NaN hidden states at ignored rows, a reference made under inference mode, narrow integer
    labels, unchecked labels outside the vocabulary; and a second derivative raises."""
    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 5, 4
    group = dist.group.WORLD
    case = make_case(shape=(13,), bias=True, ref_bias=True, seed=60)
    start, stop = _even(37, world, rank)
    ignored = case.labels == -100
    hidden = case.hidden.detach().clone()
    hidden[ignored] = float("nan")
    with torch.inference_mode():
        frozen = {name: getattr(case, name).clone() for name in ("ref_hidden", "ref_weight", "ref_bias")}
    labels = case.labels.clone()
    labels[:2] = torch.tensor([-3, 40])
    variants = {
        "nan_at_ignored": (dict(hidden=hidden), {}),
        "inference_reference": (frozen, {}),
        "int8_labels": (dict(labels=case.labels.to(torch.int8)), {}),
        "unchecked_out_of_range": (dict(labels=labels), dict(check_labels=False)),
    }
    for impl in ("torch", "triton"):
        for name, (fields, extra) in variants.items():
            local = _slice_case(case, start, stop)
            for field, value in fields.items():
                setattr(local, field, value[start:stop] if field in ("ref_weight", "ref_bias") else value)
            local.hidden = local.hidden.detach().clone().requires_grad_()
            oracle = case if name != "unchecked_out_of_range" else Case(
                case.hidden, case.weight, labels, case.ref_hidden, case.ref_weight, case.bias, case.ref_bias)
            want_stats, want_grads = run(oracle, "reference", ALL_STATS, **extra)
            stats, grads = run(local, impl, ALL_STATS, process_group=group, **extra)
            for stat in ALL_STATS:
                assert max_rel_err(getattr(stats, stat), getattr(want_stats, stat)) < TOL, (impl, name, stat)
            for i, (got, want) in enumerate(zip(grads, want_grads)):
                rows = slice(None) if i == 0 else slice(start, stop)
                assert torch.isfinite(got).all() and max_rel_err(got, want[rows]) < TOL, (impl, name, i)
        local = _slice_case(case, start, stop)
        stats = fpo_ops.token_stats(local.hidden, local.weight, case.labels, case.ref_hidden, local.ref_weight,
                                    bias=local.bias, outputs=("logp", "kl"), impl=impl, process_group=group)
        (grad_h,) = torch.autograd.grad((stats.logp + stats.kl).sum(), local.hidden, create_graph=True)
        with pytest.raises(RuntimeError, match=r"^token_stats: double backward is not supported"):
            torch.autograd.grad((grad_h ** 2).sum(), local.weight)


def _check_no_tokens(rank: int, world: int) -> None:
    """N = 0: empty statistics and zero gradients, with the same collectives on every rank."""
    case = make_case(shape=(0,), bias=True)
    start, stop = _even(37, world, rank)
    for impl in ("torch", "triton"):
        stats, grads = run(_slice_case(case, start, stop), impl, ALL_STATS, process_group=dist.group.WORLD)
        assert all(getattr(stats, stat).shape == (0,) for stat in ALL_STATS)
        assert [tuple(g.shape) for g in grads] == [(0, 19), (stop - start, 19), (stop - start,)]
        assert all(bool((g == 0).all()) for g in grads)


def _check_cases(rank: int, world: int, impl: str) -> None:
    # Blocks that divide nothing, so each slice spans several partial tiles.
    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 5, 4
    group = dist.group.WORLD
    assert vocab_range(37, group) == _even(37, world, rank)
    with pytest.raises(ValueError, match=r"^vocab_size: expected an int >= the group size"):
        vocab_range(world - 1, group)
    splits = ("even", "uneven") if impl == "torch" else ("uneven",)
    cases = CASES if impl == "torch" else {name: CASES[name] for name in TRITON_CASES}
    subsets = SUBSETS if impl == "torch" else TRITON_SUBSETS
    for split in splits:
        for name, kwargs in cases.items():
            case = make_case(**kwargs)
            vocab = case.weight.shape[0]
            assert vocab % world != 0
            bounds = _bounds(vocab, world, split)
            if kwargs.get("ignore_fraction", 0.25) < 1.0 and case.labels.numel() >= 2 * world:
                _labels_on_every_slice(case, bounds)
                owners = {next(r for r, (a, b) in enumerate(bounds) if a <= y < b)
                          for y in case.labels.view(-1).tolist() if y != -100}
                assert owners == set(range(world))
            _check(f"{name}/{split}", case, ALL_STATS, group, *bounds[rank], impl)
        for outputs in subsets:
            case = make_case(bias=True, softcap=5.0, seed=3)
            _check(f"{outputs}/{split}", case, outputs, group, *_bounds(37, world, split)[rank], impl)


def _check_subgroups(rank: int, world: int) -> None:
    """Two independent groups at once: ranks are group ranks, and each group sums only its own."""
    if world < 4:
        return
    halves = [list(range(0, world // 2)), list(range(world // 2, world))]
    groups = [dist.new_group(ranks) for ranks in halves]
    mine = 0 if rank in halves[0] else 1
    group, group_rank = groups[mine], halves[mine].index(rank)
    with pytest.raises(ValueError, match=r"^process_group: expected a group that contains this process"):
        case = make_case(shape=(3,))
        fpo_ops.token_stats(case.hidden, case.weight, case.labels, process_group=groups[1 - mine])
    case = make_case(vocab=41, bias=True, softcap=3.0, seed=20 + mine)
    bounds = _bounds(41, len(halves[mine]), "even")
    _check(f"subgroup{mine}", case, ALL_STATS, group, *bounds[group_rank], "torch")


def _check_low_precision(rank: int, world: int) -> None:
    """Error against float64 <= 2x that of plain same-dtype PyTorch (the oracle run in dtype) + floor."""
    # The tiles of the single-process error-budget test: with 4-column tiles the streaming op's
    # fp32 gradients exceed the budget on one process already (about 2e-5 against 4e-6), which
    # says nothing about the vocabulary split.
    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 8, 16
    for dtype, floor in ((torch.float32, 1e-6), (torch.bfloat16, 1e-3)):
        case64 = make_case(shape=(4, 16), hidden_size=48, vocab=150, ref_hidden_size=40, bias=True,
                           softcap=20.0, seed=13)
        low = case64.cast(dtype)
        exact_stats, exact_grads = run(low.cast(torch.float64), "reference", ALL_STATS)
        plain_stats, plain_grads = run(low, "reference", ALL_STATS)
        start, stop = _bounds(150, world, "uneven")[rank]
        stats, grads = run(_slice_case(low, start, stop), "torch", ALL_STATS, process_group=dist.group.WORLD)
        for stat in ALL_STATS:
            want = getattr(exact_stats, stat)
            if stat in INDEX_STATS:  # an index has no error size (see stats_cases.assert_within_error_budget)
                assert torch.equal(getattr(stats, stat) < 0, want < 0), stat
                continue
            ours, plain = max_abs_err(getattr(stats, stat), want), max_abs_err(getattr(plain_stats, stat), want)
            assert getattr(stats, stat).dtype == torch.float32
            assert ours <= 2 * plain + floor * max(1.0, want.abs().max().item()), (dtype, stat, ours, plain)
        for i, (got, plain, want) in enumerate(zip(grads, plain_grads, exact_grads)):
            rows = slice(None) if i == 0 else slice(start, stop)
            assert got.dtype == dtype
            ours, base = max_abs_err(got, want[rows]), max_abs_err(plain[rows], want[rows])
            assert ours <= 2 * base + floor * want.abs().max().item(), (dtype, i, ours, base)


def _check_collectives(rank: int, world: int) -> None:
    """The all-reduces issued are exactly the documented per-token scalars plus dhidden."""
    issued = []
    original = dist.all_reduce

    def recording(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        issued.append((str(op).split(".")[-1], tuple(tensor.shape), tensor.dtype))
        return original(tensor, op=op, group=group, async_op=async_op)

    n_tokens, hidden_size, f64 = 6, 19, torch.float64
    expected = {
        # Without a reference statistic the reference head is not read at all.
        ("logp",): [("MAX", (1, n_tokens), f64), ("SUM", (2, n_tokens), f64)],
        ("logp", "ref_logp", "kl"): [("MAX", (2, n_tokens), f64), ("SUM", (5, n_tokens), f64)],
        # top1_correct adds the maximum logit before the label to the MAX all-reduce; argmax is
        # the lowest global index at the maximum, in int64
        ALL_STATS: [("MAX", (3, n_tokens), f64), ("SUM", (9, n_tokens), f64), ("MIN", (n_tokens,), torch.int64),
                    ("SUM", (2, n_tokens), f64)],
    }
    dist.all_reduce = recording
    try:
        for outputs, forward in expected.items():
            case = make_case(shape=(n_tokens,), hidden_size=hidden_size, bias=True)
            issued.clear()
            run(_slice_case(case, *_even(37, world, rank)), "torch", outputs, process_group=dist.group.WORLD)
            assert issued == ([("SUM", (world,), torch.int64)] + forward
                              + [("SUM", (n_tokens, hidden_size), f64)]), (outputs, issued)
    finally:
        dist.all_reduce = original


def _check_bad_input(rank: int, world: int, group) -> None:
    case = make_case(shape=(2, 5), bias=True)
    start, stop = _even(37, world, rank)
    local = _slice_case(case, start, stop)
    base = dict(hidden=local.hidden, weight=local.weight, labels=case.labels, ref_hidden=case.ref_hidden,
                ref_weight=local.ref_weight, bias=local.bias, outputs=("logp", "kl"), process_group=group)
    # A label beyond this rank's rows but inside the whole vocabulary is fine ...
    fpo_ops.token_stats(**dict(base, labels=torch.full_like(case.labels, 36)))
    # ... one beyond the whole vocabulary is not, and every rank says so.
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 37\)"):
        fpo_ops.token_stats(**dict(base, labels=case.labels.index_fill(1, torch.tensor([0]), 37)))
    with pytest.raises(ValueError, match=r"^impl: expected .* with a process_group, got 'reference'"):
        fpo_ops.token_stats(**dict(base, impl="reference"))
    with pytest.raises(TypeError, match=r"^process_group: expected a torch.distributed.ProcessGroup"):
        fpo_ops.token_stats(**dict(base, process_group="world"))
    if rank == 0:
        empty = dict(weight=local.weight[:0], bias=local.bias[:0], ref_weight=local.ref_weight[:0])
    else:
        empty = {}
    with pytest.raises(ValueError, match=r"^weight: expected at least one vocabulary row on every process"):
        fpo_ops.token_stats(**dict(base, **empty))


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_matches_single_process(world_size):
    launch(_all_cases_worker, world_size)


def test_process_group_of_wrong_type_is_rejected():
    case = make_case(shape=(2, 3))
    with pytest.raises(TypeError, match=r"^process_group: expected a torch.distributed.ProcessGroup"):
        fpo_ops.token_stats(case.hidden, case.weight, case.labels, process_group=object())
