"""Backward kernels of `token_stats`, run per vocabulary chunk of C columns.

1. `token_stats_bwd_kernel` recomputes the policy (and reference) logit tiles and writes the
   gradient with respect to the pre-activations, dz [n_valid, C], in the GEMM dtype; also the
   per-token-block column sums of dz in fp32 (for dbias) and, with gradient filtering, a flag per
   tile whose p and q are all negligible.
2. `token_stats_bwd_dh_kernel`: dhidden[N, H] (fp32) += dz @ W[chunk]; each program owns a
   [BN, BH] slice of dhidden and reduces over the chunk's columns in registers.
3. `token_stats_bwd_dw_kernel`: dweight[chunk] = dz^T @ hidden; each program owns a [BV, BH] block
   of dweight and loops over every token, so dweight is summed in fp32 in registers and rounded
   once, with no [V, H] fp32 buffer.
With gradient filtering, 2 and 3 walk lists of the unfiltered blocks (built from the flags on the
device), so the filtered tiles cost neither loads nor MMAs. No atomics anywhere: results are
bitwise reproducible.
"""
import math

import torch
import triton
import triton.language as tl

from .rows import (
    ENTROPY_ROW, G_ENT_ROW, G_JSD_ROW, G_KL_ROW, G_LOGP_ROW, G_LSE_ROW, G_RKL_ROW, KL_P_M_ROW, LSE_REF_ROW,
    LSE_ROW, REVERSE_KL_ROW,
)
from .utils import (
    dot_acc, dot_precision, gradient_gemm_launch, head_gemm, launch_pieces, log_mixture, logit_piece,
    preactivation_grad, round_for_store, triton_dtype, upcast_dot_operands, weight_operands,
)


@triton.jit
def _token_block_and_slice(n_valid_ptr, N, X, BN: tl.constexpr, BX: tl.constexpr):
    # program (pid_x, pid_n) -> block pid_x of X (vocabulary columns or hidden units): xs [BX],
    # x_mask [BX]; token block pid_n: idx [BN] positions in order, n_valid, in_range [BN],
    # row_mask [BN] (tokens with a gradient); program ids are int64
    pid_x = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    idx = pid_n * BN + tl.arange(0, BN)
    xs = pid_x * BX + tl.arange(0, BX)
    x_mask = xs < X
    n_valid = tl.load(n_valid_ptr)
    in_range = idx < N
    row_mask = idx < n_valid
    return pid_x, pid_n, idx, xs, x_mask, n_valid, in_range, row_mask


