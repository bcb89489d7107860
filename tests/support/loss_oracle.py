"""Independent float64 formulas of the loss heads, for the tests.

Everything here materialises the logits and writes each loss out from its paper or from the
trainer it mirrors (TRL's DPOTrainer, KTOTrainer, CPOTrainer, ORPOTrainer; TDPO's and SPPO's
official code); nothing imports fpo_ops. Gradients flow by autograd to the batch's leaves.
"""
import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from loss_batches import IGNORE, Batch


def _logits(hidden, weight, bias, temperature=1.0, softcap=None, logit_scale=1.0):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_quantities(batch: Batch, hidden=None, ref_hidden=None, labels=None) -> Dict[str, torch.Tensor]:
    """Per-token [R, T] float64 values from explicit log-softmaxes (0 at ignored positions)."""
    hidden = batch.hidden if hidden is None else hidden
    ref_hidden = batch.ref_hidden if ref_hidden is None else ref_hidden
    labels = batch.labels if labels is None else labels
    head = batch.head
    ref_weight = batch.weight.detach() if batch.ref_weight is None else batch.ref_weight
    ref_bias = batch.ref_bias
    if batch.ref_weight is None and ref_bias is None and batch.bias is not None:
        ref_bias = batch.bias.detach()
    z = _logits(hidden, batch.weight, batch.bias, head.get("temperature", 1.0), head.get("softcap"),
                head.get("logit_scale", 1.0))
    zr = _logits(ref_hidden, ref_weight, ref_bias, head.get("temperature", 1.0), head.get("ref_softcap"),
                 head.get("ref_logit_scale", 1.0))
    return token_quantities_of_logits(z, zr, labels)


