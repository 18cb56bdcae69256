"""Measuring helpers shared by the demo and the benchmarks."""
from __future__ import annotations

from typing import Callable

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def cuda_time_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 10) -> float:
    """Median of CUDA-event timings of ``fn()``; each call is synchronised, so
    host work before its first kernel counts (as it does for a single prefill)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]
