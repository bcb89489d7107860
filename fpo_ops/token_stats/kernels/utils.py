"""Device functions shared by the token-statistics kernels: the logit tile and its transforms."""
import contextlib
import functools
import os
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .interpreter_compat import ensure_interpreter_scalars


def interpreted() -> bool:
    """True when kernels run through the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if interpreted():
    ensure_interpreter_scalars()


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    # The interpreter multiplies the raw uint16 storage of bf16 operands in tl.dot; fp32 operands
    # give the same products (bf16 x bf16 is exact in fp32) and the same fp32 accumulation.
    return interpreted() and dtype == torch.bfloat16


# The interpreter converts fp32 to bf16 by truncating the mantissa (Triton 3.x's `cast_impl`
# ignores the rounding mode), where compiled kernels round to nearest even (cvt.rn.bf16.f32), as
# PyTorch does. Truncation errs toward zero on every element, up to a whole ulp, so a bf16 dz tile
# biased that way makes dweight and dhidden sums of errors of one sign (3-4x plain PyTorch's error
# where a softcap bites); `round_for_store` rounds by hand there.
ROUND_BF16_BY_HAND = tl.constexpr(interpreted())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow PyTorch's TF32 switch, so fp32 results are comparable to plain PyTorch."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def triton_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32,
            torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # a [M, K], b [K, L], acc [M, L]
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def round_for_store(x, ptr):
    # x (ACC) -> the element type of ptr, rounded to nearest even as compiled code rounds
    if ROUND_BF16_BY_HAND and x.dtype == tl.float32 and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # add half an ulp of bf16 (less 1 where the kept bit is even: ties go to even) and keep the
        # high 16 bits, which are the bf16 (the interpreter's conversion also mangles subnormals)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # a NaN's payload could carry into the sign bit: its own high bits, quiet bit set
        rounded = tl.where(x == x, rounded, (bits >> 16) | 0x40)
        y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(ptr.dtype.element_ty)
    return y


@triton.jit
def stable_tanh(x):
    # exp of a non-positive argument never overflows, at +-1e4 as at 0
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


def weight_tma_ok(weight: torch.Tensor) -> bool:
    """Whether a TMA descriptor may carry ``weight`` [rows, K] to a kernel: Hopper or later (or the
    interpreter), a contiguous last dimension, a 16-byte aligned base and row stride."""
    if weight.device.type == "cuda":
        if torch.cuda.get_device_capability(weight.device)[0] < 9:
            return False
    elif weight.device.type != "meta" and not interpreted():  # meta: builds read without a GPU
        return False
    size = weight.element_size()
    return (weight.dim() == 2 and weight.stride(1) == 1 and (weight.stride(0) * size) % 16 == 0
            and weight.data_ptr() % 16 == 0)


def weight_operands(cfg: "TileConfig", *weights: torch.Tensor):
    """(the heads' weights as a launch passes them, W_TMA): host tensor descriptors of [BV,
    BH_reduce] blocks when ``cfg.weight_tma`` asks for them and every weight allows one
    (`weight_tma_ok`), else the tensors themselves. One flag for all: a kernel takes either kind."""
    # a TMA box spans at most 256 elements per dimension
    if not (cfg.weight_tma and cfg.BV <= 256 and cfg.BH_reduce <= 256 and all(weight_tma_ok(w) for w in weights)):
        return weights, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor.from_tensor(w, block_shape=[cfg.BV, cfg.BH_reduce]) for w in weights), True


@triton.jit
def head_gemm(h_ptr, w_ptr, rows, cols, row_mask, col_mask, K, stride_h, stride_w, ACC: tl.constexpr,
              BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, W_TMA: tl.constexpr):
    # rows [BN] int64 token rows, cols [BV] int64 weight rows (contiguous) -> h W^T [BN, BV]. With
    # W_TMA, w_ptr is a tensor descriptor of the weight ([rows, K], block [BV, BH]): the tile comes
    # by TMA, zero beyond its rows and K; columns past the caller's slice are its masks' to drop.
    acc = tl.zeros([BN, BV], dtype=ACC)
    if W_TMA:
        first_col = tl.min(cols, 0).to(tl.int32)
    for k0 in range(0, K, BH):
        ks = k0 + tl.arange(0, BH)
        k_mask = ks < K
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if W_TMA:
            w = w_ptr.load([first_col, k0])
        else:
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = dot_acc(h, tl.trans(w), acc, UPCAST, PRECISION)
    return acc


@triton.jit
def head_transform(acc, b_ptr, cols, col_mask, logit_scale, softcap, temperature,
                   HAS_BIAS: tl.constexpr, CAPPED: tl.constexpr, ACC: tl.constexpr):
    # h W^T [BN, X] of the columns cols [X] -> the logits: + bias, * scale, the softcap, / T
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    acc = acc * logit_scale
    if CAPPED:
        acc = softcap * stable_tanh(acc / softcap)
    return acc / temperature


@triton.jit
def logit_piece(acc, i: tl.constexpr, PIECES: tl.constexpr, b_ptr, v0, n_in, logit_scale, softcap, temperature,
                HAS_BIAS: tl.constexpr, CAPPED: tl.constexpr, ACC: tl.constexpr,
                BN: tl.constexpr, BV: tl.constexpr):
    # piece i (`column_piece`) of the logit tile whose `head_gemm` is acc and first column v0, its
    # n_in columns in the slice: (the logits [BN, BV // PIECES], their int32 lanes, in-slice mask)
    lanes = piece_lanes(i, PIECES, BV)
    in_piece = lanes < n_in
    z = head_transform(column_piece(acc, i, PIECES, BN, BV), b_ptr, v0 + lanes, in_piece, logit_scale, softcap,
                       temperature, HAS_BIAS, CAPPED, ACC)
    return z, lanes, in_piece


@triton.jit
def preactivation_grad(dz, z, logit_scale, softcap, temperature, CAPPED: tl.constexpr):
    # d/dz -> d/d(h W^T + b) through /T, the cap and the scale; tanh(u / c) is z T / c.
    # Scalars only ever meet tensors: scalar-scalar arithmetic would round to fp32.
    dz = dz * logit_scale / temperature
    if CAPPED:
        t = z * temperature / softcap
        dz = dz * (1.0 - t * t)
    return dz


# An epilogue with many elementwise ops (the JSD pass's log-mixture, the backward's gradient terms)
# runs on column pieces of the logit tiles, one after another. Triton lowers a tile's elementwise
# ops op by op, so a whole [128, 128] tile's temporaries sit beside the two accumulators (policy and
# reference) and spilled at 255 registers; a piece holds 1 / PIECES of them. The pieces are views of
# the registers: a thread of a wgmma (or mma) accumulator holds its columns in pairs (c, c + 1)
# repeated every 8 columns, so taking the even or odd columns and then halves by the top bits moves
# no data (the compile check shows no added shared-memory access).
# Measured at [128, 128] in bf16 (`kernel_compile_check.py bf16 --widest`): the JSD pass takes 4
# pieces, the backward 8, the forward 8 or 1 by its statistics (`launch_pieces`). The forward folds
# each piece as an online-softmax step of its own, but takes the reference's maximum over the whole
# tile before its divergences' sums (token_stats_fwd.py).
EPILOGUE_PIECES = {"fwd": 8, "jsd": 4, "bwd": 8}
# A piece is at least this many columns wide. The interpreter (16- and 32-wide tiles) pays per op,
# so narrower pieces there only multiply its time; CUDA tiles (64 or 128 wide) never meet the bound.
MIN_PIECE_COLUMNS = 8


@triton.jit
def _half(x, top: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
    # x [BN, W] -> its first (top 0) or last (top 1) W / 2 columns
    lo, hi = tl.split(tl.permute(tl.reshape(x, [BN, 2, W // 2]), (0, 2, 1)))
    if top == 0:
        out = lo
    else:
        out = hi
    return out


@triton.jit
def column_piece(x, i: tl.constexpr, PIECES: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    # x [BN, BV] -> piece i of PIECES (1, 2, 4 or 8) [BN, BV // PIECES]: the even (i even) or odd
    # columns, then halves by the next bits of i
    if PIECES == 1:
        piece = x
    else:
        even, odd = tl.split(tl.reshape(x, [BN, BV // 2, 2]))
        if i % 2 == 0:
            piece = even
        else:
            piece = odd
        if PIECES >= 4:
            piece = _half(piece, (i // 2) % 2, BN, BV // 2)
        if PIECES >= 8:
            piece = _half(piece, (i // 4) % 2, BN, BV // 4)
    return piece


@triton.jit
def piece_lanes(i: tl.constexpr, PIECES: tl.constexpr, BV: tl.constexpr):
    # the int32 offsets in the tile of piece i's columns (`column_piece`)
    if PIECES == 1:
        lanes = tl.arange(0, BV)
    else:
        # a shift, not `2 *`: the compile check counts int32 tensor multiplies (offset products)
        lanes = (tl.arange(0, BV // PIECES) << 1) + i % 2
        if PIECES >= 4:
            lanes += ((i // 2) % 2) * (BV // 2)
        if PIECES >= 8:
            lanes += ((i // 4) % 2) * (BV // 4)
    return lanes


@triton.jit
def log_mixture(logp, logq, log_beta, log1m_beta):
    # log(beta q + (1 - beta) p); log_beta or log1m_beta is -inf at the endpoints
    a = logq + log_beta
    b = logp + log1m_beta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


# Shared memory the pipeline stages of one GEMM may fill: a Hopper block gets 227 KiB, and Triton
# keeps some of it for the epilogue's layout conversions.
STAGE_SHARED_BYTES = 200 << 10


def stages_within_shared(num_stages: int, stage_bytes: int) -> int:
    """Pipeline stages for a GEMM loop whose operand tiles take ``stage_bytes`` per stage: at most
    ``num_stages``, as many as `STAGE_SHARED_BYTES` holds (at least 1). The gradient GEMMs' wide
    BH_grad tiles hold fewer stages than the logit GEMMs' narrow BH_reduce steps."""
    return max(1, min(num_stages, STAGE_SHARED_BYTES // max(1, stage_bytes)))


def gradient_gemm_launch(cfg: "TileConfig", rows: int, stage_bytes: int, element_size: int):
    """(num_warps, num_stages) of a gradient GEMM (dh or dw) whose program computes a [rows, BH_grad]
    tile, with ``stage_bytes`` of operand tiles per pipeline stage.

    Triton gives each warpgroup (4 warps) 64 rows of an output tile and splits the rest between
    warpgroups along its columns: at 64 rows and 8 warps each would issue 64x64 wgmma. So a 16-bit
    tile gets at most one warpgroup per 64x128 block of it, and the programs per SM that frees
    (``num_warps`` over its warps) share shared memory for their stages, so an SM still runs
    ``num_warps`` warps.
    """
    warps = cfg.num_warps
    if element_size == 2:
        warps = min(warps, 4 * max(1, (rows // 64) * (cfg.BH_grad // 128)))
    programs = max(1, cfg.num_warps // warps)
    return warps, stages_within_shared(cfg.num_stages, programs * stage_bytes)


# The forward's last wave of programs is at least this full (when a split count allows it).
MIN_LAST_WAVE = 0.75


def last_wave_fill(programs: int, slots: int) -> float:
    """Fraction of ``slots`` (programs resident at once on the device) that the last wave uses."""
    rest = programs % slots
    return 1.0 if rest == 0 else rest / slots


@functools.lru_cache(maxsize=4096)
def split_blocks(vocab_blocks: int, token_blocks: int, slots: int, min_splits: int) -> int:
    """Vocabulary blocks per split, for ``token_blocks`` x splits programs on ``slots`` resident ones.

    The wanted split count is the least that fills one wave (at least ``min_splits``). The split
    counts possible are ``cdiv(vocab_blocks, b)`` for b blocks per split, so no split is empty; from
    the wanted one up to 16 times it, the first whose last wave is at least `MIN_LAST_WAVE` full wins
    (on 132 SMs this holds for every N from 256 to 65536 at Llama-3, Qwen2.5 and Gemma-2 vocabularies,
    a test), else the one with the fewest idle slots in its last wave.

    Args:
        vocab_blocks: BV-wide blocks of the vocabulary; token_blocks: BN-token blocks.
        slots: programs resident at once (programs per SM x SMs).
        min_splits: least split count.

    Returns:
        Blocks per split (>= 1).
    """
    wanted = min(vocab_blocks, max(min_splits, -(-slots // token_blocks)))
    best, best_idle = None, None
    per_split = -(-vocab_blocks // wanted)
    while per_split >= 1:
        splits = -(-vocab_blocks // per_split)
        if splits > 16 * wanted:
            break
        programs = splits * token_blocks
        if last_wave_fill(programs, slots) >= MIN_LAST_WAVE:
            return per_split
        idle = -programs % slots
        if best_idle is None or idle < best_idle:
            best, best_idle = per_split, idle
        # the next larger split count
        per_split = min(per_split - 1, -(-vocab_blocks // (splits + 1)) if splits < vocab_blocks else 0)
    return best if best is not None else 1


# Launch shapes from the widest down: a `TileConfig`'s own fields ("wide") and, per its ``levels``,
# lighter ones with fewer accumulator registers per thread ("narrow", "narrowest").
TILE_LEVELS = ("wide", "narrow", "narrowest")
# The fields a level (`TileConfig.levels`) may replace.
_LAUNCH_FIELDS = ("BN", "BV", "BH_reduce", "BH_grad", "num_warps", "num_stages")


class TileConfig:
    """Block sizes and launch shape of the token-statistics kernels.

    BN tokens x BV vocabulary columns per logit tile, reduced over the hidden size in BH_reduce
    steps; the gradient GEMMs write BH_grad-wide slices of dhidden/dweight. The backward pass
    handles the vocabulary in chunks of ``vocab_chunk`` columns, whose logit gradient [N, chunk]
    is the only buffer that grows with N beyond a few floats per token.

    ``levels`` {level: fields to replace} gives the lighter shapes (`TILE_LEVELS`) that launches
    keeping more live than these tiles leave registers for take (`launch_tiles`); None: every launch
    uses these. ``weight_tma``: the logit kernels read weight tiles through TMA descriptors where the
    weights allow (`weight_operands`); off by default until a GPU run measures it.
    """

    def __init__(self, BN: int, BV: int, BH_reduce: int, BH_grad: int, num_warps: int,
                 num_stages: int, target_programs: int, min_splits: int, dz_buffer_bytes: int,
                 min_vocab_chunk: int, levels: Optional[Dict[str, dict]] = None, weight_tma: bool = False):
        for name, block in (("BN", BN), ("BV", BV), ("BH_reduce", BH_reduce), ("BH_grad", BH_grad)):
            # tl.dot needs every dimension >= 16
            if block < 16 or block & (block - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {block}")
        for level, fields in (levels or {}).items():
            if level not in TILE_LEVELS[1:]:
                raise ValueError(f"levels: expected keys among {TILE_LEVELS[1:]}, got {level!r}")
            unknown = sorted(set(fields) - set(_LAUNCH_FIELDS))
            if unknown:
                raise ValueError(f"levels[{level!r}]: expected overrides of {_LAUNCH_FIELDS}, got {unknown}")
        self.BN, self.BV, self.BH_reduce, self.BH_grad = BN, BV, BH_reduce, BH_grad
        self.num_warps, self.num_stages = num_warps, num_stages
        self.target_programs = target_programs
        self.min_splits = min_splits
        self.dz_buffer_bytes = dz_buffer_bytes
        self.min_vocab_chunk = min_vocab_chunk
        self.levels = None if levels is None else {k: dict(v) for k, v in levels.items()}
        self.weight_tma = bool(weight_tma)

    def as_kwargs(self) -> dict:
        """The constructor's arguments, so a tuned shape can be written back into `tile_config`."""
        kwargs = dict(BN=self.BN, BV=self.BV, BH_reduce=self.BH_reduce, BH_grad=self.BH_grad,
                      num_warps=self.num_warps, num_stages=self.num_stages,
                      target_programs=self.target_programs, min_splits=self.min_splits,
                      dz_buffer_bytes=self.dz_buffer_bytes, min_vocab_chunk=self.min_vocab_chunk)
        if self.levels is not None:
            kwargs["levels"] = {k: dict(v) for k, v in self.levels.items()}
        if self.weight_tma:
            kwargs["weight_tma"] = True
        return kwargs

    def at(self, level: str) -> "TileConfig":
        """This shape with ``levels[level]``'s fields (itself at "wide" or where ``levels`` lacks it).

        Args:
            level: one of `TILE_LEVELS`.

        Returns:
            A TileConfig without levels of its own (or this one).
        """
        if level not in TILE_LEVELS:
            raise ValueError(f"level: expected one of {TILE_LEVELS}, got {level!r}")
        if not self.levels or level not in self.levels:
            return self
        kwargs = self.as_kwargs()
        del kwargs["levels"]
        return TileConfig(**{**kwargs, **self.levels[level]})

    def __eq__(self, other) -> bool:
        return isinstance(other, TileConfig) and self.as_kwargs() == other.as_kwargs()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return "TileConfig(" + ", ".join(f"{k}={v}" for k, v in self.as_kwargs().items()) + ")"

    def vocab_splits(self, n_tokens: int, vocab: int):
        """(splits, columns per split) of the forward: enough programs to fill the device, in full waves.

        At least ``min_splits``: the programs running at one time then cover few token blocks
        (whose hidden states stay in L2 for their whole walk) and several weight tiles. Of the
        split counts from there up, the first whose launch (splits x token blocks programs, in
        waves of ``target_programs``) ends in a wave at least `MIN_LAST_WAVE` full; see
        `split_count`.
        """
        vocab_blocks = triton.cdiv(vocab, self.BV)
        token_blocks = max(1, triton.cdiv(n_tokens, self.BN))
        blocks_per_split = split_blocks(vocab_blocks, token_blocks, self.target_programs, self.min_splits)
        return triton.cdiv(vocab_blocks, blocks_per_split), blocks_per_split * self.BV

    def vocab_chunk(self, n_tokens: int, vocab: int, element_size: int) -> int:
        """Columns of the backward's logit-gradient buffer, a multiple of BV."""
        fit = self.dz_buffer_bytes // max(1, n_tokens * element_size)
        chunk = max(self.min_vocab_chunk, fit // self.BV * self.BV)
        return min(chunk, triton.cdiv(vocab, self.BV) * self.BV)


# Forward programs resident per SM at the CUDA launch shape. tests/support/kernel_compile_check.py reports
# 255 registers per thread for the forward (and the logit-gradient) kernel at 8 warps: 65280 of an
# SM's 65536 registers, so one program per SM; the compile test checks the two agree.
PROGRAMS_PER_SM = 1
# Registers and shared memory of one Hopper SM (H100, H200), for that occupancy check.
SM_REGISTERS = 65536
SM_SHARED_BYTES = 233472


def resident_programs(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Programs of one kernel that fit on a Hopper SM at once (register- and shared-memory-bound).

    Args:
        registers: registers per thread (as the compiler reports them).
        shared_bytes: shared memory per program.
        num_warps: warps per program.

    Returns:
        The count (0 if one program does not fit).
    """
    # registers are allocated per warp in units of 256 (8 per thread)
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = SM_REGISTERS // (per_warp * num_warps)
    by_shared = SM_SHARED_BYTES // max(1, shared_bytes)
    return min(by_registers, by_shared, 64 // num_warps)


# The 16-bit CUDA launch shape: [128, 128] logit tiles over 8 warps, so each of the two warpgroups
# issues wgmma.64x128x16 (tests/support/kernel_compile_check.py reads the shape from the SASS; the
# previous [64, 128] tiles gave 64x64, which needs more shared-memory bandwidth per multiply-add than
# an SM has), reduced over the hidden size in 32-wide steps through 4 stages: the same 64 KiB of
# operand buffers per program as 64-wide steps through 2, one stage deeper, and fewer registers for
# each stage's addresses (at 64-wide steps through 3 stages DPO's forward spills 16 B, bias and
# softcap 16 B, and the JSD backward did not fit [128, 128]). The gradient GEMMs' wider BH_grad
# tiles take the stages shared memory holds (`stages_within_shared`: 3). Every measured launch takes
# these tiles (`VARIANT_TILES`, its heavy epilogues in column pieces).
# Not yet timed on a GPU: scripts/gpu_check.sh's sweep times it beside `PREVIOUS_16BIT_TILES`
# ([64, 128] for every launch) and `FIRST_WIDE_16BIT_STEPS` (64-wide steps, 3 stages) and prints the
# fastest.
HOPPER_16BIT_TILES = dict(BN=128, BV=128, BH_reduce=32, BH_grad=128, num_warps=8, num_stages=4)
PREVIOUS_16BIT_TILES = dict(BN=64, BV=128, BH_reduce=64, BH_grad=128, num_warps=8, num_stages=3)
FIRST_WIDE_16BIT_STEPS = dict(BH_reduce=64, num_stages=3)
# Lighter shapes, for flag sets no variant measured and for launch shapes that name them: a [64, 128]
# tile over 8 warps holds half the accumulator registers per thread of a [128, 128] one; [64, 64]
# (wgmma 64x32) with 2 stages.
HOPPER_16BIT_LEVELS = {"narrow": dict(BN=64), "narrowest": dict(BN=64, BV=64, num_stages=2)}

# Per pass, (flag set, level) from the widest level down: a launch takes the first level whose flag
# set holds every constexpr branch flag it sets (as the launchers pass them), else "narrowest". Each
# set is a variant measured with `python tests/support/kernel_compile_check.py bf16 --widest`
# (cuda:90, 8 warps; benchmarks/results/hopper-compile-bf16-widest.md) to compile at that level
# with no local memory access in a GEMM's K loop and at most a few per vocabulary tile. With the
# epilogues on column pieces (`column_piece`) every variant does so at [128, 128] (registers / spill
# bytes / local accesses per tile):
# - forward: dpo 201/0; with bias and softcap 255/16 B/0 (once per program); SFT's token accuracy
#   202/0; tdpo 255/48 B/2; every statistic with bias and softcap 255/64 B/4 (268 before the
#   pieces); gradient filtering's statistics 255/96 B/8 (178 before).
# - JSD pass: 255/0; with bias and softcap 255/16 B/0 (34 and 205 per tile before).
# - backward logit-gradient kernel (one tile per program): every gradient with bias and softcap
#   255/0 (1844 B before); gradient filtering 248/0 (5920 B before); dpo 117/0.
# The narrower levels (`HOPPER_16BIT_LEVELS`) stay for launch shapes that name them (the GPU sweep's
# candidates) and for flag sets no variant measured.
#   The backward's dh/dw GEMMs take the same tile shape (they read its dz buffer, dbias parts and
#   skip flags by its token blocks), with warps and stages of their own (`gradient_gemm_launch`).
_REF = frozenset({"HAS_REF", "HAS_REF_BIAS", "REF_CAPPED"})
_POLICY = frozenset({"HAS_BIAS", "CAPPED"})
_EVERY_FWD = _REF | _POLICY | {"WANT_ENT", "WANT_S2", "WANT_SUM_Z", "WANT_M_PRE", "WANT_ARGMAX", "WANT_RKL", "WANT_KL"}
VARIANT_TILES = {
    "fwd": ((_EVERY_FWD, "wide"),),
    "jsd": ((_REF | _POLICY, "wide"),),
    "bwd": ((_REF | _POLICY | {"G_LOGP", "G_LSE", "G_ENT", "G_KL", "G_RKL", "G_JSD", "WANT_DB", "FILTER"}, "wide"),),
}
# The forward launches that fold each tile whole (one piece): at [128, 128] these build with fewer
# instructions and no more spills than in pieces (dpo 3456 instructions whole, 4128 in 8 pieces);
# the others fold `EPILOGUE_PIECES["fwd"]`.
WHOLE_TILE_FOLDS = (_REF | _POLICY, frozenset({"WANT_M_PRE", "WANT_ARGMAX"}), frozenset({"HAS_REF", "WANT_KL"}))


def _flags_on(flags: dict) -> set:
    return {name for name, value in flags.items() if value}


def launch_pieces(kernel: str, flags: dict, BV: int) -> int:
    """The column pieces (`column_piece`) a launch of ``kernel`` ("fwd", "jsd" or "bwd") with
    constexpr ``flags`` and ``BV``-wide tiles takes its epilogue in: its pass's `EPILOGUE_PIECES`
    (1 for the forward flag sets of `WHOLE_TILE_FOLDS`), at most as many as leave each piece
    `MIN_PIECE_COLUMNS` wide."""
    if kernel not in EPILOGUE_PIECES:
        raise ValueError(f"kernel: expected one of {tuple(EPILOGUE_PIECES)}, got {kernel!r}")
    pieces = EPILOGUE_PIECES[kernel]
    if kernel == "fwd" and any(_flags_on(flags) <= fits for fits in WHOLE_TILE_FOLDS):
        pieces = 1
    return max(1, min(pieces, BV // MIN_PIECE_COLUMNS))


PASSES = tuple(VARIANT_TILES)


def launch_level(kernel: str, flags: dict) -> str:
    """The `TILE_LEVELS` entry of a launch of ``kernel`` ("fwd", "jsd" or "bwd") with constexpr
    ``flags`` {name: bool} (see `VARIANT_TILES`)."""
    if kernel not in VARIANT_TILES:
        raise ValueError(f"kernel: expected one of {PASSES}, got {kernel!r}")
    return next((level for fits, level in VARIANT_TILES[kernel] if _flags_on(flags) <= fits), "narrowest")


def launch_tiles(cfg: TileConfig, kernel: str, flags: dict) -> TileConfig:
    """The launch shape of one launch: ``cfg`` at the level `launch_level` gives it.

    Args:
        cfg: the device's shape (`tile_config`, or an override).
        kernel: "fwd" (partials pass), "jsd" (JSD pass) or "bwd" (the whole backward of one call).
        flags: {constexpr branch flag: bool} of the launch, as passed to the kernel.

    Returns:
        A TileConfig.
    """
    return cfg.at(launch_level(kernel, flags))


# Set only inside `override_tile_config` (the benchmark's tile-shape sweep).
_OVERRIDE: Optional[TileConfig] = None


@contextlib.contextmanager
def override_tile_config(cfg: TileConfig):
    """Within the block every launch uses ``cfg`` instead of `tile_config`'s choice.

    For timing candidate launch shapes through the public ``token_stats`` path; not thread-safe.
    """
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, cfg
    try:
        yield cfg
    finally:
        _OVERRIDE = previous


def tile_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Heuristic launch shape; the CUDA values are chosen for H100-class GPUs (not autotuned).

    Forward, per wave of `PROGRAMS_PER_SM` (1) program per SM and BN=BV=128: with S splits
    running together the hidden states of SMs/S token blocks stay in L2 while S weight tiles stream
    per step, which balances at S ~ sqrt(SMs*BN/BV) ~ 11 on an H100 or H200 (132 SMs); at least 8
    splits, more where the last wave would be under 3/4 full (`split_blocks`).
    Wider dtypes get narrower hidden blocks and fewer stages to stay within shared memory.
    """
    if _OVERRIDE is not None:
        return _OVERRIDE
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        common = dict(target_programs=PROGRAMS_PER_SM * sms, min_splits=8, dz_buffer_bytes=128 << 20,
                      min_vocab_chunk=1024)
        if dtype in (torch.bfloat16, torch.float16):
            return TileConfig(**{**common, **HOPPER_16BIT_TILES}, levels=HOPPER_16BIT_LEVELS)
        if dtype == torch.float32:
            return TileConfig(BN=64, BV=128, BH_reduce=32, BH_grad=64, num_warps=8, num_stages=2,
                              **common)
        return TileConfig(BN=32, BV=64, BH_reduce=16, BH_grad=32, num_warps=4, num_stages=1, **common)
    # interpreter: the smallest legal tiles keep CPU runs short and still exercise vocabulary
    # splits and several backward chunks at test sizes
    return TileConfig(BN=16, BV=16, BH_reduce=16, BH_grad=16, num_warps=1, num_stages=1,
                      target_programs=4, min_splits=1, dz_buffer_bytes=1 << 10, min_vocab_chunk=32)
