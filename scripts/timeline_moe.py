"""Kernel timeline of one pcg::fused_moe call (graph replays under
torch.profiler): each kernel's start and end relative to the call's first
kernel, medians over the replays, to see the critical path (where the GEMMs
start, what runs beside what). Needs a CUDA device.
    TL_TOKENS=16,64 TL_ENVS="PCG_X=0|PCG_X=1,PCG_Y=2" python scripts/timeline_moe.py [shape ...]
TL_ENVS: '|'-separated environment settings, one timeline each (read at capture).
TL_CHAIN=n captures n calls back to back (two input sets in turn), as
bench/moe.py's chain: the boundaries between calls show."""
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from moe import SHAPES, make_inputs, moe_weights  # noqa: E402
from profile_moe import short  # noqa: E402
import pcg  # noqa: E402
from pcg.ops.fused_moe import w13_block_for  # noqa: E402
from pcg.timing import capture_graph  # noqa: E402


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def kernels_of(trace_path):
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    ks = [e for e in ev if e.get("ph") == "X" and e.get("cat") == "kernel"]
    return sorted(((float(e["ts"]), float(e["dur"]), e["name"]) for e in ks), key=lambda x: x[0])


def main():
    if not torch.cuda.is_available():
        print("timeline_moe: no CUDA device")
        return
    dev = torch.device("cuda")
    names = sys.argv[1:] or ["qwen3-30b-a3b"]
    reps = 20
    for name in names:
        E, k, H, I = SHAPES[name]
        torch.manual_seed(0)
        blk = w13_block_for(I, 8)
        w13, w2 = moe_weights(E, H, I, dev, blk)
        for T in [int(x) for x in os.environ.get("TL_TOKENS", "16,64,1024").split(",")]:
            sets = [make_inputs(T, E, k, H, 7 + i, dev) for i in range(2)]
            chain = int(os.environ.get("TL_CHAIN", "1"))

            def calls():
                return [pcg.fused_moe(*sets[i % 2][:1], w13, w2, *sets[i % 2][1:], w13_block=blk)
                        for i in range(chain)]
            for envs in os.environ.get("TL_ENVS", "").split("|"):
                kv = dict(x.split("=", 1) for x in envs.split(",") if x)
                saved = {key: os.environ.get(key) for key in kv}
                os.environ.update(kv)
                g = capture_graph(calls)[0]
                for key, v in saved.items():
                    if v is None:
                        os.environ.pop(key)
                    else:
                        os.environ[key] = v
                timeline(g, f"{name} T={T} x{chain} [{envs or 'default'}]", reps)
        del w13, w2


def profiled_calls(g, reps, sync_each=True):
    """Kernels of `reps` replays of graph g under torch.profiler (after 5
    warm-up replays): one list of (start us, duration us, name) per replay,
    in start order. sync_each: synchronise after every replay (one call at a
    time on the GPU) or only after the last."""
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    prof.export_chrome_trace(path)
    ks = kernels_of(path)
    per = len(ks) // reps
    return [ks[r * per:(r + 1) * per] for r in range(reps)]


def timeline(g, label, reps):
    calls = profiled_calls(g, reps)
    per = len(calls[0])
    rows = {}
    for call in calls:
        t0 = call[0][0]
        for i, (ts, dur, nm) in enumerate(call):
            rows.setdefault(i, (short(nm), [], []))
            rows[i][1].append(ts - t0)
            rows[i][2].append(ts - t0 + dur)
    print(f"{label}: {per} kernels (w13 block layout), us from the first kernel's start (median of {reps})")
    for i, (nm, st, en) in sorted(rows.items()):
        print(f"  {nm:28s} start {median(st):8.1f}  end {median(en):8.1f}  dur {median(en) - median(st):7.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
