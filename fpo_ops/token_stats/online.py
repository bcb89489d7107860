"""Online (max-rescaled) per-token sums over vocabulary blocks, and the per-token logit gradient.

A block of the vocabulary turns into *partials*: a dict of per-token tensors, each kept relative to
the block's running maxima so that no exponential overflows. Partials of disjoint blocks merge
exactly (`merge_partials`), so the same code folds vocabulary tiles one after another, or combines
slices of the vocabulary held by different processes. `finalize` turns them into statistics.

Per token, with m = max z, s = sum e^{z-m} (primed: reference), lse = m + log s:
    ent = sum e^{z-m} (z-m)                      entropy     = log s - ent / s
    s2  = sum e^{2(z-m)}                         log_sum_p2  = log s2 - 2 log s
    rkl = sum e^{z-m} ((z-m) - (z'-m'))          reverse_kl  = rkl / s - log s + log s'
    kl  = sum e^{z'-m'} ((z'-m') - (z-m))        kl          = kl / s' - log s' + log s
    m_pre = max_{v < y} z_v                      top1_correct = z[y] == m and m_pre < m
    argmax = min {v : z_v == m}                  argmax (the predicted token)
(``m_pre`` is a maximum, not a sum: it merges by max and is never shifted; the tie rule is
torch.argmax's: y is the prediction only if no earlier index attains the maximum. ``argmax``
merges as the smallest index among the blocks whose maximum is the common one.)
Shifting by the maxima keeps the sums free of the cancellation that ``sum p z`` suffers at |z| ~ 1e4.
"""
import math
from typing import Dict, Optional, Tuple

import torch

from .options import HeadOptions
from .stats import PARTIAL_MERGE, partials_for

Partials = Dict[str, torch.Tensor]


def needed_partials(opts: HeadOptions) -> Tuple[str, ...]:
    """Names of the sums a call needs beyond the two log-normalisers and the label logits
    (from the table `fpo_ops.token_stats.stats.STATS`)."""
    return partials_for(opts.outputs)


def transform_logits(x: torch.Tensor, softcap: Optional[float], logit_scale: float,
                     temperature: float) -> torch.Tensor:
    """``cap(scale * x) / T`` on a fp32/fp64 tile of pre-activations ``x = h @ W^T + b``."""
    x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def logit_to_preactivation_grad(dz: torch.Tensor, z: torch.Tensor, softcap: Optional[float],
                                logit_scale: float, temperature: float) -> torch.Tensor:
    """Chain d/dz through ``/T``, the softcap and the scale: tanh(u/c) is recovered as z T / c."""
    factor = logit_scale / temperature
    if softcap is None:
        return dz * factor
    t = z * (temperature / softcap)
    return dz * (factor * (1.0 - t * t))


def tile_partials(z: torch.Tensor, z_ref: Optional[torch.Tensor], local_labels: torch.Tensor,
                  keys: Tuple[str, ...], first_column: int = 0) -> Partials:
    """Partials of one [n, b] tile; ``local_labels`` is the label's column in the tile or -1.
    ``first_column``: the tile's first row of the head (``argmax`` is counted from there)."""
    in_tile = (local_labels >= 0) & (local_labels < z.shape[1])
    col = torch.where(in_tile, local_labels, torch.zeros_like(local_labels))[:, None]
    zero = z.new_zeros(())

    m = z.max(dim=1).values
    shifted = z - m[:, None]
    e = torch.exp(shifted)
    out = {"m": m, "s": e.sum(1), "z_label": torch.where(in_tile, z.gather(1, col)[:, 0], zero)}
    if "ent" in keys:
        out["ent"] = (e * shifted).sum(1)
    if "s2" in keys:
        out["s2"] = (e * e).sum(1)
    if "sum_z" in keys:
        out["sum_z"] = z.sum(1)
    if "m_pre" in keys:
        # label columns past the tile put the whole tile before the label; -1 puts none of it
        before = torch.arange(z.shape[1], device=z.device)[None, :] < local_labels[:, None]
        out["m_pre"] = torch.where(before, z, z.new_full((), float("-inf"))).max(dim=1).values
    if "argmax" in keys:
        # torch.argmax returns the first maximal index
        out["argmax"] = (z.argmax(dim=1) + first_column).to(z.dtype)
    if z_ref is not None:
        m_ref = z_ref.max(dim=1).values
        shifted_ref = z_ref - m_ref[:, None]
        e_ref = torch.exp(shifted_ref)
        out["m_ref"], out["s_ref"] = m_ref, e_ref.sum(1)
        out["z_ref_label"] = torch.where(in_tile, z_ref.gather(1, col)[:, 0], zero)
        if "rkl" in keys:
            out["rkl"] = (e * (shifted - shifted_ref)).sum(1)
        if "kl" in keys:
            out["kl"] = (e_ref * (shifted_ref - shifted)).sum(1)
    return out


