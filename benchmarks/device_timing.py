"""Timing and bandwidth references the kernel and GPU benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# Peak HBM bandwidth by device name (GB/s, vendors' figures); the longest matching key wins ("H200" before "H20").
HBM_PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "H20": 4000.0, "A100": 2039.0, "B200": 8000.0, "L40S": 864.0}


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on CUDA (it flushes the L2 cache between calls), median wall
    time of ``repeats`` calls after ``warmup`` on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def hbm_peak_gbps(device: torch.device, override: float | None = None) -> float:
    """The device's peak memory bandwidth in GB/s: ``override``, else the table by device name, else NaN."""
    if override is not None:
        return override
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key in sorted(HBM_PEAK_GBPS, key=len, reverse=True):
        if key in name:
            return HBM_PEAK_GBPS[key]
    return float("nan")
