"""Ties at the maximum logit: ``top1_correct`` and the predicted token ``argmax`` follow
torch.argmax (the first maximal index), as TRL's ``mean_token_accuracy`` and Liger's
``return_predicted_tokens`` do, in every implementation. A label on a later copy of the maximum
is not the prediction (inputs: `tie_cases`)."""
import pytest
import torch

import fpo_ops
from fpo_ops.token_stats import chunked
from stats_cases import poisoned_allocations  # noqa: F401  (autouse fixture)
from tie_cases import CASES, first_argmax

IMPLS = ("reference", "torch", "triton")


def expected_top1(case):
    predicted, z = first_argmax(case)
    return ((predicted == case.labels) & (case.labels != -100)).double(), z


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Small tiles, so that tied columns fall into different vocabulary tiles (torch backend)."""
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 8)
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_top1_correct_takes_the_first_maximal_index(name, impl):
    case = CASES[name]()
    want, z = expected_top1(case)
    at_max = z.gather(1, case.labels.clamp_min(0)[:, None])[:, 0] == z.max(-1).values
    later_tie = at_max & (want == 0) & (case.labels != -100)
    # the planted ties are real: some labels sit on a later copy of the maximum, some on the first
    assert later_tie.sum() >= 4 and want.sum() >= 4
    stats = fpo_ops.token_stats(case.hidden, case.weight, case.labels, bias=case.bias,
                                outputs=("logp", "top1_correct"), impl=impl, **case.kwargs)
    assert torch.equal(stats.top1_correct, want)
    assert torch.all(stats.top1_correct[later_tie] == 0)


# with the entropy the Triton forward folds each tile in column pieces, which are not in column
# order (`fpo_ops.token_stats.kernels.utils.launch_pieces`): a tie between pieces of one tile
@pytest.mark.parametrize("more", [(), ("entropy",)], ids=["whole-tiles", "tile-pieces"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_argmax_is_the_first_maximal_index(name, impl, more):
    """int64 ids, -1 at ignored tokens (as Liger's predicted tokens), no gradient."""
    case = CASES[name]()
    predicted, _ = first_argmax(case)
    ignored = case.labels == -100
    stats = fpo_ops.token_stats(case.hidden, case.weight, case.labels, bias=case.bias,
                                outputs=("argmax", "logp", *more), impl=impl, **case.kwargs)
    assert stats.argmax.dtype == torch.int64 and not stats.argmax.requires_grad
    assert torch.equal(stats.argmax, torch.where(ignored, -1, predicted))
    # the first of several maxima, not the label: where the label is a later copy they differ
    assert (stats.argmax[~ignored] != case.labels[~ignored]).any()
