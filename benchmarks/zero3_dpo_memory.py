"""Peak memory per rank of one DPO step under DeepSpeed ZeRO-3: TRL's DPOTrainer against FusedDPOTrainer.

A Llama backbone of 2 small layers (H 256 by default) under a Llama-3-sized vocabulary (V 128256),
a separate reference model, fp32, 2 pairs per rank; run on CPU through accelerate as users launch it::

    for t in trl fused; do
      DS_ACCELERATOR=cpu accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 2 \
          benchmarks/zero3_dpo_memory.py --trainer $t --out benchmarks/results/zero3-dpo-memory-cpu-$t.json
    done

Each trainer trains one optimizer step in a launch of its own (freed memory the allocator keeps would
otherwise hide the second trainer's peak). Memory is the resident set size of the process (CPU), sampled every 0.2 ms
from the beginning to the end of the step, minus the resident size at its beginning: what the step
adds on top of the partitioned models, optimizer and data. Rank 0 writes the figures of every rank.
"""
import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import date

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Highest resident set size seen since `reset`, sampled by a background thread."""

    def __init__(self, interval_s=2e-4):
        self.interval_s, self.peak, self.running = interval_s, 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(self.interval_s)

    def reset(self) -> int:
        now = rss()
        self.peak = now
        return now


def dataset(pairs, words_per_row, seed=0):
    from datasets import Dataset
    from hf_fixtures import WORDS

    g = torch.Generator().manual_seed(seed)
    text = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))
    return Dataset.from_list([dict(prompt=text(words_per_row // 4), chosen=" " + text(words_per_row),
                                   rejected=" " + text(words_per_row)) for _ in range(pairs)])


def step_memory(fused: bool, args, world: int) -> dict:
    import copy

    import transformers
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fpo_ops.integrations.trl import FusedDPOConfig, FusedDPOTrainer
    from hf_fixtures import tiny_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
        eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ref_model = copy.deepcopy(model)
    trainer_cls, config_cls = (FusedDPOTrainer, FusedDPOConfig) if fused else (DPOTrainer, DPOConfig)
    sampler = PeakSampler()
    record = {}

    class Measure(TrainerCallback):
        def on_step_begin(self, *a, **k):
            record["before"] = sampler.reset()

        def on_step_end(self, *a, **k):
            record["peak"] = sampler.peak

    training_args = config_cls(
        output_dir=os.path.join(args.tmp, "fused" if fused else "trl"), per_device_train_batch_size=args.pairs,
        max_steps=1, learning_rate=1e-3, optim="sgd", report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, gradient_checkpointing=False, ddp_backend="gloo", disable_tqdm=True, max_length=None, beta=0.1,
        logging_steps=1,
    )
    trainer = trainer_cls(model=model, ref_model=ref_model, args=training_args,
                          train_dataset=dataset(args.pairs * world, args.words),
                          processing_class=tiny_tokenizer(), callbacks=[Measure()])
    trainer.train()
    sampler.running = False
    return dict(step_peak_mib=(record["peak"] - record["before"]) / 2**20, rss_before_step_mib=record["before"] / 2**20,
                loss=trainer.state.log_history[0]["loss"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2, help="pairs per rank")
    parser.add_argument("--words", type=int, default=200, help="words (tokens) per completion")
    parser.add_argument("--trainer", choices=("trl", "fused"), required=True)
    parser.add_argument("--tmp", default="/tmp/fpo-zero3-memory")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    mine = step_memory(args.trainer == "fused", args, int(os.environ.get("WORLD_SIZE", "1")))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    results = {args.trainer: gathered}
    if dist.get_rank() == 0:
        import accelerate
        import deepspeed
        import trl

        report = dict(
            what="peak resident memory per rank added by one DPO step (fp32, separate reference) under ZeRO-3",
            device=f"cpu ({platform.processor() or platform.machine()}), {dist.get_world_size()} processes, gloo",
            versions=dict(torch=torch.__version__, deepspeed=deepspeed.__version__, accelerate=accelerate.__version__,
                          trl=trl.__version__),
            date=str(date.today()), command="DS_ACCELERATOR=cpu accelerate launch --config_file "
            "examples/accelerate/zero3.yaml --num_processes 2 benchmarks/zero3_dpo_memory.py " + " ".join(sys.argv[1:]),
            # one token per word (the fixtures' word-level tokenizer), an EOS after each completion
            shape=dict(V=args.vocab, H=args.hidden, layers=2, pairs_per_rank=args.pairs, words_per_completion=args.words,
                       tokens_per_rank=args.pairs * 2 * (args.words // 4 + args.words + 1)),
            results=results,
        )
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
