"""What Triton builds for a Hopper GPU from the real launches, read on CPU (tests/support/kernel_compile_check.py).

One subprocess (the interpreter must be off) compiles the main variants (DPO, TDPO, every statistic
with bias and softcap) through the JIT's own specialisation for cuda:90, with the ptxas and
cuobjdump bundled in triton, and the test keeps: every kernel compiles within shared memory with no
int32 offset products; the forward holds `PROGRAMS_PER_SM` programs per SM, as `tile_config`
assumes; every logit GEMM issues wgmma at least 64x128; no kernel touches local memory inside a
GEMM's K loop, and the only spills are the listed ones (`LISTED_SPILLS`, exact: a new spill fails,
and so does a listed one's going), each within its bytes and its local accesses per vocabulary
tile; the forward's last wave is at least 3/4 full at every N of the report.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fpo_ops.token_stats.kernels.utils import MIN_LAST_WAVE, PROGRAMS_PER_SM, resident_programs

H100_SHARED_MEMORY_PER_BLOCK = 232448
SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "support", "kernel_compile_check.py")
# kernels whose inner GEMMs produce logit tiles or consume them (the dh GEMM reads dz tiles)
LOGIT_GEMM_KERNELS = ("token_stats_fwd_kernel", "token_stats_jsd_fwd_kernel", "token_stats_bwd_kernel",
                      "token_stats_bwd_dh_kernel")
# (kernel, variant): (spill bytes, LDL/STL per vocabulary tile), the most each listed spill may take
# (benchmarks/results/hopper-compile-bf16-after.md). All run at [128, 128]
# (`fpo_ops.token_stats.kernels.utils.VARIANT_TILES`), where the next level down would halve their
# wgmma: a few words reloaded once per tile of 2 x 128 K steps, or once per program.
LISTED_SPILLS = {
    ("token_stats_fwd_kernel", "tdpo"): (48, 2),
    ("token_stats_fwd_kernel", "every-stat"): (64, 4),
    ("token_stats_jsd_fwd_kernel", "every-stat"): (16, 0),
}


@pytest.fixture(scope="module")
def reports():
    if torch.cuda.is_available():
        pytest.skip("the GPU tests run the compiled kernels themselves")
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        from kernel_compile_check import missing_tools
    finally:
        sys.path.pop(0)
    reason = missing_tools()
    if reason:
        pytest.skip(reason + ": registers, spills and wgmma shapes of the sm_90a build unchecked")
    return _compile_report("--main")


@pytest.fixture(scope="module")
def tma_reports(reports):
    """The DPO and TDPO builds with the weight tiles through TMA descriptors (`TileConfig.weight_tma`)."""
    return _compile_report("--variants", "dpo,tdpo", "--weight-tma")


def _compile_report(*args):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)] + [os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, SCRIPT, "bf16", *args, "--json"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print(f"compiled {len(rows)} kernels in {time.perf_counter() - started:.0f} s")
    return rows


def _ids(rows):
    return {(r["kernel"], r["variant"]) for r in rows}


def test_every_kernel_compiles_within_shared_memory(reports):
    kernels = {r["kernel"] for r in reports}
    assert kernels == {"token_stats_fwd_kernel", "token_stats_jsd_fwd_kernel", "token_stats_bwd_kernel",
                       "token_stats_bwd_dh_kernel", "token_stats_bwd_dw_kernel"}
    for r in reports:
        assert 0 < r["shared_bytes"] <= H100_SHARED_MEMORY_PER_BLOCK, r
        # offsets * stride in int32 would overflow once the product passes 2^31
        assert r["int32_tensor_multiplies"] == 0, r
        assert r["registers"] is not None and r["hmma"] == 0, r


def test_forward_occupancy_is_what_tile_config_assumes(reports):
    for r in reports:
        if r["kernel"] == "token_stats_fwd_kernel":
            assert resident_programs(r["registers"], r["shared_bytes"], r["num_warps"]) == PROGRAMS_PER_SM, r


def test_forward_last_wave_is_three_quarters_full(reports):
    for r in reports:
        if r["kernel"] in ("token_stats_fwd_kernel", "token_stats_jsd_fwd_kernel"):
            for n, (programs, waves, fill) in r["waves"].items():
                assert fill >= MIN_LAST_WAVE, (r["kernel"], r["variant"], n, programs, waves)


def test_logit_gemms_issue_wgmma_at_least_64x128(reports):
    narrow = {(r["kernel"], r["variant"]) for r in reports if r["kernel"] in LOGIT_GEMM_KERNELS
              and min(int(shape.split("x")[1]) for shape in r["wgmma"]) < 128}
    for r in reports:
        assert r["wgmma"], r  # every kernel multiplies on the tensor cores' Hopper path
    assert narrow == set()


def test_no_local_memory_inside_a_k_loop(reports):
    # a spill there costs in proportion to the GEMM's work
    assert [r for r in reports if r["k_loop_ldl_stl"]] == []


def test_spills_only_where_listed_and_within_their_bounds(reports):
    spilling = {(r["kernel"], r["variant"]) for r in reports if r["spill_bytes"] or r["ldl"] or r["stl"]}
    # exact: a listed kernel that stops spilling fails here too, so the list shrinks as spills go
    assert spilling == set(LISTED_SPILLS) & _ids(reports), [r for r in reports if (r["kernel"], r["variant"]) in spilling]
    for r in reports:
        spill_bytes, per_tile = LISTED_SPILLS.get((r["kernel"], r["variant"]), (0, 0))
        assert r["spill_bytes"] <= spill_bytes and r["loop_ldl_stl"] <= per_tile, r


def test_weight_tma_loads_weight_tiles_by_tma_and_spills_no_more(reports, tma_reports):
    # every logit kernel of DPO and TDPO issues TMA tile loads, and its per-thread async copies are
    # fewer (those of the gathered hidden rows are left); no spill beyond the listed ones' bounds,
    # none inside a K loop, and shared memory stays within the limit
    plain = {(r["kernel"], r["variant"]): r for r in reports}
    logit = [r for r in tma_reports if r["kernel"] in LOGIT_GEMM_KERNELS[:3]]
    assert {(r["kernel"], r["variant"]) for r in logit} == {
        ("token_stats_fwd_kernel", "dpo"), ("token_stats_bwd_kernel", "dpo"),
        ("token_stats_fwd_kernel", "tdpo"), ("token_stats_bwd_kernel", "tdpo")}
    for r in logit:
        before = plain[(r["kernel"], r["variant"])]
        assert r["tma_loads"] > 0 and before["tma_loads"] == 0, r
        assert 0 < r["ldgsts"] < before["ldgsts"], (r, before)
        spill_bytes, per_tile = LISTED_SPILLS.get((r["kernel"], r["variant"]), (0, 0))
        assert r["k_loop_ldl_stl"] == 0 and 0 < r["shared_bytes"] <= H100_SHARED_MEMORY_PER_BLOCK, r
        assert r["spill_bytes"] <= spill_bytes and r["loop_ldl_stl"] <= per_tile, r


def test_loop_local_accesses_counts_the_k_loops_and_every_wgmma_loop():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        from kernel_compile_check import loop_local_accesses
    finally:
        sys.path.pop(0)
    sass = "\n".join(f"        /*{address:04x}*/                   {instruction} ;" for address, instruction in [
        (0x10, "STL [R1], R16"),                       # before every loop
        (0x20, "LDL R20, [R1]"),                       # the vocabulary loop's head
        (0x30, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),
        (0x40, "LDL R21, [R1+0x4]"),                   # in the K loop
        (0x50, "@!P0 BRA 0x30"),                       # K loop back edge
        (0x60, "STL [R1+0x8], R22"),                   # the tile's epilogue
        (0x70, "@P1 BRA 0x90"),                        # a forward branch is no loop
        (0x80, "LDL R23, [R1+0x8]"),
        (0x90, "@!P2 BRA 0x20"),                       # vocabulary loop back edge
        (0xa0, "LDL.LU R6, [R1]"),
        (0xb0, "STL [R1+0xc], R7"),                    # a loop without wgmma
        (0xc0, "@!P3 BRA 0xb0"),
        (0xd0, "@!P0 BRA 0xd0"),                       # an out-of-line wait, entered from the K loop,
        (0xe0, "BRA 0x40"),                            # returns there: no loop
    ])
    # the K loop's LDL; with the vocabulary loop's head, epilogue and forward-branch block: 4
    assert loop_local_accesses(sass) == (1, 4)
