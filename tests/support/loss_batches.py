"""Small float64 batches for the loss-head tests: policy and reference heads, prompt/completion labels."""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

IGNORE = -100


@dataclass
class Batch:
    hidden: torch.Tensor            # [R, T, H] leaf, requires grad
    weight: torch.Tensor            # [V, H] leaf, requires grad
    labels: torch.Tensor            # [R, T]
    ref_hidden: torch.Tensor        # [R, T, Hr]
    ref_weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor] = None
    ref_bias: Optional[torch.Tensor] = None
    head: Dict = field(default_factory=dict)   # temperature, softcap, logit_scale, ...

    def leaves(self):
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]

    def fresh_leaves(self) -> "Batch":
        """A copy whose trainable tensors are new leaves (so two computations get separate grads)."""
        def leaf(t):
            return None if t is None else t.detach().clone().requires_grad_(True)
        return Batch(leaf(self.hidden), leaf(self.weight), self.labels, self.ref_hidden, self.ref_weight,
                     leaf(self.bias), self.ref_bias, dict(self.head))


def make_labels(rows: int, T: int, V: int, generator: torch.Generator, min_completion: int = 1) -> torch.Tensor:
    """Each row: a prompt (ignored), a completion of its own length, then padding (ignored)."""
    labels = torch.randint(0, V, (rows, T), generator=generator)
    for r in range(rows):
        prompt = int(torch.randint(0, 3, (1,), generator=generator))
        length = int(torch.randint(min_completion, T - prompt + 1, (1,), generator=generator))
        labels[r, :prompt] = IGNORE
        labels[r, prompt + length:] = IGNORE
    return labels


def make_batch(rows: int = 8, T: int = 7, H: int = 16, V: int = 37, ref_H: Optional[int] = None, seed: int = 0,
               bias: bool = False, shared_weight: bool = False, head: Optional[Dict] = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    ref_H = H if ref_H is None else ref_H
    hidden = torch.randn(rows, T, H, generator=g, dtype=dt)
    weight = torch.randn(V, H, generator=g, dtype=dt) * (1.5 / H ** 0.5)
    if ref_H == H:
        ref_hidden = hidden + 0.4 * torch.randn(rows, T, H, generator=g, dtype=dt)
    else:
        ref_hidden = torch.randn(rows, T, ref_H, generator=g, dtype=dt)
    if shared_weight:
        ref_weight = None
    else:
        ref_weight = (weight if ref_H == H else torch.zeros(V, ref_H, dtype=dt)) \
            + torch.randn(V, ref_H, generator=g, dtype=dt) * (0.6 / ref_H ** 0.5)
    b = torch.randn(V, generator=g, dtype=dt) * 0.3 if bias else None
    rb = torch.randn(V, generator=g, dtype=dt) * 0.3 if bias and not shared_weight else None
    labels = make_labels(rows, T, V, g)
    return Batch(hidden.requires_grad_(True), weight.requires_grad_(True), labels, ref_hidden, ref_weight,
                 None if b is None else b.requires_grad_(True), rb, dict(head or {}))


def head_kwargs(batch: Batch) -> Dict:
    """Keyword arguments of the fpo_ops loss functions for this batch's head."""
    return dict(bias=batch.bias, ref_bias=batch.ref_bias, **batch.head)