# The maxima the sums are relative to.
MAXIMA = ("m", "m_ref")


def shift_partials(p: Partials, m: torch.Tensor, m_ref: Optional[torch.Tensor]) -> Partials:
    """The partials ``p`` re-expressed relative to per-token maxima ``m`` (``m_ref``) >= their own.

    Relative to common maxima every partial except the maxima themselves is a plain sum over the
    vocabulary, so those of disjoint blocks add: that is how processes holding slices of the
    vocabulary combine theirs with one all-reduce.
    """
    d = p["m"] - m
    r = torch.exp(d)
    out = {"m": m, "s": r * p["s"], "z_label": p["z_label"]}
    if "ent" in p:
        out["ent"] = r * (p["ent"] + d * p["s"])
    if "s2" in p:
        out["s2"] = r * r * p["s2"]
    for key in p:
        if key not in MAXIMA and PARTIAL_MERGE[key] == "max":
            out[key] = p[key]  # other maxima (m_pre) are not relative to anything
        elif PARTIAL_MERGE[key] == "min":
            # a block below the common maximum holds no maximal index
            out[key] = torch.where(p["m"] == m, p[key], p[key].new_full((), float("inf")))
    if "sum_z" in p:
        out["sum_z"] = p["sum_z"]
    if "m_ref" in p:
        d_ref = p["m_ref"] - m_ref
        r_ref = torch.exp(d_ref)
        out["m_ref"], out["s_ref"], out["z_ref_label"] = m_ref, r_ref * p["s_ref"], p["z_ref_label"]
        if "rkl" in p:
            out["rkl"] = r * (p["rkl"] + (d - d_ref) * p["s"])
        if "kl" in p:
            out["kl"] = r_ref * (p["kl"] + (d_ref - d) * p["s_ref"])
    return out


def merge_stacked(blocks: Partials) -> Partials:
    """Exact combination of the partials of disjoint vocabulary blocks stacked on dim 0 ({key:
    [S, N]} -> {key: [N]}): maxima by max, the sums after shifting to the common maxima."""
    m = blocks["m"].max(dim=0).values
    m_ref = blocks["m_ref"].max(dim=0).values if "m_ref" in blocks else None
    shifted = shift_partials(blocks, m, m_ref)

    def merge(key, value):
        if key in MAXIMA:
            return value  # already the common maximum
        merge_op = PARTIAL_MERGE[key]
        if merge_op == "max":
            return value.max(dim=0).values
        return value.min(dim=0).values if merge_op == "min" else value.sum(0)
    return {key: merge(key, value) for key, value in shifted.items()}


_PAIRWISE = {"max": torch.maximum, "min": torch.minimum, "sum": torch.add}


def merge_partials(a: Partials, b: Partials) -> Partials:
    """Exact combination of the partials of two disjoint vocabulary blocks (`merge_stacked` of two,
    without stacking: this runs once per tile)."""
    m = torch.maximum(a["m"], b["m"])
    m_ref = torch.maximum(a["m_ref"], b["m_ref"]) if "m_ref" in a else None
    a, b = shift_partials(a, m, m_ref), shift_partials(b, m, m_ref)
    return {key: value if key in MAXIMA else _PAIRWISE[PARTIAL_MERGE[key]](value, b[key])
            for key, value in a.items()}


