"""The backward's low-precision stores (dz, dweight) round fp32 to nearest even, as compiled
kernels and PyTorch do, also through the interpreter, whose own fp32 -> bf16 conversion truncates
(`fpo_ops.token_stats.kernels.utils.round_for_store`)."""
import pytest
import torch
import triton
import triton.language as tl

from fpo_ops.token_stats.kernels.utils import round_for_store

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _store_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, round_for_store(x, y_ptr), mask=offs < n)


def _fp32_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2048, generator=g) * torch.logspace(-30, 30, 2048)
    # every bit pattern class: normals, subnormals, infinities, NaNs, both signs
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (2048,), generator=g, dtype=torch.int64).to(torch.int32)
    # exact bf16 ties (the dropped half is 0x8000): to even, down as often as up
    ties = ((torch.randint(0, 2 ** 15, (256,), generator=g, dtype=torch.int32) << 16) | 0x8000)
    ties = torch.cat([ties, ties | (1 << 31)])
    f32 = torch.finfo(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), f32.max, -f32.max,
                            3.3895314e38, f32.tiny, 1e-40, -1e-45])
    return torch.cat([spread, bits.view(torch.float32), ties.view(torch.float32), special])


# the interpreter converts to fp16 with NumPy, which warns where a finite fp32 becomes inf
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stores_round_like_pytorch_bit_for_bit(dtype):
    x = _fp32_values().to(DEVICE)
    got = torch.empty(x.numel(), dtype=dtype, device=DEVICE)
    _store_kernel[(1,)](x, got, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    mismatched = (got.view(torch.int16) != want.view(torch.int16)) & ~nan
    assert not mismatched.any(), (x[mismatched][:5], got[mismatched][:5], want[mismatched][:5])


def test_fp32_stores_are_exact():
    x = _fp32_values().to(DEVICE)
    got = torch.empty_like(x)
    _store_kernel[(1,)](x, got, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(got.view(torch.int32)[~x.isnan()], x.view(torch.int32)[~x.isnan()])
