"""Ties at the maximum logit across the slices of a vocabulary-parallel head (2 gloo processes):
``top1_correct`` and ``argmax`` take the lowest global index that attains the maximum, as on one
process."""
import pytest
import torch
import torch.distributed as dist

import fpo_ops
from fpo_ops.token_stats import chunked
from distributed_launch import launch
from tie_cases import CASES, first_argmax

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

# (start, stop) per rank: the first tied column (3) on rank 1 with the others, or on rank 0 alone
SPLITS = {"first_tie_on_rank_1": [(0, 3), (3, 37)], "even": [(0, 19), (19, 37)]}
OUTPUTS = ("logp", "top1_correct", "argmax")


def _worker(rank: int, world: int) -> None:
    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 5, 8
    for name, make in CASES.items():
        case = make()
        predicted, _ = first_argmax(case)
        valid = case.labels != -100
        want = ((predicted == case.labels) & valid).double()
        want_argmax = torch.where(valid, predicted, -1)
        single = fpo_ops.token_stats(case.hidden, case.weight, case.labels, bias=case.bias, outputs=OUTPUTS,
                                     impl="torch", **case.kwargs)
        assert torch.equal(single.top1_correct, want), name
        for split, bounds in SPLITS.items():
            start, stop = bounds[rank]
            bias = None if case.bias is None else case.bias.detach()[start:stop]
            for impl in ("torch", "triton"):
                stats = fpo_ops.token_stats(case.hidden, case.weight.detach()[start:stop], case.labels, bias=bias,
                                            outputs=OUTPUTS, impl=impl, process_group=dist.group.WORLD,
                                            **case.kwargs)
                assert torch.equal(stats.top1_correct, want), (name, split, impl)
                assert torch.equal(stats.argmax, want_argmax), (name, split, impl)


def test_top1_correct_ties_across_slices():
    launch(_worker, 2)
