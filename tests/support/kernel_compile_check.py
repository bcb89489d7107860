"""What Triton builds for a Hopper GPU (cuda:90) from fpo-ops' real launches, read without a GPU.

Run as a script (it must not run under TRITON_INTERPRET=1):
    python tests/support/kernel_compile_check.py [bf16|fp16|fp32] [--main | --variants a,b] [--weight-tma]
        [--widest] [--json]

The kernels are not compiled from a hand-written signature: the backend's own host code
(`triton_vocab_partials`, `triton_jsd_pass`, `triton_backward_tiles`) runs on ``meta`` tensors of a
Llama-3-8B head (H 4096, V 128256) while a stand-in driver reports a cuda:90 target and every
``kernel[grid](...)`` is turned into the JIT's own ``warmup``. So each kernel is specialised by
Triton's binder exactly as on a GPU (pointers by their alignment, integers divisible by 16 or equal
to 1, the constexprs the host passes) and built by ``triton.compile`` from the JIT's own
signature. A meta tensor's data pointer is its byte offset from an aligned base, as a CUDA
allocation's is, so slices such as a vocabulary chunk's rows keep their real alignment.

Per kernel variant it reports the registers, spill bytes and stack frame from ptxas' log, the
LDL/STL instructions (all, those inside the GEMMs' K loops and those inside any loop) and the
``HGMMA.64xNx16`` shapes in the SASS (bundled cuobjdump), the shared memory, the programs one SM
holds, and per N in `WAVE_TOKENS` the launch's programs and waves on a 132-SM H100/H200 with the
last wave's fill.
``--widest`` builds every launch at the widest level, what `VARIANT_TILES` steps down from. Exits
non-zero if a kernel fails to compile.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from fpo_ops.token_stats.kernels.utils import TileConfig, resident_programs, tile_config
from fpo_ops.token_stats.options import HeadOptions

HOPPER_SMS = 132
WAVE_TOKENS = (256, 512, 1024, 4096, 16384)
LLAMA3_HIDDEN, LLAMA3_VOCAB = 4096, 128256
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Variant:
    """One use of the backend: which passes run, with which statistics and head options."""

    name: str
    partial_keys: Tuple[str, ...] = ()      # optional forward partials (ent, s2, sum_z, rkl, kl)
    has_ref: bool = True
    jsd: bool = False                       # the JSD pass
    grads: Tuple[str, ...] = ()             # statistics with an upstream gradient; () = no backward
    bias: bool = False
    softcap: bool = False
    filter_eps: float = 0.0


# The launches behind DPO (also with a bias and Gemma-2's softcap), TDPO, distillation and SFT with
# its token-accuracy metric, plus every optional statistic, bias and softcap at once and gradient
# filtering: together every kernel and every constexpr branch of the kernels.
VARIANTS = (
    Variant("dpo", grads=("logp",)),
    Variant("tdpo", partial_keys=("kl",), grads=("logp", "kl")),
    Variant("jsd", jsd=True, grads=("jsd",)),
    Variant("every-stat", partial_keys=("ent", "s2", "sum_z", "m_pre", "argmax", "rkl", "kl"), jsd=True,
            grads=("logp", "lse", "entropy", "kl", "reverse_kl", "jsd"), bias=True, softcap=True),
    Variant("filtered", partial_keys=("ent", "rkl", "kl"),
            grads=("logp", "entropy", "kl", "reverse_kl", "jsd"), bias=True, softcap=True, filter_eps=1e-6),
    Variant("dpo-capped", grads=("logp",), bias=True, softcap=True),
    Variant("sft-top1", partial_keys=("m_pre", "argmax"), has_ref=False, grads=("logp",)),
)
# What the CPU test compiles (the CI budget); the script compiles every variant.
MAIN_VARIANTS = ("dpo", "tdpo", "every-stat")


class _Hopper:
    """Driver stand-in: a current cuda:90 device and stream, so the JIT specialises and compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def set_current_device(self, device):
        pass


class _FakeH100:
    multi_processor_count = HOPPER_SMS


@dataclass
class Launch:
    kernel: str
    grid: Tuple[int, ...]
    compiled: object
    constexprs: Dict[str, object]
    num_warps: int


@contextlib.contextmanager
def hopper_jit():
    """Within the block every Triton launch compiles for cuda:90 through the JIT and is recorded,
    not run; yields the list the launches are appended to."""
    launches: List[Launch] = []
    original_run = JITFunction.run
    original_props = torch.cuda.get_device_properties

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        bound = dict(zip(self.arg_names, args))
        constexprs = {p.name: kwargs.get(p.name, bound.get(p.name)) for p in self.params if p.is_constexpr}
        launches.append(Launch(self.fn.__name__, tuple(grid), kernel, constexprs,
                               kwargs.get("num_warps", 4)))
        return kernel

    driver.set_active(_Hopper())
    JITFunction.run = run
    torch.cuda.get_device_properties = lambda device=None: _FakeH100()
    try:
        yield launches
    finally:
        JITFunction.run = original_run
        torch.cuda.get_device_properties = original_props
        driver.reset_active() if _has_default_driver() else setattr(driver, "_active", None)


