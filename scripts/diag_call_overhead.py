"""Where pcg's fixed per-call cost goes (issue: pcg vs one whole graph at small T).

For the default 8-layer model at a few T: (1) host microseconds of one call
while the GPU is busy (a sleep kernel queued first, so nothing waits on the
GPU): pcg split path, pcg with graph attention, the whole-graph step;
(2) with the GPU idle (as in bench/e2e.py's synchronised timing): CUDA-event
time of the call and host time until its first graph launch; (3) a torch
profiler listing of one pcg call's host ops before the first cudaGraphLaunch.
Writes a chrome trace to $OUT (or /tmp). A diagnostic, not a benchmark."""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, "bench")
import pcg  # noqa: E402
from e2e import whole_graph_step  # noqa: E402
from pcg.models import qwen3_moe_model  # noqa: E402


def host_us_busy(fn, reps=20):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU work ahead of the call
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    ts.sort()
    return ts[len(ts) // 2]


def idle_event_us(fn, reps=20):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    out = os.environ.get("OUT", "/tmp")
    ts = [1, 16, 256]
    model = qwen3_moe_model(8, dtype=torch.bfloat16, device="cuda")
    ids = {t: torch.randint(0, model.config.vocab_size, (1, t), device="cuda") for t in ts}
    prev, pcg.attention.USE_GRAPH_ATTENTION = pcg.attention.USE_GRAPH_ATTENTION, True
    try:
        wga = pcg.wrap(model, max_tokens=64, progress=False).capture()  # graph attention (the default)
    finally:
        pcg.attention.USE_GRAPH_ATTENTION = prev
    prev, pcg.attention.USE_GRAPH_ATTENTION = pcg.attention.USE_GRAPH_ATTENTION, False
    try:
        w = pcg.wrap(model, max_tokens=max(ts), progress=False).capture()  # every bucket split
    finally:
        pcg.attention.USE_GRAPH_ATTENTION = prev
    print(f"{'T':>5} {'mode':>22} {'host us (GPU busy)':>19} {'event us (GPU idle)':>20}")
    with torch.inference_mode():
        for t in ts:
            step = whole_graph_step(w, ids[t])
            modes = [("whole-graph step", step), ("pcg split", lambda: w(input_ids=ids[t]))]
            if t <= 64:
                modes.append(("pcg graph-attention", lambda: wga(input_ids=ids[t])))
            for name, fn in modes:
                for _ in range(3):
                    fn()
                print(f"{t:>5} {name:>22} {host_us_busy(fn):19.1f} {idle_event_us(fn):20.1f}", flush=True)
            del step
        # host ops of one call, with the GPU busy so nothing waits
        from torch.profiler import ProfilerActivity, profile
        for name, m in (("pcg", w), ("pcg-ga", wga)):
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                m(input_ids=ids[1])
            torch.cuda.synchronize()
            path = os.path.join(out, f"trace_{name}_T1.json")
            prof.export_chrome_trace(path)
            evs = sorted((e for e in prof.events()), key=lambda e: e.time_range.start)
            t0 = evs[0].time_range.start
            print(f"\n{name} T=1: host events (start us, duration us), first 60 top-level-ish:")
            shown = 0
            for e in evs:
                if e.cpu_parent is not None and e.cpu_parent.cpu_parent is not None:
                    continue
                print(f"  {e.time_range.start - t0:8.1f} {e.time_range.elapsed_us():8.1f}  {e.name[:70]}")
                shown += 1
                if shown >= 60:
                    break
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
