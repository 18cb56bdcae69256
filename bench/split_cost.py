"""Where piecewise capture loses time against one whole-model CUDA graph.

For each T, times pcg.wrap(model) and the whole-model graph of the same
kernels (bench/e2e.py's ``whole-graph``) side by side, then traces one call of
each with torch.profiler and splits the wall time into: host latency before
the first GPU activity, GPU busy time (union of kernels, copies, memsets),
and idle gaps between GPU activities, listing the largest gaps with the
activities on either side (the profiler slows host work, so gaps are inflated).

Without the profiler it then peels pcg's call apart (CUDA-event time and host
enqueue time of each): the wrapped call, the engine's replay (no input
checks/packing), the C++ segment chain alone (the recorded calls run the C++
attention op), and one attention split on its own: through the layer op's
Python (as a non-standard layer would) and the C++ op alone (as a replay does).

    python bench/split_cost.py --layers 8 --tokens 1 4 16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import whole_graph_step  # noqa: E402

import pcg  # noqa: E402
from pcg.batch import BatchMeta  # noqa: E402
from pcg.models import qwen3_moe_model  # noqa: E402
from pcg.registry import RunContext, running  # noqa: E402
from pcg.timing import cuda_time_ms, device_time_ms, host_us, paired_time_ms  # noqa: E402

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def trace(fn, label: str) -> dict:
    """One traced call of ``fn``: host latency, GPU busy, gaps."""
    torch.cuda.synchronize()
    acts = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[acts.CPU, acts.CUDA]) as prof:
        for _ in range(2):  # the first traced call warms the profiler up; the second is measured
            torch.cuda.synchronize()
            with torch.profiler.record_function(label):
                fn()
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.unlink(path)
    marks = sorted((e for e in events if e.get("name") == label and e.get("ph") == "X"
                    and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    if not marks:
        return {"error": "no trace marker"}
    t0 = marks[-1]["ts"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and e.get("ph") == "X" and e["ts"] >= t0),
                 key=lambda e: e["ts"])
    if not gpu:
        return {"error": "no GPU activity traced"}
    busy, gaps, end = 0.0, [], gpu[0]["ts"]
    prev = None
    for e in gpu:
        s, d = e["ts"], e.get("dur", 0)
        if prev is not None and s > end:
            gaps.append((s - end, prev["name"][:60], e["name"][:60]))
        busy += max(0.0, s + d - max(s, end))
        if s + d > end:
            end, prev = s + d, e
    gaps.sort(reverse=True)
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and e["ts"] >= t0
                and e["name"] in ("cudaGraphLaunch", "cudaLaunchKernel", "cudaLaunchKernelExC")]
    return {"host_latency_us": gpu[0]["ts"] - t0, "gpu_span_us": end - gpu[0]["ts"],
            "gpu_busy_us": busy, "gaps_us": sum(g[0] for g in gaps), "num_gaps": len(gaps),
            "gpu_activities": len(gpu), "host_launch_calls": len(launches),
            "host_enqueue_us": marks[-1].get("dur", 0.0),
            "top_gaps": [(round(g, 1), a, b) for g, a, b in gaps[:8]]}


@torch.inference_mode()
def peel(wrapped, ids: torch.Tensor, reps: int) -> dict:
    """Event and host times of pcg's call, layer by layer of its software."""
    eng = wrapped.engine()
    t = ids.shape[1]
    chain = eng.graphs[t].chain
    reg = wrapped.registry

    def chain_only():
        batch = BatchMeta(t, [0, t], eng.static_pos[:t], t)
        with running(RunContext(reg, batch, eng.num_valid)):
            chain.replay()

    variants = {"wrapped": lambda: wrapped(input_ids=ids),
                "engine.replay": lambda: eng.replay(ids[0], None, [0, t], t),
                "chain": chain_only}
    out = {name: {"ms": cuda_time_ms(fn, reps=reps), "host_us": host_us(fn),
                  "device_ms": device_time_ms(fn, reps=reps)} for name, fn in variants.items()}
    layer = reg.attention_layers[0]
    c = wrapped.model.config
    q = torch.randn(t, c.num_attention_heads, c.head_dim, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(t, c.num_key_value_heads, c.head_dim, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(q)

    def one_split():
        batch = BatchMeta(t, [0, t], eng.static_pos[:t], t)
        with running(RunContext(reg, batch, eng.num_valid)):
            torch.ops.pcg.attention_out(q, kv, kv, o, layer.layer_id)

    meta = BatchMeta(t, [0, t], None, t).host_meta()

    def one_native_call():
        torch.ops.pcg.causal_attention_out(q, kv, kv, o, meta, layer.scaling, -1)

    for name, fn in (("one split via Python", one_split), ("one split, C++ op only", one_native_call)):
        out[name] = {"ms": cuda_time_ms(fn, reps=reps), "host_us": host_us(fn),
                     "device_ms": device_time_ms(fn, reps=reps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16, 256])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("split_cost: no CUDA device; nothing to measure")
        return
    model = qwen3_moe_model(args.layers, dtype=torch.bfloat16, device="cuda")
    wrapped = pcg.wrap(model, buckets=args.tokens, progress=False).capture()
    res = {}
    for t in args.tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, t), device="cuda")
        whole = whole_graph_step(wrapped, ids)

        def piecewise():
            return wrapped(input_ids=ids)

        w_ms, p_ms = paired_time_ms([whole, piecewise], reps=args.reps)
        row = {"whole_ms": w_ms, "pcg_ms": p_ms, "whole_device_ms": device_time_ms(whole, reps=args.reps),
               "pcg_device_ms": device_time_ms(piecewise, reps=args.reps)}
        torch.cuda.synchronize()
        h0 = time.perf_counter()
        piecewise()
        row["pcg_host_us"] = (time.perf_counter() - h0) * 1e6
        torch.cuda.synchronize()
        row["whole"] = trace(whole, "whole")
        row["pcg"] = trace(piecewise, "pcg")
        res[t] = row
        print(f"\nT={t}: whole-graph {row['whole_ms']:.3f} ms, pcg {row['pcg_ms']:.3f} ms "
              f"(ratio {row['pcg_ms'] / row['whole_ms']:.3f}); pcg host enqueue {row['pcg_host_us']:.0f} us")
        print(f"  GPU side only (host work hidden behind a spin): whole-graph {row['whole_device_ms']:.3f} ms, "
              f"pcg {row['pcg_device_ms']:.3f} ms (-1: the host was never hidden)")
        for mode in ("whole", "pcg"):
            r = row[mode]
            if "error" in r:
                print(f"  {mode}: {r['error']}")
                continue
            print(f"  {mode:>5}: host latency {r['host_latency_us']:.1f} us, GPU span {r['gpu_span_us']:.1f}, "
                  f"busy {r['gpu_busy_us']:.1f}, gaps {r['gaps_us']:.1f} us in {r['num_gaps']}, "
                  f"{r['gpu_activities']} GPU activities, {r['host_launch_calls']} launch calls")
            for g in r["top_gaps"]:
                print(f"         gap {g[0]:>6} us: {g[1]}  ->  {g[2]}")
        row["peel"] = peel(wrapped, ids, args.reps)
        splits = wrapped.report().split_calls_per_bucket.get(t, 0)
        row["split_calls"] = splits
        print(f"  without the profiler ({splits} attention splits per call"
              f"{'; attention inside the graph' if splits == 0 else ''}):")
        for name, v in row["peel"].items():
            gpu = f"{v['device_ms'] * 1e3:8.1f} us" if v["device_ms"] >= 0 else "not hidden"
            print(f"    {name:<24} {v['ms'] * 1e3:8.1f} us (events)   host enqueue {v['host_us']:7.1f} us   "
                  f"GPU side {gpu}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "split_cost.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
