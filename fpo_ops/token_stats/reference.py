"""The math oracle: plain PyTorch that materialises both models' logits.

It is deliberately simple (autograd does every gradient) and runs in any dtype, float64 included.
Optimised code never imports it; tests and benchmarks compare against it.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .options import HeadOptions


def reference_logits(hidden, weight, bias, softcap, logit_scale, opts: HeadOptions) -> torch.Tensor:
    """``cap(scale * (h @ W^T + b)) / T`` as a [N, V] tensor in the accumulation dtype."""
    x = (hidden.to(opts.compute_dtype) @ weight.to(opts.compute_dtype).T).to(opts.accum_dtype)
    if bias is not None:
        x = x + bias.to(opts.accum_dtype)
    x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / opts.temperature


def reference_token_stats(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ref_hidden: Optional[torch.Tensor], ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor], opts: HeadOptions,
) -> Dict[str, torch.Tensor]:
    """Per-token statistics of flattened inputs (hidden [N, H], labels [N]) as {name: [N]}."""
    valid = labels != opts.ignore_index
    # Unchecked labels outside the vocabulary (check_labels=False) have label logit 0, as in the
    # streaming and fused implementations, whose label logit comes from the tile holding it.
    in_vocab = valid & (labels >= 0) & (labels < weight.shape[0])
    safe_labels = torch.where(in_vocab, labels, torch.zeros_like(labels)).long()

    def at_label(values):
        return torch.where(in_vocab, values.gather(-1, safe_labels[:, None]).squeeze(-1), values.new_zeros(()))

    def label_log_prob(log_probs, logits):
        # log p[y] = z[y] - lse, with z[y] = 0 outside the vocabulary
        outside = -torch.logsumexp(logits, dim=-1)
        return torch.where(in_vocab, log_probs.gather(-1, safe_labels[:, None]).squeeze(-1), outside)

    def rows_used(h):
        # Ignored rows get gradient 0 even when not finite: 0 * NaN would spread NaN over dweight.
        return torch.where(valid[:, None], h, h.new_zeros(()))

    z = reference_logits(rows_used(hidden), weight, bias, opts.softcap, opts.logit_scale, opts)
    logp_all = F.log_softmax(z, dim=-1)
    stats = {}
    if opts.wants("logp"):
        stats["logp"] = label_log_prob(logp_all, z)
    if opts.wants("lse"):
        stats["lse"] = torch.logsumexp(z, dim=-1)
    if opts.wants("entropy"):
        stats["entropy"] = -(logp_all.exp() * logp_all).sum(-1)
    with torch.no_grad():  # metric statistics carry no gradient
        if opts.wants("log_sum_p2"):
            stats["log_sum_p2"] = torch.logsumexp(2 * logp_all, dim=-1)
        if opts.wants("mean_logit"):
            stats["mean_logit"] = z.mean(-1)
        if opts.wants("top1_correct"):
            # torch.argmax returns the first maximal index: a tie with an earlier index is wrong
            stats["top1_correct"] = (in_vocab & (z.argmax(-1) == labels)).to(opts.accum_dtype)
        if opts.wants("argmax"):
            stats["argmax"] = z.argmax(-1)

    if ref_hidden is not None:
        # The reference is frozen: no gradient reaches it, even through a shared weight.
        z_ref = reference_logits(
            rows_used(ref_hidden.detach()), ref_weight.detach(), None if ref_bias is None else ref_bias.detach(),
            opts.ref_softcap, opts.ref_logit_scale, opts,
        )
        logq_all = F.log_softmax(z_ref, dim=-1)
        if opts.wants("ref_logp"):
            stats["ref_logp"] = label_log_prob(logq_all, z_ref)
        if opts.wants("kl"):
            stats["kl"] = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
        if opts.wants("reverse_kl"):
            stats["reverse_kl"] = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
        if opts.wants("jsd"):
            stats["jsd"] = _jsd(logp_all, logq_all, opts.jsd_beta)

    zero = torch.zeros((), dtype=opts.accum_dtype, device=hidden.device)
    none = torch.full((), -1, dtype=torch.int64, device=hidden.device)  # an index at ignored rows
    return {name: torch.where(valid, stats[name], none if name == "argmax" else zero) for name in opts.outputs}


def _jsd(logp_all: torch.Tensor, logq_all: torch.Tensor, beta: float) -> torch.Tensor:
    """beta KL(q || m) + (1 - beta) KL(p || m) with m = beta q + (1 - beta) p, per row."""
    # The endpoints drop the vanishing term of m, whose log would be -inf.
    if beta == 0.0:
        logm = logp_all
    elif beta == 1.0:
        logm = logq_all
    else:
        logm = torch.logaddexp(logq_all + math.log(beta), logp_all + math.log1p(-beta))
    jsd = torch.zeros(logp_all.shape[:-1], dtype=logp_all.dtype, device=logp_all.device)
    if beta > 0.0:
        jsd = jsd + beta * (logq_all.exp() * (logq_all - logm)).sum(-1)
    if beta < 1.0:
        jsd = jsd + (1.0 - beta) * (logp_all.exp() * (logp_all - logm)).sum(-1)
    return jsd
