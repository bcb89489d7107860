"""Fused Triton backend of `token_stats` (``impl="triton"``; `TRITON_BACKEND`).

Forward: one pass over the vocabulary computes both models' logit tiles with tl.dot and folds them
into online partial sums (``fpo_ops.token_stats.online``); when N is small the vocabulary is split across
programs and the splits are merged exactly here. ``jsd`` takes a second pass. Backward recomputes
the tiles chunk by chunk over the vocabulary (see ``kernels/token_stats_bwd.py``); it uses no
atomics, so its results are reproducible bit for bit. Ignored tokens are moved to the end of the
launch order and cost no tile work.

The passes `triton_vocab_partials`, `triton_jsd_pass` and `triton_backward_tiles` follow the
protocol of `fpo_ops.token_stats.backend` (each over the rows of the head a process holds, the whole head
without a process group) and return what ``fpo_ops.token_stats.chunked``'s passes return; `fpo_ops.token_stats.function`
drives them.
On CPU tensors the kernels run through the Triton interpreter (TRITON_INTERPRET=1).
"""
import contextlib
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton

from .backend import Backend
from .kernels.token_stats_bwd import bwd_flags, token_stats_bwd_chunk
from .kernels.token_stats_fwd import token_stats_fwd, token_stats_jsd_fwd
from .kernels.utils import TileConfig, launch_tiles, tile_config
from .online import Partials, merge_stacked
from .options import HeadOptions
from .stats import GRAD_KEYS, PARTIAL_KEYS, REFERENCE_GRADS, SAVED_KEYS, present_partials

