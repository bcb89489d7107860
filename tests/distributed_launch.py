"""Run a function on several CPU processes joined by a gloo group, with a hard time limit.

The function runs as ``fn(rank, world_size, *args)`` in each process, between
``init_process_group`` and ``destroy_process_group``; an exception in any process fails the caller
with that process's traceback. Processes still running at the deadline are terminated, so a
collective that never completes fails the test instead of hanging it.
"""
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Seconds any single collective may wait before gloo raises.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    # Processes share two cores; one thread each avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int, *args, timeout_s: float = 180.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; raise on failure."""
    context = mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(5)
            pytest.fail(f"{fn.__name__} on {world_size} processes did not finish within {timeout_s} s")
