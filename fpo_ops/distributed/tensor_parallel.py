"""Tensor-parallel LM heads: a DTensor weight sharded on the vocabulary runs `token_stats`
vocabulary-parallel over its device mesh's process group, without gathering the head.

PyTorch's ``ColwiseParallel`` on ``lm_head`` (as torchtitan's and transformers' tensor-parallel
plans apply it) makes the head's weight and bias DTensors placed ``Shard(0)`` on a 1-D device mesh:
each process holds a contiguous block of vocabulary rows, blocks in the order of the ranks of the
mesh's process group (the order DTensor's own ``full_tensor`` assembles them in). That is the
layout ``token_stats(..., process_group=group)`` computes on; `local_head` maps one onto the other:

- weight (and bias) ``Shard(0)``: ``to_local()`` and ``mesh.get_group()``. ``to_local`` is
  differentiable: autograd wraps this process's dweight back into a ``Shard(0)`` DTensor of the
  head's global shape, so ``weight.grad`` is the DTensor an optimizer of the DTensor expects.
- hidden states and labels are the same on every process. A DTensor one is made whole with
  ``full_tensor()`` (no communication for ``Replicate()``; a sequence-sharded one is gathered); its
  gradient, the group's full dhidden, returns as a DTensor of its own placement.
- the reference head: a DTensor placed like the weight, or a plain tensor holding the whole
  reference head (the same on every process), of which this process's rows are read.
- a ``Replicate()`` weight is a whole head on every process and runs as on one process.

Any other head (``Shard(1)``, ``Partial()``, a mesh of more than one dimension) raises a
ValueError: the op never gathers a head behind the caller's back (``weight.full_tensor()`` does it
where that is intended; `fpo_ops.integrations.hf` does it for FSDP2 parameters).
"""
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch


def _dtensor_type() -> Optional[type]:
    # No DTensor exists before torch.distributed.tensor is imported (importing it costs seconds),
    # so a plain call never imports it.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def has_dtensor(*tensors: Optional[torch.Tensor]) -> bool:
    """True when any of ``tensors`` is a DTensor."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


@dataclass
class LocalHead:
    """The plain tensors `token_stats` computes on, and the group holding the vocabulary (or None)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: Optional[torch.Tensor]
    ref_weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    ref_bias: Optional[torch.Tensor]
    group: Any


def _layout(t) -> str:
    return f"placements {tuple(t.placements)} on a device mesh of shape {tuple(t.device_mesh.shape)}"


def is_vocab_sharded(t) -> bool:
    """True for a DTensor placed ``Shard(0)`` on a 1-D device mesh (a head split on the vocabulary)."""
    from torch.distributed.tensor import Shard

    # `type is`, not isinstance: FSDP2's _StridedShard is a Shard subclass with another layout.
    return t.device_mesh.ndim == 1 and type(t.placements[0]) is Shard and t.placements[0].dim == 0


def _is_replicated(t) -> bool:
    return t.device_mesh.ndim == 1 and t.placements[0].is_replicate()


def _whole(t):
    """A DTensor made whole on every process (differentiable), anything else unchanged."""
    return t.full_tensor() if has_dtensor(t) else t