def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _token_order(valid: Optional[torch.Tensor], n_tokens: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """([N] int64 rows with the tokens to compute first, 0-d int32 count of them); no host sync."""
    if valid is None:
        return (torch.arange(n_tokens, device=device),
                torch.full((), n_tokens, dtype=torch.int32, device=device))
    order = torch.argsort((~valid).to(torch.uint8), stable=True)
    return order, valid.sum(dtype=torch.int32)


def _merge_splits(part: torch.Tensor, keys: Sequence[str], has_ref: bool) -> Partials:
    """Exact merge of the per-split partials [S, len(PARTIAL_KEYS), N] into one {key: [N]}."""
    splits = {k: part[:, PARTIAL_KEYS.index(k)] for k in present_partials(keys, has_ref)}
    if part.shape[0] == 1:
        return {k: v[0] for k, v in splits.items()}
    return merge_stacked(splits)


def triton_vocab_partials(h, rh, labels, weight, bias, ref_weight, ref_bias, keys: Sequence[str],
                          opts: HeadOptions, valid: Optional[torch.Tensor] = None,
                          config: Optional[TileConfig] = None) -> Partials:
    """Partials (`fpo_ops.token_stats.online`) of tokens ``h`` over every row of ``weight``, fused in Triton.

    ``weight`` may be one process's slice of the vocabulary; merge the slices' partials with
    ``fpo_ops.token_stats.online.merge_partials`` (or ``shift_partials`` + all-reduce) and ``finalize`` them.

    Args:
        h: [N, H] policy hidden states; rh: [N, HR] reference hidden states or None.
        labels: [N] int label ids relative to the rows of ``weight`` (outside [0, V) where another
            slice holds the label).
        weight: [V, H]; bias: [V] or None; ref_weight: [V, HR] or None; ref_bias: [V] or None.
        keys: optional partial names, as from ``fpo_ops.token_stats.online.needed_partials(opts)``.
        opts: HeadOptions (softcap, scales, temperature; ``compute_dtype`` is h's dtype).
        valid: [N] bool, tokens to compute (default all); the partials of the others are finite
            placeholders to be masked by the caller.
        config: launch shape (default: `fpo_ops.token_stats.kernels.utils.tile_config` of the device).

    Returns:
        {key: [N]} in the accumulation dtype with keys m, s, z_label, the requested ``keys``
        among ent/s2/sum_z, and with a reference m_ref, s_ref, z_ref_label and requested rkl/kl.
    """
    has_ref = rh is not None
    h, weight, bias, labels = map(_contiguous, (h, weight, bias, labels))
    rh, ref_weight, ref_bias = map(_contiguous, (rh, ref_weight, ref_bias))
    cfg = config or tile_config(h.device, h.dtype)
    order, n_valid = _token_order(valid, h.shape[0], h.device)
    with _on_device(h):
        part = token_stats_fwd(h, weight, bias, rh, ref_weight, ref_bias, labels, 0, order, n_valid,
                               opts, keys, cfg)
    return _merge_splits(part, keys, has_ref)


def triton_jsd_pass(h, rh, weight, bias, ref_weight, ref_bias, stats: Dict[str, torch.Tensor],
                    opts: HeadOptions, valid: Optional[torch.Tensor] = None,
                    config: Optional[TileConfig] = None) -> Dict[str, torch.Tensor]:
    """Second pass over the rows of ``weight``: the JSD needs both log-normalisers first.

    Args:
        h, rh, weight, bias, ref_weight, ref_bias: as in `triton_vocab_partials` (``rh``
            required).
        stats: holds ``lse`` and ``lse_ref`` [N], normalisers over the whole vocabulary.
        opts: HeadOptions (``jsd_beta``); valid, config: as in `triton_vocab_partials`.

    Returns:
        {"jsd": [N], "kl_p_m": [N]}: sums over the rows of ``weight``, so slices' results add.
    """
    h, weight, bias = map(_contiguous, (h, weight, bias))
    rh, ref_weight, ref_bias = map(_contiguous, (rh, ref_weight, ref_bias))
    cfg = config or tile_config(h.device, h.dtype)
    order, n_valid = _token_order(valid, h.shape[0], h.device)
    lse = stats["lse"].to(opts.accum_dtype).contiguous()
    lse_ref = stats["lse_ref"].to(opts.accum_dtype).contiguous()
    with _on_device(h):
        sums = token_stats_jsd_fwd(h, weight, bias, rh, ref_weight, ref_bias, lse, lse_ref, order,
                                   n_valid, opts, cfg).sum(0)
    beta = opts.jsd_beta
    return {"jsd": beta * sums[0] + (1.0 - beta) * sums[1], "kl_p_m": sums[1]}


def triton_backward_tiles(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias,
                          coef: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor],
                          opts: HeadOptions, need_h: bool, need_w: bool, need_b: bool,
                          valid: Optional[torch.Tensor] = None, config: Optional[TileConfig] = None):
    """Gradients of a slice of the vocabulary (the per-tile formula of ``online.tile_logit_grad``).

    Args:
        hidden: [N, H]; weight: [V, H] (a slice's rows); bias: [V] or None; ref_hidden [N, HR],
            ref_weight [V, HR], ref_bias [V]: the reference, or None.
        labels: [N] ids relative to the rows of ``weight`` (see `triton_vocab_partials`).
        coef: {statistic: [N]} upstream gradient of each differentiable statistic that has one
            (0 at ignored tokens).
        saved: {name: [N]} values over the whole vocabulary: ``lse``, ``lse_ref`` (with a
            reference gradient), ``entropy``, ``reverse_kl``, ``kl_p_m`` (for the gradients of
            entropy, reverse_kl, jsd).
        opts: HeadOptions; ``grad_filter_eps`` > 0 zeroes tiles whose p and q are all below it.
        need_h, need_w, need_b: which gradients to return.
        valid: [N] bool, tokens with a gradient (default all); config: launch shape.

    Returns:
        (dhidden [N, H] in the accumulation dtype, this slice's share before any cross-process
        sum; dweight [V, H] in weight's dtype; dbias [V] in bias's dtype), None where not needed.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = opts.accum_dtype
    device = hidden.device
    if not (need_h or need_w or need_b):
        return None, None, None
    use_ref = ref_hidden is not None and any(k in REFERENCE_GRADS for k in coef)
    hidden, weight, bias, labels = map(_contiguous, (hidden, weight, bias, labels))
    if use_ref:
        ref_hidden, ref_weight, ref_bias = map(_contiguous, (ref_hidden, ref_weight, ref_bias))
    else:
        ref_hidden = ref_weight = ref_bias = None
    filtering = opts.grad_filter_eps > 0.0
    # one shape for the whole backward: its dh/dw GEMMs read dz, dbias parts and skip flags by its token blocks
    flags = bwd_flags(bias is not None, use_ref, ref_bias is not None, tuple(coef), opts, need_b, filtering)
    cfg = launch_tiles(config or tile_config(device, hidden.dtype), "bwd", flags)
    order, n_valid = _token_order(valid, n_tokens, device)

    coef_buf = torch.zeros((len(GRAD_KEYS), n_tokens), dtype=acc, device=device)
    for name, g in coef.items():
        coef_buf[GRAD_KEYS.index(name)] = g
    saved_buf = torch.zeros((len(SAVED_KEYS), n_tokens), dtype=acc, device=device)
    for name, value in saved.items():
        if name in SAVED_KEYS:
            saved_buf[SAVED_KEYS.index(name)] = value

    grad_h = torch.empty((n_tokens, hidden.shape[1]), dtype=acc, device=device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    chunk = cfg.vocab_chunk(n_tokens, vocab, hidden.element_size())
    token_blocks = triton.cdiv(n_tokens, cfg.BN)
    dz = torch.empty((n_tokens, chunk), dtype=hidden.dtype, device=device)
    db_part = torch.empty((token_blocks, chunk), dtype=acc, device=device) if need_b else None
    skip = (torch.empty((token_blocks, triton.cdiv(chunk, cfg.BV)), dtype=torch.int8, device=device)
            if filtering else None)

    def rows(t, c0, c1):
        return None if t is None else t[c0:c1]

    with _on_device(hidden):
        for c0 in range(0, vocab, chunk):
            c1 = min(c0 + chunk, vocab)
            token_stats_bwd_chunk(
                hidden, weight[c0:c1], rows(bias, c0, c1), ref_hidden, rows(ref_weight, c0, c1),
                rows(ref_bias, c0, c1), labels, c0, order, n_valid, coef_buf, saved_buf,
                tuple(coef), opts, cfg, grad_h, rows(grad_w, c0, c1), rows(grad_b, c0, c1),
                first_chunk=c0 == 0, dz=dz, db_part=db_part, skip=skip,
            )
    return grad_h, grad_w, grad_b


TRITON_BACKEND = Backend(partials=triton_vocab_partials, jsd=triton_jsd_pass, backward=triton_backward_tiles)
