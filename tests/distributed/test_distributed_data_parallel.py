"""A tiny policy trained with token_stats under DDP and FSDP2 equals the same step on one process.

The global batch of preference pairs is split raggedly over the ranks (1, 2, 3, ... pairs), so
a per-rank mean would weight ranks wrongly: the loss is reduced with `data_parallel_mean`. Checked
in float64 to 1e-9: the logged global loss, every parameter's gradient and the parameters after an
optimizer step. The same processes check the reduction helpers on their own, and on 4 processes a
vocabulary-parallel head inside DDP (2 vocabulary groups x 2 data-parallel groups).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import fpo_ops
from fpo_ops.distributed import data_parallel_mean, mean_over_ranks, vocab_range
from distributed_launch import launch
from stats_cases import max_rel_err

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

VOCAB, HIDDEN, REF_HIDDEN, SEQ = 29, 12, 10, 7
BETA, KL_COEF = 0.1, 0.3
TOL = 1e-9


class TinyPolicy(nn.Module):
    """Embedding, one mixing layer and a biased LM head whose statistics come from token_stats.

    The statistics are computed inside ``forward`` so that FSDP2 has the head's parameters
    unsharded while the op reads them (and again for its backward).
    """

    def __init__(self, seed: int, rows: slice = slice(None), vocab_group=None):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN, dtype=torch.float64)
        self.mix = nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)
        self.head = nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
        # With a vocabulary group the head keeps only this process's rows of the same init.
        self.head.weight = nn.Parameter(self.head.weight.detach()[rows].clone())
        self.head.bias = nn.Parameter(self.head.bias.detach()[rows].clone())
        self.vocab_group = vocab_group

    def forward(self, input_ids, labels, ref_hidden, ref_weight):
        hidden = torch.tanh(self.mix(self.embed(input_ids)))
        return fpo_ops.token_stats(hidden, self.head.weight, labels, ref_hidden, ref_weight,
                                   bias=self.head.bias, outputs=("logp", "ref_logp", "kl"), impl="torch",
                                   process_group=self.vocab_group)


def _global_batch(n_pairs: int):
    """TRL layout: rows [0, P) are the chosen completions, rows [P, 2P) the rejected ones."""
    g = torch.Generator().manual_seed(123)
    input_ids = torch.randint(0, VOCAB, (2 * n_pairs, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (2 * n_pairs, SEQ), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[torch.rand(labels.shape, generator=g) < 0.2] = -100  # ragged completion lengths
    ref_hidden = torch.randn(2 * n_pairs, SEQ, REF_HIDDEN, generator=g, dtype=torch.float64)
    ref_weight = torch.randn(VOCAB, REF_HIDDEN, generator=g, dtype=torch.float64) / REF_HIDDEN ** 0.5
    return input_ids, labels, ref_hidden, ref_weight


def _pair_losses(stats, labels) -> torch.Tensor:
    """TDPO-style sigmoid loss per pair: DPO log-ratio margin minus a token-KL margin."""
    mask = labels != -100
    logratio = ((stats.logp - stats.ref_logp) * mask).sum(-1)
    kl = (stats.kl * mask).sum(-1)
    n = labels.shape[0] // 2
    margin = (logratio[:n] - logratio[n:]) - KL_COEF * (kl[n:] - kl[:n])
    return -F.logsigmoid(BETA * margin)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train_step(model: nn.Module, batch, wrap: str, data_group=None):
    """One SGD step; returns (global loss, {name: grad}, {name: parameter after the step})."""
    input_ids, labels, ref_hidden, ref_weight = batch
    if wrap == "ddp":
        module = DistributedDataParallel(model, process_group=data_group)
    elif wrap == "fsdp2":
        fully_shard(model.mix)
        fully_shard(model)
        module = model
    else:
        module = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    per_pair = _pair_losses(module(input_ids, labels, ref_hidden, ref_weight), labels)
    if wrap == "single":
        loss = logged = per_pair.mean()
    else:
        loss = data_parallel_mean(per_pair.sum(), per_pair.numel(), data_group)
        logged = mean_over_ranks(loss, data_group)
    loss.backward()
    grads = {name: _full(p.grad) for name, p in model.named_parameters()}
    optimizer.step()
    params = {name: _full(p) for name, p in model.named_parameters()}
    return logged.detach(), grads, params


def _rank_rows(pairs_per_rank, rank: int) -> torch.Tensor:
    """This rank's chosen rows, then its rejected rows, of the global batch."""
    n_pairs = sum(pairs_per_rank)
    first = sum(pairs_per_rank[:rank])
    chosen = torch.arange(first, first + pairs_per_rank[rank])
    return torch.cat([chosen, chosen + n_pairs])


