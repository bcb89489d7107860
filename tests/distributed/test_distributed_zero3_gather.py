"""`hf.apply_gathered` on real DeepSpeed ZeRO-3 parameters (2 CPU processes, gloo), against the dense op.

The head is built under ``deepspeed.zero.Init``, so each rank holds half of it. The fused call gathers
it for the forward and again for the recomputation in backward, and partitions it again once its
gradient is accumulated; a head DeepSpeed itself holds gathered is used as it is and left gathered.
The trainers under the full engines are tested in `test_distributed_engines.py`.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

pytest.importorskip("deepspeed")

from distributed_launch import launch  # noqa: E402

V, H, N = 37, 12, 7  # V odd: the two partitions differ in size


def _stats(weight, hidden, labels):
    import fpo_ops

    out = fpo_ops.token_stats(hidden, weight, labels, outputs=("logp", "entropy", "top1_correct"), impl="torch")
    return out.logp, out.entropy, out.top1_correct


def _worker(rank: int, world: int) -> None:
    # What a launcher would set; deepspeed reads them.
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from fpo_ops.integrations import hf

    deepspeed.init_distributed(dist_backend="gloo")
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    dense = torch.randn(V, H, dtype=torch.float32, generator=g)
    hidden = torch.randn(N, H, dtype=torch.float32, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    upstream = [torch.randn(N, dtype=torch.float32, generator=g) for _ in range(2)]
    # fp32 (DeepSpeed partitions fp32, bf16 or fp16 only): compared with the same op on the dense head
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    with deepspeed.zero.Init(config_dict_or_path=config):  # fp32 from the config
        head = torch.nn.Linear(H, V, bias=False, dtype=torch.float32)
    weight = head.weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0), torch.no_grad():
        if rank == 0:
            weight.copy_(dense)
    assert hf.is_zero3_param(weight) and weight.ds_status == ZeroParamStatus.NOT_AVAILABLE
    assert weight.ds_tensor.numel() == (V * H + world - 1) // world

    dense = dense.requires_grad_(True)
    expected_hidden = hidden.clone().requires_grad_(True)
    expected = _stats(dense, expected_hidden, labels)
    (expected[0] * upstream[0] + expected[1] * upstream[1]).sum().backward()

    def check(got, got_hidden):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_hidden.grad, expected_hidden.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(weight.grad, dense.grad, rtol=1e-6, atol=1e-6)

    # Partitioned: gathered for forward and for the backward recompute, partitioned again after each.
    got_hidden = hidden.clone().requires_grad_(True)
    got = hf.apply_gathered(_stats, [weight], got_hidden, labels)
    assert weight.ds_status == ZeroParamStatus.NOT_AVAILABLE and weight.numel() == 0
    (got[0] * upstream[0] + got[1] * upstream[1]).sum().backward()
    assert weight.ds_status == ZeroParamStatus.NOT_AVAILABLE and not weight.ds_active_sub_modules
    check(got, got_hidden)

    # Held by DeepSpeed (here its own gather; in training a module's fetch): used as it is and left to
    # DeepSpeed, which partitions it when its hold ends.
    weight.grad = None
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        got_hidden = hidden.clone().requires_grad_(True)
        got = hf.apply_gathered(_stats, [weight], got_hidden, labels)
        (got[0] * upstream[0] + got[1] * upstream[1]).sum().backward()
        assert weight.ds_status == ZeroParamStatus.AVAILABLE and not weight.ds_active_sub_modules
    assert weight.ds_status == ZeroParamStatus.NOT_AVAILABLE
    check(got, got_hidden)


def test_zero3_head_is_gathered_for_forward_and_backward_and_released():
    launch(_worker, 2, timeout_s=300)
