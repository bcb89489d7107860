"""Peak host memory and time of one transformers `Trainer` step: a model patched by `apply_fused_head`
against the same model unpatched, on CPU.

Each variant runs in its own process (peak RSS is per process and never goes down), on a tiny Llama
backbone with a large vocabulary and one long row, so that the LM head dominates.

    python benchmarks/trainer_patch_memory.py                    # V 128256, 4096 tokens, H 256, 2 layers, fp32
    python benchmarks/trainer_patch_memory.py --only fused --tokens 2048 --label-smoothing 0.1
    python benchmarks/trainer_patch_memory.py --out benchmarks/results/trainer-patch-cpu.json

Prints one JSON line per variant: RSS just before the step (model, data and optimizer set up), the
peak RSS, their difference and the step's wall time; the first line holds the device and versions.
"""
import argparse
import json
import os
import sys
import tempfile

# Run as a script from the checkout: the suite imports itself as `benchmarks` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.trainer_memory import peak_rss_bytes, run_each_in_own_process, timed_training_step  # noqa: E402


def build(args):
    import torch
    import transformers
    from datasets import Dataset

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.tokens, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.tokens,), generator=g).tolist()
    dataset = Dataset.from_list([{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}])
    return model, dataset


def run_one(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(max(1, args.threads))
    model, dataset = build(args)
    if args.variant == "fused":
        from fpo_ops.integrations.hf import apply_fused_head

        apply_fused_head(model, impl=args.impl)
    with tempfile.TemporaryDirectory() as out:
        config = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, max_steps=1, learning_rate=1e-3, optim="sgd",
            report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
            label_smoothing_factor=args.label_smoothing,
        )
        trainer = transformers.Trainer(model=model, args=config, train_dataset=dataset,
                                       data_collator=transformers.default_data_collator)
        before, seconds = timed_training_step(trainer)
    return {
        "variant": "apply_fused_head" if args.variant == "fused" else "unpatched",
        "impl": args.impl if args.variant == "fused" else None, "tokens": args.tokens, "vocab": args.vocab,
        "hidden": args.hidden, "layers": args.layers, "label_smoothing_factor": args.label_smoothing,
        "threads": args.threads, "loss": trainer.state.log_history[0].get("loss"),
        "rss_before_step_mib": round(before / 2**20, 1), "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        "step_peak_above_baseline_mib": round((peak_rss_bytes() - before) / 2**20, 1),
        "train_seconds": round(seconds, 2),
        "logits_fp32_mib": round(args.tokens * args.vocab * 4 / 2**20, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["fused", "unpatched"], help="run one variant in this process")
    parser.add_argument("--only", choices=["fused", "unpatched"], help="launch only this variant")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--impl", default="auto", help="token_stats implementation of the fused head")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="Trainer's label_smoothing_factor")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_one(args)), flush=True)
        return
    run_each_in_own_process(__file__, "--variant", [args.only] if args.only else ["unpatched", "fused"], args.out)


if __name__ == "__main__":
    main()
