"""fpo-ops under torch.distributed.

- Vocabulary-parallel heads: ``fpo_ops.token_stats(..., process_group=group)`` with each process
  holding a contiguous slice of the head's rows (`vocab_range` gives the usual split).
- Tensor-parallel heads: a DTensor weight placed ``Shard(0)`` on a 1-D device mesh (PyTorch's
  ``ColwiseParallel``) runs the same way over the mesh's group (`tensor_parallel`).
- Data parallel (DDP, FSDP2): the op needs nothing special; `data_parallel_mean` makes the global
  mean over ragged per-rank batches explicit, `mean_over_ranks` logs it.
"""
from .data_parallel import data_parallel_mean, mean_over_ranks
from .vocab_parallel import vocab_range

__all__ = ["data_parallel_mean", "mean_over_ranks", "vocab_range"]
