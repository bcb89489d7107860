"""Bytes that vocabulary-parallel `token_stats` all-reduces per token, against the logits it avoids.

Runs the op on 2 CPU processes (gloo) with every ``torch.distributed.all_reduce`` recorded (shape,
dtype, phase), forward and backward, for several statistic sets at each named head's hidden size.
The recorded collectives are per-token scalars plus the [N, H] dhidden, none of them depends on
the vocabulary, so each rank holds only a small slice of it here. The comparison is a row of fp32
logits per token and model (V values), which is what a vocabulary-parallel head would otherwise
have to gather to compute the same statistics. The backward's [N, H] dhidden all-reduce is the
same for any vocabulary-parallel linear layer; the forward's per-token scalars replace the logits.

    python benchmarks/distributed_comm_volume.py [--out benchmarks/results/distributed_comm_volume.json]
"""
import argparse
import datetime
import json
import os
import platform
import socket
import sys
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.heads import HEADS  # noqa: E402

WORLD = 2
TOKENS = 16
ROWS_PER_RANK = 24
HEAD_NAMES = ("llama3-8b", "qwen2.5-7b", "gemma2-2b")
OUTPUT_SETS = {
    "logp": ("logp",),
    "dpo (logp, ref_logp)": ("logp", "ref_logp"),
    "tdpo (logp, ref_logp, kl)": ("logp", "ref_logp", "kl"),
    "all statistics": ("logp", "ref_logp", "kl", "reverse_kl", "entropy", "jsd", "log_sum_p2",
                       "mean_logit", "top1_correct"),
}


def _record_all_reduces(log: List[Dict], phase: Dict[str, str]):
    original = dist.all_reduce

    def recording(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        log.append({"phase": phase["now"], "op": str(op).split(".")[-1], "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).replace("torch.", ""),
                    "bytes": tensor.numel() * tensor.element_size()})
        return original(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = recording


def _worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    import fpo_ops

    log: List[Dict] = []
    phase = {"now": "forward"}
    _record_all_reduces(log, phase)
    rows = []
    for head_name in HEAD_NAMES:
        head = HEADS[head_name]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(TOKENS, head.hidden, generator=g).requires_grad_()
        ref_hidden = torch.randn(TOKENS, head.hidden, generator=g)
        weight = (torch.randn(ROWS_PER_RANK * WORLD, head.hidden, generator=g) / head.hidden ** 0.5)
        ref_weight = weight + 0.01 * torch.randn(weight.shape, generator=g)
        labels = torch.randint(0, ROWS_PER_RANK * WORLD, (TOKENS,), generator=g)
        local = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        w_local = weight[local].clone().requires_grad_()
        for set_name, outputs in OUTPUT_SETS.items():
            log.clear()
            phase["now"] = "forward"
            stats = fpo_ops.token_stats(hidden, w_local, labels, ref_hidden, ref_weight[local],
                                        outputs=outputs, impl="torch", process_group=dist.group.WORLD)
            loss = sum(getattr(stats, name).sum() for name in outputs
                       if getattr(stats, name).requires_grad)
            phase["now"] = "backward"
            loss.backward()
            per_token = {p: sum(c["bytes"] for c in log if c["phase"] == p and c["dtype"] != "int64") / TOKENS
                         for p in ("forward", "backward")}
            fixed = sum(c["bytes"] for c in log if c["dtype"] == "int64")
            logits_fp32 = head.vocab * 4 * (2 if any(o != "logp" for o in outputs) else 1)
            rows.append({
                "head": head_name, "hidden": head.hidden, "vocab": head.vocab, "outputs": set_name,
                "collectives": list(log), "fixed_bytes_per_call": fixed,
                "forward_bytes_per_token": per_token["forward"],
                "backward_bytes_per_token": per_token["backward"],
                "logits_fp32_bytes_per_token": logits_fp32,
                "ratio_logits_to_forward": logits_fp32 / per_token["forward"],
                "ratio_logits_to_all_reduced": logits_fp32 / (per_token["forward"] + per_token["backward"]),
            })
    if rank == 0:
        result = {
            "what": "bytes all-reduced per token by vocabulary-parallel token_stats (fp32 inputs: "
                    "fp32 accumulators), recorded from the collectives issued; payload per rank "
                    "(a ring all-reduce sends about 2(W-1)/W times it)",
            "world_size": WORLD, "tokens": TOKENS, "rows_per_rank": ROWS_PER_RANK,
            "device": f"cpu ({platform.processor() or platform.machine()}), gloo",
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/distributed_comm_volume.py",
            "rows": rows,
        }
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"{'head':<11} {'outputs':<26} {'fwd B/tok':>9} {'bwd B/tok':>9} {'logits B/tok':>12} "
              f"{'logits/fwd':>10} {'logits/(fwd+bwd)':>16}")
        for r in rows:
            print(f"{r['head']:<11} {r['outputs']:<26} {r['forward_bytes_per_token']:>9.0f} "
                  f"{r['backward_bytes_per_token']:>9.0f} {r['logits_fp32_bytes_per_token']:>12} "
                  f"{r['ratio_logits_to_forward']:>10.0f} {r['ratio_logits_to_all_reduced']:>16.1f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "distributed_comm_volume.json"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, os.path.abspath(args.out)), nprocs=WORLD)


if __name__ == "__main__":
    main()