def _has_default_driver() -> bool:
    try:
        driver.default
        return True
    except RuntimeError:
        return False


def hopper_config(dtype: torch.dtype) -> TileConfig:
    """`tile_config`'s CUDA launch shape on a 132-SM Hopper GPU, without a GPU."""
    original = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda device=None: _FakeH100()
    try:
        return tile_config(torch.device("cuda"), dtype)
    finally:
        torch.cuda.get_device_properties = original


def run_variant(variant: Variant, n_tokens: int, dtype: torch.dtype, cfg: TileConfig,
                hidden: int = LLAMA3_HIDDEN, vocab: int = LLAMA3_VOCAB) -> None:
    """Run the backend's host code for ``variant`` on meta tensors (inside `hopper_jit`)."""
    from fpo_ops.token_stats.triton_stats import triton_backward_tiles, triton_jsd_pass, triton_vocab_partials

    meta = torch.device("meta")
    h = torch.empty((n_tokens, hidden), dtype=dtype, device=meta)
    w = torch.empty((vocab, hidden), dtype=dtype, device=meta)
    b = torch.empty((vocab,), dtype=dtype, device=meta) if variant.bias else None
    rh, rw, rb = (h, w, b) if variant.has_ref else (None, None, None)
    labels = torch.empty((n_tokens,), dtype=torch.int64, device=meta)
    valid = torch.empty((n_tokens,), dtype=torch.bool, device=meta)
    cap = 30.0 if variant.softcap else None
    opts = HeadOptions(compute_dtype=dtype, softcap=cap, ref_softcap=cap, grad_filter_eps=variant.filter_eps)
    triton_vocab_partials(h, rh, labels, w, b, rw, rb, variant.partial_keys, opts, valid, config=cfg)
    vector = torch.empty((n_tokens,), dtype=opts.accum_dtype, device=meta)
    if variant.jsd:
        triton_jsd_pass(h, rh, w, b, rw, rb, {"lse": vector, "lse_ref": vector}, opts, valid, config=cfg)
    if variant.grads:
        saved = {k: vector for k in ("lse", "lse_ref", "entropy", "reverse_kl", "kl_p_m")}
        triton_backward_tiles(h, w, b, labels, rh, rw, rb, {k: vector for k in variant.grads}, saved, opts,
                              need_h=True, need_w=True, need_b=variant.bias, valid=valid, config=cfg)


def _tool(name: str) -> Optional[str]:
    path = os.path.join(TOOLS, name)
    return path if os.path.exists(path) else None


def missing_tools() -> Optional[str]:
    """None when the bundled ptxas and cuobjdump exist, else which are missing."""
    missing = [name for name in ("ptxas", "cuobjdump") if _tool(name) is None]
    return f"triton's bundled {' and '.join(missing)} not found under {TOOLS}" if missing else None


def sass(cubin: bytes) -> str:
    """The SASS of a cubin, from the cuobjdump bundled with triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


# an arith.muli whose operands are int32 tensors, e.g. "tensor<128x1xi32>"
_INT32_TENSOR_MULTIPLY = re.compile(r"arith\.muli .*: tensor<[0-9x]+xi32>")


def int32_tensor_multiplies(ttir: str) -> int:
    """Lines of the Triton IR that multiply int32 tensors (an ``offsets * stride`` in int32 overflows
    once the product passes 2^31; scalar x small constant is not counted)."""
    return sum(1 for line in ttir.splitlines() if _INT32_TENSOR_MULTIPLY.search(line))


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_HGMMA = re.compile(r"\bHGMMA\.(\d+x\d+x\d+)")
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", re.MULTILINE)
_LOCAL = re.compile(r"\b(LDL|STL)(\.[A-Z0-9.]+)?\s")


_ADDRESSED = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*)$")
# a predicated branch: a loop's back edge (an unconditional branch back is the return from an
# out-of-line block, such as a barrier's wait placed after the kernel's body)
_BRANCH = re.compile(r"^@!?U?P\d\s+BRA(?:\.[A-Z.]+)? 0x([0-9a-f]+)")


def loop_local_accesses(text: str) -> Tuple[int, int]:
    """(in K loops, in loops) LDL/STL instructions: inside the innermost loops that issue wgmma (the
    GEMMs' K loops), where a spill costs per K step, and inside any loop that issues wgmma (a
    forward's vocabulary loop too), where it costs per tile. A spill outside both costs once per
    program.

    A loop is a predicated backward branch and the instructions from its target up to it."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in map(_ADDRESSED.match, text.splitlines()) if m]
    loops = []
    for address, instruction in lines:
        branch = _BRANCH.search(instruction)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            if any(start <= a <= address and "HGMMA" in i for a, i in lines):
                loops.append((start, address))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi)
                                                         for lo2, hi2 in loops)]
    local = [a for a, i in lines if _LOCAL.search(i + " ")]

    def inside(ranges):
        return sum(1 for a in local if any(lo <= a <= hi for lo, hi in ranges))

    return inside(innermost), inside(loops)


