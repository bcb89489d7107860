"""Compile every token-statistics kernel variant for a Hopper GPU (sm_90) without a GPU.

Run as a script (it must not run under TRITON_INTERPRET=1):
    python tests/support/kernel_compile_check.py [bf16|fp16|fp32]
Prints one JSON line per kernel with its shared memory, the count of 32-bit integer multiplies of
index tensors in its Triton IR (an ``offsets * stride`` in int32 overflows once the product passes
2^31, so there should be none) and, when the bundled cuobjdump can read the cubin, registers and
spill bytes; exits non-zero if a kernel fails to compile. The launch
shapes are those `fpo_ops.token_stats.kernels.utils.tile_config` picks on CUDA, and every integer argument
that a real launch would see as a multiple of 16 is declared so, as Triton would specialise it.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fpo_ops.token_stats.kernels import token_stats_bwd, token_stats_fwd
from fpo_ops.token_stats.kernels.utils import TileConfig, tile_config

INT_ARGS_ALIGNED = ("H", "HR", "v_per_split")
FLOAT_ARGS = ("logit_scale", "softcap", "ref_logit_scale", "ref_softcap", "temperature", "log_beta",
              "log1m_beta", "jsd_beta", "filter_eps")
ACCUM_BUFFERS = ("part_ptr", "sums_ptr", "coef_ptr", "saved_ptr", "db_part_ptr", "dh_ptr", "lse_ptr",
                 "lse_ref_ptr")


def _arg_type(name: str, dtype: str) -> str:
    if name in ("labels_ptr", "order_ptr", "kept_ptr", "kept_count_ptr"):
        return "*i64"
    if name == "n_valid_ptr":
        return "*i32"
    if name == "skip_ptr":
        return "*i8"
    if name in ACCUM_BUFFERS:
        return "*fp32"
    if name.endswith("_ptr"):
        return "*" + dtype
    return "fp32" if name in FLOAT_ARGS else "i32"


def _resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    return {"registers": found.get("REG"), "stack_bytes": found.get("STACK")}


# an arith.muli whose operands are int32 tensors, e.g. "tensor<128x1xi32>"
_INT32_TENSOR_MULTIPLY = re.compile(r"arith\.muli .*: tensor<[0-9x]+xi32>")


def int32_tensor_multiplies(ttir: str) -> int:
    """Lines of the Triton IR that multiply int32 tensors (scalar x small constant is not counted)."""
    return sum(1 for line in ttir.splitlines() if _INT32_TENSOR_MULTIPLY.search(line))


def compile_kernel(kernel, dtype: str, constexprs: dict, cfg: TileConfig) -> dict:
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else _arg_type(n, dtype) for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs
               and (n.endswith("_ptr") or n.startswith("stride") or n in INT_ARGS_ALIGNED)}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return {"kernel": kernel.fn.__name__, "shared_bytes": compiled.metadata.shared,
            "int32_tensor_multiplies": int32_tensor_multiplies(compiled.asm["ttir"]),
            **_resource_usage(compiled.asm["cubin"])}


def variants(dtype: str, cfg: TileConfig):
    dot = dict(ACC=tl.float32, UPCAST=False, PRECISION="ieee", BN=cfg.BN, BV=cfg.BV)
    every_stat = dict(WANT_ENT=True, WANT_S2=True, WANT_SUM_Z=True, WANT_RKL=True, WANT_KL=True)
    no_extra = dict(WANT_ENT=False, WANT_S2=False, WANT_SUM_Z=False, WANT_RKL=False, WANT_KL=True)
    heads = dict(HAS_BIAS=True, HAS_REF_BIAS=True, CAPPED=True, REF_CAPPED=True)
    plain = dict(HAS_BIAS=False, HAS_REF_BIAS=False, CAPPED=False, REF_CAPPED=False)
    fwd = token_stats_fwd
    yield fwd.token_stats_fwd_kernel, dict(HAS_REF=True, BH=cfg.BH_reduce, **heads, **every_stat, **dot)
    yield fwd.token_stats_fwd_kernel, dict(HAS_REF=True, BH=cfg.BH_reduce, **plain, **no_extra, **dot)
    yield fwd.token_stats_jsd_fwd_kernel, dict(BH=cfg.BH_reduce, **heads, **dot)
    bwd = token_stats_bwd
    every_grad = dict(G_LOGP=True, G_ENT=True, G_KL=True, G_RKL=True, G_JSD=True)
    for filtering in (False, True):
        yield bwd.token_stats_bwd_kernel, dict(BH=cfg.BH_reduce, WANT_DB=True, FILTER=filtering,
                                               **heads, **every_grad, **dot)
        yield bwd.token_stats_bwd_dh_kernel, dict(BH=cfg.BH_grad, ACCUMULATE=True, FILTER=filtering, **dot)
        yield bwd.token_stats_bwd_dw_kernel, dict(BH=cfg.BH_grad, FILTER=filtering, **dot)
    yield bwd.token_stats_bwd_kernel, dict(BH=cfg.BH_reduce, WANT_DB=False, FILTER=False, G_LOGP=True,
                                           G_ENT=False, G_KL=True, G_RKL=False, G_JSD=False, **plain, **dot)


class _FakeH100:
    multi_processor_count = 132


def main(dtype_name: str) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    # the CUDA launch shape without a CUDA device
    torch.cuda.get_device_properties = lambda device: _FakeH100()
    cfg = tile_config(torch.device("cuda"), torch_dtype)
    for kernel, constexprs in variants(dtype_name, cfg):
        report = compile_kernel(kernel, dtype_name, constexprs, cfg)
        report.update(dtype=dtype_name, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bf16"))
