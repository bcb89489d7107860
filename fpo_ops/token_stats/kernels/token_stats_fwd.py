"""Forward kernels of `token_stats`: online partial sums over a vocabulary slice, and the JSD pass.

A program owns BN tokens (taken through ``order``, which lists the non-ignored tokens first, so
blocks of ignored tokens do no work) and one split of the vocabulary. It streams over the split in
BV-column tiles, computing the policy and reference logit tiles with tl.dot over the hidden size,
and folds each tile into max-shifted running sums (the math of ``fpo_ops.token_stats.online``). Each split
writes its own partials; the host merges splits exactly.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..stats import PARTIAL_KEYS
from .rows import (
    ARGMAX_ROW, ENT_ROW, KL_ROW, M_PRE_ROW, M_REF_ROW, M_ROW, RKL_ROW, S2_ROW, S_REF_ROW, S_ROW, SUM_Z_ROW,
    Z_LABEL_ROW, Z_REF_LABEL_ROW,
)
from .utils import (
    dot_precision, head_gemm, launch_pieces, launch_tiles, log_mixture, logit_piece,
    triton_dtype, upcast_dot_operands, weight_operands,
)


@triton.jit
def _token_block(order_ptr, n_valid_ptr, N, BN: tl.constexpr):
    # -> split pid_s, token block pid_n (both int64), n_valid, in_range [BN], row_mask [BN] (tokens
    #    with a result), rows [BN] their rows
    # splits vary fastest: programs running together share the token block's hidden states in L2
    pid_s = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    idx = pid_n * BN + tl.arange(0, BN)
    n_valid = tl.load(n_valid_ptr)
    in_range = idx < N
    row_mask = idx < n_valid
    rows = tl.load(order_ptr + idx, mask=in_range, other=0)
    return pid_s, pid_n, n_valid, in_range, row_mask, rows


@triton.jit
def _vocab_split(pid_s, pid_n, n_valid, V, v_per_split, BN: tl.constexpr):
    # -> the split's columns [v_lo, v_hi) and the end of its tile loop, v_end
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    # a block holding only ignored tokens runs no tile
    v_end = tl.where(pid_n * BN < n_valid, v_hi, v_lo)
    return v_lo, v_hi, v_end


@triton.jit
def token_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, labels_ptr, order_ptr, n_valid_ptr, part_ptr,
    N, H, HR, V, label_offset, v_per_split,
    stride_h, stride_w, stride_rh, stride_rw, stride_part_split, stride_part_key,
    logit_scale, softcap, ref_logit_scale, ref_softcap, temperature,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    CAPPED: tl.constexpr, REF_CAPPED: tl.constexpr,
    WANT_ENT: tl.constexpr, WANT_S2: tl.constexpr, WANT_SUM_Z: tl.constexpr, WANT_M_PRE: tl.constexpr,
    WANT_ARGMAX: tl.constexpr, WANT_RKL: tl.constexpr, WANT_KL: tl.constexpr,
    ACC: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, W_TMA: tl.constexpr, PIECES: tl.constexpr,
):
    # h [N, H], w [V, H], rh [N, HR], rw [V, HR], labels [N], order [N], part [S, PARTIAL_KEYS, N];
    # with W_TMA, w and rw are tensor descriptors (block [BV, BH])
    pid_s, pid_n, n_valid, in_range, row_mask, rows = _token_block(order_ptr, n_valid_ptr, N, BN)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1) - label_offset
    v_lo, v_hi, v_end = _vocab_split(pid_s, pid_n, n_valid, V, v_per_split, BN)

    m = tl.full([BN], float("-inf"), dtype=ACC)
    s = tl.zeros([BN], dtype=ACC)
    z_label = tl.zeros([BN], dtype=ACC)
    ent = tl.zeros([BN], dtype=ACC)
    s2 = tl.zeros([BN], dtype=ACC)
    sum_z = tl.zeros([BN], dtype=ACC)
    m_pre = tl.full([BN], float("-inf"), dtype=ACC)
    argmax = tl.zeros([BN], dtype=tl.int64) + v_lo
    m_ref = tl.full([BN], float("-inf"), dtype=ACC)
    s_ref = tl.zeros([BN], dtype=ACC)
    z_ref_label = tl.zeros([BN], dtype=ACC)
    rkl = tl.zeros([BN], dtype=ACC)
    kl = tl.zeros([BN], dtype=ACC)

    for v0 in range(v_lo, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        col_mask = cols < v_hi
        acc = head_gemm(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, ACC, BN, BV, BH,
                        UPCAST, PRECISION, W_TMA)
        # The tile is folded piece by piece (`logit_piece`), each piece an online-softmax step of its
        # own. On the tile's layout columns are int32 offsets in the tile: an int64 column index per
        # element there costs two registers each.
        n_in = (v_hi - v0).to(tl.int32)
        label_in_tile = (labels - v0).to(tl.int32)
        m_before = m
        s_before = s
        for i in tl.static_range(PIECES):
            z, lanes, in_piece = logit_piece(acc, i, PIECES, b_ptr, v0, n_in, logit_scale, softcap, temperature,
                                             HAS_BIAS, CAPPED, ACC, BN, BV)
            in_piece = in_piece[None, :]
            piece_max = tl.max(tl.where(in_piece, z, float("-inf")), 1)
            m_new = tl.maximum(m, piece_max)
            if WANT_ARGMAX:
                # the first column at the maximum, torch.argmax's: pieces are not in column order,
                # so a tie takes the lower column (earlier tiles' columns are all lower)
                at_max = (z == piece_max[:, None]) & in_piece
                piece_arg = tl.min(tl.where(at_max, lanes[None, :], BV), 1) + v0
                argmax = tl.where(piece_max > m, piece_arg,
                                  tl.where(piece_max == m, tl.minimum(argmax, piece_arg), argmax))
            # before the first column s is 0 and every sum is 0: any finite shift keeps them 0
            d = tl.where(s > 0, m - m_new, 0.0)
            alpha = tl.exp(d)
            shifted = tl.where(in_piece, z - m_new[:, None], 0.0)
            e = tl.where(in_piece, tl.exp(shifted), 0.0)
            if WANT_ENT:
                ent = alpha * (ent + d * s) + tl.sum(e * shifted, 1)
            if WANT_S2:
                s2 = alpha * alpha * s2 + tl.sum(e * e, 1)
            if WANT_SUM_Z:
                sum_z += tl.sum(tl.where(in_piece, z, 0.0), 1)
            if WANT_M_PRE:
                # the columns before the label (labels of ignored tokens are -1: none)
                before = (lanes[None, :] < label_in_tile[:, None]) & in_piece
                m_pre = tl.maximum(m_pre, tl.max(tl.where(before, z, float("-inf")), 1))
            is_label = (lanes[None, :] == label_in_tile[:, None]) & in_piece
            z_label += tl.sum(tl.where(is_label, z, 0.0), 1)
            s = alpha * s + tl.sum(e, 1)
            m = m_new
        if HAS_REF:
            # across the reference GEMM the policy's accumulator stays live only for the divergences
            acc_ref = head_gemm(rh_ptr, rw_ptr, rows, cols, row_mask, col_mask, HR, stride_rh, stride_rw, ACC,
                                BN, BV, BH, UPCAST, PRECISION, W_TMA)
            # the reference's maximum over the whole tile first: the divergences' recurrences then
            # take one shift of each maximum per tile (the policy's, m_before -> m, and this one).
            # A shift per piece left them to cancel terms the size of the logits: at temperature
            # 2^-40 the reverse KL's gradient was off by 1e17 where plain PyTorch's is off by 1e9.
            tile_max_ref = tl.full([BN], float("-inf"), dtype=ACC)
            for i in tl.static_range(PIECES):
                zr, lanes, in_piece = logit_piece(acc_ref, i, PIECES, rb_ptr, v0, n_in, ref_logit_scale,
                                                  ref_softcap, temperature, HAS_REF_BIAS, REF_CAPPED, ACC, BN, BV)
                tile_max_ref = tl.maximum(tile_max_ref, tl.max(tl.where(in_piece[None, :], zr, float("-inf")), 1))
            m_ref_new = tl.maximum(m_ref, tile_max_ref)
            d_ref = tl.where(s_ref > 0, m_ref - m_ref_new, 0.0)
            alpha_ref = tl.exp(d_ref)
            d = tl.where(s_before > 0, m_before - m, 0.0)
            alpha = tl.exp(d)
            tile_s_ref = tl.zeros([BN], dtype=ACC)
            tile_rkl = tl.zeros([BN], dtype=ACC)
            tile_kl = tl.zeros([BN], dtype=ACC)
            for i in tl.static_range(PIECES):
                zr, lanes, in_piece = logit_piece(acc_ref, i, PIECES, rb_ptr, v0, n_in, ref_logit_scale,
                                                  ref_softcap, temperature, HAS_REF_BIAS, REF_CAPPED, ACC, BN, BV)
                in_piece = in_piece[None, :]
                shifted_ref = tl.where(in_piece, zr - m_ref_new[:, None], 0.0)
                e_ref = tl.where(in_piece, tl.exp(shifted_ref), 0.0)
                if WANT_RKL or WANT_KL:
                    # the policy's logits again: one transform per logit is cheaper than pieces kept live
                    z, lanes, _in = logit_piece(acc, i, PIECES, b_ptr, v0, n_in, logit_scale, softcap,
                                                temperature, HAS_BIAS, CAPPED, ACC, BN, BV)
                    shifted = tl.where(in_piece, z - m[:, None], 0.0)
                if WANT_RKL:
                    # e again from `shifted`: one exp per logit is cheaper than a tile kept live
                    e = tl.where(in_piece, tl.exp(shifted), 0.0)
                    tile_rkl += tl.sum(e * (shifted - shifted_ref), 1)
                if WANT_KL:
                    tile_kl += tl.sum(e_ref * (shifted_ref - shifted), 1)
                is_label = (lanes[None, :] == label_in_tile[:, None]) & in_piece
                z_ref_label += tl.sum(tl.where(is_label, zr, 0.0), 1)
                tile_s_ref += tl.sum(e_ref, 1)
            if WANT_RKL:
                rkl = alpha * (rkl + (d - d_ref) * s_before) + tile_rkl
            if WANT_KL:
                kl = alpha_ref * (kl + (d_ref - d) * s_ref) + tile_kl
            s_ref = alpha_ref * s_ref + tile_s_ref
            m_ref = m_ref_new

    # skipped blocks hold ignored tokens only: finite placeholders (one logit 0) that merge cleanly
    m = tl.where(s > 0, m, 0.0)
    s = tl.where(s > 0, s, 1.0)
    out = part_ptr + pid_s * stride_part_split + rows
    tl.store(out + M_ROW * stride_part_key, m, mask=in_range)
    tl.store(out + S_ROW * stride_part_key, s, mask=in_range)
    tl.store(out + Z_LABEL_ROW * stride_part_key, z_label, mask=in_range)
    if WANT_ENT:
        tl.store(out + ENT_ROW * stride_part_key, ent, mask=in_range)
    if WANT_S2:
        tl.store(out + S2_ROW * stride_part_key, s2, mask=in_range)
    if WANT_SUM_Z:
        tl.store(out + SUM_Z_ROW * stride_part_key, sum_z, mask=in_range)
    if WANT_M_PRE:
        tl.store(out + M_PRE_ROW * stride_part_key, m_pre, mask=in_range)
    if WANT_ARGMAX:
        tl.store(out + ARGMAX_ROW * stride_part_key, argmax.to(ACC), mask=in_range)
    if HAS_REF:
        m_ref = tl.where(s_ref > 0, m_ref, 0.0)
        s_ref = tl.where(s_ref > 0, s_ref, 1.0)
        tl.store(out + M_REF_ROW * stride_part_key, m_ref, mask=in_range)
        tl.store(out + S_REF_ROW * stride_part_key, s_ref, mask=in_range)
        tl.store(out + Z_REF_LABEL_ROW * stride_part_key, z_ref_label, mask=in_range)
        if WANT_RKL:
            tl.store(out + RKL_ROW * stride_part_key, rkl, mask=in_range)
        if WANT_KL:
            tl.store(out + KL_ROW * stride_part_key, kl, mask=in_range)


@triton.jit
def token_stats_jsd_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, lse_ptr, lse_ref_ptr, order_ptr, n_valid_ptr,
    sums_ptr, N, H, HR, V, v_per_split,
    stride_h, stride_w, stride_rh, stride_rw, stride_sums_split, stride_sums_key,
    logit_scale, softcap, ref_logit_scale, ref_softcap, temperature, log_beta, log1m_beta,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, CAPPED: tl.constexpr, REF_CAPPED: tl.constexpr,
    ACC: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, W_TMA: tl.constexpr, PIECES: tl.constexpr,
):
    # lse, lse_ref [N] (over the whole vocabulary), sums [S, 2, N]: sum q (log q - log m), sum p (...)
    pid_s, pid_n, n_valid, in_range, row_mask, rows = _token_block(order_ptr, n_valid_ptr, N, BN)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    lse_ref = tl.load(lse_ref_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    v_lo, v_hi, v_end = _vocab_split(pid_s, pid_n, n_valid, V, v_per_split, BN)

    sum_q = tl.zeros([BN], dtype=ACC)
    sum_p = tl.zeros([BN], dtype=ACC)
    for v0 in range(v_lo, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        col_mask = cols < v_hi
        acc = head_gemm(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, ACC, BN, BV, BH,
                        UPCAST, PRECISION, W_TMA)
        acc_ref = head_gemm(rh_ptr, rw_ptr, rows, cols, row_mask, col_mask, HR, stride_rh, stride_rw, ACC,
                            BN, BV, BH, UPCAST, PRECISION, W_TMA)
        # the logits and the log-mixture's exps and logs are formed on column pieces of the
        # accumulators (`logit_piece`)
        n_in = (v_hi - v0).to(tl.int32)
        for i in tl.static_range(PIECES):
            z, lanes, in_piece = logit_piece(acc, i, PIECES, b_ptr, v0, n_in, logit_scale, softcap, temperature,
                                             HAS_BIAS, CAPPED, ACC, BN, BV)
            zr, lanes, in_piece = logit_piece(acc_ref, i, PIECES, rb_ptr, v0, n_in, ref_logit_scale, ref_softcap,
                                              temperature, HAS_REF_BIAS, REF_CAPPED, ACC, BN, BV)
            logp = z - lse[:, None]
            logq = zr - lse_ref[:, None]
            logm = log_mixture(logp, logq, log_beta, log1m_beta)
            sum_q += tl.sum(tl.where(in_piece[None, :], tl.exp(logq) * (logq - logm), 0.0), 1)
            sum_p += tl.sum(tl.where(in_piece[None, :], tl.exp(logp) * (logp - logm), 0.0), 1)
    out = sums_ptr + pid_s * stride_sums_split + rows
    tl.store(out, sum_q, mask=in_range)
    tl.store(out + stride_sums_key, sum_p, mask=in_range)


def _head_args(hidden, weight, bias):
    """Pointers of one head; a missing bias is replaced by the weight (never read)."""
    return hidden, weight, weight if bias is None else bias


def _floats(softcap: Optional[float], logit_scale: float):
    return float(logit_scale), 1.0 if softcap is None else float(softcap)


def fwd_flags(has_bias: bool, has_ref: bool, has_ref_bias: bool, opts, keys) -> dict:
    """The constexpr branch flags of `token_stats_fwd_kernel` for one launch (also what
    `launch_tiles` picks its tile shape by)."""
    return dict(
        HAS_BIAS=has_bias, HAS_REF=has_ref, HAS_REF_BIAS=has_ref and has_ref_bias,
        CAPPED=opts.softcap is not None, REF_CAPPED=has_ref and opts.ref_softcap is not None,
        WANT_ENT="ent" in keys, WANT_S2="s2" in keys, WANT_SUM_Z="sum_z" in keys,
        WANT_M_PRE="m_pre" in keys, WANT_ARGMAX="argmax" in keys,
        WANT_RKL=has_ref and "rkl" in keys, WANT_KL=has_ref and "kl" in keys,
    )


def jsd_flags(has_bias: bool, has_ref_bias: bool, opts) -> dict:
    """The constexpr branch flags of `token_stats_jsd_fwd_kernel` for one launch."""
    return dict(HAS_BIAS=has_bias, HAS_REF_BIAS=has_ref_bias, CAPPED=opts.softcap is not None,
                REF_CAPPED=opts.ref_softcap is not None)


def token_stats_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, label_offset: int,
                    order, n_valid, opts, keys, cfg) -> torch.Tensor:
    """Launch the partial-sum pass over all rows of ``weight``.

    Args:
        hidden: [N, H]; weight: [V, H]; bias: [V] or None; ref_*: the same for the reference
            (hidden size HR) or None.
        labels: [N] int ids; ``labels - label_offset`` is the label's row in ``weight``.
        order: [N] int64 token rows, non-ignored first; n_valid: 0-d int32 count of them.
        opts: HeadOptions; keys: optional partial names (fpo_ops.token_stats.online.needed_partials).
        cfg: TileConfig.

    Returns:
        [splits, len(PARTIAL_KEYS), N] partials in the accumulation dtype; rows of keys not asked
        for are left unwritten.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = opts.accum_dtype
    has_ref = ref_hidden is not None
    flags = fwd_flags(bias is not None, has_ref, ref_bias is not None, opts, keys)
    cfg = launch_tiles(cfg, "fwd", flags)
    splits, v_per_split = cfg.vocab_splits(n, vocab)
    part = torch.empty((splits, len(PARTIAL_KEYS), n), dtype=acc, device=hidden.device)
    if n == 0:
        return part
    rh, rw, rb = _head_args(ref_hidden, ref_weight, ref_bias) if has_ref else (hidden, weight, weight)
    scale, cap = _floats(opts.softcap, opts.logit_scale)
    ref_scale, ref_cap = _floats(opts.ref_softcap, opts.ref_logit_scale)
    grid = (splits, triton.cdiv(n, cfg.BN))
    (w_arg, rw_arg), w_tma = weight_operands(cfg, weight, rw)
    token_stats_fwd_kernel[grid](
        hidden, w_arg, weight if bias is None else bias, rh, rw_arg, rb, labels, order, n_valid, part,
        n, hidden.shape[1], rh.shape[1], vocab, label_offset, v_per_split,
        hidden.stride(0), weight.stride(0), rh.stride(0), rw.stride(0), part.stride(0), part.stride(1),
        scale, cap, ref_scale, ref_cap, float(opts.temperature),
        **flags, ACC=triton_dtype(acc), BN=cfg.BN, BV=cfg.BV, BH=cfg.BH_reduce,
        UPCAST=upcast_dot_operands(hidden.dtype), PRECISION=dot_precision(hidden.dtype), W_TMA=w_tma,
        PIECES=launch_pieces("fwd", flags, cfg.BV), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part


def token_stats_jsd_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, lse_ref,
                        order, n_valid, opts, cfg) -> torch.Tensor:
    """Launch the JSD pass over all rows of ``weight``.

    Args:
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias: as in `token_stats_fwd` (the
            reference is required).
        lse, lse_ref: [N] log-normalisers of both models over the whole vocabulary.
        order, n_valid, opts, cfg: as in `token_stats_fwd`.

    Returns:
        [splits, 2, N]: per split, sum_v q (log q - log m) and sum_v p (log p - log m).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    flags = jsd_flags(bias is not None, ref_bias is not None, opts)
    cfg = launch_tiles(cfg, "jsd", flags)
    splits, v_per_split = cfg.vocab_splits(n, vocab)
    sums = torch.empty((splits, 2, n), dtype=opts.accum_dtype, device=hidden.device)
    if n == 0:
        return sums
    scale, cap = _floats(opts.softcap, opts.logit_scale)
    ref_scale, ref_cap = _floats(opts.ref_softcap, opts.ref_logit_scale)
    beta = float(opts.jsd_beta)
    log_beta = math.log(beta) if beta > 0.0 else float("-inf")
    log1m_beta = math.log1p(-beta) if beta < 1.0 else float("-inf")
    grid = (splits, triton.cdiv(n, cfg.BN))
    (w_arg, rw_arg), w_tma = weight_operands(cfg, weight, ref_weight)
    token_stats_jsd_fwd_kernel[grid](
        hidden, w_arg, weight if bias is None else bias, ref_hidden, rw_arg,
        ref_weight if ref_bias is None else ref_bias, lse, lse_ref, order, n_valid, sums,
        n, hidden.shape[1], ref_hidden.shape[1], vocab, v_per_split,
        hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
        sums.stride(0), sums.stride(1),
        scale, cap, ref_scale, ref_cap, float(opts.temperature), log_beta, log1m_beta,
        **flags, ACC=triton_dtype(opts.accum_dtype), BN=cfg.BN, BV=cfg.BV, BH=cfg.BH_reduce,
        UPCAST=upcast_dot_operands(hidden.dtype), PRECISION=dot_precision(hidden.dtype), W_TMA=w_tma,
        PIECES=launch_pieces("jsd", flags, cfg.BV), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return sums
