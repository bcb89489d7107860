"""Streaming PyTorch backend of `token_stats` (``impl="torch"``; `TORCH_BACKEND`).

Tiles tokens and vocabulary so that only one [BN, BV] block of logits per model exists at a time.
Forward keeps a few floats per token (log-normalisers and the statistic values the gradient
formula needs); backward recomputes the tiles. Runs on any device PyTorch runs on. The passes
follow the protocol of `fpo_ops.token_stats.backend`; `fpo_ops.token_stats.function` drives them.
"""
import warnings
from typing import Dict, Optional, Tuple

import torch

from .backend import Backend
from .online import (
    Partials, logit_to_preactivation_grad, merge_partials, tile_jsd_sums, tile_logit_grad, tile_partials,
    transform_logits,
)
from .options import HeadOptions
from .stats import REFERENCE_GRADS

# Tile sizes: a [TOKEN_BLOCK, VOCAB_BLOCK] fp32 tile is 8 MiB, large enough for efficient GEMMs.
TOKEN_BLOCK = 512
VOCAB_BLOCK = 4096


# Device types whose matmul returns fp32 directly from bf16/fp16 operands (torch.mm(out_dtype=)).
_NATIVE_FP32_OUT: Dict[str, bool] = {}


def gemm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` summed and returned in fp32 (fp64 for fp64 operands), whatever the operands' dtype.

    A bf16 result would round each tile's sum over H (or over a token block, for dweight) to bf16
    before it is added to the fp32 accumulators: that error grows with the number of tiles.
    Low-precision operands multiply natively where the backend returns fp32 (CUDA), else after an
    upcast (CPU has no such kernel). A backend expected to have it that fails warns once, naming
    the error, since the upcast GEMMs run at the fp32 rate, several times slower.

    Args:
        a: [M, K]; b: [K, L], of one dtype and device.

    Returns:
        [M, L] in fp32 (fp64 for fp64 operands).
    """
    if a.dtype in (torch.float32, torch.float64) and b.dtype == a.dtype:
        return a @ b
    device_type = a.device.type
    if _NATIVE_FP32_OUT.get(device_type, True) and device_type != "cpu":
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _NATIVE_FP32_OUT[device_type] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            _NATIVE_FP32_OUT[device_type] = False
            warnings.warn(
                f"gemm_fp32: torch.mm(..., out_dtype=torch.float32) failed on {device_type} for "
                f"{a.dtype} operands ({type(exc).__name__}: {str(exc)[:200]}); the streaming op "
                f"upcasts its GEMM operands to fp32 on this device from now on (slower)",
                RuntimeWarning, stacklevel=2)
    return a.float() @ b.float()


def _logit_tile(hidden, weight, bias, v0, v1, softcap, logit_scale, opts: HeadOptions) -> torch.Tensor:
    x = gemm_fp32(hidden, weight[v0:v1].T).to(opts.accum_dtype)
    if bias is not None:
        x = x + bias[v0:v1].to(opts.accum_dtype)
    return transform_logits(x, softcap, logit_scale, opts.temperature)


def vocab_partials(h, rh, labels, weight, bias, ref_weight, ref_bias, keys, opts: HeadOptions):
    """Partials (`fpo_ops.token_stats.online`) of tokens ``h`` [n, H] over every row of ``weight`` [V, H].

    ``weight`` may be one process's slice of the vocabulary: ``labels`` [n] are then ids relative
    to the slice (outside [0, V) where another slice holds the label, or the token is ignored).
    """
    has_ref = rh is not None
    partials = None
    for v0 in range(0, weight.shape[0], VOCAB_BLOCK):
        v1 = min(v0 + VOCAB_BLOCK, weight.shape[0])
        z = _logit_tile(h, weight, bias, v0, v1, opts.softcap, opts.logit_scale, opts)
        z_ref = (_logit_tile(rh, ref_weight, ref_bias, v0, v1, opts.ref_softcap,
                             opts.ref_logit_scale, opts) if has_ref else None)
        tile = tile_partials(z, z_ref, labels - v0, keys, first_column=v0)
        partials = tile if partials is None else merge_partials(partials, tile)
    return partials


def jsd_pass(h, rh, weight, bias, ref_weight, ref_bias, stats, opts: HeadOptions) -> Dict[str, torch.Tensor]:
    """Second pass over the vocabulary: the JSD needs both log-normalisers first.

    Both results are sums over the rows of ``weight``, so the passes of vocabulary slices add up.
    """
    beta = opts.jsd_beta
    sum_q = h.new_zeros(h.shape[0], dtype=opts.accum_dtype)
    sum_p = torch.zeros_like(sum_q)
    for v0 in range(0, weight.shape[0], VOCAB_BLOCK):
        v1 = min(v0 + VOCAB_BLOCK, weight.shape[0])
        z = _logit_tile(h, weight, bias, v0, v1, opts.softcap, opts.logit_scale, opts)
        z_ref = _logit_tile(rh, ref_weight, ref_bias, v0, v1, opts.ref_softcap, opts.ref_logit_scale, opts)
        q_part, p_part = tile_jsd_sums(z - stats["lse"][:, None], z_ref - stats["lse_ref"][:, None], beta)
        sum_q += q_part
        sum_p += p_part
    return {"jsd": beta * sum_q + (1.0 - beta) * sum_p, "kl_p_m": sum_p}


def backward_tiles(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, coef, saved,
                   opts: HeadOptions, need_h: bool, need_w: bool, need_b: bool,
                   valid: Optional[torch.Tensor] = None):
    """Recompute tiles, vocabulary-block outer so each block's dW sums over all tokens in fp32.

    ``labels`` are relative to the rows of ``weight`` (see `vocab_partials`). ``valid`` [N] bool
    marks the tokens with a gradient (default all): the others contribute exactly 0, even where
    their hidden states are not finite (0 * NaN would spread NaN over all of dweight). Returns
    dhidden in the accumulation dtype (a slice's share, before any cross-process sum), dweight
    and dbias.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = opts.accum_dtype
    needs_ref_tile = ref_hidden is not None and any(k in REFERENCE_GRADS for k in coef)
    grad_h = hidden.new_zeros(hidden.shape, dtype=acc) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None

    for v0 in range(0, vocab, VOCAB_BLOCK):
        v1 = min(v0 + VOCAB_BLOCK, vocab)
        grad_w_block = hidden.new_zeros((v1 - v0, weight.shape[1]), dtype=acc) if need_w else None
        grad_b_block = hidden.new_zeros(v1 - v0, dtype=acc) if need_b else None
        for n0 in range(0, n_tokens, TOKEN_BLOCK):
            n1 = min(n0 + TOKEN_BLOCK, n_tokens)
            h = hidden[n0:n1]
            keep = None if valid is None else valid[n0:n1, None]
            z = _logit_tile(h, weight, bias, v0, v1, opts.softcap, opts.logit_scale, opts)
            z_ref = (_logit_tile(ref_hidden[n0:n1], ref_weight, ref_bias, v0, v1, opts.ref_softcap,
                                 opts.ref_logit_scale, opts) if needs_ref_tile else None)
            dz = tile_logit_grad(
                z, z_ref, labels[n0:n1] - v0,
                {k: c[n0:n1] for k, c in coef.items()}, {k: s[n0:n1] for k, s in saved.items()},
                opts.jsd_beta,
            )
            dx = logit_to_preactivation_grad(dz, z, opts.softcap, opts.logit_scale, opts.temperature)
            if keep is not None:
                dx = torch.where(keep, dx, dx.new_zeros(()))
                if need_w:
                    h = torch.where(keep, h, h.new_zeros(()))
            if need_b:
                grad_b_block += dx.sum(0)
            # dz rounded to the GEMM dtype, as autograd rounds the gradient of low-precision logits
            dx = dx.to(hidden.dtype)
            if need_h:
                grad_h[n0:n1] += gemm_fp32(dx, weight[v0:v1])
            if need_w:
                grad_w_block += gemm_fp32(dx.T, h)
        if need_w:
            grad_w[v0:v1] = grad_w_block
        if need_b:
            grad_b[v0:v1] = grad_b_block
    return grad_h, grad_w, grad_b


def _token_blocks(n_tokens: int):
    """[n0, n1) token blocks; one empty block for N = 0, so results keep their [0] shape."""
    for n0 in range(0, max(n_tokens, 1), TOKEN_BLOCK):
        yield n0, min(n0 + TOKEN_BLOCK, n_tokens)


def partials(hidden, ref_hidden, local_labels, weight, bias, ref_weight, ref_bias,
             keys: Tuple[str, ...], opts: HeadOptions, valid=None) -> Partials:
    """Partials [N] of every token over the rows of ``weight``, streamed in token blocks."""
    blocks = [vocab_partials(hidden[n0:n1], None if ref_hidden is None else ref_hidden[n0:n1],
                             local_labels[n0:n1], weight, bias, ref_weight, ref_bias, keys, opts)
              for n0, n1 in _token_blocks(hidden.shape[0])]
    return {key: torch.cat([block[key] for block in blocks]) for key in blocks[0]}


def jsd(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, stats: Dict[str, torch.Tensor],
        opts: HeadOptions, valid=None) -> Dict[str, torch.Tensor]:
    """The rows' terms of ``jsd`` and ``kl_p_m`` [N], given the global ``lse``/``lse_ref``."""
    parts = [jsd_pass(hidden[n0:n1], ref_hidden[n0:n1], weight, bias, ref_weight, ref_bias,
                      {name: stats[name][n0:n1] for name in ("lse", "lse_ref")}, opts)
             for n0, n1 in _token_blocks(hidden.shape[0])]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


TORCH_BACKEND = Backend(partials=partials, jsd=jsd, backward=backward_tiles)
