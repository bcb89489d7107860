"""Peak host memory of one training step: FusedDPOTrainer vs TRL's DPOTrainer, on CPU.

Each trainer runs in its own process (peak RSS is per process and never goes down), on a tiny
Llama backbone with a large vocabulary and one long preference pair, so the LM head dominates.

    python benchmarks/trainer_memory.py                       # both trainers, defaults below
    python benchmarks/trainer_memory.py --seq-len 2048 --vocab 128256 --hidden 256 --loss sigmoid
    python benchmarks/trainer_memory.py --only fused --loss tdpo2
    python benchmarks/trainer_memory.py --bf16 --gradient-checkpointing --out benchmarks/results/x.json

Prints one JSON line per trainer: peak RSS of the process, RSS just before the step (models,
reference, dataset and optimizer set up), their difference, and the step's wall time. ``--bf16``
trains under bf16 autocast (TRL's default): the backbones and both trainers' head GEMMs take bf16
operands. ``--out`` also writes the lines (device and versions first) to a JSON file.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# Run as a script from the checkout: the suite imports itself as `benchmarks` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_training_step(trainer):
    """Train ``trainer`` (set up for one step) with its optimizer built beforehand, so that the optimizer
    state is part of the baseline, not of the step. Returns (resident bytes before the step, seconds)."""
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    before = current_rss_bytes()
    start = time.perf_counter()
    trainer.train()
    return before, time.perf_counter() - start


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(args, pairs: int = 1, seed: int = 0):
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(args.vocab - 3)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<eos>", "<unk>"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")

    g = torch.Generator().manual_seed(seed)

    def text(n):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    prompt_len = 16
    completion_len = args.seq_len - prompt_len - 1  # the trainer appends an EOS token
    dataset = Dataset.from_list([
        {"prompt": text(prompt_len), "chosen": " " + text(completion_len), "rejected": " " + text(completion_len)}
        for _ in range(pairs)
    ])
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    ref_model = transformers.LlamaForCausalLM(config).float()
    return model, ref_model, tokenizer, dataset


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.trainer == "fused":
        from fpo_ops.integrations.trl import FusedDPOConfig as Config, FusedDPOTrainer as Trainer
    else:
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    model, ref_model, tokenizer, dataset = build(args)
    with tempfile.TemporaryDirectory() as out:
        config = Config(
            output_dir=out, per_device_train_batch_size=1, max_steps=1, learning_rate=1e-3, optim="sgd",
            report_to="none", bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
            save_strategy="no", max_length=None, use_cpu=True, disable_tqdm=True, logging_steps=1,
            loss_type=args.loss, beta=0.1,
        )
        trainer = Trainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
        before, seconds = timed_training_step(trainer)
    tokens = 2 * args.seq_len
    return {
        "trainer": "FusedDPOTrainer" if args.trainer == "fused" else "trl.DPOTrainer",
        "loss": args.loss, "seq_len": args.seq_len, "pairs": 1, "tokens": tokens, "vocab": args.vocab,
        "hidden": args.hidden, "layers": args.layers, "gradient_checkpointing": args.gradient_checkpointing,
        "bf16": args.bf16, "threads": args.threads,
        "rss_before_step_mib": round(before / 2**20, 1), "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        "step_peak_above_baseline_mib": round((peak_rss_bytes() - before) / 2**20, 1),
        "train_seconds": round(seconds, 2),
        "logits_fp32_mib_per_model": round(tokens * args.vocab * 4 / 2**20, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=["fused", "trl"], help="run one trainer in this process")
    parser.add_argument("--only", choices=["fused", "trl"], help="launch only this trainer")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--loss", default="sigmoid")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TRL's default)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.trainer:
        print(json.dumps(run_one(args)), flush=True)
        return
    run_each_in_own_process(__file__, "--trainer", [args.only] if args.only else ["trl", "fused"], args.out)


def run_each_in_own_process(script: str, option: str, choices, out) -> None:
    """Run ``script option choice`` once per choice, each in a fresh process (so that each peak is its
    own), with this command's other arguments; print and optionally save (``out``) the result rows."""
    rows = [run_info()]
    print(json.dumps(rows[0]), flush=True)
    forwarded = _without_options(sys.argv[1:], ("--only", "--out"))
    for choice in choices:
        cmd = [sys.executable, os.path.abspath(script), option, choice] + forwarded
        result = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            rows.append({option.lstrip("-"): choice, "error": result.stderr[-2000:]})
        else:
            rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")


def _without_options(argv, names):
    """``argv`` without the options ``names`` and their values (``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not any(a.startswith(name + "=") for name in names):
            out.append(a)
    return out


def run_info() -> dict:
    """Device, versions, date and command of a run, the first record of a results file."""
    import torch

    from benchmarks.report import device_info, versions

    return {"device": device_info(torch.device("cpu")), **versions(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(["python"] + sys.argv)}


if __name__ == "__main__":
    main()