def _own_rows(weight) -> slice:
    """This process's rows of a ``Shard(0)`` head: torch.chunk's split (DTensor's) by group rank."""
    import torch.distributed as dist

    group = weight.device_mesh.get_group()
    vocab, world, rank = weight.shape[0], dist.get_world_size(group), dist.get_rank(group)
    chunk = -(-vocab // world)
    start = min(rank * chunk, vocab)
    stop = min(start + chunk, vocab)
    got = weight.to_local().shape[0]
    if got != stop - start:
        raise ValueError(
            f"weight: expected DTensor's Shard(0) split (torch.chunk's: {stop - start} of {vocab} rows on group rank "
            f"{rank}) to read this process's rows of a plain reference head, got {got} rows; pass the "
            f"reference head as a DTensor placed like weight"
        )
    return slice(start, stop)


def _companion(name: str, t, weight, own_rows, whole_if_plain: bool):
    """``bias``, ``ref_weight`` or ``ref_bias`` next to a DTensor ``weight``, as this process's rows.

    A DTensor must be placed like ``weight``. A plain tensor is this process's rows already
    (``whole_if_plain=False``: the policy bias, whose gradient must stay per process) or the whole
    tensor, the same on every process, which is sliced (the reference, which gets no gradient).
    """
    if t is None:
        return None
    if has_dtensor(t):
        if t.device_mesh != weight.device_mesh or tuple(t.placements) != tuple(weight.placements) or (
                t.dim() >= 1 and t.shape[0] != weight.shape[0]):
            raise ValueError(f"{name}: expected a DTensor placed like weight ({_layout(weight)}, "
                             f"{weight.shape[0]} rows), got {_layout(t)}, shape {tuple(t.shape)}")
        return t.to_local()
    if not is_vocab_sharded(weight):
        return t  # a replicated head: plain tensors are whole, as on one process
    if not whole_if_plain:
        local_rows = weight.to_local().shape[0]
        if tuple(t.shape) != (local_rows,):
            raise ValueError(
                f"{name}: expected a DTensor placed like weight or this process's rows of it (shape "
                f"({local_rows},)), got a plain tensor of shape {tuple(t.shape)}"
            )
        return t
    if t.dim() < 1 or t.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{name}: expected a DTensor placed like weight or the whole reference head ({weight.shape[0]} "
            f"rows, the same on every process), got a plain tensor of shape {tuple(t.shape)}"
        )
    return t[own_rows()]


def local_head(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, *, process_group,
               impl: str) -> LocalHead:
    """Plain tensors and the process group for a `token_stats` call given DTensors.

    Args:
        hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias: as `token_stats` takes them,
            some DTensors: ``weight`` placed ``Shard(0)`` (vocabulary-parallel) or ``Replicate()`` on
            a 1-D mesh, ``bias`` and the reference head DTensors placed like it or plain tensors (the
            bias: this process's rows; the reference: the whole head), the hidden states and labels
            DTensors of any placement or plain (the same on every process).
        process_group: must be None with a DTensor weight (its mesh gives the group).
        impl: the `token_stats` implementation asked for.

    Returns:
        LocalHead: plain tensors (this process's rows of each head; hidden states and labels whole)
        and ``mesh.get_group()`` for a ``Shard(0)`` weight, else ``process_group``.
    """
    hidden, ref_hidden, labels = _whole(hidden), _whole(ref_hidden), _whole(labels)
    if not has_dtensor(weight):
        for name, t in (("bias", bias), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
            if has_dtensor(t):
                raise ValueError(f"{name}: expected a plain tensor when weight is one, got a DTensor with "
                                 f"{_layout(t)}")
        return LocalHead(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, process_group)
    if process_group is not None:
        raise ValueError("process_group: expected None with a DTensor weight (the group is its device mesh's), "
                         "got a group")
    sharded = is_vocab_sharded(weight)
    if not sharded and not _is_replicated(weight):
        raise ValueError(
            f"weight: expected a DTensor sharded on the vocabulary dimension (placements (Shard(dim=0),), "
            f"PyTorch's ColwiseParallel) or replicated, on a 1-D device mesh, got {_layout(weight)}; gather "
            f"it with weight.full_tensor() to compute on the whole head"
        )
    if sharded and impl == "reference":
        raise ValueError("impl: expected 'auto', 'torch' or 'triton' with a vocabulary-sharded DTensor weight, "
                         "got 'reference'")
    rows = []

    def own_rows() -> slice:  # computed once, and only for a plain reference head
        if not rows:
            rows.append(_own_rows(weight))
        return rows[0]

    return LocalHead(
        hidden, weight.to_local(), labels, ref_hidden,
        _companion("ref_weight", ref_weight, weight, own_rows, whole_if_plain=True),
        _companion("bias", bias, weight, own_rows, whole_if_plain=False),
        _companion("ref_bias", ref_bias, weight, own_rows, whole_if_plain=True),
        weight.device_mesh.get_group() if sharded else None,
    )
