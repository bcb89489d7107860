"""`fpo_ops.token_stats.chunked.gemm_fp32`: fp32 results from low-precision operands, natively or loudly upcast."""
import pytest
import torch

from fpo_ops.token_stats import chunked


@pytest.fixture(autouse=True)
def fresh_backend_cache(monkeypatch):
    monkeypatch.setattr(chunked, "_NATIVE_FP32_OUT", {})


def _operands(device, dtype=torch.bfloat16, m=67, k=300, n=45):
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=g, device=device).to(dtype)
    b = torch.randn(k, n, generator=g, device=device).to(dtype)
    return a, b


def test_cpu_upcasts_without_warning(recwarn):
    a, b = _operands("cpu")
    out = chunked.gemm_fp32(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=0, atol=0)
    assert not [w for w in recwarn if "gemm_fp32" in str(w.message)]


def test_a_failing_native_gemm_warns_once_and_upcasts(monkeypatch):
    """A backend whose mm(out_dtype=) raises: one RuntimeWarning naming the error, then fp32 GEMMs."""
    real_mm = torch.mm

    def mm(a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            raise NotImplementedError("no aten::mm.dtype here")
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    a, b = _operands("cpu")
    a, b = a.to("meta"), b.to("meta")  # a non-CPU device type without a real kernel
    with pytest.warns(RuntimeWarning, match=r"gemm_fp32: .*meta.*NotImplementedError: no aten::mm.dtype"):
        out = chunked.gemm_fp32(a, b)
    assert out.dtype == torch.float32 and out.shape == (67, 45)
    assert chunked._NATIVE_FP32_OUT == {"meta": False}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunked.gemm_fp32(a, b)  # decided once: no second warning


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_native_fp32_output(dtype, recwarn):
    """On CUDA the GEMM returns fp32 itself (no upcast) and sums like an fp32 GEMM of the operands."""
    a, b = _operands("cuda", dtype, m=1031, k=4096, n=2053)
    out = chunked.gemm_fp32(a, b)
    assert chunked._NATIVE_FP32_OUT.get("cuda") is True
    assert not [w for w in recwarn if "gemm_fp32" in str(w.message)]
    assert out.dtype == torch.float32
    exact = a.double() @ b.double()
    upcast = a.float() @ b.float()
    ours, base = (out.double() - exact).abs().max().item(), (upcast.double() - exact).abs().max().item()
    assert ours <= 2 * base + 1e-6 * exact.abs().max().item(), (ours, base)
