"""`linear_cross_entropy`: ``F.cross_entropy(hidden @ weight.T + bias, labels)`` without the logits.

The options are those users of Cut-Cross-Entropy (``shift``, ``softcap``, ``return_lse``,
``filter_eps`` as ``grad_filter_eps``) and Liger-Kernel (``label_smoothing``, ``lse_square_scale`` as
``z_loss``, ``reduction``) pass. Per token, every term is a statistic of one `token_stats` pass:

    nll         = -logp
    smoothing   = lse - mean_v z_v = KL(u || p) + log V      (u the uniform distribution)
    z-loss      = lse^2                                       (the differentiable `lse` statistic)

Label smoothing is the cross-entropy against ``(1 - eps) onehot(y) + eps u``, i.e.
``(1 - eps) nll + eps (KL(u || p) + log V)``: the ``kl`` statistic against a reference whose logits
are all 0 (a one-column zero head) gives it with its exact gradient ``p - 1/V`` through every
softcap, scale and temperature, in every implementation and over a vocabulary split.
"""
import inspect
import math
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

from ..token_stats import token_stats
from .checks import check_bool, check_number

REDUCTIONS = ("mean", "sum", "none")


def _validate_options(reduction, label_smoothing, z_loss, shift, return_lse) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {list(REDUCTIONS)}, got {reduction!r}")
    check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    check_number("z_loss", z_loss, 0.0)
    check_bool("shift", shift)
    check_bool("return_lse", return_lse)


def _validate(hidden, labels, reduction, label_smoothing, z_loss, shift, return_lse) -> None:
    _validate_options(reduction, label_smoothing, z_loss, shift, return_lse)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if shift:
        if labels.dim() < 1 or labels.shape[-1] < 2:
            raise ValueError(f"shift: expected labels with at least 2 positions in the last dimension, "
                             f"got shape {tuple(labels.shape)}")
        if hidden.dim() < 2:
            raise ValueError(f"shift: expected hidden of shape [..., T, H], got shape {tuple(hidden.shape)}")


