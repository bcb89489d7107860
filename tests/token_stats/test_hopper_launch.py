"""The CUDA launch shape on a Hopper GPU (132 SMs), checked without one: the forward's waves.

Pure arithmetic on `TileConfig`; the compiled code's properties are checked in
tests/token_stats/test_hopper_compile.py.
"""
import pytest
import torch
import triton

from fpo_ops.token_stats.kernels.token_stats_bwd import bwd_flags
from fpo_ops.token_stats.kernels.token_stats_fwd import fwd_flags, jsd_flags
from fpo_ops.token_stats.kernels.utils import (
    HOPPER_16BIT_TILES, MIN_LAST_WAVE, STAGE_SHARED_BYTES, TileConfig, gradient_gemm_launch,
    last_wave_fill, launch_level, launch_pieces, launch_tiles, split_blocks, stages_within_shared, tile_config,
)
from fpo_ops.token_stats.options import HeadOptions
from fpo_ops.token_stats.stats import REFERENCE_GRADS

HOPPER_SMS = 132
# Llama-3, Qwen2.5 and Gemma-2 vocabularies, and two older ones
VOCABS = (128256, 152064, 256000, 32000, 50257)


class _FakeHopper:
    multi_processor_count = HOPPER_SMS


@pytest.fixture
def hopper_configs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _FakeHopper())
    return {dtype: tile_config(torch.device("cuda"), dtype) for dtype in (torch.bfloat16, torch.float32)}


def test_forward_last_wave_is_three_quarters_full_for_every_n(hopper_configs):
    # the narrower tiles of the launches that take them (`launch_tiles`) too
    bf16 = hopper_configs[torch.bfloat16]
    shapes = {**hopper_configs, "bf16 narrow": bf16.at("narrow"), "bf16 narrowest": bf16.at("narrowest")}
    for dtype, cfg in shapes.items():
        for vocab in VOCABS:
            vocab_blocks = triton.cdiv(vocab, cfg.BV)
            for n in range(256, 65537):
                splits, per_split = cfg.vocab_splits(n, vocab)
                token_blocks = triton.cdiv(n, cfg.BN)
                # every split has columns, and the splits cover the vocabulary
                assert (splits - 1) * per_split < vocab <= splits * per_split, (dtype, vocab, n)
                assert splits >= min(cfg.min_splits, vocab_blocks)
                fill = last_wave_fill(splits * token_blocks, cfg.target_programs)
                assert fill >= MIN_LAST_WAVE, (dtype, vocab, n, splits, fill)


def test_wave_arithmetic():
    assert last_wave_fill(136, 132) == pytest.approx(4 / 132) and last_wave_fill(264, 132) == 1.0
    # N 512 at BN 64: 8 token blocks; 17 splits would be 136 programs (one SM's worth over a wave),
    # 29 splits are 232 programs, a last wave of 100 of 132
    blocks = split_blocks(1002, 8, 132, 8)
    assert triton.cdiv(1002, blocks) == 29 and last_wave_fill(29 * 8, 132) >= MIN_LAST_WAVE
    # one wave already full: nothing added
    assert triton.cdiv(1002, split_blocks(1002, 132, 132, 1)) == 1
    # a vocabulary too small for a full last wave: the fewest idle slots it allows
    assert split_blocks(3, 1, 132, 8) == 1
    with pytest.raises(ValueError, match="BN"):
        TileConfig(BN=8, BV=16, BH_reduce=16, BH_grad=16, num_warps=1, num_stages=1, target_programs=1,
                   min_splits=1, dz_buffer_bytes=1, min_vocab_chunk=16)


def _launches(opts, keys=(), grads=("logp",), has_ref=True, bias=False):
    """{pass: flags} of one call, as the launchers build them."""
    # the backward reads the reference only for a gradient that needs it
    bwd_ref = has_ref and any(g in REFERENCE_GRADS for g in grads)
    return {"fwd": fwd_flags(bias, has_ref, bias, opts, keys), "jsd": jsd_flags(bias, bias, opts),
            "bwd": bwd_flags(bias, bwd_ref, bias, grads, opts, bias, opts.grad_filter_eps > 0.0)}