def _data_parallel_worker(rank: int, world: int) -> None:
    pairs_per_rank = [1 + r % 3 for r in range(world)]
    batch = _global_batch(sum(pairs_per_rank))
    rows = _rank_rows(pairs_per_rank, rank)
    local_batch = tuple(t[rows] for t in batch[:3]) + (batch[3],)
    want_loss, want_grads, want_params = _train_step(TinyPolicy(seed=0), batch, "single")
    assert all(g.abs().max() > 0 for g in want_grads.values())
    for wrap in ("ddp", "fsdp2"):
        loss, grads, params = _train_step(TinyPolicy(seed=0), local_batch, wrap)
        assert max_rel_err(loss, want_loss) < TOL, (wrap, loss.item(), want_loss.item())
        assert grads.keys() == want_grads.keys()
        for name in want_grads:
            assert max_rel_err(grads[name], want_grads[name]) < TOL, (wrap, name)
            assert max_rel_err(params[name], want_params[name]) < TOL, (wrap, name)
    _check_mean_helpers(rank, world)
    if world == 4:
        _check_vocab_parallel_head_under_ddp(rank, world)


def _check_vocab_parallel_head_under_ddp(rank: int, world: int) -> None:
    """2 x 2 mesh: each pair of processes splits the head's rows, DDP averages across the pairs.

    Ranks (0, 1) and (2, 3) are vocabulary groups fed the same micro-batch; (0, 2) and (1, 3) are
    data-parallel groups over which DDP averages the gradients of the same rows.
    """
    vocab_size = 2
    n_data = world // vocab_size
    vocab_groups = [dist.new_group([d * vocab_size + v for v in range(vocab_size)]) for d in range(n_data)]
    data_groups = [dist.new_group([d * vocab_size + v for d in range(n_data)]) for v in range(vocab_size)]
    data_rank, vocab_rank = divmod(rank, vocab_size)
    vocab_group = vocab_groups[data_rank]

    pairs_per_data_rank = [1 + d % 3 for d in range(n_data)]
    batch = _global_batch(sum(pairs_per_data_rank))
    want_loss, want_grads, want_params = _train_step(TinyPolicy(seed=0), batch, "single")
    start, stop = vocab_range(VOCAB, vocab_group)
    rows = _rank_rows(pairs_per_data_rank, data_rank)
    local_batch = tuple(t[rows] for t in batch[:3]) + (batch[3][start:stop],)
    model = TinyPolicy(seed=0, rows=slice(start, stop), vocab_group=vocab_group)
    loss, grads, params = _train_step(model, local_batch, "ddp", data_groups[vocab_rank])
    assert max_rel_err(loss, want_loss) < TOL, (loss.item(), want_loss.item())
    for name in want_grads:
        own = slice(start, stop) if name.startswith("head.") else slice(None)
        assert max_rel_err(grads[name], want_grads[name][own]) < TOL, name
        assert max_rel_err(params[name], want_params[name][own]) < TOL, name


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_and_fsdp2_match_single_process(world_size):
    launch(_data_parallel_worker, world_size)


def _check_mean_helpers(rank: int, world: int) -> None:
    """Ranks with different counts (one with none) get gradient world / global count each."""
    counts = [3, 0, 5, 2][:world]
    local_sum = torch.tensor(float(10 * rank + 1), dtype=torch.float64, requires_grad=True)
    loss = data_parallel_mean(local_sum, counts[rank])
    loss.backward()
    assert local_sum.grad.item() == pytest.approx(world / sum(counts), rel=1e-15)
    want = sum(10 * r + 1 for r in range(world)) / sum(counts)
    assert mean_over_ranks(loss).item() == pytest.approx(want, rel=1e-15)
    empty = data_parallel_mean(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match=r"^local_sum: expected a scalar tensor"):
        data_parallel_mean(torch.zeros(2), 1)

