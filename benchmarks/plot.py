"""Time, time over the GEMM floor and peak memory against sequence length, a row of panels per (head, workload)."""
from pathlib import Path
from typing import Iterable


def plot_results(records: Iterable[dict], path: Path, title: str) -> Path:
    """Write a PNG with fwd+bwd median time, that time as a multiple of the head GEMMs timed beside it
    (DESIGN section 5's count; 1 is the floor) and peak memory above inputs vs N, one line per provider.

    Args:
        records: results of `measure.run_case`; cases that did not run are left out (an OOM case
            ends its provider's line early).
        path: PNG file to write.
        title: figure title (device, dtype).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on benchmark machines
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    panels = sorted({(r["head"], r["workload"]) for r in ok})
    # One colour per provider across every panel.
    providers = sorted({r["provider"] for r in ok})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(providers)}
    fig, axes = plt.subplots(len(panels), 3, figsize=(16, 3.6 * max(len(panels), 1)), squeeze=False)
    for (head, workload), (ax_time, ax_floor, ax_mem) in zip(panels, axes):
        cases = [r for r in ok if r["head"] == head and r["workload"] == workload]
        for provider in sorted({r["provider"] for r in cases}):
            series = sorted((r for r in cases if r["provider"] == provider), key=lambda r: r["n_tokens"])
            n = [r["n_tokens"] for r in series]
            style = dict(marker="o", color=colours[provider], label=provider,
                         linewidth=2.5 if provider.startswith("fpo") else 1.2)
            ax_time.plot(n, [r["fwd_bwd_ms"] for r in series], **style)
            floor = [(x, r["x_gemm_floor"]) for x, r in zip(n, series) if r.get("x_gemm_floor") is not None]
            if floor:
                ax_floor.plot(*zip(*floor), **style)
            mem = [(x, r["mem_fwd_bwd_mib"]) for x, r in zip(n, series) if r.get("mem_fwd_bwd_mib") is not None]
            if mem:
                ax_mem.plot(*zip(*mem), **style)
        for ax, label in ((ax_time, "fwd+bwd median time [ms]"), (ax_floor, "time / its GEMM floor"),
                          (ax_mem, "peak memory above inputs [MiB]")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.set_title(f"{head} / {workload}")
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