def _vocab_size(weight: torch.Tensor, process_group) -> Union[int, torch.Tensor]:
    """The whole vocabulary's size: the rows of ``weight``, summed over the group's slices."""
    if process_group is None:
        return weight.shape[0]
    from ..distributed.vocab_parallel import slice_bounds

    sizes, _ = slice_bounds(weight.shape[0], process_group, weight.device)
    return sizes.sum()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    shift: bool = False,
    return_lse: bool = False,
    impl: str = "auto",
    process_group=None,
    check_labels: bool = True,
    grad_filter_eps: float = 0.0,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Cross-entropy of the logits ``cap(logit_scale * (hidden @ weight.T + bias)) / temperature``
    against ``labels``, as ``torch.nn.functional.cross_entropy`` computes it, without materialising them.

    Args:
        hidden: [..., H] hidden states (``[..., T, H]`` with ``shift``).
        weight: [V, H] LM-head weight (with ``process_group``: this process's contiguous slice of rows).
        labels: [...] token ids, ``ignore_index`` where no loss is wanted; ``labels[i]`` is predicted
            at ``hidden[i]``, or with ``shift=True`` ``labels[..., t + 1]`` at ``hidden[..., t, :]``.
        bias: [V] head bias or None.
        ignore_index: label value of positions without a loss.
        reduction: ``"mean"`` (over the positions not ignored; NaN when every position is ignored, as
            ``F.cross_entropy`` gives), ``"sum"`` or ``"none"`` (per position, 0 where ignored).
        label_smoothing: eps in [0, 1]: the target is ``(1 - eps) onehot(y) + eps / V``, as in
            ``F.cross_entropy``: per token ``(1 - eps) nll + eps (lse - mean_v z_v)``.
        z_loss: coefficient (>= 0) of ``lse**2`` added per token (Liger's ``lse_square_scale``,
            PaLM's z-loss), reduced like the rest.
        softcap: ``softcap * tanh(x / softcap)`` applied to the scaled logits (Gemma-2), or None.
        logit_scale: multiplies the logits before the cap (Cohere).
        temperature: divides the (scaled, capped) logits.
        shift: predict ``labels[..., 1:]`` from ``hidden[..., :-1, :]`` (Cut-Cross-Entropy's ``shift``);
            needs at least 2 positions.
        return_lse: also return the per-token log-sum-exp of the logits.
        impl: `token_stats` implementation: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.
        process_group: a ``torch.distributed`` group over which the vocabulary is split (see `token_stats`).
        check_labels: check that labels lie in [0, V) (one host sync).
        grad_filter_eps: `token_stats`' gradient filter (``impl="triton"``; Cut-Cross-Entropy's ``filter_eps``).

    Returns:
        The loss: [] for ``"mean"``/``"sum"``, else shaped like ``labels`` (``labels[..., 1:]`` with
        ``shift``), float32 (float64 for float64 inputs). With ``return_lse``: ``(loss, lse)``, lse
        shaped like the unreduced loss, 0 where ignored, carrying a gradient.
        Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    _validate(hidden, labels, reduction, label_smoothing, z_loss, shift, return_lse)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    smoothing = float(label_smoothing) > 0.0
    outputs = ("logp",) + (("kl",) if smoothing else ()) + (("lse",) if z_loss > 0 or return_lse else ())
    uniform = {}
    if smoothing:
        # A reference head of one zero column: its logits are 0 everywhere, q = 1/V.
        uniform = dict(ref_hidden=hidden.new_zeros(hidden.shape[:-1] + (1,)),
                       ref_weight=weight.new_zeros(weight.shape[0], 1).to(hidden.dtype))
    stats = token_stats(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, logit_scale=logit_scale, outputs=outputs, impl=impl,
        check_labels=check_labels, process_group=process_group, grad_filter_eps=grad_filter_eps, **uniform,
    )
    valid = labels != ignore_index
    per_token = -stats.logp
    if smoothing:
        eps = float(label_smoothing)
        vocab = _vocab_size(weight, process_group)
        log_vocab = math.log(vocab) if isinstance(vocab, int) else torch.log(vocab.to(per_token.dtype))
        smooth = torch.where(valid, stats.kl + log_vocab, torch.zeros_like(stats.kl))
        per_token = (1.0 - eps) * per_token + eps * smooth
    lse = stats.lse
    if z_loss > 0:
        per_token = per_token + float(z_loss) * lse * lse
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        # 0 / 0 = NaN with every position ignored, as F.cross_entropy; the gradient stays 0.
        loss = per_token.sum() / valid.sum().to(per_token.dtype)
    return (loss, lse) if return_lse else loss


class LinearCrossEntropy(nn.Module):
    """`linear_cross_entropy` as a module: options fixed and checked at construction.

    ``forward(hidden, weight, labels, **overrides)`` takes the function's positional arguments (hidden
    first, as Cut-Cross-Entropy's ``LinearCrossEntropy``; Liger's module takes the weight first) and,
    per call, ``bias`` or an option to override.

    Args:
        options: keyword options of `linear_cross_entropy` (``ignore_index``, ``reduction``,
            ``label_smoothing``, ``z_loss``, ``softcap``, ``shift``, ``return_lse``, ``impl``, ...).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        parameters = inspect.signature(linear_cross_entropy).parameters
        unknown = [name for name in options if name not in parameters
                   or parameters[name].kind is not inspect.Parameter.KEYWORD_ONLY or name == "bias"]
        if unknown:
            raise TypeError(f"LinearCrossEntropy: expected keyword options of linear_cross_entropy, "
                            f"got unknown {unknown}")
        defaults = {name: p.default for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        merged = {**defaults, **options}
        _validate_options(merged["reduction"], merged["label_smoothing"], merged["z_loss"], merged["shift"],
                          merged["return_lse"])
        self.options = dict(options)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **overrides: Any):
        return linear_cross_entropy(hidden, weight, labels, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