def sass_summary(text: str) -> dict:
    """Local-memory instructions (also those in loops, `loop_local_accesses`), the wgmma shapes (``HGMMA.64x128x16``:
    M x N x K), TMA tile loads (``UTMALDG``), per-thread async copies (``LDGSTS``) and all instructions
    of some SASS."""
    return {"ldl": len(re.findall(r"\bLDL\b", text)), "stl": len(re.findall(r"\bSTL\b", text)),
            **dict(zip(("k_loop_ldl_stl", "loop_ldl_stl"), loop_local_accesses(text))),
            "wgmma": sorted(set(_HGMMA.findall(text)), key=lambda s: [int(x) for x in s.split("x")]),
            "hmma": len(re.findall(r"\bHMMA\b", text)), "tma_loads": len(re.findall(r"\bUTMALDG\b", text)),
            "ldgsts": len(re.findall(r"\bLDGSTS\b", text)), "instructions": len(_INSTRUCTION.findall(text))}


def wgmma_width(shape: str) -> int:
    """N of an ``MxNxK`` wgmma shape."""
    return int(shape.split("x")[1])


def waves(programs: int, per_sm: int, sms: int = HOPPER_SMS) -> Tuple[float, float]:
    """(waves, fill of the last wave) of ``programs`` on ``sms`` SMs holding ``per_sm`` each."""
    slots = max(1, per_sm) * sms
    full, rest = divmod(programs, slots)
    return programs / slots, (rest / slots if rest else 1.0)


def _key(launch: Launch) -> Tuple:
    return (launch.kernel, tuple(sorted((k, str(v)) for k, v in launch.constexprs.items())))


# constexprs that name a kernel's branch (the rest are tile sizes and dtypes, shown once per row)
_BRANCH_FLAGS = ("HAS_REF", "WANT_ENT", "WANT_S2", "WANT_SUM_Z", "WANT_M_PRE", "WANT_ARGMAX", "WANT_RKL", "WANT_KL",
                 "HAS_BIAS", "CAPPED", "G_LOGP", "G_LSE", "G_ENT", "G_KL", "G_RKL", "G_JSD", "WANT_DB", "FILTER", "ACCUMULATE")


def _flags(constexprs: Dict[str, object]) -> str:
    return ",".join(k for k in _BRANCH_FLAGS if constexprs.get(k) is True) or "-"


