"""Timing in alternating rounds, peak memory, and torch.profiler tables of the timed calls."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["peak_mb", "print_profile", "profile_calls", "rss_mb", "start_profiler", "sync", "time_rounds"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    fns: dict[str, Callable[[], Any]], *, device: torch.device, warmup: int, iters: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Seconds per call of each function: ``warmup`` calls each, then ``rounds`` alternating blocks of ``iters``
    calls; the median block mean is reported, with the peak memory of the blocks."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync(device)
    blocks: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int] = dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            blocks[name].append((time.perf_counter() - start) / iters)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
    out = {}
    for name, times in blocks.items():
        out[name] = {"seconds": statistics.median(times), "spread": (max(times) - min(times)) / min(times)}
        out[name]["peak_memory_mb"] = round(peaks[name] / 2**20, 1) if device.type == "cuda" else None
    return out


def rss_mb(device: torch.device) -> float | None:
    """On the CPU: the process's peak resident memory so far (Linux reports KiB)."""
    if device.type == "cuda":
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_mb(device: torch.device) -> float | None:
    """Peak memory since the last reset: allocated device memory on a GPU, resident memory on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return rss_mb(device)


def profile_calls(title: str, fns: dict[str, Callable[[], Any]], device: torch.device, calls: int = 3) -> None:
    """Print where the time of ``calls`` calls of each function goes (torch.profiler, top operators) to stderr."""
    for name, fn in fns.items():
        prof = start_profiler(device)
        for _ in range(calls):
            fn()
        print_profile(prof, device, f"{name} {title}, {calls} calls")


def start_profiler(device: torch.device):
    """A started torch.profiler (CPU, and CUDA on a GPU) that remembers when it started."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
    prof.__enter__()
    prof.started_at = time.perf_counter()
    return prof


def print_profile(prof, device: torch.device, title: str) -> None:
    """Stop ``prof`` and print its top operators, by device time on a GPU (by CPU time on the CPU), and the wall
    time it covered, to stderr."""
    sync(device)
    wall_ms = (time.perf_counter() - prof.started_at) * 1000
    prof.__exit__(None, None, None)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    print(f"\n### profile: {title} (wall {wall_ms:.1f} ms, profiler included)\n{table}", file=sys.stderr, flush=True)
