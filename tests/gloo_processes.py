"""Running a function in two CPU processes joined by a gloo process group (for tests of collective code)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn: Callable[[int], Any], queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        queue.put((rank, fn(rank)))
    finally:
        dist.destroy_process_group()


def run_on_two_processes(fn: Callable[[int], Any]) -> list[Any]:
    """``[fn(0), fn(1)]``, each called in its own spawned process of a 2-process gloo group; ``fn`` must be a
    module-level function (it is pickled) and return something picklable."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [ctx.Process(target=_worker, args=(rank, port, fn, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [value for _, value in results]
