"""Run a function on several CPU processes joined by a gloo group, with a hard time limit.

The function runs as ``fn(rank, world_size, *args)`` in each process, between
``init_process_group`` and ``destroy_process_group``; an exception in any process fails the caller
with that process's traceback. Processes still running at the deadline are terminated, so a
collective that never completes fails the test instead of hanging it.
"""
import os
import shutil
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Seconds any single collective may wait before gloo raises.
COLLECTIVE_TIMEOUT_S = 60


def _entry(rank: int, world_size: int, store_path: str, fn, args) -> None:
    # Processes share two cores; one thread each avoids oversubscription.
    torch.set_num_threads(1)
    # A file store, not a TCP one: rank 0 would host the TCP store's server thread, and exiting
    # while a peer still talks to it aborts the process ("terminate called without an active
    # exception").
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no process tears its side down while a peer is still in a collective
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int, *args, timeout_s: float = 180.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; raise on failure."""
    store_dir = tempfile.mkdtemp(prefix="fpo-dist-")
    store_path = os.path.join(store_dir, "store")
    context = mp.start_processes(_entry, args=(world_size, store_path, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(5)
                pytest.fail(f"{fn.__name__} on {world_size} processes did not finish within {timeout_s} s")
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
