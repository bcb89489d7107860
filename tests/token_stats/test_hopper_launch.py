"""The CUDA launch shape on a Hopper GPU (132 SMs), checked without one: the forward's waves.

Pure arithmetic on `TileConfig`; the compiled code's properties are checked in
tests/token_stats/test_hopper_compile.py.
"""
import pytest
import torch
import triton

from fpo_ops.token_stats.kernels.utils import MIN_LAST_WAVE, TileConfig, last_wave_fill, split_blocks, tile_config

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
    for dtype, cfg in hopper_configs.items():
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