def test_each_variant_gets_the_tiles_its_compiled_code_fits(hopper_configs):
    """16-bit: [128, 128] tiles for every variant, whose sm_90a build at that shape keeps local
    memory out of the K loops (benchmarks/results/hopper-compile-bf16-after.md); the forward folds
    a tile whole or in 8 pieces by its statistics, the JSD pass in 4, the backward in 8, none
    narrower than 8 columns; a flag set no variant measured takes the
    narrowest shape; wider dtypes have one shape for all."""
    cfg = hopper_configs[torch.bfloat16]
    wide, narrow, narrowest = cfg, cfg.at("narrow"), cfg.at("narrowest")
    assert {k: getattr(wide, k) for k in HOPPER_16BIT_TILES} == HOPPER_16BIT_TILES
    assert {k: getattr(narrow, k) for k in HOPPER_16BIT_TILES} == {**HOPPER_16BIT_TILES, "BN": 64}
    assert (narrowest.BN, narrowest.BV, narrowest.num_stages) == (64, 64, 2) and narrowest.levels is None
    plain = HeadOptions()
    capped = HeadOptions(softcap=30.0, ref_softcap=30.0)
    filtered = HeadOptions(grad_filter_eps=1e-6)
    every_grad = ("logp", "entropy", "kl", "reverse_kl", "jsd")
    expected = [
        # (launches, the forward's pieces)
        (_launches(plain), 1),                                              # dpo
        (_launches(plain, has_ref=False), 1),                               # SFT
        (_launches(plain, has_ref=False, keys=("m_pre", "argmax")), 1),     # SFT, token accuracy
        (_launches(capped, bias=True), 1),                                  # dpo, bias + softcap
        (_launches(plain, keys=("kl",), grads=("logp", "kl")), 1),          # tdpo
        (_launches(plain, grads=("jsd",)), 1),                              # distillation
        (_launches(capped, bias=True, keys=("ent", "rkl", "kl"), grads=every_grad), 8),
        (_launches(filtered, keys=("ent", "s2", "sum_z", "m_pre", "argmax", "rkl", "kl")), 8),
        (_launches(plain, keys=("ent",), grads=("lse",)), 8),
    ]
    for launches, pieces in expected:
        for kernel in ("fwd", "jsd", "bwd"):
            assert launch_tiles(cfg, kernel, launches[kernel]) == wide, (kernel, launches[kernel])
        assert launch_pieces("fwd", launches["fwd"], wide.BV) == pieces, launches["fwd"]
        assert (launch_pieces("jsd", launches["jsd"], wide.BV), launch_pieces("bwd", launches["bwd"], wide.BV)) == (4, 8)
    # a piece is at least 8 columns wide: the narrowest CUDA tiles (64) keep every piece, the
    # interpreter's 16- and 32-wide tiles take 2 and 4
    heavy = _launches(capped, bias=True, keys=("ent", "rkl", "kl"), grads=every_grad)
    assert [launch_pieces("bwd", heavy["bwd"], bv) for bv in (16, 32, 64, 128)] == [2, 4, 8, 8]
    assert [launch_pieces("fwd", heavy["fwd"], bv) for bv in (16, 32, 64)] == [2, 4, 8]
    assert [launch_pieces("jsd", heavy["jsd"], bv) for bv in (16, 32, 64)] == [2, 4, 4]
    with pytest.raises(ValueError, match="kernel: expected one of"):
        launch_pieces("dh", {}, 128)
    assert launch_level("fwd", {"HAS_REF": True, "A_FLAG_NOT_MEASURED": True}) == "narrowest"
    fp32 = hopper_configs[torch.float32]
    assert launch_tiles(fp32, "bwd", _launches(filtered)["bwd"]) is fp32
    with pytest.raises(ValueError, match="kernel: expected one of"):
        launch_level("dw", {})
    with pytest.raises(ValueError, match="level: expected one of"):
        cfg.at("wider")
    with pytest.raises(ValueError, match=r"levels\['narrow'\]: expected overrides of"):
        TileConfig(**{**cfg.as_kwargs(), "levels": {"narrow": dict(BM=64)}})


def test_gradient_gemms_keep_wgmma_64x128_within_shared_memory(hopper_configs):
    """The dh/dw GEMMs' [BV, BH_grad] operand tiles are 4x the logit GEMMs' [BV, BH_reduce] ones: at
    the 16-bit shape they take 3 of its 4 stages (4 would need 256 KiB of a block's 227). At 64-token
    tiles dh runs on one warpgroup (8 warps would split it into two 64x64 halves), with the stages
    two programs per SM can hold."""
    cfg = hopper_configs[torch.bfloat16]
    dh_stage = (cfg.BN + cfg.BH_grad) * cfg.BV * 2
    assert cfg.num_stages == 4 and stages_within_shared(cfg.num_stages, dh_stage) == 3
    assert 3 * dh_stage <= STAGE_SHARED_BYTES < 4 * dh_stage
    assert gradient_gemm_launch(cfg, cfg.BN, dh_stage, 2) == (8, 3)
    narrow = cfg.at("narrow")
    narrow_stage = (narrow.BN + narrow.BH_grad) * narrow.BV * 2
    assert gradient_gemm_launch(narrow, narrow.BN, narrow_stage, 2) == (4, 2)
    assert 2 * 2 * narrow_stage <= STAGE_SHARED_BYTES < 2 * 3 * narrow_stage
    # wider dtypes keep their warps (no 16-bit wgmma to widen)
    fp32 = hopper_configs[torch.float32]
    assert gradient_gemm_launch(fp32, fp32.BN, (fp32.BN + fp32.BH_grad) * fp32.BV * 4, 4)[0] == fp32.num_warps
    # the logit GEMMs' steps keep all of theirs; a stage larger than the budget still runs, unpipelined
    assert stages_within_shared(cfg.num_stages, (cfg.BN + cfg.BV) * cfg.BH_reduce * 2) == 4
    assert stages_within_shared(3, STAGE_SHARED_BYTES + 1) == 1
