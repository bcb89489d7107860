"""Which bf16 DPO trainer is closer to fp32: FusedDPOTrainer or TRL's DPOTrainer (CPU, models built in code).

Two measurements, each against an fp32 result:

- ``head``: one batch of bf16 hidden states from a bf16-autocast backbone; per-token log-probs of the
  LM head from TRL's chunked function under bf16 autocast (bf16 GEMM output: logit tiles rounded to
  bf16) and from `fpo_ops.token_stats` under bf16 autocast (bf16 operands, fp32 tiles), against the
  same head in fp32. Only the head differs, so this isolates the head's rounding.
- ``train``: 4 SGD steps of each trainer under bf16 (TRL's default, gradient checkpointing on) against
  TRL's DPOTrainer in fp32, per seed: relative error of the logged loss, log-probs and grad norm.
  Backbone rounding (shared by both) and the head's add up here.

    python benchmarks/trainer_precision.py --out benchmarks/results/cpu-trainer-bf16-vs-fp32.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_memory import build, run_info  # noqa: E402

METRICS = ("loss", "logps/chosen", "logps/rejected", "grad_norm")


def models(args, seed, pairs):
    """Policy and a reference near it (each weight 5% off); the head is widened so logits have std ~``logit_std`` as in a
    trained LM (a fresh init gives near-zero logits, where bf16 rounding of a logit costs nothing)."""
    import torch

    model, ref_model, tokenizer, dataset = build(args, pairs=pairs, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, args.logit_std / args.hidden ** 0.5)
        ref_model.load_state_dict(model.state_dict())
        for p in ref_model.parameters():  # 5% of each weight: a reference near the policy
            p.mul_(1.0 + 0.05 * torch.randn_like(p))
    return model, ref_model, tokenizer, dataset


def head_errors(args) -> dict:
    import torch
    from trl.kernels import ChunkedLogProbFunction

    import fpo_ops
    from fpo_ops.integrations.hf import hidden_and_head

    model, _, tokenizer, dataset = models(args, seed=0, pairs=args.head_pairs)
    ids = torch.tensor([tokenizer(row["prompt"] + row["chosen"])["input_ids"] for row in dataset])
    labels = ids[:, 1:].reshape(-1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        parts = hidden_and_head(model, input_ids=ids)
    hidden = parts.hidden[:, :-1].reshape(-1, parts.hidden.shape[-1]).detach()
    weight = parts.weight.detach()
    with torch.no_grad():
        exact = fpo_ops.token_stats(hidden.float(), weight.float(), labels, impl="torch").logp
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = fpo_ops.token_stats(hidden, weight, labels, impl="torch").logp
            theirs = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 4096, None, 1.0,
                                                  ("log_probs",))[0]

    def summary(x):
        err = (x.float() - exact).abs()
        return {"mean_abs_err": err.mean().item(), "max_abs_err": err.max().item(),
                "seq_logp_abs_err": (x.float() - exact).reshape(len(dataset), -1).sum(1).abs().mean().item()}

    return {"tokens": labels.numel(), "vocab": args.vocab, "hidden": args.hidden,
            "fpo_bf16": summary(ours), "trl_bf16": summary(theirs)}


def train_run(trainer: str, bf16: bool, seed: int, args) -> list:
    import torch

    if trainer == "fused":
        from fpo_ops.integrations.trl import FusedDPOConfig as Config, FusedDPOTrainer as Trainer
    else:
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    model, ref_model, tokenizer, dataset = models(args, seed, args.pairs)
    with tempfile.TemporaryDirectory() as out:
        config = Config(
            output_dir=out, per_device_train_batch_size=2, max_steps=args.steps, learning_rate=1e-2, optim="sgd",
            report_to="none", bf16=bf16, save_strategy="no", max_length=None, use_cpu=True, disable_tqdm=True,
            logging_steps=1, loss_type="sigmoid", seed=seed,
        )
        t = Trainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer)
        t.train()
    return [{k: row[k] for k in METRICS} for row in t.state.log_history if "loss" in row]


def train_errors(args) -> dict:
    per_seed, errors = [], {"fpo_bf16": {m: [] for m in METRICS}, "trl_bf16": {m: [] for m in METRICS}}
    for seed in range(args.seeds):
        fp32 = train_run("trl", False, seed, args)
        runs = {"fpo_bf16": train_run("fused", True, seed, args), "trl_bf16": train_run("trl", True, seed, args)}
        per_seed.append({"seed": seed, "fp32": fp32, **runs})
        for name, rows in runs.items():
            for row, exact in zip(rows, fp32):
                for m in METRICS:
                    errors[name][m].append(abs(row[m] - exact[m]) / abs(exact[m]))
    closer = {m: sum(a < b for a, b in zip(errors["fpo_bf16"][m], errors["trl_bf16"][m])) for m in METRICS}
    return {
        "steps": args.steps, "seeds": args.seeds,
        "median_rel_err": {name: {m: statistics.median(v) for m, v in e.items()} for name, e in errors.items()},
        "mean_rel_err": {name: {m: statistics.fmean(v) for m, v in e.items()} for name, e in errors.items()},
        "fpo_closer_count": closer, "comparisons_per_metric": len(errors["fpo_bf16"]["loss"]),
        "runs": per_seed,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs of each training run")
    parser.add_argument("--head-pairs", type=int, default=64, help="sequences of the head-only measurement")
    parser.add_argument("--logit-std", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results to this JSON file")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = {**run_info(), "head": head_errors(args), "train": train_errors(args)}
    print(json.dumps({k: v for k, v in result.items() if k != "train"}, indent=1))
    print(json.dumps({k: v for k, v in result["train"].items() if k != "runs"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
