"""`preference_loss`: every pairwise preference loss on top of `token_stats`, without [N, V] logits.

One call runs request -> statistics -> per-pair terms -> loss: the loss types' registry entries
(`registry.LOSSES`) say which token statistics and reference they need, `token_stats` computes them
in one pass, `_pair_terms` sums them per sequence, and each entry's formula gives the per-pair loss.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..token_stats.stats import REFERENCE_STATS
from ..token_stats import token_stats
from .checks import check_bool, validate_pair_labels, validate_pair_tensor
from .config import LossConfig
from .fdivergence import f_divergence_score
from .keywords import option_keywords
from .heads import PairTerms
from .metrics import reward_metrics, token_metrics
from .options import HeadConfig
from .output import PreferenceOutput
from .reference_free import sft_loss
from .registry import LOGRATIO, LOGRATIO_KL, LOSSES, OFFSET, PAIR_INPUTS, POLICY, types_where, users_of
from .sequence import completion_mask, ld_token_weights, sequence_mean, sequence_sum, split_pairs
from .token_level import spo_sample_terms


@option_keywords(config=LossConfig, head=HeadConfig)
def preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    config: LossConfig,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    margin: Optional[torch.Tensor] = None,
    sample_hidden: Optional[torch.Tensor] = None,
    sample_ref_hidden: Optional[torch.Tensor] = None,
    sample_labels: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
    spo_score_function: bool = False,
    spo_weight: Optional[torch.Tensor] = None,
    chosen_win_prob: Optional[torch.Tensor] = None,
    rejected_win_prob: Optional[torch.Tensor] = None,
    pair_win_prob: Optional[torch.Tensor] = None,
    nll_target: Optional[torch.Tensor] = None,
    compute_metrics: bool = True,
    head: HeadConfig,
) -> PreferenceOutput:
    """Pairwise preference loss of an LM head (DPO family, TDPO, SPO, SPPO, SimPO, CPO, ORPO).

    The batch holds B pairs: rows ``[:B]`` are the chosen responses, rows ``[B:]`` the rejected ones
    (TRL and Liger layout). Per-token statistics come from `token_stats` (``impl`` and the head
    options are forwarded); per-sequence log-probs are sums over the completion tokens (labels not
    equal to ``ignore_index``), as in TRL. With several loss types the loss is
    ``Σ_k loss_weights[k] · mean_pairs(loss_k)``.

    Loss types (formulas and papers in the docstrings of `pairwise`, `per_response`, `ranked`,
    `token_level`, `sppo`, `reference_free`):
    every TRL ``DPOTrainer`` type (``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``,
    ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``,
    ``discopop``, ``sft``, ``sigmoid_norm``) with TRL's semantics, plus ``tdpo1``, ``tdpo2``
    (token KL(π_ref‖π_θ) summed per sequence), ``spo`` (``-(1/α) log σ(α (S_w - S_l))`` plus β times
    the summed token KL(π_θ‖π_ref) of sequences sampled from the policy, or of the pair when none are
    given), ``sppo`` and ``sppo_single`` (soft win rates), ``simpo``, ``cpo`` and ``orpo``.

    Reference: losses on log-ratios need reference log-probs, from ``ref_hidden`` (with
    ``ref_weight``, or the policy head when None) or precomputed as ``ref_chosen_logps`` /
    ``ref_rejected_logps``. ``tdpo1``, ``tdpo2`` and ``spo`` need token-level reference
    distributions, so precomputed log-probs cannot replace ``ref_hidden`` for them.
    ``simpo``, ``cpo``, ``orpo`` and ``sft`` need no reference.

    Margin (Sequential Preference Optimization, Lou et al. 2024, "SPO: Multi-Dimensional Preference
    Sequential Alignment With Implicit Reward Modeling"): ``margin`` [B] is subtracted, in reward
    units, from the scaled difference inside every margin-based loss (``sigmoid``, ``hinge``, ``ipo``,
    ``exo_pair``, ``robust``, ``discopop``, ``sigmoid_norm``, ``tdpo1``, ``tdpo2``, ``spo``,
    ``simpo``, ``cpo``); e.g. sigmoid becomes ``-log σ(β Δ - margin)`` and ipo
    ``(Δ_avg - margin/β - 1/(2β))²``. For round k of sequential alignment the caller computes it from
    the frozen models π_1..π_{k-1} of the earlier rounds with multipliers λ_i:
    ``margin = β Σ_{i<k} λ_i [log π_i(y_w)/π_ref(y_w) - log π_i(y_l)/π_ref(y_l)]``.

    Args:
        hidden: [2B, T, H] policy hidden states aligned with ``labels``.
        weight: [V, H] policy LM-head weight.
        labels: [2B, T] next-token ids, ``ignore_index`` outside the completions.
        ref_hidden: [2B, T, H'] reference hidden states, or None.
        ref_weight: [V, H'] reference LM-head weight; None shares the policy head.
        bias, ref_bias: [V] head biases or None.
        loss_type: a loss name or a list of names (combined with ``loss_weights``).
        loss_weights: one float per loss type; default all 1.
        beta: β (the KL strength; IPO's τ; ORPO's λ; SPO's KL weight; SPPO's 1/η).
        label_smoothing: ε of ``robust`` ([0, 0.5)), ``exo_pair`` ((0, 1)), ``aot``, ``aot_unpaired``,
            ``simpo`` and ``cpo``.
        f_divergence_type: ``reverse_kl``, ``forward_kl``, ``js_divergence`` or ``alpha_divergence``
            (f-DPO), allowed with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.
        f_alpha_divergence_coef: α in [0, 1] of ``alpha_divergence``.
        ld_alpha: LD-DPO weight in [0, 1] of each pair's tokens beyond the shorter response's length
            (summed log-probs only), or None.
        use_weighting: WPO weighting by the detached product of the two responses' length-normalised
            ``exp(mean(log p - log Σ_v p_v²))``.
        discopop_tau: τ of ``discopop``.
        ref_chosen_logps, ref_rejected_logps: [B] precomputed reference log-probs (already LD-DPO
            weighted when ``ld_alpha`` is used), or None.
        margin: [B] per-pair margin in reward units (see above), or None.
        tdpo_alpha: α of ``tdpo2``.
        spo_alpha: softmax exponent α of ``spo``'s preference term.
        sample_hidden, sample_ref_hidden, sample_labels: [S, T', H], [S, T', H'], [S, T']: sequences
            sampled from the policy (labels: the sampled tokens, ``ignore_index`` on prompt and padding)
            whose summed token KL(π_θ‖π_ref), through the same heads, forms ``spo``'s regulariser (the
            paper's global KL); None uses the pair itself (the local variant).
        sample_weights: [S] non-negative weights of the samples in the regulariser's mean, or None.
        spo_score_function: add the score-function term to the regulariser's gradient (see
            `token_level.spo_sample_terms`); needs samples.
        spo_weight: [B] per-pair weight μ of ``spo``'s preference term, or None.
        chosen_win_prob, rejected_win_prob: [B] win rates P_w, P_l in [0, 1] of ``sppo`` (SPPO's
            ``chosen_probs_win``, ``chosen_probs_lose``).
        pair_win_prob: [B] P(y_w ≻ y_l) in [0, 1] of ``sppo_single`` (SPPO's ``chosen_probs``).
        nll_target: [2B, T] labels of the NLL term of ``cpo``, ``orpo`` and ``sft`` (Liger's
            ``nll_target``: its chosen half is used, mean over its non-ignored tokens), or None for
            ``labels``; costs one more pass of the head over the chosen rows.
        simpo_gamma: target margin γ of ``simpo``.
        cpo_alpha: weight of the NLL term of ``cpo``.
        average_log_prob: divide the policy and reference sequence log-probs (computed or
            precomputed sums) by the completion length before the loss, as Liger's
            ``average_log_prob``; ``ipo`` and ``sigmoid_norm``, which divide by the length
            themselves, then do not divide again (``simpo``/``orpo`` use means anyway). Not with ``ld_alpha``.
        ignore_index, temperature, softcap, logit_scale, ref_softcap, ref_logit_scale: head options,
            as in `token_stats`.
        compute_metrics: also compute ``entropy``, ``logits/*`` and ``mean_token_accuracy``.
        impl: `token_stats` implementation.
        check_inputs: check label ranges (via `token_stats`) and win-probability ranges (host syncs).
        check_finite: check that the hidden states are finite (a host sync; `token_stats`).
        process_group: vocabulary-parallel head: each process passes the same batch and its own
            contiguous slice of the rows of ``weight``/``bias`` (and ``ref_weight``/``ref_bias``), in
            rank order; loss and metrics come out identical on every process (see `token_stats`).
        grad_filter_eps: ``impl="triton"``'s approximate backward threshold (0, the default, is exact).
        config, head: a ready `LossConfig` (the loss options above) and `HeadConfig` (the head
            options), or None; keywords given beside one replace its fields. The loss and head
            keywords are generated from these two dataclasses (`keywords.option_keywords`).

    Returns:
        PreferenceOutput: ``loss`` [] and ``metrics`` under TRL's names (plus ``kl/chosen``,
        ``kl/rejected`` for TDPO, ``reverse_kl`` for SPO, ``nll_loss`` for CPO/ORPO/SFT,
        ``log_odds_ratio``/``log_odds_chosen`` for ORPO), the [B] per-sequence log-probs with gradient,
        the reference log-probs and the rewards. Rewards follow the first loss type: β·(log-ratio +
        sequence KL) for TDPO (official code), β·(mean log-prob) for SimPO/ORPO, β·(log-prob) for CPO
        or without a reference, else β·(log-ratio) as TRL.
    """
    ignore_index = head.ignore_index
    head_options = head.token_stats_kwargs()
    pair_inputs = dict(chosen_win_prob=chosen_win_prob, rejected_win_prob=rejected_win_prob,
                       pair_win_prob=pair_win_prob, spo_weight=spo_weight)
    samples = _Samples(sample_hidden, sample_ref_hidden, sample_labels, sample_weights, spo_score_function)
    request = _request(config, labels, ref_hidden, ref_chosen_logps, ref_rejected_logps, margin, pair_inputs,
                       samples, compute_metrics, head.check_inputs)
    # request -> statistics
    uses_ref_model = any(name in request.outputs for name in REFERENCE_STATS)
    stats = token_stats(
        hidden, weight, labels, ref_hidden if uses_ref_model else None, ref_weight if uses_ref_model else None,
        bias=bias, ref_bias=ref_bias, outputs=request.outputs, **head_options,
    )
    # statistics -> per-pair terms
    terms, mask = _pair_terms(stats, labels, config, ignore_index, ref_chosen_logps, ref_rejected_logps,
                              pair_inputs)
    if request.on_samples:
        # the global regulariser: the KL along sequences the policy generated, through the same heads
        sample_stats = token_stats(
            sample_hidden, weight, sample_labels, sample_ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
            outputs=("reverse_kl", "logp") if spo_score_function else ("reverse_kl",), **head_options,
        )
        terms.spo_reverse_kl = spo_sample_terms(
            sample_stats.reverse_kl, sample_stats.logp, completion_mask(sample_labels, ignore_index),
        )
        terms.spo_sample_weights = sample_weights
    if nll_target is not None:
        terms.nll = _nll_on_target(nll_target, labels, config, hidden, weight, bias, ignore_index, head_options)
    # per-pair terms -> loss
    pair_weights = _wpo_weights(stats, mask) if config.use_weighting else None
    loss, per_sequence = _combine(config, terms, margin, pair_weights)
    return _build_output(config, terms, loss, per_sequence, stats if compute_metrics else None, mask)


NLL_LOSS_TYPES = ("cpo", "orpo", "sft")  # the loss types with an NLL term on the chosen rows


def _nll_on_target(nll_target, labels, config, hidden, weight, bias, ignore_index, head_options):
    """The NLL of the chosen rows against ``nll_target``'s chosen half (a second pass of the head)."""
    if not set(config.loss_type) & set(NLL_LOSS_TYPES):
        raise ValueError(f"nll_target: only used by loss types {list(NLL_LOSS_TYPES)}, got {list(config.loss_type)}")
    if not isinstance(nll_target, torch.Tensor) or nll_target.is_floating_point():
        raise TypeError(f"nll_target: expected an integer tensor of shape {tuple(labels.shape)}, got "
                        f"{getattr(nll_target, 'dtype', type(nll_target).__name__)}")
    if nll_target.shape != labels.shape:
        raise ValueError(f"nll_target: expected shape {tuple(labels.shape)} (that of labels), got "
                         f"{tuple(nll_target.shape)}")
    n_chosen = labels.shape[0] // 2
    target = nll_target[:n_chosen]
    stats = token_stats(hidden[:n_chosen], weight, target, bias=bias, outputs=("logp",), **head_options)
    return sft_loss(stats.logp, completion_mask(target, ignore_index))


def _combine(config, terms: PairTerms, margin, pair_weights):
    """``Σ_k loss_weights[k] · mean_pairs(loss_k)`` ([]) and the detached per-pair sum ([B])."""
    dtype, device = terms.chosen_logps.dtype, terms.chosen_logps.device
    pair_margin = 0.0 if margin is None else margin.to(dtype)
    loss = torch.zeros((), dtype=dtype, device=device)
    per_sequence = torch.zeros(terms.chosen_logps.shape[0], dtype=dtype, device=device)
    for name, loss_weight in zip(config.loss_type, config.loss_weights):
        per_pair = LOSSES[name].formula(terms, config, pair_margin)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        loss = loss + per_pair.mean() * loss_weight
        per_sequence = per_sequence + per_pair.detach() * loss_weight
    return loss, per_sequence


@dataclass(frozen=True)
class _Samples:
    """SPO's on-policy samples and their options (all None / False without samples)."""

    hidden: Optional[torch.Tensor]
    ref_hidden: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    score_function: bool

    @property
    def given(self) -> bool:
        return any(t is not None for t in (self.hidden, self.ref_hidden, self.labels))


@dataclass(frozen=True)
class _Request:
    """What one call computes: the token statistics of the pair batch and where the reference comes from."""

    outputs: Tuple[str, ...]
    precomputed_ref: bool
    on_samples: bool     # a loss type's token statistics come from policy samples


def _request(config, labels, ref_hidden, ref_chosen_logps, ref_rejected_logps, margin, pair_inputs,
             samples: _Samples, compute_metrics: bool, check_inputs: bool) -> _Request:
    """Checks the tensors against the loss types and derives the statistics to request."""
    n_pairs = validate_pair_labels(labels)
    specs = [LOSSES[name] for name in dict.fromkeys(config.loss_type)]
    chosen_set = {spec.name for spec in specs}
    for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
                        ("margin", margin), *pair_inputs.items()):
        validate_pair_tensor(name, value, n_pairs, labels.device)
    precomputed_ref = _check_reference(specs, ref_hidden, ref_chosen_logps, ref_rejected_logps, samples)
    _check_samples(chosen_set, samples)
    # a loss type without a pair to offset (SFT) simply ignores the margin in a combination
    without_margin = sorted(spec.name for spec in specs if spec.margin is None)
    if margin is not None and without_margin:
        offset = sorted(types_where(lambda spec: spec.margin == OFFSET))
        raise ValueError(
            f"margin: expected None with loss types outside {offset}, got a tensor with {without_margin}"
        )
    _check_pair_inputs(specs, pair_inputs, check_inputs)

    on_samples = samples.given
    outputs = ["logp"]
    # TRL logs rewards as β·log-ratio whenever a reference is at hand, even for "sft" alone
    if ref_hidden is not None and not precomputed_ref and any(spec.reward != POLICY for spec in specs):
        outputs.append("ref_logp")
    for spec in specs:
        if not (spec.on_policy_samples and on_samples):
            outputs += [name for name in spec.token_stats if name not in outputs]
    if config.use_weighting:
        outputs.append("log_sum_p2")
    if compute_metrics:
        outputs += ["entropy", "mean_logit", "top1_correct"]
    return _Request(tuple(outputs), precomputed_ref, on_samples)


def _check_reference(specs, ref_hidden, ref_chosen_logps, ref_rejected_logps, samples: _Samples) -> bool:
    """Checks that every loss has the reference it needs; returns whether precomputed log-probs are used."""
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "ref_chosen_logps, ref_rejected_logps: expected both tensors or both None, got "
            f"{'a tensor' if ref_chosen_logps is not None else 'None'} and "
            f"{'a tensor' if ref_rejected_logps is not None else 'None'}"
        )
    precomputed = ref_chosen_logps is not None
    needs_logps = sorted(spec.name for spec in specs if spec.reference_logps)
    if needs_logps and ref_hidden is None and not precomputed:
        raise ValueError(
            f"ref_hidden: loss types {needs_logps} need reference log-probs: expected ref_hidden (with ref_weight) "
            "or ref_chosen_logps and ref_rejected_logps, got neither"
        )
    token_level = sorted(spec.name for spec in specs if spec.reference_model and not spec.on_policy_samples)
    if token_level and ref_hidden is None:
        raise ValueError(
            f"ref_hidden: loss types {token_level} need the token-level KL to the reference over the full "
            "vocabulary, which precomputed log-probs cannot give: expected a tensor, got None"
        )
    on_samples = [spec.name for spec in specs if spec.reference_model and spec.on_policy_samples]
    if on_samples and ref_hidden is None and not samples.given:
        raise ValueError(
            f"ref_hidden: {_names(on_samples)} needs the token-level KL(policy || reference) over the full "
            "vocabulary: expected ref_hidden (or sample_hidden, sample_ref_hidden, sample_labels), got None"
        )
    return precomputed


def _names(names) -> str:
    return ", ".join(repr(name) for name in names)


def _check_samples(chosen_set, samples: _Samples) -> None:
    users = sorted(types_where(lambda spec: spec.on_policy_samples))
    sample_args = (samples.hidden, samples.ref_hidden, samples.labels)
    if samples.given:
        if not chosen_set & set(users):
            raise ValueError(
                f"sample_hidden: on-policy samples are only used by {_names(users)}, got loss types "
                f"{sorted(chosen_set)}"
            )
        if any(a is None for a in sample_args):
            raise ValueError(
                "sample_hidden, sample_ref_hidden, sample_labels: expected all three tensors for SPO's on-policy "
                f"samples, got {['tensor' if a is not None else 'None' for a in sample_args]}"
            )
        if not isinstance(samples.labels, torch.Tensor):
            raise TypeError(f"sample_labels: expected a torch.Tensor, got {type(samples.labels).__name__}")
        if samples.labels.dim() != 2:
            raise ValueError(f"sample_labels: expected shape [S, T'] (one row per sample), got "
                             f"{tuple(samples.labels.shape)}")
    check_bool("spo_score_function", samples.score_function)
    if samples.score_function and samples.labels is None:
        raise ValueError(
            "spo_score_function: the score-function term needs sequences sampled from the policy: expected "
            "sample_hidden, sample_ref_hidden and sample_labels, got None"
        )
    if samples.weights is not None:
        if samples.labels is None:
            raise ValueError("sample_weights: expected None without sample_labels, got a tensor")
        validate_pair_tensor("sample_weights", samples.weights, samples.labels.shape[0], samples.labels.device)


def _check_pair_inputs(specs, pair_inputs, check_inputs: bool) -> None:
    """Per-pair inputs: each loss type's required ones present, none given that no chosen type reads."""
    chosen_set = sorted(spec.name for spec in specs)
    for spec in specs:
        missing = [name for name in spec.requires if pair_inputs[name] is None]
        if missing:
            got = ["tensor" if pair_inputs[name] is not None else "None" for name in spec.requires]
            raise ValueError(f"{', '.join(spec.requires)}: {spec.name!r} expects {spec.inputs_help}, got "
                             f"{got if len(got) > 1 else got[0]}")
    for name, value in pair_inputs.items():
        if value is None:
            continue
        users = users_of(name)
        if not set(users) & set(chosen_set):
            raise ValueError(f"{name}: {PAIR_INPUTS[name].what} only used by {_names(users)}, got loss types "
                             f"{chosen_set}")
        if PAIR_INPUTS[name].probability and check_inputs and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(
                f"{name}: expected values in [0, 1], got min {value.min().item()} max {value.max().item()}"
            )


def _pair_terms(stats, labels, config, ignore_index, ref_chosen_logps, ref_rejected_logps,
                pair_inputs) -> Tuple[PairTerms, torch.Tensor]:
    """Per-token statistics -> the per-sequence terms of every loss formula, and the completion mask."""
    mask = completion_mask(labels, ignore_index)
    dtype = stats.logp.dtype
    token_weights = ld_token_weights(mask, config.ld_alpha, dtype)
    logps = (stats.logp * token_weights).sum(dim=1)
    avg_logps = sequence_mean(stats.logp, mask)
    lengths = mask.sum(dim=1).to(dtype)
    chosen_mask, _ = split_pairs(mask)
    chosen_token_logps, _ = split_pairs(stats.logp)
    nll = sft_loss(chosen_token_logps, chosen_mask)

    # average_log_prob (Liger's): every sequence log-prob, policy and reference (computed or
    # precomputed sums), becomes a per-token mean; the formulas that divide by the length
    # themselves (ipo, sigmoid_norm) then see lengths of 1, so each mean is taken once.
    per_token = lengths.clamp(min=1) if config.average_log_prob else None
    if per_token is not None:
        logps = logps / per_token
        lengths = torch.ones_like(lengths)
    terms = PairTerms(*split_pairs(logps), *split_pairs(avg_logps), *split_pairs(lengths), nll=nll)
    ref_logps = None
    if ref_chosen_logps is not None:
        ref_logps = torch.cat([ref_chosen_logps.detach(), ref_rejected_logps.detach()]).to(dtype)
    elif stats.ref_logp is not None:
        ref_logps = (stats.ref_logp * token_weights).sum(dim=1)
    if ref_logps is not None:
        if per_token is not None:
            ref_logps = ref_logps / per_token
        terms.ref_chosen_logps, terms.ref_rejected_logps = split_pairs(ref_logps)
    if terms.ref_chosen_logps is not None:
        f_type, alpha = config.f_divergence_type, config.f_alpha_divergence_coef
        terms.chosen_scores = f_divergence_score(terms.chosen_logratios, f_type, alpha)
        terms.rejected_scores = f_divergence_score(terms.rejected_logratios, f_type, alpha)
    if stats.kl is not None:
        terms.chosen_seq_kl, terms.rejected_seq_kl = split_pairs(sequence_sum(stats.kl, mask))
    if stats.reverse_kl is not None:
        terms.spo_reverse_kl = sequence_sum(stats.reverse_kl, mask)
    for name, value in pair_inputs.items():
        setattr(terms, name, None if value is None else value.to(dtype))
    return terms, mask


def _wpo_weights(stats, mask) -> torch.Tensor:
    """[B] WPO pair weights (Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization",
    2024, Eq. 2): the product over the pair of exp(mean over completion tokens of log p - log Σ p²)."""
    with torch.no_grad():
        aligned = (stats.logp.detach() - stats.log_sum_p2) * mask
        weights = torch.exp(aligned.sum(dim=1) / mask.sum(dim=1).clamp(min=1))
        chosen_weights, rejected_weights = split_pairs(weights)
        return chosen_weights * rejected_weights


def _build_output(config, terms: PairTerms, loss, per_sequence, stats, mask) -> PreferenceOutput:
    """Rewards by the first loss type's rule, TRL's metrics, and each chosen type's own metrics."""
    primary = LOSSES[config.loss_type[0]]
    beta = config.beta
    has_ref = terms.ref_chosen_logps is not None
    if primary.mean_logps:
        chosen_logps, rejected_logps = terms.chosen_avg_logps, terms.rejected_avg_logps
    else:
        chosen_logps, rejected_logps = terms.chosen_logps, terms.rejected_logps
    if primary.reward == LOGRATIO_KL:
        chosen_rewards = beta * (terms.chosen_logratios + terms.chosen_seq_kl).detach()
        rejected_rewards = beta * (terms.rejected_logratios + terms.rejected_seq_kl).detach()
    elif has_ref and primary.reward == LOGRATIO:
        chosen_rewards = beta * terms.chosen_logratios.detach()
        rejected_rewards = beta * terms.rejected_logratios.detach()
    else:
        chosen_rewards, rejected_rewards = beta * chosen_logps.detach(), beta * rejected_logps.detach()

    metrics = reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    if stats is not None:
        metrics.update(token_metrics(stats, mask))
    for name in dict.fromkeys(config.loss_type):
        if LOSSES[name].metrics is not None:
            metrics.update(LOSSES[name].metrics(terms))
    return PreferenceOutput(
        loss=loss, metrics=metrics, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        ref_chosen_logps=None if not has_ref else terms.ref_chosen_logps.detach(),
        ref_rejected_logps=None if not has_ref else terms.ref_rejected_logps.detach(),
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, per_sequence_loss=per_sequence,
    )
