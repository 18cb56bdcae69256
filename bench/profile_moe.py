"""Per-kernel GPU time of pcg::fused_moe (torch.profiler), to see where the
gap to the floor is: which of align / GEMM1 / GEMM2 / reduce dominates at each
(shape, T).

    python bench/profile_moe.py                         # default grid
    python bench/profile_moe.py --shapes qwen3 --tokens 1 1024
    ncu --kernel-name regex:moe_ --section SpeedOfLight --section Occupancy \
        python bench/profile_moe.py --plain --shapes qwen3 --tokens 1 16384   # hardware counters

Prints one table (us per call, averaged over --iters graph replays). --plain
only calls the op eagerly --iters times (no profiler, no graphs: for ncu).
Without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe import SHAPES, make_inputs  # noqa: E402


def short(name: str) -> str:
    for key in ("moe_align", "moe_gemm_tc", "moe_gemm_simt", "moe_reduce"):
        if key in name:
            gated = "true" in name.split(key, 1)[1][:200] if "gemm" in key else None
            return key + ("[gemm1]" if gated else "[gemm2]" if gated is False else "")
    # the CUTLASS path and the stream path
    for key in ("grouped_setup", "unpermute_reduce", "permute_kernel", "gated_act", "stream_up",
                "stream_down"):
        if key in name:
            return key
    if "cutlass" in name or "GemmUniversal" in name:
        # GEMM1 is cooperative; GEMM2 is pingpong unless built with
        # PCG_MOE_GEMM2=cooperative (then both are this one kernel type).
        return "cutlass_gemm[pingpong]" if "Pingpong" in name else "cutlass_gemm[cooperative]"
    return name[:40]


def profile_one(E, k, H, I, T, iters, device, config=None):
    import pcg
    from pcg.timing import capture_graph
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, torch.bfloat16)
    hidden, wts, ids = make_inputs(T, E, k, H, 5, device)
    graph, _ = capture_graph(lambda: pcg.fused_moe(hidden, w13, w2, wts, ids, config=config))
    graph.replay()
    torch.cuda.synchronize()
    acts = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[acts.CUDA]) as prof:
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[short(ev.name)] += ev.device_time / iters
    return dict(per)


def plain_calls(E, k, H, I, T, iters, device, config=None):
    import pcg
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, torch.bfloat16)
    hidden, wts, ids = make_inputs(T, E, k, H, 5, device)
    for _ in range(iters):
        pcg.fused_moe(hidden, w13, w2, wts, ids, config=config)
    torch.cuda.synchronize()
    print(f"E={E} k={k} H={H} I={I} T={T}: {iters} eager calls", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 16, 128, 1024, 4096, 16384])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--plain", action="store_true", help="eager calls only (run under ncu)")
    ap.add_argument("--config", nargs=3, type=int, default=None,
                    help="force [block_m, tile1, tile2], e.g. -1 -1 -1 (CUTLASS) or -2 -1 -1 (stream)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/profile_moe.py needs a CUDA GPU; nothing to do.")
        return 0
    device = torch.device("cuda")
    for s in args.shapes:
        name = next(n for n in SHAPES if n.startswith(s))
        E, k, H, I = SHAPES[name]
        for T in args.tokens:
            if args.plain:
                plain_calls(E, k, H, I, T, args.iters, device, args.config)
                continue
            per = profile_one(E, k, H, I, T, args.iters, device, args.config)
            total = sum(per.values())
            parts = "  ".join(f"{n} {v:.1f}" for n, v in sorted(per.items(), key=lambda x: -x[1]))
            print(f"{name:17s} T={T:6d} kernels {total:9.1f} us | {parts}", flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
