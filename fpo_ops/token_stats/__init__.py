"""`token_stats`: the public op. Validates, resolves autocast, flattens and dispatches on `impl`.

The package holds the whole op (docs/DESIGN.md section 3): this entry; `stats` (the table of
statistics); `options` and `validation`; `online` (the max-shifted partial sums); `function` and
`function_io` (the one autograd Function), `backend` (the protocol its backends follow),
`custom_op` (the same passes as torch.library ops); the backends `chunked` (streaming PyTorch)
and `triton_stats` with the device code in `kernels/`; and `reference`, the float64 oracle.
"""
import contextlib
import functools
from typing import Callable, Dict, Optional, Sequence

import torch

from ..distributed.tensor_parallel import has_dtensor
from .custom_op import op_token_stats
from .function import function_token_stats
from .options import HeadOptions
from .stats import STAT_NAMES, TokenStats
from .validation import (
    int64_labels, normalize_outputs, validate_grad_filter_eps, validate_process_group, validate_token_stats_args,
)

__all__ = ["STAT_NAMES", "TokenStats", "token_stats"]

StatsFn = Callable[..., Dict[str, torch.Tensor]]


def _triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_impl_name(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if _triton_available(device) else "torch"
    return impl


def _resolve_impl(impl: str, device: torch.device) -> StatsFn:
    """The function computing flattened inputs on one process: the oracle, or the one autograd
    Function over the backend ``impl`` names."""
    impl = _resolve_impl_name(impl, device)
    if impl == "reference":
        from .reference import reference_token_stats  # the oracle is only loaded on request
        return reference_token_stats
    return functools.partial(function_token_stats, impl=impl)


def _autocast_dtype(hidden) -> Optional[torch.dtype]:
    """The autocast dtype active on ``hidden``'s device, or None (no autocast, or not a tensor)."""
    if not isinstance(hidden, torch.Tensor):
        return None
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(t, dtype: torch.dtype):
    """``t`` in the autocast dtype when it is a floating-point tensor (else unchanged for validation)."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    ref_softcap: Optional[float] = None,
    ref_logit_scale: float = 1.0,
    outputs: Sequence[str] = ("logp",),
    jsd_beta: float = 0.5,
    impl: str = "auto",
    check_labels: bool = True,
    check_finite: bool = False,
    process_group=None,
    grad_filter_eps: float = 0.0,
) -> TokenStats:
    """Per-token statistics of the policy (and reference) LM head without materialising logits.

    Logits of each model are ``cap(logit_scale * (hidden @ weight^T + bias)) / temperature``, with
    ``cap(x) = softcap * tanh(x / softcap)`` when a softcap is given. Let p be the policy's and q
    the reference's next-token distribution and y the label.

    Args:
        hidden: [..., H] policy hidden states (already aligned with ``labels``).
        weight: [V, H] policy LM-head weight.
        labels: [...] token ids of any integer dtype (compared as int64), ``labels[i]`` being
            predicted at ``hidden[i]``; positions equal to ``ignore_index`` are skipped and get
            statistic 0 and gradient 0, whatever their hidden states (NaN included).
        ref_hidden: [..., H'] reference hidden states (H' may differ from H), or None.
        ref_weight: [V, H'] reference LM-head weight; None with ``ref_hidden`` shares the policy's
            head (weight and, unless ``ref_bias`` is given, bias). The reference gets no gradient.
        bias, ref_bias: [V] head biases or None.
        ignore_index: label value of positions to skip.
        temperature: divides both models' logits.
        softcap, ref_softcap: tanh logit cap of each model (Gemma-2's ``final_logit_softcapping``).
        logit_scale, ref_logit_scale: multiply each model's logits before the cap.
            ``temperature``, the caps and the scales must lie in [2^-40, 2^40].
        outputs: names of the statistics to compute: ``logp`` (log p[y]), ``lse`` (log sum_v e^{z_v}
            of the policy logits z after temperature, cap and scale; gradient p), ``ref_logp`` (log q[y]),
            ``kl`` (KL(q||p)), ``reverse_kl`` (KL(p||q)), ``entropy`` (H(p)), ``jsd``
            (beta KL(q||m) + (1-beta) KL(p||m), m = beta q + (1-beta) p), and the gradient-free
            metrics ``log_sum_p2`` (log sum p^2), ``mean_logit`` and ``top1_correct`` (1 where
            the label is the first maximal index of the logits, torch.argmax's tie rule), and
            ``argmax``, the predicted token (that first maximal index; a global id with
            ``process_group``), int64 and -1 at ignored positions.
        jsd_beta: beta of ``jsd``, in [0, 1].
        impl: ``"auto"`` (Triton on CUDA, else ``"torch"``), ``"triton"``, ``"torch"`` (streaming
            PyTorch) or ``"reference"`` (materialises logits; the test oracle).
        check_labels: check that labels lie in [0, V) (one host sync). Unchecked, a label outside
            [0, V) other than ``ignore_index`` counts with label logit 0 (log p = -lse), in forward
            and backward alike.
        check_finite: check that the hidden states are finite (one host sync).
        process_group: a ``torch.distributed`` group over which the vocabulary is split: each
            process passes the same ``hidden``/``labels`` (global ids) and its own contiguous slice
            of the rows of ``weight``/``bias`` (and ``ref_weight``/``ref_bias``), slices in rank
            order. Statistics come out identical on every process; backward gives each its slice's
            weight gradient and the full hidden gradient (see `fpo_ops.distributed`).
            A DTensor ``weight`` placed ``Shard(0)`` on a 1-D device mesh (PyTorch's
            ``ColwiseParallel``) runs the same way over ``mesh.get_group()`` with ``process_group``
            None: ``bias`` and the reference head DTensors placed alike (or plain: the bias this
            process's rows, the reference the whole head), hidden states plain or DTensors (made
            whole); ``weight.grad`` comes back a ``Shard(0)`` DTensor. Any other placement raises
            (`fpo_ops.distributed.tensor_parallel`).
        grad_filter_eps: ``impl="triton"`` only (the other implementations ignore it): when > 0,
            backward drops every logit-gradient tile (a block of tokens x vocabulary columns
            without a label) whose p and q are all below it, skipping its two gradient GEMMs.
            An approximation; 0 (default) computes the exact gradient.

    Returns:
        TokenStats with the requested fields set, each shaped like ``labels``: float32 (float64 for
        float64 inputs), 0 at ignored positions; ``argmax`` int64, -1 at ignored positions. Gradients flow to ``hidden``, ``weight``, ``bias``.
        Under ``torch.autocast`` the GEMMs run in the autocast dtype; the statistics stay fp32.
        Gradients are first-order: differentiating them again raises. On meta tensors only the
        shapes and dtypes are computed. Under ``torch.compile`` the call is one graph node for
        any N (see the README).
    """
    if has_dtensor(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias):
        return _token_stats_of_dtensors(
            hidden, weight, labels, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
            ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
            ref_softcap=ref_softcap, ref_logit_scale=ref_logit_scale, outputs=outputs, jsd_beta=jsd_beta,
            impl=impl, check_labels=check_labels, check_finite=check_finite, process_group=process_group,
            grad_filter_eps=grad_filter_eps,
        )
    outputs = normalize_outputs(outputs)
    labels = int64_labels(labels)
    # Under torch.autocast the operands take the autocast dtype first, as F.linear's do: plain AMP
    # gives bf16 hidden states and an fp32 head. Gradients come back in each input's own dtype
    # (the casts are differentiable). Outside autocast a dtype mismatch stays an error.
    autocast_dtype = _autocast_dtype(hidden)
    if autocast_dtype is not None:
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias = (
            _autocast(t, autocast_dtype) for t in (hidden, weight, bias, ref_hidden, ref_weight, ref_bias))
    # Under torch.compile, and on meta tensors, the streaming and fused implementations run as
    # custom ops (`fpo_ops.token_stats.custom_op`) whose forward checks the data itself.
    compiling = torch.compiler.is_compiling()
    validate_token_stats_args(
        hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, outputs=outputs,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        ref_softcap=ref_softcap, ref_logit_scale=ref_logit_scale, jsd_beta=jsd_beta, impl=impl,
        check_labels=check_labels and process_group is None and not compiling,
        check_finite=check_finite and not compiling, sliced_vocab=process_group is not None,
    )
    validate_grad_filter_eps(grad_filter_eps)
    if process_group is not None:
        validate_process_group(process_group, impl)
    impl = _resolve_impl_name(impl, hidden.device)
    as_op = process_group is None and impl != "reference" and (compiling or hidden.device.type == "meta")
    if compiling and not as_op and (check_labels or check_finite):
        flag = "check_labels" if check_labels else "check_finite"
        where = f"impl={impl!r}" + (" with a process_group" if process_group is not None else "")
        raise ValueError(f"{flag}: expected False under torch.compile for {where}, got True (the check "
                         f"reads the data: a host sync that cannot be compiled; impl='torch' and 'triton' "
                         f"without a process_group run it inside their compiled op)")
    if ref_hidden is not None and ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias

    device_type = hidden.device.type
    has_autocast = torch.amp.is_autocast_available(device_type)  # not for meta tensors
    compute_dtype = hidden.dtype  # the autocast dtype under autocast (operands cast above)
    opts = HeadOptions(
        outputs=outputs, ignore_index=ignore_index, temperature=float(temperature),
        softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale),
        ref_softcap=None if ref_softcap is None else float(ref_softcap),
        ref_logit_scale=float(ref_logit_scale), jsd_beta=float(jsd_beta), compute_dtype=compute_dtype,
        grad_filter_eps=float(grad_filter_eps),
    )

    def flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.reshape(-1, t.shape[-1]).to(compute_dtype)

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(compute_dtype)

    if as_op:
        fn = functools.partial(op_token_stats, impl=impl, check_labels=check_labels, check_finite=check_finite)
    elif process_group is None:
        fn = _resolve_impl(impl, hidden.device)
    else:
        # The same Function as without a group: the vocabulary split is one more option of it.
        fn = functools.partial(function_token_stats, impl=impl, group=process_group, check_labels=check_labels)
    # The GEMMs run in compute_dtype with every sum in fp32: autocast must not recast inside.
    with torch.autocast(device_type, enabled=False) if has_autocast else contextlib.nullcontext():
        stats = fn(
            flat(hidden), cast(weight), bias, labels.reshape(-1),
            flat(ref_hidden), cast(ref_weight), ref_bias, opts,
        )
    return TokenStats(**{name: value.reshape(labels.shape) for name, value in stats.items()})


# Eager under torch.compile (a graph break; fullgraph=True refuses it): the vocabulary-parallel
# Function issues collectives and host syncs that are not traced.
@torch.compiler.disable
def _token_stats_of_dtensors(hidden, weight, labels, ref_hidden, ref_weight, *, bias, ref_bias, process_group,
                             impl, **options) -> TokenStats:
    """`token_stats` given DTensors: on this process's rows of the head and its mesh's process group
    (`fpo_ops.distributed.tensor_parallel`)."""
    from ..distributed.tensor_parallel import local_head

    head = local_head(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                      process_group=process_group, impl=impl)
    return token_stats(head.hidden, head.weight, head.labels, head.ref_hidden, head.ref_weight, bias=head.bias,
                       ref_bias=head.ref_bias, process_group=head.group, impl=impl, **options)