def token_quantities_of_logits(z: torch.Tensor, zr: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """`token_quantities` from policy logits ``z`` and reference logits ``zr`` [R, T, V] (``zr`` detached)."""
    zr = zr.detach()
    valid = labels != IGNORE
    logp_all, logq_all = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    p, q = logp_all.exp(), logq_all.exp()
    index = labels.clamp(min=0).unsqueeze(-1)
    m = valid.to(z.dtype)
    return dict(
        mask=valid,
        logp=logp_all.gather(-1, index).squeeze(-1) * m,
        ref_logp=logq_all.gather(-1, index).squeeze(-1) * m,
        kl=(q * (logq_all - logp_all)).sum(-1) * m,
        reverse_kl=(p * (logp_all - logq_all)).sum(-1) * m,
        entropy=-(p * logp_all).sum(-1) * m,
        log_sum_sq_probs=torch.logsumexp(2 * logp_all, -1) * m,
        mean_logits=z.mean(-1) * m,
        is_top1=(z.argmax(-1) == labels) & valid,
    )


# ----------------------------------------------------------------------------------------------
# TRL DPOTrainer._compute_loss, transcribed (plus the per-pair margin of Sequential PO)


def dpo_oracle(
    tok: Dict[str, torch.Tensor], loss_types: Sequence[str], *, loss_weights=None, beta=0.1,
    label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
    use_weighting=False, discopop_tau=0.05, ref_chosen_logps=None, ref_rejected_logps=None, margin=None,
):
    mask = tok["mask"]
    per_token_logps = tok["logp"]
    m = mask.to(per_token_logps.dtype)
    if ld_alpha is None:
        logps = per_token_logps.sum(1)
        ref_logps = tok["ref_logp"].sum(1)
    else:
        comp_pos = mask.long().cumsum(1)
        comp_lens = mask.sum(1)
        chosen_lens, rejected_lens = comp_lens.chunk(2)
        shared = torch.minimum(chosen_lens, rejected_lens)
        shared = torch.cat([shared, shared]).unsqueeze(1)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared) & mask
        tail_mask = (comp_pos > shared) & mask
        logps = (per_token_logps * shared_mask).sum(1) + ld_alpha * (per_token_logps * tail_mask).sum(1)
        ref_logps = (tok["ref_logp"] * shared_mask).sum(1) + ld_alpha * (tok["ref_logp"] * tail_mask).sum(1)
    chosen_logps, rejected_logps = logps.chunk(2)
    if ref_chosen_logps is None:
        ref_chosen_logps, ref_rejected_logps = ref_logps.detach().chunk(2)
    u_w = chosen_logps - ref_chosen_logps
    u_l = rejected_logps - ref_rejected_logps

    def score(u):
        if f_divergence_type == "reverse_kl":
            return u
        if f_divergence_type == "forward_kl":
            return 1 - torch.exp(-u)
        if f_divergence_type == "js_divergence":
            return math.log(2) + F.logsigmoid(u)
        a = f_alpha_divergence_coef
        if abs(a - 1) < 1e-6:
            return u
        return (torch.exp(torch.clamp((a - 1) * u, max=80.0)) - 1) / (a - 1)

    s_w, s_l = score(u_w), score(u_l)
    mg = 0.0 if margin is None else margin
    x = beta * (s_w - s_l) - mg
    n_w, n_l = m.chunk(2)
    len_w, len_l = n_w.sum(1).clamp(min=1), n_l.sum(1).clamp(min=1)
    ls = label_smoothing
    weights = loss_weights or [1.0] * len(loss_types)
    loss = 0.0
    for lt, lw in zip(loss_types, weights):
        if lt == "sigmoid":
            per = -F.logsigmoid(x)
        elif lt == "hinge":
            per = torch.relu(1 - x)
        elif lt == "ipo":
            per = (s_w / len_w - s_l / len_l - mg / beta - 1 / (2 * beta)) ** 2
        elif lt == "exo_pair":
            per = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-ls)) + \
                torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(ls))
        elif lt == "nca_pair":
            per = -F.logsigmoid(beta * u_w) - 0.5 * F.logsigmoid(-beta * u_w) - 0.5 * F.logsigmoid(-beta * u_l)
        elif lt == "robust":
            per = (-(1 - ls) * F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1 - 2 * ls)
        elif lt == "bco_pair":
            per = -F.logsigmoid(beta * u_w) - F.logsigmoid(-beta * u_l)
        elif lt == "sppo_hard":
            per = (u_w - 0.5 / beta) ** 2 + (u_l + 0.5 / beta) ** 2
        elif lt == "aot":
            d = torch.sort(chosen_logps - rejected_logps)[0] - torch.sort(ref_chosen_logps - ref_rejected_logps)[0]
            per = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
        elif lt == "aot_unpaired":
            d = torch.sort(u_w)[0] - torch.sort(u_l)[0]
            per = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
        elif lt == "apo_zero":
            per = 1 - torch.sigmoid(beta * u_w) + torch.sigmoid(beta * u_l)
        elif lt == "apo_down":
            per = torch.sigmoid(beta * u_w) + 1 - torch.sigmoid(beta * (u_w - u_l))
        elif lt == "discopop":
            mod = torch.sigmoid(x / discopop_tau)
            per = -F.logsigmoid(x) * (1 - mod) + torch.exp(-x) * mod
        elif lt == "sft":
            chosen_tok, _ = per_token_logps.chunk(2)
            per = (-chosen_tok[n_w.bool()].mean()).expand(len_w.shape[0])
        elif lt == "sigmoid_norm":
            per = -F.logsigmoid(beta * (s_w / len_w - s_l / len_l) - mg)
        else:
            raise AssertionError(lt)
        if use_weighting:
            with torch.no_grad():
                aligned = (per_token_logps - tok["log_sum_sq_probs"]) * m
                w = torch.exp(aligned.sum(1) / m.sum(1).clamp(min=1))
            per = per * w.chunk(2)[0] * w.chunk(2)[1]
        loss = loss + per.mean() * lw

    rewards_w, rewards_l = beta * u_w.detach(), beta * u_l.detach()
    metrics = dict(_reward_metrics(rewards_w, rewards_l, chosen_logps, rejected_logps), **_token_metrics(tok))
    if set(loss_types) & {"sft"}:
        metrics["nll_loss"] = -per_token_logps.chunk(2)[0][n_w.bool()].mean().detach()
    return loss, metrics, chosen_logps, rejected_logps


def _reward_metrics(rw, rl, lw, ll):
    return {
        "rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
        "rewards/accuracies": (rw > rl).double().mean(), "rewards/margins": (rw - rl).mean(),
        "logps/chosen": lw.detach().mean(), "logps/rejected": ll.detach().mean(),
    }


def _token_metrics(tok):
    mask = tok["mask"]
    cm, rm = mask.chunk(2)
    mean_logits = tok["mean_logits"].detach()
    cl, rl = mean_logits.chunk(2)
    top1, _ = tok["is_top1"].chunk(2)
    return {
        "entropy": tok["entropy"].detach()[mask].sum() / mask.sum(),
        "logits/chosen": cl[cm].sum() / cm.sum(),
        "logits/rejected": rl[rm].sum() / rm.sum(),
        "mean_token_accuracy": (top1 & cm).sum().double() / cm.sum(),
    }


# ----------------------------------------------------------------------------------------------
# TDPO (official code's tdpo_loss), SPO, SPPO


