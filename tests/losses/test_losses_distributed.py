"""`preference_loss` with a vocabulary-parallel head (process_group=) on 2 gloo processes equals one process.

Every process builds the same float64 batch (seeded), computes the loss on the whole head itself (the
same impl, and the float64 oracle), then on its own contiguous slice of the rows of both heads with
``process_group``, and compares to 1e-9: the loss, every metric, the per-sequence outputs, the full
dhidden and its slice of dweight/dbias, under a random upstream gradient.
"""
import pytest
import torch
import torch.distributed as dist

import fpo_ops
from fpo_ops.token_stats import chunked
from distributed_launch import launch
from loss_batches import make_batch
from stats_cases import max_rel_err

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

TOL = 1e-9
LOSSES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.2, label_smoothing=0.0),
    "tdpo2": dict(loss_type="tdpo2", beta=0.3, tdpo_alpha=0.7),
}
HEAD = dict(temperature=0.8, softcap=4.0, ref_softcap=6.0, logit_scale=1.2)


def _split(vocab: int, world: int, rank: int):
    """An uneven contiguous split: each rank holds a different number of rows."""
    sizes = [vocab // 3] + [vocab - vocab // 3]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _run(batch, rows: slice, impl: str, loss_kwargs, **extra):
    """The loss, metrics and gradients of one call on the rows ``rows`` of both heads."""
    hidden = batch.hidden.detach().clone().requires_grad_()
    weight = batch.weight.detach()[rows].clone().requires_grad_()
    bias = batch.bias.detach()[rows].clone().requires_grad_()
    out = fpo_ops.preference_loss(
        hidden, weight, batch.labels, batch.ref_hidden, batch.ref_weight[rows], bias=bias,
        ref_bias=batch.ref_bias[rows], impl=impl, **HEAD, **loss_kwargs, **extra,
    )
    g = torch.Generator().manual_seed(7)
    upstream = torch.randn(2, out.chosen_logps.shape[0], generator=g, dtype=torch.float64)
    total = 1.3 * out.loss + (upstream[0] * out.chosen_logps).sum() + (upstream[1] * out.rejected_logps).sum()
    grads = torch.autograd.grad(total, (hidden, weight, bias))
    return out, grads


def _worker(rank: int, world: int) -> None:
    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 5, 4  # several partial tiles on each slice
    batch = make_batch(rows=6, T=7, H=16, V=37, ref_H=12, seed=23, bias=True)
    start, stop = _split(37, world, rank)
    for name, loss_kwargs in LOSSES.items():
        single, single_grads = _run(batch, slice(None), "torch", loss_kwargs)
        oracle, oracle_grads = _run(batch, slice(None), "reference", loss_kwargs)
        local, grads = _run(batch, slice(start, stop), "torch", loss_kwargs, process_group=dist.group.WORLD)
        assert set(local.metrics) == set(single.metrics), name
        for want in (single, oracle):
            assert max_rel_err(local.loss, want.loss) < TOL, (name, "loss")
            for metric, value in want.metrics.items():
                assert max_rel_err(local.metrics[metric], value) < TOL, (name, metric)
            for field in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                          "chosen_rewards", "rejected_rewards", "per_sequence_loss"):
                assert max_rel_err(getattr(local, field), getattr(want, field)) < TOL, (name, field)
        # dhidden is whole on every process; dweight and dbias are this slice's rows
        for i, (got, full, exact) in enumerate(zip(grads, single_grads, oracle_grads)):
            rows = slice(None) if i == 0 else slice(start, stop)
            assert got.shape == full[rows].shape, (name, i)
            for want in (full, exact):
                err = (got - want[rows]).abs().max().item() / want.abs().max().clamp_min(1e-30).item()
                assert err < TOL, (name, i, err)


def test_preference_loss_vocab_parallel_matches_single_process():
    launch(_worker, 2)