def finalize(p: Partials, vocab_size: int) -> Dict[str, torch.Tensor]:
    """Statistics (and the log-normalisers ``lse``/``lse_ref``) from fully merged partials."""
    log_s = torch.log(p["s"])
    lse = p["m"] + log_s
    out = {"lse": lse, "logp": p["z_label"] - lse}
    if "argmax" in p:
        out["argmax"] = p["argmax"].to(torch.int64)
    if "m_pre" in p:
        # the first maximal index, as torch.argmax: a tie with an earlier index is not correct
        out["top1_correct"] = ((p["z_label"] >= p["m"]) & (p["m_pre"] < p["m"])).to(lse.dtype)
    if "ent" in p:
        out["entropy"] = log_s - p["ent"] / p["s"]
    if "s2" in p:
        out["log_sum_p2"] = torch.log(p["s2"]) - 2.0 * log_s
    if "sum_z" in p:
        out["mean_logit"] = p["sum_z"] / vocab_size
    if "m_ref" in p:
        log_s_ref = torch.log(p["s_ref"])
        lse_ref = p["m_ref"] + log_s_ref
        out["lse_ref"] = lse_ref
        out["ref_logp"] = p["z_ref_label"] - lse_ref
        if "rkl" in p:
            out["reverse_kl"] = p["rkl"] / p["s"] - log_s + log_s_ref
        if "kl" in p:
            out["kl"] = p["kl"] / p["s_ref"] - log_s_ref + log_s
    return out


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta q + (1 - beta) p); exact at the endpoints, where one term vanishes."""
    if beta == 0.0:
        return logp
    if beta == 1.0:
        return logq
    return torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))


def tile_jsd_sums(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row sums of one tile for the JSD: (sum q (log q - log m), sum p (log p - log m))."""
    logm = log_mixture(logp, logq, beta)
    return (torch.exp(logq) * (logq - logm)).sum(1), (torch.exp(logp) * (logp - logm)).sum(1)


def tile_logit_grad(
    z: torch.Tensor, z_ref: Optional[torch.Tensor], local_labels: torch.Tensor,
    coef: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor], beta: float,
) -> torch.Tensor:
    """d loss / d z on one [n, b] tile (DESIGN section 2), given per-token upstream gradients.

    Terms: logp -> onehot(y) - p, lse -> p, and those of the divergences and the entropy.
    ``coef`` maps each differentiable statistic with an upstream gradient to that gradient [n]
    (already 0 at ignored tokens); ``saved`` holds lse, lse_ref and the statistic values the
    formula needs, each [n].
    """
    logp = z - saved["lse"][:, None]
    p = torch.exp(logp)
    dz = torch.zeros_like(z)
    if "lse" in coef:
        dz = dz + coef["lse"][:, None] * p
    if "logp" in coef:
        g = coef["logp"][:, None]
        in_tile = (local_labels >= 0) & (local_labels < z.shape[1])
        col = torch.where(in_tile, local_labels, torch.zeros_like(local_labels))[:, None]
        dz = dz - g * p
        dz.scatter_add_(1, col, torch.where(in_tile, coef["logp"], torch.zeros_like(coef["logp"]))[:, None])
    if "entropy" in coef:
        dz = dz - coef["entropy"][:, None] * p * (logp + saved["entropy"][:, None])
    if z_ref is not None:
        logq = z_ref - saved["lse_ref"][:, None]
        if "kl" in coef:
            dz = dz + coef["kl"][:, None] * (p - torch.exp(logq))
        if "reverse_kl" in coef:
            dz = dz + coef["reverse_kl"][:, None] * p * (logp - logq - saved["reverse_kl"][:, None])
        if "jsd" in coef and beta < 1.0:
            logm = log_mixture(logp, logq, beta)
            dz = dz + ((1.0 - beta) * coef["jsd"])[:, None] * p * (logp - logm - saved["kl_p_m"][:, None])
    return dz
