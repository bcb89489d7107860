"""Peak memory above a baseline: the CUDA allocator's peak, or the process's peak RSS on CPU.

On CPU the peak resident set (VmHWM) is reset through ``/proc/self/clear_refs`` and freed heap pages
are handed back first (``malloc_trim``), so that memory a previous step freed but the allocator kept
is not counted as part of the baseline and then silently reused.
"""
import ctypes
import gc
from typing import Optional

import torch

_MIB = 1024 * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context of one measured region: `start` sets the baseline, `peak_mib` reads the peak above it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.exact = True

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_heap()
            self.exact = _reset_rss_peak()
            self.baseline = _proc_status_kib("VmRSS") * 1024

    def peak_mib(self) -> Optional[float]:
        """Peak bytes above the baseline since `start`, in MiB (None when the platform cannot say)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / _MIB
        if not self.exact:
            return None
        return (_proc_status_kib("VmHWM") * 1024 - self.baseline) / _MIB
