"""Time and peak host memory of one training step of each fused TRL drop-in vs its TRL counterpart.

The sibling of `trainer_memory.py` (DPO) for the other trainers. Each trainer runs in its own
process (peak RSS is per process and never goes down), on a tiny Llama backbone with a large
vocabulary and long sequences, so the LM head dominates; float32, CPU.

    python benchmarks/trainer_step.py --kind sft                   # TRL then fused, defaults below
    python benchmarks/trainer_step.py --kind kto --seq-len 2048 --vocab 128256
    python benchmarks/trainer_step.py --kind sft --out benchmarks/results/trainer-step-cpu.json

Prints (and with ``--out`` appends to a JSON list) one record per trainer: peak RSS, RSS just
before the step (models, dataset and optimizer set up), their difference, and the step's wall time.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_memory  # noqa: E402
from trainer_memory import peak_rss_bytes, timed_training_step  # noqa: E402

# kind -> (TRL names, fused names, rows of the dataset, keyword of the second model or None, extra config).
KINDS = {
    "sft": (("SFTConfig", "SFTTrainer"), ("FusedSFTConfig", "FusedSFTTrainer"), 1, None, {}),
    "kto": (("KTOConfig", "KTOTrainer"), ("FusedKTOConfig", "FusedKTOTrainer"), 2, "ref_model", {"beta": 0.1}),
    # On-policy: the step generates a completion of max_completion_length (set from --seq-len) first.
    "distill": (("DistillationConfig", "DistillationTrainer"),
                ("FusedDistillationConfig", "FusedDistillationTrainer"), 1, "teacher_model", {"beta": 0.5}),
    # Two completions of one prompt and a length reward, TRL's default beta (GRPO 0: no reference;
    # RLOO 0.05: the reference is loaded from the policy's saved copy).
    "grpo": (("GRPOConfig", "GRPOTrainer"), ("FusedGRPOConfig", "FusedGRPOTrainer"), 2, None, {"num_generations": 2}),
    "rloo": (("RLOOConfig", "RLOOTrainer"), ("FusedRLOOConfig", "FusedRLOOTrainer"), 2, None, {"num_generations": 2}),
}
ON_POLICY = ("distill", "grpo", "rloo")


def reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def build(args):
    """The models and tokenizer of `trainer_memory.build` (the same seeded Llama) and this kind's dataset."""
    import torch
    from datasets import Dataset

    policy, second, tokenizer, _ = trainer_memory.build(args)
    words = [f"w{i}" for i in range(args.vocab - 3)]
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    prompt_len = 16
    completion_len = args.seq_len - prompt_len - 1  # the trainer appends an EOS token
    rows = KINDS[args.kind][2]
    dataset = Dataset.from_list([
        {"prompt": text(prompt_len), "completion": " " + text(completion_len), **({"label": i % 2 == 0}
                                                                                 if args.kind == "kto" else {})}
        for i in range(rows)
    ])
    if args.kind in ON_POLICY:
        dataset = dataset.remove_columns("completion")
    models = [policy, second] if KINDS[args.kind][3] else [policy]
    return models, tokenizer, dataset, rows


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(max(1, args.threads))
    trl_names, fused_names, _, second, extra = KINDS[args.kind]
    trainer_kwargs = {}
    if args.kind in ON_POLICY:
        extra = dict(extra, max_completion_length=args.seq_len - 16)
    if args.kind in ("grpo", "rloo"):
        trainer_kwargs = {"reward_funcs": reward_length}
    if args.trainer == "fused":
        import fpo_ops.integrations.trl as module
        names = fused_names
    else:
        import trl as module
        names = trl_names
    Config, Trainer = (getattr(module, n) for n in names)
    models, tokenizer, dataset, rows = build(args)
    trainer_kwargs = {second: models[1]} if second else trainer_kwargs
    with tempfile.TemporaryDirectory() as out:
        config = Config(
            output_dir=out, per_device_train_batch_size=rows, max_steps=1, learning_rate=1e-3, optim="sgd",
            report_to="none", bf16=False, gradient_checkpointing=args.gradient_checkpointing,
            save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
            **({} if args.kind in ON_POLICY else {"max_length": None}), **extra,
        )
        model = models[0]
        if args.kind in ("grpo", "rloo"):
            model.save_pretrained(os.path.join(out, "policy"))
            model = os.path.join(out, "policy")
        trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          **trainer_kwargs)
        before, seconds = timed_training_step(trainer)
    return {
        "trainer": names[1] if args.trainer == "fused" else f"trl.{names[1]}", "kind": args.kind,
        "seq_len": args.seq_len, "rows": rows, "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
        "gradient_checkpointing": args.gradient_checkpointing,
        "rss_before_step_mib": round(before / 2**20, 1), "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        "step_peak_above_baseline_mib": round((peak_rss_bytes() - before) / 2**20, 1),
        "train_seconds": round(seconds, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--trainer", choices=["fused", "trl"], help="run one trainer in this process")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", help="append the records to this JSON file (a list)")
    args = parser.parse_args()
    if args.trainer:
        print(json.dumps(run_one(args)), flush=True)
        return
    import torch
    import transformers
    import trl

    records = [{"device": platform.processor() or platform.machine(), "python": platform.python_version(),
                "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join(["python", "benchmarks/trainer_step.py"] + sys.argv[1:])}]
    forwarded = [a for a in sys.argv[1:] if a != "--out" and a != args.out]
    for trainer in ("trl", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), "--trainer", trainer] + forwarded
        result = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        records.append(json.loads(lines[-1]) if result.returncode == 0 and lines
                       else {"trainer": trainer, "kind": args.kind, "error": result.stderr[-2000:]})
    for record in records:
        print(json.dumps(record), flush=True)
    if args.out:
        previous = json.load(open(args.out)) if os.path.exists(args.out) else []
        with open(args.out, "w") as f:
            json.dump(previous + [records], f, indent=1)


if __name__ == "__main__":
    main()