def tdpo_oracle(tok, *, beta, alpha, tdpo2, margin=None, detach_chosen_kl=None):
    mask = tok["mask"]
    logps, ref_logps = tok["logp"].sum(1), tok["ref_logp"].sum(1)
    position_kl = (tok["kl"] * mask).sum(1)
    cw, cl = logps.chunk(2)
    rw, rl = ref_logps.chunk(2)
    chosen_logps_margin, rejected_logps_margin = cw - rw, cl - rl
    chosen_kl, rejected_kl = position_kl.chunk(2)
    detach = tdpo2 if detach_chosen_kl is None else detach_chosen_kl
    margin_kl = rejected_kl - (chosen_kl.detach() if detach else chosen_kl)
    logits = (chosen_logps_margin - rejected_logps_margin) - (alpha if tdpo2 else 1.0) * margin_kl
    losses = -F.logsigmoid(beta * logits - (0.0 if margin is None else margin))
    chosen_rewards = beta * (chosen_logps_margin + chosen_kl).detach()
    rejected_rewards = beta * (rejected_logps_margin + rejected_kl).detach()
    metrics = dict(_reward_metrics(chosen_rewards, rejected_rewards, cw, cl), **_token_metrics(tok))
    metrics["kl/chosen"] = chosen_kl.detach().mean()
    metrics["kl/rejected"] = rejected_kl.detach().mean()
    return losses.mean(), metrics


def spo_oracle(tok, *, beta, alpha, sample_tok=None, margin=None, pair_weight=None, sample_weights=None):
    """SPO (Sharifnassab et al. 2024): -(1/α) log(π_w^α / (π_w^α + π_l^α)) + β E_y[Σ_t KL(π_θ ‖ π_ref)].

    The expectation is the (weighted) mean over the given samples, which are held fixed: the
    gradient is the per-token distribution term only (see `spo_exact_regulariser` for the full one).
    """
    logps = tok["logp"].sum(1)
    cw, cl = logps.chunk(2)
    pw, pl = torch.exp(alpha * cw), torch.exp(alpha * cl)   # small sequences: no overflow in float64
    mg = 0.0 if margin is None else margin
    preference = -torch.log(pw / (pw + pl * torch.exp(torch.as_tensor(mg, dtype=pw.dtype)))) / alpha
    if pair_weight is not None:
        preference = preference * pair_weight
    source = tok if sample_tok is None else sample_tok
    per_sample = source["reverse_kl"].sum(1)
    if sample_weights is None:
        regulariser = per_sample.mean()
    else:
        regulariser = (per_sample * sample_weights).sum() / sample_weights.sum()
    loss = preference.mean() + beta * regulariser
    u = (logps - tok["ref_logp"].sum(1)).detach()
    metrics = dict(_reward_metrics(beta * u.chunk(2)[0], beta * u.chunk(2)[1], cw, cl), **_token_metrics(tok))
    metrics["reverse_kl"] = regulariser.detach()
    return loss, metrics


def sppo_oracle(tok, *, beta, p_w=None, p_l=None, p_pair=None):
    """SPPO official trainer (uclaml/SPPO ``dpo_loss``), η = 1/β:
    ``sppo``: ((u_w - η(P_w - ½))² + (u_l - η(P_l - ½))²) / 2 with P_w, P_l = chosen_probs_win, chosen_probs_lose;
    ``sppo_single`` (p_pair given): ((u_w - η(P - ½))² + (u_l + η(P - ½))²) / 2 with P = chosen_probs."""
    u = tok["logp"].sum(1) - tok["ref_logp"].sum(1)
    u_w, u_l = u.chunk(2)
    eta = 1 / beta
    if p_pair is not None:
        loss_w = (u_w - eta * (p_pair - 0.5)) ** 2
        loss_l = (u_l + eta * (p_pair - 0.5)) ** 2
    else:
        loss_w = (u_w - eta * (p_w - 0.5)) ** 2
        loss_l = (u_l - eta * (p_l - 0.5)) ** 2
    return ((loss_w + loss_l) / 2).mean()


# ----------------------------------------------------------------------------------------------
# Reference-free: CPOTrainer (sigmoid / simpo), ORPOTrainer


def _avg_logps(tok):
    m = tok["mask"].to(tok["logp"].dtype)
    return tok["logp"].sum(1) / m.sum(1)


def _nll(tok):
    chosen_tok, _ = tok["logp"].chunk(2)
    chosen_mask, _ = tok["mask"].chunk(2)
    return -chosen_tok[chosen_mask].mean()


