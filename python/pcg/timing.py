"""Measuring helpers shared by the demo and the benchmarks."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Union

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def cuda_time_ms(fn: Union[Callable[[], object], Sequence[Callable[[], object]]],
                 warmup: int = 2, reps: int = 10) -> float:
    """Median of CUDA-event timings of ``fn()``; each call is synchronised, so
    host work before its first kernel counts (as it does for a single prefill).
    A sequence of functions is called in rotation (e.g. one per input set, so
    repeated calls do not just measure the L2 cache)."""
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()
    return _median([_event_ms(fns[i % len(fns)]) for i in range(reps)])


def _event_ms(f: Callable[[], object]) -> float:
    """CUDA-event time of one synchronised call of ``f``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    f()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def _spin_cycles(us: float) -> int:
    """SM clock cycles of ``torch.cuda._sleep`` that last about ``us``."""
    khz = torch.cuda.get_device_properties(torch.cuda.current_device()).clock_rate
    return int(us * 1e-6 * khz * 1e3)


def _hidden_event_ms(f: Callable[[], object], cycles: int, tries: int = 5) -> float:
    """CUDA-event time of one synchronised call of ``f`` whose host work is
    hidden: the GPU spins while the host enqueues the call, so the events see
    only the GPU's work (kernels and the gaps between them). Retries when the
    host outlasted the spin; -1.0 when every try did."""
    for _ in range(tries):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        spin_end = torch.cuda.Event()
        torch.cuda._sleep(cycles)
        spin_end.record()
        start.record()
        f()
        end.record()
        hidden = not spin_end.query()  # still spinning: the whole call was enqueued in time
        end.synchronize()
        if hidden:
            return start.elapsed_time(end)
    return -1.0


def paired_time_ms(fns: Sequence[Callable[[], object]], warmup: int = 5, reps: int = 30,
                   hide_host_us: Optional[Sequence[float]] = None) -> list[float]:
    """Median CUDA-event times of several functions measured in alternation
    (a, b, a, b, ...), so drifts of the host (clock, other load) hit all of
    them alike: for ratios between modes. Each call is synchronised.

    ``hide_host_us[i] > 0`` times ``fns[i]`` with its host work hidden behind
    a GPU spin of that many microseconds (as ``device_time_ms``): the time of
    what the GPU does, without the host's latency before the first kernel
    (e.g. a graph of many calls timed per call). Its median is over the
    repetitions whose host work the spin covered (-1.0 if none)."""
    hide = list(hide_host_us) if hide_host_us is not None else [0.0] * len(fns)
    if len(hide) != len(fns):
        raise ValueError(f"hide_host_us has {len(hide)} entries for {len(fns)} functions")
    cycles = [_spin_cycles(h) if h > 0 else 0 for h in hide]
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            ms = _hidden_event_ms(f, cycles[i]) if cycles[i] else _event_ms(f)
            if ms >= 0:
                times[i].append(ms)
    return [_median(t) if t else -1.0 for t in times]


def device_time_ms(fn: Callable[[], object], reps: int = 20, hide_us: float = 4000.0) -> float:
    """Median CUDA-event time of ``fn()`` with its host work hidden: the GPU
    first spins for ``hide_us`` while the host enqueues the call, so the
    events see only what the GPU does (kernels and the gaps between them),
    not the host's latency before the first launch. A repetition whose host
    work outlasted the spin is dropped; -1.0 when every one did."""
    cycles = _spin_cycles(hide_us)
    fn()  # warm-up
    times = [ms for ms in (_hidden_event_ms(fn, cycles, tries=1) for _ in range(reps)) if ms >= 0]
    return _median(times) if times else -1.0


def host_us(fn: Callable[[], object], reps: int = 20) -> float:
    """Median host time (us) to enqueue one call on an idle GPU: the time the
    GPU waits before the call's first kernel can start."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return _median(times)


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` up once on a side stream, then capture it; returns (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