def compile_report(dtype_name: str = "bf16", variants: Sequence[str] = tuple(v.name for v in VARIANTS),
                   wave_tokens: Sequence[int] = WAVE_TOKENS, cfg: Optional[TileConfig] = None) -> List[dict]:
    """One row per distinct compiled kernel of ``variants``, as the JIT builds it for cuda:90.

    Args:
        dtype_name: bf16, fp16 or fp32 (hidden states and weights).
        variants: names from `VARIANTS`, or Variants.
        wave_tokens: token counts N at which each launch's grid is read.
        cfg: launch shape (default `tile_config` on a 132-SM Hopper GPU).

    Returns:
        Dicts: kernel, variant, flags, block sizes, num_warps/num_stages, registers, spill bytes
        (stores + loads), stack bytes, ldl, stl, wgmma shapes, shared bytes, programs per SM, and
        ``waves`` {N: [programs, waves, last-wave fill]}.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_report: run without TRITON_INTERPRET=1 (the interpreter compiles nothing)")
    dtype = DTYPES[dtype_name]
    cfg = cfg or hopper_config(dtype)
    chosen = [v for v in VARIANTS if v.name in variants] + [v for v in variants if isinstance(v, Variant)]
    rows: Dict[Tuple, dict] = {}
    # ptxas' log is the only report of spills without a GPU: compile even what triton's cache holds
    previous = triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile
    triton.knobs.nvidia.dump_ptxas_log = triton.knobs.compilation.always_compile = True
    try:
        for variant in chosen:
            for n_tokens in sorted(wave_tokens, reverse=True):
                log = io.StringIO()
                with hopper_jit() as launches, contextlib.redirect_stdout(log):
                    run_variant(variant, n_tokens, dtype, cfg)
                ptxas_logs = log.getvalue()
                for launch in launches:
                    key = _key(launch)
                    if key not in rows:
                        rows[key] = _describe(launch, variant.name, ptxas_logs, cfg)
                    row = rows[key]
                    programs = 1
                    for g in launch.grid:
                        programs *= int(g)
                    count, fill = waves(programs, row["programs_per_sm"])
                    row["waves"].setdefault(n_tokens, [programs, round(count, 2), round(fill, 2)])
    finally:
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = previous
    return list(rows.values())


def _describe(launch: Launch, variant: str, ptxas_logs: str, cfg: TileConfig) -> dict:
    compiled = launch.compiled
    name = compiled.metadata.name
    # ptxas prints one block per kernel it assembles: "Compiling entry function 'NAME' ... Used R registers"
    block = ""
    for part in ptxas_logs.split("Compiling entry function"):
        if f"'{name}'" in part.split("\n", 1)[0]:
            block = part
    registers = _PTXAS.search(block)
    spills = _SPILLS.search(block)
    stack = _STACK.search(block)
    summary = sass_summary(sass(compiled.asm["cubin"]))
    shared = compiled.metadata.shared
    regs = int(registers.group(1)) if registers else None
    per_sm = resident_programs(regs, shared, launch.num_warps) if regs else 0
    c = launch.constexprs
    return {"kernel": launch.kernel, "variant": variant, "flags": _flags(c),
            "tile": f"BN{c.get('BN')} BV{c.get('BV')} BH{c.get('BH')}", "num_warps": launch.num_warps,
            "num_stages": compiled.metadata.num_stages, "registers": regs,
            "spill_bytes": (int(spills.group(1)) + int(spills.group(2))) if spills else None,
            "stack_bytes": int(stack.group(1)) if stack else None, **summary, "shared_bytes": shared,
            "int32_tensor_multiplies": int32_tensor_multiplies(compiled.asm["ttir"]),
            "programs_per_sm": per_sm, "waves": {}}


def format_report(rows: List[dict], wave_tokens: Sequence[int] = WAVE_TOKENS) -> str:
    """A Markdown table of `compile_report`'s rows (waves as ``waves/last-wave fill``)."""
    header = ["kernel", "variant", "flags", "tile", "warps", "regs", "spill B", "stack B", "LDL", "STL",
              "in K loops", "in loops", "wgmma",
              "TMA", "LDGSTS", "instr", "smem KiB", "per SM"] + [f"N {n}" for n in wave_tokens]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["kernel"], r["variant"], r["flags"], r["tile"], str(r["num_warps"]), str(r["registers"]),
                 str(r["spill_bytes"]), str(r["stack_bytes"]), str(r["ldl"]), str(r["stl"]),
                 str(r["k_loop_ldl_stl"]), str(r["loop_ldl_stl"]),
                 " ".join(r["wgmma"]) or ("HMMA" if r["hmma"] else "-"), str(r["tma_loads"]), str(r["ldgsts"]),
                 str(r["instructions"]), f"{r['shared_bytes'] / 1024:.0f}",
                 str(r["programs_per_sm"])]
        for n in wave_tokens:
            w = r["waves"].get(n)
            cells.append("-" if w is None else f"{w[0]}: {w[1]:.2f}/{w[2]:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dtype_name = next((a for a in argv if a in DTYPES), "bf16")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    reason = missing_tools()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    names = list(MAIN_VARIANTS) if "--main" in argv else [v.name for v in VARIANTS]
    if "--variants" in argv:  # a comma list of VARIANTS names
        names = argv[argv.index("--variants") + 1].split(",")
        unknown = sorted(set(names) - {v.name for v in VARIANTS})
        if unknown:
            print(f"--variants: expected names among {[v.name for v in VARIANTS]}, got {unknown}", file=sys.stderr)
            return 2
    cfg = hopper_config(DTYPES[dtype_name])
    if "--weight-tma" in argv:  # the logit kernels' weight tiles through TMA descriptors
        cfg = TileConfig(**{**cfg.as_kwargs(), "weight_tma": True})
    if "--widest" in argv:  # every launch at the widest level (what VARIANT_TILES steps down from)
        cfg = TileConfig(**{**cfg.as_kwargs(), "levels": {}})
    rows = compile_report(dtype_name, names, cfg=cfg)
    if "--json" in argv:
        for row in rows:
            print(json.dumps({**row, "dtype": dtype_name}))
    else:
        print(f"{dtype_name}, {cfg}, Llama-3-8B head (H {LLAMA3_HIDDEN}, "
              f"V {LLAMA3_VOCAB}); waves: programs: waves/last-wave fill on {HOPPER_SMS} SMs\n")
        print(format_report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
