"""`kto_loss`: Kahneman-Tversky Optimisation on unpaired examples, with TRL ``KTOTrainer`` semantics."""
from dataclasses import dataclass
from typing import Optional

import torch

from ..token_stats import token_stats
from .checks import check_number
from .keywords import option_keywords
from .options import HeadConfig
from .metrics import masked_mean
from .output import PreferenceOutput
from .sequence import completion_mask, sequence_sum

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOConfig:
    """The loss options of `kto_loss`, checked at construction (see `kto_loss` for their meaning)."""

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {list(KTO_LOSS_TYPES)}, got {self.loss_type!r}")
        check_number("beta", self.beta, low=0.0, low_open=True)
        check_number("desirable_weight", self.desirable_weight, low=0.0)
        check_number("undesirable_weight", self.undesirable_weight, low=0.0)


@option_keywords(config=KTOConfig, head=HeadConfig)
def kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    *,
    desirable: torch.Tensor,
    kl_hidden: Optional[torch.Tensor] = None,
    kl_labels: Optional[torch.Tensor] = None,
    kl_ref_hidden: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    ref_kl_logps: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    config: KTOConfig,
    compute_metrics: bool = True,
    head: HeadConfig,
) -> PreferenceOutput:
    """KTO loss of an LM head on B unpaired completions labelled desirable or undesirable.

    With u = log π_θ(y|x) - log π_ref(y|x) (sums over completion tokens) and the reference point
    ``z = clamp(mean_i [log π_θ(y'_i|x_i) - log π_ref(y'_i|x_i)], min=0)``, detached, estimated on
    mismatched pairs (x_i, y'_i) (TRL pairs each prompt with the next example's completion):

        desirable:   λ_D (1 - σ(β (u - z)))        undesirable:   λ_U (1 - σ(β (z - u)))

    and the loss is the mean over the B examples. ``apo_zero_unpaired`` drops z and uses
    ``1 - σ(β u)`` / ``σ(β u)``. Source: Ethayarajh et al., "KTO: Model Alignment as Prospect
    Theoretic Optimization" (2024), Eq. 7; D'Oosterlinck et al. (2024) for APO.

    Args:
        hidden: [B, T, H] policy hidden states. weight: [V, H]. labels: [B, T] (``ignore_index``
            outside completions).
        ref_hidden: [B, T, H'] reference hidden states, or None with ``ref_logps``.
        ref_weight: [V, H'] reference head; None shares the policy head.
        desirable: [B] bool, True for desirable completions.
        kl_hidden, kl_labels: [B, T', H], [B, T']: the mismatched sequences of the reference point
            (``"kto"`` only).
        kl_ref_hidden: [B, T', H'] their reference hidden states, or None with ``ref_kl_logps``.
        bias, ref_bias: [V] head biases or None.
        ref_logps, ref_kl_logps: [B] precomputed reference log-probs of the completions and of the
            mismatched sequences.
        kl: a precomputed reference point z ([] or [B], detached, used as given: Liger's ``kl``),
            in place of the mismatched sequences (``"kto"`` only).
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        beta: β. desirable_weight, undesirable_weight: λ_D, λ_U.
        ignore_index, temperature, softcap, logit_scale, ref_softcap, ref_logit_scale: head options.
        compute_metrics: also compute ``entropy`` and ``logits/*``.
        impl: `token_stats` implementation. check_inputs: check label ranges (host sync).
        check_finite, process_group, grad_filter_eps: as in `token_stats` (``process_group``: each
            process holds its slice of the rows of both heads).
        config, head: a ready `KTOConfig` (the loss options) and `HeadConfig` (the head options), or
            None; keywords given beside one replace its fields (`keywords.option_keywords`).

    Returns:
        PreferenceOutput with ``loss`` [] and TRL's KTO metrics: ``kl``, ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the
        desirable / undesirable examples; 0 for an empty side, where TRL skips logging), ``entropy``,
        ``logits/chosen``, ``logits/rejected``. ``chosen_*``/``rejected_*`` fields hold the [B]
        per-example values masked to each side (0 elsewhere), to keep shapes static.
    """
    loss_type, beta = config.loss_type, config.beta
    desirable_weight, undesirable_weight = config.desirable_weight, config.undesirable_weight
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels: expected a tensor of shape [B, T], got {getattr(labels, 'shape', type(labels))}")
    n = labels.shape[0]
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        got = getattr(desirable, "dtype", type(desirable).__name__)
        raise TypeError(f"desirable: expected a bool tensor of shape [{n}], got {got}")
    if tuple(desirable.shape) != (n,):
        raise ValueError(f"desirable: expected shape ({n},), got {tuple(desirable.shape)}")
    if ref_hidden is None and ref_logps is None:
        raise ValueError("ref_hidden: expected reference hidden states or precomputed ref_logps, got neither")
    uses_kl = loss_type == "kto"
    if kl is not None:
        _check_precomputed_kl(kl, n, loss_type, kl_hidden, kl_labels, kl_ref_hidden, ref_kl_logps)
    elif uses_kl and (kl_hidden is None or kl_labels is None):
        raise ValueError("kl_hidden, kl_labels: 'kto' estimates its reference point on mismatched sequences: "
                         "expected both tensors, got None")
    if uses_kl and kl is None and kl_ref_hidden is None and ref_kl_logps is None:
        raise ValueError("kl_ref_hidden: expected reference hidden states of the mismatched sequences or "
                         "precomputed ref_kl_logps, got neither")
    for name, value in (("ref_logps", ref_logps), ("ref_kl_logps", ref_kl_logps)):
        if value is not None and tuple(value.shape) != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(value.shape)}")

    head_options = dict(bias=bias, ref_bias=ref_bias, **head.token_stats_kwargs())
    use_ref_model = ref_logps is None
    outputs = ["logp"] + (["ref_logp"] if use_ref_model else [])
    if compute_metrics:
        outputs += ["entropy", "mean_logit"]
    stats = token_stats(hidden, weight, labels, ref_hidden if use_ref_model else None,
                        ref_weight if use_ref_model else None, outputs=tuple(outputs), **head_options)
    mask = completion_mask(labels, head.ignore_index)
    logps = sequence_sum(stats.logp, mask)
    dtype = logps.dtype
    ref = sequence_sum(stats.ref_logp, mask) if use_ref_model else ref_logps.detach().to(dtype)
    logratios = logps - ref

    if uses_kl:
        if kl is None:
            kl = _reference_point(kl_hidden, weight, kl_labels, kl_ref_hidden, ref_weight, ref_kl_logps,
                                  head_options, dtype)
        else:
            kl = kl.detach().to(dtype)
        chosen_losses = 1 - torch.sigmoid(beta * (logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        kl = torch.zeros((), dtype=dtype, device=logps.device)
        chosen_losses = 1 - torch.sigmoid(beta * logratios)
        rejected_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * chosen_losses, undesirable_weight * rejected_losses)
    loss = losses.mean()

    is_chosen = desirable.to(dtype)
    is_rejected = 1 - is_chosen
    rewards = beta * logratios.detach()
    n_chosen, n_rejected = is_chosen.sum().clamp(min=1), is_rejected.sum().clamp(min=1)
    metrics = {
        "kl": kl.detach().mean(),
        "rewards/chosen": (rewards * is_chosen).sum() / n_chosen,
        "rewards/rejected": (rewards * is_rejected).sum() / n_rejected,
        "logps/chosen": (logps.detach() * is_chosen).sum() / n_chosen,
        "logps/rejected": (logps.detach() * is_rejected).sum() / n_rejected,
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if compute_metrics:
        mean_logit = stats.mean_logit.detach()
        metrics["entropy"] = masked_mean(stats.entropy.detach(), mask)
        metrics["logits/chosen"] = masked_mean(mean_logit, mask & desirable.unsqueeze(1))
        metrics["logits/rejected"] = masked_mean(mean_logit, mask & ~desirable.unsqueeze(1))
    return PreferenceOutput(
        loss=loss, metrics=metrics, chosen_logps=logps * is_chosen, rejected_logps=logps * is_rejected,
        ref_chosen_logps=ref.detach() * is_chosen, ref_rejected_logps=ref.detach() * is_rejected,
        chosen_rewards=rewards * is_chosen, rejected_rewards=rewards * is_rejected, per_sequence_loss=losses.detach(),
    )


def _check_precomputed_kl(kl, n, loss_type, *sources) -> None:
    if loss_type != "kto":
        raise ValueError(f"kl: the reference point is used by loss_type 'kto' only, got {loss_type!r}")
    if not isinstance(kl, torch.Tensor) or not kl.is_floating_point():
        raise TypeError(f"kl: expected a floating-point tensor of shape [] or [{n}], got "
                        f"{getattr(kl, 'dtype', type(kl).__name__)}")
    if tuple(kl.shape) not in ((), (n,)):
        raise ValueError(f"kl: expected shape () or ({n},), got {tuple(kl.shape)}")
    if any(t is not None for t in sources):
        raise ValueError("kl_hidden, kl_labels, kl_ref_hidden, ref_kl_logps: expected None with a precomputed "
                         "kl, got a tensor")


def _reference_point(kl_hidden, weight, kl_labels, kl_ref_hidden, ref_weight, ref_kl_logps, head, dtype):
    """KTO's z: clamp(mean over the mismatched sequences of their policy/reference log-ratio, min=0), detached."""
    with torch.no_grad():
        use_ref_model = ref_kl_logps is None
        stats = token_stats(
            kl_hidden.detach(), weight.detach(), kl_labels, kl_ref_hidden if use_ref_model else None,
            ref_weight if use_ref_model else None,
            outputs=("logp", "ref_logp") if use_ref_model else ("logp",), **head,
        )
        mask = completion_mask(kl_labels, head["ignore_index"])
        policy = sequence_sum(stats.logp, mask).to(dtype)
        reference = sequence_sum(stats.ref_logp, mask).to(dtype) if use_ref_model else ref_kl_logps.to(dtype)
        return (policy - reference).mean().clamp(min=0)