@triton.jit
def token_stats_bwd_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, labels_ptr, order_ptr, n_valid_ptr,
    coef_ptr, saved_ptr, dz_ptr, db_part_ptr, skip_ptr,
    N, H, HR, C, label_offset,
    stride_h, stride_w, stride_rh, stride_rw, stride_coef, stride_saved, stride_dz,
    stride_db_part, stride_skip,
    logit_scale, softcap, ref_logit_scale, ref_softcap, temperature, jsd_beta, log_beta, log1m_beta,
    filter_eps,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, CAPPED: tl.constexpr, REF_CAPPED: tl.constexpr,
    G_LOGP: tl.constexpr, G_LSE: tl.constexpr, G_ENT: tl.constexpr, G_KL: tl.constexpr,
    G_RKL: tl.constexpr, G_JSD: tl.constexpr, WANT_DB: tl.constexpr, FILTER: tl.constexpr,
    ACC: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, W_TMA: tl.constexpr, PIECES: tl.constexpr,
):
    # w [C, H] and rw [C, HR] are the chunk's rows (tensor descriptors with W_TMA); coef [GRAD_KEYS, N], saved [SAVED_KEYS, N]
    # dz [N, C] indexed by position in order; db_part [N / BN, C]; skip [N / BN, C / BV]
    # vocabulary blocks vary fastest: programs running together share hidden rows in L2
    pid_v, pid_n, idx, cols, col_mask, n_valid, _, row_mask = _token_block_and_slice(
        n_valid_ptr, N, C, BN, BV)
    if pid_n * BN < n_valid:
        rows = tl.load(order_ptr + idx, mask=row_mask, other=0)
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1) - label_offset
        lse = tl.load(saved_ptr + LSE_ROW * stride_saved + rows, mask=row_mask, other=0.0)
        # the GEMMs' accumulators; the logits (bias, scale, softcap, temperature) and every term are
        # formed on column pieces of them (`logit_piece`), after the reference GEMM
        acc = head_gemm(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, ACC, BN, BV, BH,
                        UPCAST, PRECISION, W_TMA)
        if G_KL or G_RKL or G_JSD:
            lse_ref = tl.load(saved_ptr + LSE_REF_ROW * stride_saved + rows, mask=row_mask, other=0.0)
            acc_ref = head_gemm(rh_ptr, rw_ptr, rows, cols, row_mask, col_mask, HR, stride_rh, stride_rw, ACC,
                                BN, BV, BH, UPCAST, PRECISION, W_TMA)
        # on the tile's layout columns are int32 offsets in the tile: an int64 column per element
        # there costs two registers each
        v0 = pid_v * BV
        n_in = (C - v0).to(tl.int32)
        label_in_tile = (labels - v0).to(tl.int32)
        if FILTER:
            # The label column carries the one-hot term, which is never negligible. The tile's dz is
            # stored whatever the flag says: the dh and dw GEMMs skip flagged tiles, the host drops
            # their dbias parts.
            has_label = row_mask & (label_in_tile >= 0) & (label_in_tile < tl.minimum(n_in, BV))
            negligible = tl.sum(has_label.to(tl.int32)) == 0
        if G_LOGP:
            g_logp = tl.load(coef_ptr + G_LOGP_ROW * stride_coef + rows, mask=row_mask, other=0.0)
        if G_LSE:
            g_lse = tl.load(coef_ptr + G_LSE_ROW * stride_coef + rows, mask=row_mask, other=0.0)
        if G_ENT:
            g_ent = tl.load(coef_ptr + G_ENT_ROW * stride_coef + rows, mask=row_mask, other=0.0)
            entropy = tl.load(saved_ptr + ENTROPY_ROW * stride_saved + rows, mask=row_mask, other=0.0)
        if G_KL:
            g_kl = tl.load(coef_ptr + G_KL_ROW * stride_coef + rows, mask=row_mask, other=0.0)
        if G_RKL:
            g_rkl = tl.load(coef_ptr + G_RKL_ROW * stride_coef + rows, mask=row_mask, other=0.0)
            rkl = tl.load(saved_ptr + REVERSE_KL_ROW * stride_saved + rows, mask=row_mask, other=0.0)
        if G_JSD:
            g_jsd = tl.load(coef_ptr + G_JSD_ROW * stride_coef + rows, mask=row_mask, other=0.0)
            g_jsd = g_jsd - g_jsd * jsd_beta
            kl_p_m = tl.load(saved_ptr + KL_P_M_ROW * stride_saved + rows, mask=row_mask, other=0.0)
        dz_rows = dz_ptr + idx * stride_dz + v0
        # each piece's dz is stored as it is done
        for i in tl.static_range(PIECES):
            z, lanes, in_piece = logit_piece(acc, i, PIECES, b_ptr, v0, n_in, logit_scale, softcap, temperature,
                                             HAS_BIAS, CAPPED, ACC, BN, BV)
            tile = row_mask[:, None] & in_piece[None, :]
            logp = z - lse[:, None]
            p = tl.exp(logp)
            if FILTER:
                negligible = negligible & (tl.max(tl.where(tile, p, 0.0)) < filter_eps)
            dz = tl.zeros([BN, BV // PIECES], dtype=ACC)
            if G_LOGP:
                is_label = (lanes[None, :] == label_in_tile[:, None]) & tile
                dz += tl.where(is_label, g_logp[:, None], 0.0) - g_logp[:, None] * p
            if G_LSE:
                dz += g_lse[:, None] * p
            if G_ENT:
                dz -= g_ent[:, None] * p * (logp + entropy[:, None])
            if G_KL or G_RKL or G_JSD:
                # the same lanes and mask as the policy's piece
                zr, lanes, in_piece = logit_piece(acc_ref, i, PIECES, rb_ptr, v0, n_in, ref_logit_scale,
                                                  ref_softcap, temperature, HAS_REF_BIAS, REF_CAPPED, ACC, BN, BV)
                logq = zr - lse_ref[:, None]
                if FILTER:
                    negligible = negligible & (tl.max(tl.where(tile, tl.exp(logq), 0.0)) < filter_eps)
            if G_KL:
                dz += g_kl[:, None] * p - g_kl[:, None] * tl.exp(logq)
            if G_RKL:
                dz += g_rkl[:, None] * p * (logp - logq - rkl[:, None])
            if G_JSD:
                logm = log_mixture(logp, logq, log_beta, log1m_beta)
                dz += g_jsd[:, None] * p * (logp - logm - kl_p_m[:, None])
            dz = preactivation_grad(dz, z, logit_scale, softcap, temperature, CAPPED)
            dz = tl.where(tile, dz, 0.0)
            tl.store(dz_rows[:, None] + lanes[None, :], round_for_store(dz, dz_ptr), mask=tile)
            if WANT_DB:
                tl.store(db_part_ptr + pid_n * stride_db_part + v0 + lanes, tl.sum(dz, 0), mask=in_piece)
        if FILTER:
            tl.store(skip_ptr + pid_n * stride_skip + pid_v, negligible.to(tl.int8))
    else:
        if WANT_DB:
            tl.store(db_part_ptr + pid_n * stride_db_part + cols, tl.zeros([BV], dtype=ACC), mask=col_mask)
        if FILTER:  # a block of ignored tokens has nothing to multiply
            tl.store(skip_ptr + pid_n * stride_skip + pid_v, tl.full([], 1, dtype=tl.int8))


@triton.jit
def _dh_step(dz_ptr, w_ptr, acc, idx, row_mask, hs, h_mask, v0, C, stride_dz, stride_w,
             BV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # acc [BN, BH] += dz[idx, v0:v0+BV] @ w[v0:v0+BV, hs]
    # int64 before `cols * stride_w`: the loop's v0 is int32, and chunk x H can pass 2^31
    cols = v0 + tl.arange(0, BV).to(tl.int64)
    col_mask = cols < C
    dz = tl.load(dz_ptr + idx[:, None] * stride_dz + cols[None, :],
                 mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    w = tl.load(w_ptr + cols[:, None] * stride_w + hs[None, :],
                mask=col_mask[:, None] & h_mask[None, :], other=0.0)
    return dot_acc(dz, w, acc, UPCAST, PRECISION)


@triton.jit
def token_stats_bwd_dh_kernel(
    dz_ptr, w_ptr, dh_ptr, order_ptr, n_valid_ptr, kept_ptr, kept_count_ptr,
    N, H, C, stride_dz, stride_w, stride_dh, stride_kept,
    ACCUMULATE: tl.constexpr, FILTER: tl.constexpr, ACC: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # dz [N, C], w [C, H] -> dh [N, H] (fp32, rows by token)
    # kept [N / BN, C / BV]: per token block, its unfiltered vocabulary blocks first; kept_count [N / BN]
    # hidden blocks vary fastest: programs running together share dz rows in L2
    _, pid_n, idx, hs, h_mask, n_valid, in_range, row_mask = _token_block_and_slice(
        n_valid_ptr, N, H, BN, BH)
    rows = tl.load(order_ptr + idx, mask=in_range, other=0)
    acc = tl.zeros([BN, BH], dtype=ACC)
    if FILTER:
        # a list rather than a branch per block keeps the loop software-pipelined
        for j in range(0, tl.load(kept_count_ptr + pid_n)):
            v0 = tl.load(kept_ptr + pid_n * stride_kept + j).to(tl.int64) * BV
            acc = _dh_step(dz_ptr, w_ptr, acc, idx, row_mask, hs, h_mask, v0, C, stride_dz, stride_w,
                           BV, UPCAST, PRECISION)
    else:
        # ignored tokens get no column: their dhidden stays 0
        c_end = tl.where(pid_n * BN < n_valid, C, 0)
        for v0 in range(0, c_end, BV):
            acc = _dh_step(dz_ptr, w_ptr, acc, idx, row_mask, hs, h_mask, v0, C, stride_dz, stride_w,
                           BV, UPCAST, PRECISION)
    out = dh_ptr + rows[:, None] * stride_dh + hs[None, :]
    if ACCUMULATE:
        # later chunks only add to the tokens that have a gradient
        mask = row_mask[:, None] & h_mask[None, :]
        acc += tl.load(out, mask=mask, other=0.0)
        tl.store(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=in_range[:, None] & h_mask[None, :])


@triton.jit
def _dw_step(dz_ptr, h_ptr, order_ptr, acc, n0, n_valid, cols, col_mask, hs, h_mask, stride_dz,
             stride_h, BN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # acc [BV, BH] += dz[n0:n0+BN, cols]^T @ h[order[n0:n0+BN], hs]
    idx = n0 + tl.arange(0, BN).to(tl.int64)
    row_mask = idx < n_valid
    rows = tl.load(order_ptr + idx, mask=row_mask, other=0)
    dz = tl.load(dz_ptr + idx[:, None] * stride_dz + cols[None, :],
                 mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    h = tl.load(h_ptr + rows[:, None] * stride_h + hs[None, :],
                mask=row_mask[:, None] & h_mask[None, :], other=0.0)
    return dot_acc(tl.trans(dz), h, acc, UPCAST, PRECISION)


@triton.jit
def token_stats_bwd_dw_kernel(
    dz_ptr, h_ptr, dw_ptr, order_ptr, n_valid_ptr, kept_ptr, kept_count_ptr,
    N, H, C, stride_dz, stride_h, stride_dw, stride_kept,
    FILTER: tl.constexpr, ACC: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # dz [N, C], h [N, H] -> dw [C, H]
    # kept [C / BV, N / BN]: per vocabulary block, its unfiltered token blocks first; kept_count [C / BV]
    # vocabulary blocks vary fastest: programs running together share hidden rows in L2
    pid_v = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    cols = pid_v * BV + tl.arange(0, BV)
    col_mask = cols < C
    hs = pid_h * BH + tl.arange(0, BH)
    h_mask = hs < H
    n_valid = tl.load(n_valid_ptr)
    acc = tl.zeros([BV, BH], dtype=ACC)
    if FILTER:
        for j in range(0, tl.load(kept_count_ptr + pid_v)):
            n0 = tl.load(kept_ptr + pid_v * stride_kept + j).to(tl.int64) * BN
            acc = _dw_step(dz_ptr, h_ptr, order_ptr, acc, n0, n_valid, cols, col_mask, hs, h_mask,
                           stride_dz, stride_h, BN, UPCAST, PRECISION)
    else:
        for n0 in range(0, n_valid, BN):
            acc = _dw_step(dz_ptr, h_ptr, order_ptr, acc, n0, n_valid, cols, col_mask, hs, h_mask,
                           stride_dz, stride_h, BN, UPCAST, PRECISION)
    tl.store(dw_ptr + cols[:, None] * stride_dw + hs[None, :], round_for_store(acc, dw_ptr),
             mask=col_mask[:, None] & h_mask[None, :])


def bwd_flags(has_bias: bool, has_ref: bool, has_ref_bias: bool, grad_flags, opts, want_db: bool,
              filtering: bool) -> dict:
    """The constexpr branch flags of `token_stats_bwd_kernel` for one call (``grad_flags``: the
    GRAD_KEYS with an upstream gradient); also what `launch_tiles` picks the backward's shape by."""
    return dict(
        HAS_BIAS=has_bias, HAS_REF_BIAS=has_ref and has_ref_bias,
        CAPPED=opts.softcap is not None, REF_CAPPED=has_ref and opts.ref_softcap is not None,
        G_LOGP="logp" in grad_flags, G_LSE="lse" in grad_flags, G_ENT="entropy" in grad_flags,
        G_KL=has_ref and "kl" in grad_flags, G_RKL=has_ref and "reverse_kl" in grad_flags,
        G_JSD=has_ref and "jsd" in grad_flags, WANT_DB=want_db, FILTER=filtering,
    )


def token_stats_bwd_chunk(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
                          label_offset: int, order, n_valid, coef, saved, grad_flags, opts, cfg,
                          grad_h, grad_w, grad_b, first_chunk: bool, dz, db_part, skip):
    """Gradients of one vocabulary chunk: adds into ``grad_h``, writes ``grad_w``/``grad_b``.

    Args:
        hidden: [N, H]; weight: [C, H] the chunk's rows; bias: [C] or None; ref_*: the same for
            the reference, or None when no requested gradient reads it.
        labels: [N]; ``labels - label_offset`` is the label's row in ``weight``.
        order: [N] int64 token rows, tokens with a gradient first; n_valid: 0-d int32 count.
        coef: [len(GRAD_KEYS), N] upstream gradients in GRAD_KEYS order (0 at ignored tokens);
            saved: [len(SAVED_KEYS), N] forward values in SAVED_KEYS order (`fpo_ops.token_stats.stats`);
            grad_flags: the GRAD_KEYS present.
        grad_h: [N, H] fp32 (fp64) dhidden, written (first chunk) or added to; grad_w: [C, H] or
            None; grad_b: [C] or None.
        dz: [N, >= C] scratch in the GEMM dtype; db_part: [N / BN, >= C] fp32 scratch or None;
            skip: [N / BN, >= C / BV] int8 scratch (gradient filtering) or None.
    """
    n, chunk = hidden.shape[0], weight.shape[0]
    acc = opts.accum_dtype
    upcast, precision = upcast_dot_operands(hidden.dtype), dot_precision(hidden.dtype)
    filtering = skip is not None
    has_ref = ref_hidden is not None
    rh, rw = (ref_hidden, ref_weight) if has_ref else (hidden, weight)
    rb = ref_bias if has_ref and ref_bias is not None else weight
    beta = float(opts.jsd_beta)
    token_blocks = triton.cdiv(n, cfg.BN)
    if token_blocks == 0:  # no token: dweight and dbias are 0, dhidden is empty
        if grad_w is not None:
            grad_w.zero_()
        if grad_b is not None:
            grad_b.zero_()
        return
    flags = bwd_flags(bias is not None, has_ref, ref_bias is not None, grad_flags, opts, db_part is not None, filtering)
    (w_arg, rw_arg), w_tma = weight_operands(cfg, weight, rw)
    token_stats_bwd_kernel[(triton.cdiv(chunk, cfg.BV), token_blocks)](
        hidden, w_arg, weight if bias is None else bias, rh, rw_arg, rb, labels, order, n_valid,
        coef, saved, dz, dz if db_part is None else db_part, dz if skip is None else skip,
        n, hidden.shape[1], rh.shape[1], chunk, label_offset,
        hidden.stride(0), weight.stride(0), rh.stride(0), rw.stride(0), coef.stride(0),
        saved.stride(0), dz.stride(0), 0 if db_part is None else db_part.stride(0),
        0 if skip is None else skip.stride(0),
        float(opts.logit_scale), 1.0 if opts.softcap is None else float(opts.softcap),
        float(opts.ref_logit_scale), 1.0 if opts.ref_softcap is None else float(opts.ref_softcap),
        float(opts.temperature), beta, math.log(beta) if beta > 0.0 else float("-inf"),
        math.log1p(-beta) if beta < 1.0 else float("-inf"), float(opts.grad_filter_eps),
        **flags, ACC=triton_dtype(acc), BN=cfg.BN, BV=cfg.BV, BH=cfg.BH_reduce,
        UPCAST=upcast, PRECISION=precision, W_TMA=w_tma, PIECES=launch_pieces("bwd", flags, cfg.BV),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    kept_v = kept_v_count = kept_n = kept_n_count = dz
    if filtering:
        # unfiltered blocks first (stable sort of the 0/1 flags) and their counts, on the device
        skipped = skip[:, :triton.cdiv(chunk, cfg.BV)]
        # the kernels read the lists with unit stride along a row
        kept_v = torch.argsort(skipped, dim=1, stable=True).contiguous()
        kept_v_count = (skipped == 0).sum(1)
        kept_n = torch.argsort(skipped.T, dim=1, stable=True).contiguous()
        kept_n_count = (skipped == 0).sum(0)
    size = dz.element_size()
    if grad_h is not None:
        warps, stages = gradient_gemm_launch(cfg, cfg.BN, (cfg.BN + cfg.BH_grad) * cfg.BV * size, size)
        token_stats_bwd_dh_kernel[(triton.cdiv(hidden.shape[1], cfg.BH_grad), token_blocks)](
            dz, weight, grad_h, order, n_valid, kept_v, kept_v_count,
            n, hidden.shape[1], chunk, dz.stride(0), weight.stride(0), grad_h.stride(0),
            kept_v.stride(0),
            ACCUMULATE=not first_chunk, FILTER=filtering, ACC=triton_dtype(acc),
            BN=cfg.BN, BV=cfg.BV, BH=cfg.BH_grad, UPCAST=upcast, PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )
    if grad_w is not None:
        warps, stages = gradient_gemm_launch(cfg, cfg.BV, (cfg.BV + cfg.BH_grad) * cfg.BN * size, size)
        token_stats_bwd_dw_kernel[(triton.cdiv(chunk, cfg.BV), triton.cdiv(hidden.shape[1], cfg.BH_grad))](
            dz, hidden, grad_w, order, n_valid, kept_n, kept_n_count,
            n, hidden.shape[1], chunk, dz.stride(0), hidden.stride(0), grad_w.stride(0),
            kept_n.stride(0),
            FILTER=filtering, ACC=triton_dtype(acc), BN=cfg.BN, BV=cfg.BV, BH=cfg.BH_grad,
            UPCAST=upcast, PRECISION=precision, num_warps=warps, num_stages=stages,
        )
    if grad_b is not None:
        parts = db_part[:, :chunk]
        if filtering:
            # a flagged tile's dbias part is dropped as its dh and dw terms are
            dropped = skipped.repeat_interleave(cfg.BV, dim=1)[:, :chunk] != 0
            parts = parts.masked_fill(dropped, 0.0)
        grad_b.copy_(parts.sum(0))