def cpo_oracle(tok, *, beta, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=None, margin=None):
    """CPOTrainer.cpo_loss: 'sigmoid' on summed log-probs, 'simpo' on averaged ones (simpo has no NLL here)."""
    simpo = simpo_gamma is not None
    logps = _avg_logps(tok) if simpo else tok["logp"].sum(1)
    cw, cl = logps.chunk(2)
    logits = cw - cl
    if simpo:
        logits = logits - simpo_gamma / beta
    if margin is not None:
        logits = logits - margin / beta
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    nll = _nll(tok)
    loss = losses.mean() + (0.0 if simpo else cpo_alpha * nll)
    metrics = dict(_reward_metrics(beta * cw.detach(), beta * cl.detach(), cw, cl), **_token_metrics(tok))
    if not simpo:
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def orpo_oracle(tok, *, beta):
    """ORPOTrainer: loss = NLL - mean(β log σ(log odds_w - log odds_l)), odds on mean token log-probs."""
    cw, cl = _avg_logps(tok).chunk(2)
    log_odds = (cw - cl) - (torch.log1p(-torch.exp(cw)) - torch.log1p(-torch.exp(cl)))
    ratio = F.logsigmoid(log_odds)
    nll = _nll(tok)
    loss = nll - (beta * ratio).mean()
    metrics = dict(_reward_metrics(beta * cw.detach(), beta * cl.detach(), cw, cl), **_token_metrics(tok))
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()})
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# KTOTrainer._compute_loss


def kto_oracle(tok, desirable, *, beta, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
               kl_tok=None, ref_logps=None, ref_kl_logps=None):
    completion_logps = tok["logp"].sum(1)
    ref_completion = tok["ref_logp"].sum(1) if ref_logps is None else ref_logps
    chosen_idx = torch.nonzero(desirable).view(-1)
    rejected_idx = torch.nonzero(~desirable).view(-1)
    if loss_type == "kto":
        ref_kl = kl_tok["ref_logp"].sum(1) if ref_kl_logps is None else ref_kl_logps
        kl = (kl_tok["logp"].sum(1) - ref_kl).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=completion_logps.dtype)
    chosen_logratios = completion_logps[chosen_idx] - ref_completion[chosen_idx]
    rejected_logratios = completion_logps[rejected_idx] - ref_completion[rejected_idx]
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    loss = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses)).nanmean()
    mask = tok["mask"]
    mean_logits = tok["mean_logits"].detach()
    metrics = {
        "kl": kl,
        "entropy": tok["entropy"].detach()[mask].sum() / mask.sum(),
        "logits/chosen": mean_logits[chosen_idx][mask[chosen_idx]].sum() / mask[chosen_idx].sum(),
        "logits/rejected": mean_logits[rejected_idx][mask[rejected_idx]].sum() / mask[rejected_idx].sum(),
        "rewards/chosen": (beta * chosen_logratios.detach()).sum() / len(chosen_idx),
        "logps/chosen": completion_logps[chosen_idx].detach().sum() / len(chosen_idx),
        "rewards/rejected": (beta * rejected_logratios.detach()).sum() / len(rejected_idx),
        "logps/rejected": completion_logps[rejected_idx].detach().sum() / len(rejected_idx),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def teacher_student_logits(batch: Batch):
    """[R, T, V] student and teacher logits (before temperature) for TRL's generalized_jsd_loss."""
    head = batch.head
    teacher_weight = batch.weight.detach() if batch.ref_weight is None else batch.ref_weight
    student = _logits(batch.hidden, batch.weight, batch.bias, 1.0, head.get("softcap"), head.get("logit_scale", 1.0))
    teacher = _logits(batch.ref_hidden, teacher_weight, batch.ref_bias, 1.0, head.get("ref_softcap"),
                      head.get("ref_logit_scale", 1.0))
    return student, teacher.detach()


def spo_exact_regulariser(embed, position, weight, ref_embed, ref_position, ref_weight, *, start: int):
    """SPO's global regulariser E_{y~π_θ}[Σ_t KL(π_θ(·|y_<t) ‖ π_ref(·|y_<t))], summed exactly.

    A toy autoregressive model over V tokens: the hidden state predicting y_t is
    ``embed[y_{t-1}] + position[t]`` (y_0 = ``start``), the logits ``hidden @ weight.T``; the
    reference likewise with its own tables. Every one of the V^T sequences of length T is
    enumerated, so the result is the expectation itself, and autograd through π_θ(y) gives its full
    gradient (the per-token term and the score-function term) without any estimator.

    Returns:
        (J [], sequences [V^T, T], hidden [V^T, T, H], ref_hidden [V^T, T, H'], probs [V^T] = π_θ(y)).
    """
    import itertools

    vocab, length = weight.shape[0], position.shape[0]
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    previous = torch.cat([torch.full((sequences.shape[0], 1), start), sequences[:, :-1]], dim=1)
    hidden = embed[previous] + position
    ref_hidden = (ref_embed[previous] + ref_position).detach()
    logp_all = torch.log_softmax(hidden @ weight.T, -1)
    logq_all = torch.log_softmax(ref_hidden @ ref_weight.T, -1).detach()
    kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1).sum(-1)
    log_prob = logp_all.gather(-1, sequences.unsqueeze(-1)).squeeze(-1).sum(-1)
    probs = log_prob.exp()
    return (probs * kl).sum(), sequences, hidden, ref_hidden, probs
