"""Named LM heads the benchmarks sweep: real model shapes plus small heads a CPU can afford."""
import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class HeadSpec:
    """Shape of one model's LM head (policy and reference share it, as in DPO from an SFT model)."""

    name: str
    hidden: int
    vocab: int
    softcap: Optional[float] = None


HEADS = {
    head.name: head
    for head in (
        HeadSpec("llama3-8b", hidden=4096, vocab=128256),
        HeadSpec("qwen2.5-7b", hidden=3584, vocab=152064),
        HeadSpec("gemma2-2b", hidden=2304, vocab=256000, softcap=30.0),
        # Small enough that a 2-core CPU runs a whole sweep in minutes.
        HeadSpec("cpu-small", hidden=256, vocab=16384),
        # The shape of the README example (H 512, V 32000).
        HeadSpec("cpu-medium", hidden=512, vocab=32000),
        # pytest-benchmark entry points: odd sizes, fast enough for every provider on CPU.
        HeadSpec("tiny", hidden=96, vocab=1000),
    )
}

_CUSTOM = re.compile(r"^h(\d+)v(\d+)(?:cap(\d+(?:\.\d+)?))?$")


def get_head(name: str) -> HeadSpec:
    """A named head, or a custom one written ``h<H>v<V>`` or ``h<H>v<V>cap<C>`` (e.g. ``h512v32000``).

    Args:
        name: key of `HEADS` or a custom head string.

    Returns:
        The HeadSpec.
    """
    if name in HEADS:
        return HEADS[name]
    match = _CUSTOM.match(name.lower())
    if match is None:
        raise ValueError(f"head: expected one of {sorted(HEADS)} or 'h<H>v<V>[cap<C>]', got {name!r}")
    hidden, vocab, cap = match.groups()
    return HeadSpec(name.lower(), hidden=int(hidden), vocab=int(vocab), softcap=None if cap is None else float(cap))
