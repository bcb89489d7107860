"""Tiny Hugging Face models, a tokenizer and a preference dataset built in code (no downloads)."""
import copy

import torch

WORDS = [f"w{i}" for i in range(89)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]
VOCAB_SIZE = len(SPECIAL) + len(WORDS)  # 92: not a multiple of any block size


def tiny_tokenizer():
    """A word-level tokenizer over ``WORDS`` wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
    )


def _common(**overrides):
    config = dict(
        vocab_size=VOCAB_SIZE, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    config.update(overrides)
    return config


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of ``family`` in float32, in eval mode."""
    import transformers

    configs = {
        "llama": lambda: transformers.LlamaConfig(**_common(tie_word_embeddings=False, **overrides)),
        "llama_tied": lambda: transformers.LlamaConfig(**_common(tie_word_embeddings=True, **overrides)),
        # A small cap so that tanh is far from linear at the logits a random model produces.
        "gemma2": lambda: transformers.Gemma2Config(**_common(
            final_logit_softcapping=0.7, attn_logit_softcapping=50.0, query_pre_attn_scalar=10,
            sliding_window=16, **overrides)),
        "qwen2_tied": lambda: transformers.Qwen2Config(**_common(tie_word_embeddings=True, **overrides)),
        "cohere": lambda: transformers.CohereConfig(**_common(logit_scale=0.37, **overrides)),
        "granite": lambda: transformers.GraniteConfig(**_common(logits_scaling=3.0, **overrides)),
        # Mixture-of-Experts: 4 experts, 2 per token, so routing is uneven and the load-balancing loss matters.
        "mixtral": lambda: transformers.MixtralConfig(**_common(
            num_local_experts=4, num_experts_per_tok=2, **overrides)),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_common(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
            **overrides)),
    }
    classes = {
        "llama": transformers.LlamaForCausalLM, "llama_tied": transformers.LlamaForCausalLM,
        "gemma2": transformers.Gemma2ForCausalLM, "qwen2_tied": transformers.Qwen2ForCausalLM,
        "cohere": transformers.CohereForCausalLM,
        "granite": transformers.GraniteForCausalLM, "mixtral": transformers.MixtralForCausalLM,
        "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    }
    torch.manual_seed(seed)
    model = classes[family](configs[family]())
    # Random init gives near-uniform logits; widen them so softcaps and scales matter.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.normal_(0.0, 0.5)
    return model.float().eval()


# Plain PyTorch AMP training (`model.to(torch.bfloat16)`, then `model.lm_head.float()`).

def bf16_exact(model):
    """``model`` (fp32) with its backbone rounded to bf16 values: the mixed and the float64 copies then
    start from the same numbers, and their difference is the arithmetic alone."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("lm_head."):
                p.copy_(p.to(torch.bfloat16).float())
    return model


def mixed(model):
    """A copy of ``model`` as plain AMP training holds it: bf16 backbone, fp32 (untied) head."""
    copied = copy.deepcopy(model).to(torch.bfloat16)
    copied.lm_head.float()
    assert copied.lm_head.weight.dtype == torch.float32 and copied.model.embed_tokens.weight.dtype == torch.bfloat16
    return copied.train()


def float64(model):
    """A float64 copy of ``model`` in training mode: the exact reference of a mixed-precision run."""
    return copy.deepcopy(model).double().train()


def preference_dataset(num_pairs: int = 6, seed: int = 0):
    """An in-code ``datasets.Dataset`` of prompt/chosen/rejected strings of varying lengths."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def sentence(low: int, high: int) -> str:
        n = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    rows = [
        {"prompt": sentence(2, 7), "chosen": " " + sentence(1, 9), "rejected": " " + sentence(1, 9)}
        for _ in range(num_pairs)
    ]
    return Dataset.from_list(rows)

