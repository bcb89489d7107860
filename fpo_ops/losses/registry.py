"""The loss registry of `preference_loss`: one entry per loss type holds everything known about it.

An entry (`LossSpec`) gives the formula on the per-sequence terms (`heads.PairTerms`), what the
formula reads (reference log-probs, token-level reference distributions, extra token statistics,
per-pair inputs, on-policy samples), how rewards are logged, whether a margin or an f-divergence
applies, whether WPO weighting is allowed, its own hyper-parameters with defaults and checks, and
its extra metrics. Everything else is derived from the entries: the list of loss types, the checks
of `config.LossConfig`, the statistics requested from `token_stats`, the keywords of `preference_loss`,
the fields of the TRL trainer config. A new loss type is one formula (in the module of its family) and one
entry here.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .checks import check_bool, check_number, number, one_of
from .fdivergence import F_DIVERGENCE_TYPES
from .heads import PairTerms
from .metrics import optional_mean
from .pairwise import (
    discopop_loss, exo_pair_loss, hinge_loss, ipo_loss, robust_loss, sigmoid_loss, sigmoid_norm_loss,
)
from .per_response import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from .ranked import aot_loss, aot_unpaired_loss
from .reference_free import cpo_loss, orpo_log_odds, orpo_loss, simpo_loss
from .sppo import sppo_loss, sppo_single_loss
from .token_level import spo_preference_loss, spo_regularizer, tdpo_loss

Margin = Union[torch.Tensor, float]


@dataclass(frozen=True)
class HyperParameter:
    """A scalar option of the loss: one field of `config.LossConfig` and, unless TRL's
    ``DPOConfig`` already declares it (``trl``), of the trainer config."""

    name: str
    type: Any                              # annotation of the dataclass fields
    default: Any
    help: str                              # the trainer config's help text
    check: Callable[[str, Any], None]      # raises TypeError/ValueError naming the argument
    trl: bool = False


@dataclass(frozen=True)
class PairInput:
    """A per-pair [B] tensor argument of `preference_loss` (same name as its `PairTerms` field)."""

    what: str             # what it is, for error messages
    probability: bool     # values must lie in [0, 1] (checked with ``check_inputs``)


# Reward rules: β·(log-ratio), β·(log-ratio + sequence KL) (TDPO's official code), or β·(policy
# log-prob) even when a reference is at hand (the CPO/ORPO trainers). Without a reference every
# rule falls back to the policy log-prob.
LOGRATIO, LOGRATIO_KL, POLICY = "logratio", "logratio_kl", "policy"
# Margin support: subtracted inside the scaled difference, silently ignored (a term without a
# pair, e.g. SFT in a combination), or an error (None).
OFFSET, IGNORED = "offset", "ignored"


@dataclass(frozen=True)
class LossSpec:
    """One loss type of `preference_loss`."""

    name: str
    formula: Callable[[PairTerms, Any, Margin], torch.Tensor]   # (terms, LossConfig, margin) -> [B]
    trl: bool = False                    # a TRL DPOTrainer loss type (TRL's semantics)
    reference_logps: bool = False        # reads log π_ref(y): ref_hidden or precomputed log-probs
    reference_model: bool = False        # reads π_ref over the whole vocabulary: ref_hidden only
    token_stats: Tuple[str, ...] = ()    # token statistics beyond logp (summed per sequence)
    on_policy_samples: bool = False      # token_stats may come from policy samples instead of the pair
    reward: str = LOGRATIO
    mean_logps: bool = False             # the policy log-probs it reports are per-token means
    margin: Optional[str] = None
    f_divergence: bool = False           # TRL: the f-DPO reparameterisation applies
    weighting: bool = True               # TRL: WPO weighting allowed (sorting would misalign it)
    hyper_parameters: Tuple[HyperParameter, ...] = ()   # its own options (shared ones: COMMON)
    requires: Tuple[str, ...] = ()       # per-pair inputs it needs (names of PAIR_INPUTS)
    accepts: Tuple[str, ...] = ()        # per-pair inputs it may take
    inputs_help: str = ""                # what ``requires`` are, for the error when one is missing
    check: Optional[Callable[[Any], None]] = None       # extra checks of the LossConfig for it
    metrics: Optional[Callable[[PairTerms], Dict[str, torch.Tensor]]] = None


# Options every loss type shares (TRL's names and meanings).
COMMON = (
    HyperParameter("beta", float, 0.1, "β: the KL strength (IPO's τ, ORPO's λ, SPO's KL weight, SPPO's 1/η).",
                   number(low=0.0, low_open=True), trl=True),
    HyperParameter("label_smoothing", float, 0.0, "Label smoothing ε of robust, exo_pair, aot, simpo, cpo.",
                   number(low=0.0, high=1.0, high_open=True), trl=True),
    HyperParameter("f_divergence_type", str, "reverse_kl", "f-DPO divergence.", one_of(F_DIVERGENCE_TYPES),
                   trl=True),
    HyperParameter("f_alpha_divergence_coef", float, 0.5, "α of alpha_divergence.", number(low=0.0, high=1.0),
                   trl=True),
    HyperParameter("ld_alpha", Optional[float], None, "LD-DPO weight of the longer response's tail.",
                   number(low=0.0, high=1.0, optional=True), trl=True),
    HyperParameter("use_weighting", bool, False, "WPO weighting.", check_bool, trl=True),
    HyperParameter("average_log_prob", bool, False,
                   "Divide the policy and reference sequence log-probs by the completion length before the "
                   "loss (Liger's average_log_prob); losses that normalise by length themselves do it once.",
                   check_bool),
)

PAIR_INPUTS = {
    "chosen_win_prob": PairInput("win probabilities are", probability=True),
    "rejected_win_prob": PairInput("win probabilities are", probability=True),
    "pair_win_prob": PairInput("win probabilities are", probability=True),
    "spo_weight": PairInput("the pair weight μ is", probability=False),
}


def _scores_delta(t: PairTerms) -> torch.Tensor:
    return t.chosen_scores - t.rejected_scores


def _tdpo(alpha_of: Callable[[Any], float], stop_chosen_kl_grad: bool):
    def formula(t: PairTerms, cfg, margin: Margin) -> torch.Tensor:
        return tdpo_loss(t.chosen_logratios, t.rejected_logratios, t.chosen_seq_kl, t.rejected_seq_kl, cfg.beta,
                         alpha=alpha_of(cfg), stop_chosen_kl_grad=stop_chosen_kl_grad, margin=margin)
    return formula


def _spo(t: PairTerms, cfg, margin: Margin) -> torch.Tensor:
    preference = spo_preference_loss(t.chosen_logps, t.rejected_logps, cfg.spo_alpha, margin, t.spo_weight)
    return preference + cfg.beta * spo_regularizer(t.spo_reverse_kl, t.spo_sample_weights)


def _check_robust(cfg) -> None:
    check_number("label_smoothing (robust)", cfg.label_smoothing, low=0.0, high=0.5, high_open=True)


def _check_exo_pair(cfg) -> None:
    if cfg.label_smoothing <= 0.0:
        raise ValueError(
            "label_smoothing: expected a value in (0, 1) for 'exo_pair' (the EXO paper uses 1e-3), "
            f"got {cfg.label_smoothing}"
        )


def _kl_metrics(t: PairTerms) -> Dict[str, torch.Tensor]:
    return {"kl/chosen": optional_mean(t.chosen_seq_kl), "kl/rejected": optional_mean(t.rejected_seq_kl)}


def _spo_metrics(t: PairTerms) -> Dict[str, torch.Tensor]:
    return {"reverse_kl": spo_regularizer(t.spo_reverse_kl.detach(), t.spo_sample_weights)}


def _nll_metrics(t: PairTerms) -> Dict[str, torch.Tensor]:
    return {"nll_loss": t.nll.detach()}


def _orpo_metrics(t: PairTerms) -> Dict[str, torch.Tensor]:
    log_odds = orpo_log_odds(t.chosen_avg_logps, t.rejected_avg_logps).detach()
    return {**_nll_metrics(t), "log_odds_ratio": F.logsigmoid(log_odds).mean(), "log_odds_chosen": log_odds.mean()}


_DPO = dict(trl=True, reference_logps=True)          # a TRL loss on log-ratios to the reference
_F_DPO = dict(_DPO, margin=OFFSET, f_divergence=True)  # ... on f-DPO scores, with a margin
_TDPO_ALPHA = HyperParameter("tdpo_alpha", float, 0.5, "α of TDPO2 (weight of the rejected token-level KL).",
                             number(low=0.0))

_ENTRIES = (
    # TRL DPOTrainer's loss types, in TRL's order (formulas in pairwise, per_response, ranked).
    LossSpec("sigmoid", lambda t, cfg, m: sigmoid_loss(_scores_delta(t), cfg.beta, m), **_F_DPO),
    LossSpec("hinge", lambda t, cfg, m: hinge_loss(_scores_delta(t), cfg.beta, m), **_F_DPO),
    LossSpec("ipo", lambda t, cfg, m: ipo_loss(t.chosen_scores, t.rejected_scores, t.chosen_lengths,
                                               t.rejected_lengths, cfg.beta, m), **_F_DPO),
    LossSpec("exo_pair", lambda t, cfg, m: exo_pair_loss(_scores_delta(t), cfg.beta, cfg.label_smoothing, m),
             check=_check_exo_pair, **_F_DPO),
    LossSpec("nca_pair", lambda t, cfg, m: nca_pair_loss(t.chosen_logratios, t.rejected_logratios, cfg.beta),
             **_DPO),
    LossSpec("robust", lambda t, cfg, m: robust_loss(_scores_delta(t), cfg.beta, cfg.label_smoothing, m),
             check=_check_robust, **_F_DPO),
    LossSpec("bco_pair", lambda t, cfg, m: bco_pair_loss(t.chosen_logratios, t.rejected_logratios, cfg.beta),
             **_DPO),
    LossSpec("sppo_hard", lambda t, cfg, m: sppo_hard_loss(t.chosen_logratios, t.rejected_logratios, cfg.beta),
             **_DPO),
    LossSpec("aot", lambda t, cfg, m: aot_loss(t.chosen_logps, t.rejected_logps, t.ref_chosen_logps,
                                               t.ref_rejected_logps, cfg.beta, cfg.label_smoothing),
             weighting=False, **_DPO),
    LossSpec("aot_unpaired", lambda t, cfg, m: aot_unpaired_loss(t.chosen_logratios, t.rejected_logratios,
                                                                 cfg.beta, cfg.label_smoothing),
             weighting=False, **_DPO),
    LossSpec("apo_zero", lambda t, cfg, m: apo_zero_loss(t.chosen_logratios, t.rejected_logratios, cfg.beta),
             **_DPO),
    LossSpec("apo_down", lambda t, cfg, m: apo_down_loss(t.chosen_logratios, t.rejected_logratios, cfg.beta),
             **_DPO),
    LossSpec("discopop", lambda t, cfg, m: discopop_loss(_scores_delta(t), cfg.beta, cfg.discopop_tau, m),
             hyper_parameters=(HyperParameter("discopop_tau", float, 0.05, "τ of discopop.",
                                              number(low=0.0, low_open=True), trl=True),), **_F_DPO),
    # a batch-level token mean, spread over the pairs so that its mean is the scalar
    LossSpec("sft", lambda t, cfg, m: t.nll.expand(t.chosen_logps.shape[0]), trl=True, margin=IGNORED,
             f_divergence=True, metrics=_nll_metrics),
    LossSpec("sigmoid_norm", lambda t, cfg, m: sigmoid_norm_loss(t.chosen_scores, t.rejected_scores,
                                                                 t.chosen_lengths, t.rejected_lengths, cfg.beta, m),
             **_F_DPO),
    # Token-level KL over the vocabulary (token_level.py).
    LossSpec("tdpo1", _tdpo(lambda cfg: 1.0, stop_chosen_kl_grad=False), reference_logps=True,
             reference_model=True, token_stats=("kl",), reward=LOGRATIO_KL, margin=OFFSET, metrics=_kl_metrics),
    LossSpec("tdpo2", _tdpo(lambda cfg: cfg.tdpo_alpha, stop_chosen_kl_grad=True), reference_logps=True,
             reference_model=True, token_stats=("kl",), reward=LOGRATIO_KL, margin=OFFSET,
             hyper_parameters=(_TDPO_ALPHA,), metrics=_kl_metrics),
    LossSpec("spo", _spo, reference_model=True, token_stats=("reverse_kl",), on_policy_samples=True, margin=OFFSET,
             accepts=("spo_weight",), metrics=_spo_metrics,
             hyper_parameters=(HyperParameter("spo_alpha", float, 1.0, "Softmax exponent α of SPO's preference term.",
                                              number(low=0.0, low_open=True)),)),
    # Soft win rates (sppo.py).
    LossSpec("sppo", lambda t, cfg, m: sppo_loss(t.chosen_logratios, t.rejected_logratios, t.chosen_win_prob,
                                                 t.rejected_win_prob, cfg.beta),
             reference_logps=True, requires=("chosen_win_prob", "rejected_win_prob"),
             inputs_help="both win-probability tensors"),
    LossSpec("sppo_single", lambda t, cfg, m: sppo_single_loss(t.chosen_logratios, t.rejected_logratios,
                                                               t.pair_win_prob, cfg.beta),
             reference_logps=True, requires=("pair_win_prob",), inputs_help="P(chosen beats rejected) per pair"),
    # Reference-free (reference_free.py).
    LossSpec("simpo", lambda t, cfg, m: simpo_loss(t.chosen_avg_logps, t.rejected_avg_logps, cfg.beta,
                                                   cfg.simpo_gamma, cfg.label_smoothing, m),
             reward=POLICY, mean_logps=True, margin=OFFSET,
             hyper_parameters=(HyperParameter("simpo_gamma", float, 0.5, "Target reward margin γ of SimPO.",
                                              number()),)),
    LossSpec("cpo", lambda t, cfg, m: cpo_loss(t.chosen_logps, t.rejected_logps, t.nll, cfg.beta, cfg.cpo_alpha,
                                               cfg.label_smoothing, m),
             reward=POLICY, margin=OFFSET, metrics=_nll_metrics,
             hyper_parameters=(HyperParameter("cpo_alpha", float, 1.0, "Weight of the NLL term of CPO.",
                                              number(low=0.0)),)),
    LossSpec("orpo", lambda t, cfg, m: orpo_loss(t.chosen_avg_logps, t.rejected_avg_logps, t.nll, cfg.beta),
             reward=POLICY, mean_logps=True, metrics=_orpo_metrics),
)

LOSSES: Dict[str, LossSpec] = {spec.name: spec for spec in _ENTRIES}
LOSS_TYPES = tuple(LOSSES)
TRL_DPO_LOSS_TYPES = tuple(name for name, spec in LOSSES.items() if spec.trl)
EXTRA_LOSS_TYPES = tuple(name for name, spec in LOSSES.items() if not spec.trl)


def _unique(params) -> Tuple[HyperParameter, ...]:
    by_name: Dict[str, HyperParameter] = {}
    for p in params:
        by_name.setdefault(p.name, p)
    return tuple(by_name.values())


# Every hyper-parameter, the shared ones first, then each loss type's own in registry order.
HYPER_PARAMETERS = _unique(COMMON + tuple(p for spec in _ENTRIES for p in spec.hyper_parameters))
# Those TRL's DPOConfig does not declare: the fields a TRL trainer config adds.
EXTRA_HYPER_PARAMETERS = tuple(p for p in HYPER_PARAMETERS if not p.trl)


def types_where(predicate: Callable[[LossSpec], bool]) -> frozenset:
    """The loss type names whose entry satisfies ``predicate``."""
    return frozenset(name for name, spec in LOSSES.items() if predicate(spec))


def needs_reference(loss_types) -> bool:
    """Whether any of ``loss_types`` reads the reference model (log-probs or distributions)."""
    return any(LOSSES[name].reference_logps or LOSSES[name].reference_model for name in loss_types)


def token_level_types(loss_types) -> list:
    """The sorted names among ``loss_types`` that need the reference's token distributions at every step."""
    return sorted(name for name in set(loss_types) if LOSSES[name].reference_model)


def users_of(pair_input: str) -> Tuple[str, ...]:
    """The loss types that read the per-pair input ``pair_input`` (required or optional)."""
    return tuple(name for name, spec in LOSSES.items() if pair_input in spec.requires + spec.accepts)
