"""What is timed: the per-token statistics a trainer needs and the sequence loss built on them.

Every workload ends in a scalar loss so that providers which only return a loss (Liger-Kernel) and
providers which return per-token statistics (everyone else) are timed on the same forward + backward.
The batch follows TRL and Liger: rows ``[0, B/2)`` are chosen completions, ``[B/2, B)`` rejected ones.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .heads import HeadSpec

IGNORE_INDEX = -100
DPO_BETA = 0.1
JSD_BETA = 0.5
# Leading fraction of every row that is prompt (label ignore_index), as in preference data.
PROMPT_FRACTION = 0.25


@dataclass
class CaseInputs:
    """Tensors of one benchmark case; the policy's hidden states and head weight take gradients.

    Shapes: hidden, ref_hidden [B, T, H]; weight, ref_weight [V, H]; labels, token_weight [B, T].
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: Optional[torch.Tensor]
    ref_weight: Optional[torch.Tensor]
    token_weight: torch.Tensor
    softcap: Optional[float]

    @property
    def n_tokens(self) -> int:
        return self.labels.numel()

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.hidden, self.weight, self.labels, self.ref_hidden, self.ref_weight,
                                 self.token_weight) if t is not None)


def _sequence_sums(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, T] per-token values (0 at ignored positions) -> chosen and rejected sums, each [B/2]."""
    sums = values.sum(-1)
    half = sums.shape[0] // 2
    return sums[:half], sums[half:]


def logp_loss(stats: Dict[str, torch.Tensor], inputs: CaseInputs) -> torch.Tensor:
    """Weighted negative log-likelihood: each token's weight is random, so no gradient is all-ones."""
    valid = inputs.labels != IGNORE_INDEX
    return -(inputs.token_weight * stats["logp"]).sum() / valid.sum().clamp(min=1)


def dpo_loss(stats: Dict[str, torch.Tensor], inputs: CaseInputs) -> torch.Tensor:
    """Sigmoid DPO on summed log-ratios (TRL's default ``loss_type``)."""
    chosen, rejected = _sequence_sums(stats["logp"])
    ref_chosen, ref_rejected = _sequence_sums(stats["ref_logp"])
    margin = DPO_BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean()


def tdpo_loss(stats: Dict[str, torch.Tensor], inputs: CaseInputs) -> torch.Tensor:
    """TDPO1: the DPO margin minus the gap of sequence-level KL(ref || policy), rejected minus chosen."""
    chosen, rejected = _sequence_sums(stats["logp"])
    ref_chosen, ref_rejected = _sequence_sums(stats["ref_logp"])
    kl_chosen, kl_rejected = _sequence_sums(stats["kl"])
    margin = DPO_BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin - DPO_BETA * (kl_rejected - kl_chosen)).mean()


def jsd_loss(stats: Dict[str, torch.Tensor], inputs: CaseInputs) -> torch.Tensor:
    """Mean generalised JSD (beta 0.5) between teacher (reference) and student (policy) over valid tokens."""
    valid = inputs.labels != IGNORE_INDEX
    return stats["jsd"].sum() / valid.sum().clamp(min=1)


@dataclass(frozen=True)
class Workload:
    """One benchmarked computation.

    ``backward_models`` counts the models whose logit tiles the gradient needs again (the policy
    always; the reference too when a token-level divergence is differentiated).
    """

    name: str
    outputs: Tuple[str, ...]
    loss: Callable[[Dict[str, torch.Tensor], CaseInputs], torch.Tensor]
    needs_ref: bool
    backward_models: int
    description: str

    @property
    def forward_gemms(self) -> int:
        return 2 if self.needs_ref else 1

    @property
    def total_gemms(self) -> int:
        """Least number of ``2 N H V``-FLOP GEMMs without O(N V) storage (DESIGN section 5):
        forward logits of each model, the backward's recomputed tiles, then dh and dW."""
        return self.forward_gemms + self.backward_models + 2


WORKLOADS = {
    w.name: w
    for w in (
        Workload("logp", ("logp",), logp_loss, needs_ref=False, backward_models=1,
                 description="policy log-probs (weighted NLL)"),
        Workload("dpo", ("logp", "ref_logp"), dpo_loss, needs_ref=True, backward_models=1,
                 description="policy + reference log-probs, sigmoid DPO"),
        Workload("tdpo", ("logp", "ref_logp", "kl"), tdpo_loss, needs_ref=True, backward_models=2,
                 description="policy + reference log-probs and token KL(ref||policy), TDPO1"),
        Workload("jsd", ("jsd",), jsd_loss, needs_ref=True, backward_models=2,
                 description="distillation: generalised JSD (beta 0.5) teacher vs student"),
    )
}


def get_workload(name: str) -> Workload:
    """The workload called ``name``.

    Args:
        name: key of `WORKLOADS` (logp, dpo, tdpo, jsd).

    Returns:
        The Workload; ValueError names the choices otherwise.
    """
    if name not in WORKLOADS:
        raise ValueError(f"workload: expected one of {sorted(WORKLOADS)}, got {name!r}")
    return WORKLOADS[name]


def make_inputs(head: HeadSpec, workload: Workload, n_tokens: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> CaseInputs:
    """Random inputs of one case: 2 rows (a chosen and a rejected completion) of ``n_tokens / 2``.

    The reference is the policy plus a small perturbation, so KL and log-ratios are small but nonzero
    as in real preference training. Logits have a spread of a few nats.

    Args:
        head: head shape (H, V, softcap).
        workload: decides whether reference tensors are made.
        n_tokens: N, even.
        dtype: dtype of hidden states and weights.
        device: where the tensors live.
        seed: generator seed.

    Returns:
        CaseInputs with hidden [2, N/2, H] and weight [V, H] requiring grad.
    """
    if n_tokens < 2 or n_tokens % 2:
        raise ValueError(f"n_tokens: expected an even number >= 2 (chosen and rejected rows), got {n_tokens}")
    # Drawn on the device: a Llama-3-8B head is 2 GB of fp32 per weight, slow to draw on the host.
    gen = torch.Generator(device=device).manual_seed(seed)
    rows, length, hidden_size, vocab = 2, n_tokens // 2, head.hidden, head.vocab

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    weight_scale = 3.0 / hidden_size ** 0.5
    hidden = randn(rows, length, hidden_size)
    weight = randn(vocab, hidden_size, scale=weight_scale)
    labels = torch.randint(0, vocab, (rows, length), generator=gen, device=device)
    labels[:, : int(length * PROMPT_FRACTION)] = IGNORE_INDEX
    token_weight = torch.where(labels != IGNORE_INDEX,
                               0.5 + torch.rand(rows, length, generator=gen, device=device), 0.0)
    ref_hidden = ref_weight = None
    if workload.needs_ref:
        ref_hidden = hidden + randn(rows, length, hidden_size, scale=0.3)
        ref_weight = weight + randn(vocab, hidden_size, scale=0.3 * weight_scale)
    return CaseInputs(
        hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), labels=labels,
        ref_hidden=ref_hidden, ref_weight=ref_weight, token_weight=token_weight, softcap=head.softcap,
    )
