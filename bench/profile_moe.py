"""Per-kernel GPU time of pcg::fused_moe (torch.profiler), to see where the
gap to the floor is: which of align / GEMM1 / GEMM2 / reduce dominates at each
(shape, T).

    python bench/profile_moe.py                         # default grid
    python bench/profile_moe.py --shapes qwen3 --tokens 1 1024
    ncu --kernel-name regex:moe_ --section SpeedOfLight --section Occupancy \
        python bench/profile_moe.py --plain --shapes qwen3 --tokens 1 16384   # hardware counters

Prints one table (us per call, averaged over --iters graph replays); the
CUTLASS path's GEMMs show as cutlass_gemm1[variant] / cutlass_gemm2[variant]
(csrc/moe/grouped_gemm_variants.h). --plain only calls the op eagerly --iters
times (no profiler, no graphs: for ncu).
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


def is_cutlass_gemm(name: str) -> bool:
    return "GemmUniversal" in name or "cutlass::device_kernel" in name


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
    if is_cutlass_gemm(name):  # named by cutlass_gemm_labels (GEMM and variant)
        return "cutlass_gemm"
    return name[:40]


def cutlass_gemm_labels(config, variants):
    """("cutlass_gemm1[name]", "cutlass_gemm2[name]") of a CUTLASS config
    [-1, g1, g2] (-1: variant 0, the default): each call launches GEMM1's
    kernel, then GEMM2's, so the k-th CUTLASS kernel of a replay in launch
    order is GEMM (k % 2) + 1."""
    names = {v.id: v.name for v in variants}
    return tuple(f"cutlass_gemm{i + 1}[{names.get(0 if g == -1 else g, f'variant {g}')}]"
                 for i, g in enumerate(config[1:]))


def schedule_matches(kernel_name: str, variant_name: str) -> bool:
    """The profiled kernel's schedule (CUTLASS's type name) is the variant's."""
    want = "Pingpong" if variant_name.startswith("pingpong") else "Cooperative"
    return want in kernel_name or "WarpSpecialized" not in kernel_name


def chosen_config(E, k, H, I, T, device, config):
    """The config the op runs: the forced one, else the table's for this device."""
    if config is not None:
        return list(config)
    from pcg.ops.fused_moe import fused_moe_config, fused_moe_paths
    cutlass, stream = fused_moe_paths(device)
    return list(fused_moe_config(E, k, H, I, T, torch.bfloat16, cutlass=cutlass, stream=stream))


def _weights(E, H, I, device, w13_block):
    import pcg
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, torch.bfloat16)
    from pcg.ops.fused_moe import w13_block_for
    blk = w13_block_for(I, w13_block)
    return pcg.interleave_w13(w13, blk), w2, blk


def profile_one(E, k, H, I, T, iters, device, config=None, w13_block=8):
    import pcg
    from pcg.ops.fused_moe import fused_moe_cutlass_variants
    from pcg.timing import capture_graph
    cfg = chosen_config(E, k, H, I, T, device, config)
    gemm_labels = (cutlass_gemm_labels(cfg, fused_moe_cutlass_variants()) if cfg[0] == -1
                   else ("cutlass_gemm?", "cutlass_gemm?"))
    w13, w2, blk = _weights(E, H, I, device, w13_block)
    hidden, wts, ids = make_inputs(T, E, k, H, 5, device)
    graph, _ = capture_graph(lambda: pcg.fused_moe(hidden, w13, w2, wts, ids, config=config,
                                                   w13_block=blk))
    graph.replay()
    torch.cuda.synchronize()
    acts = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[acts.CUDA]) as prof:
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
    per = defaultdict(float)
    evs = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda ev: ev.time_range.start)  # launch order on the one stream
    n_gemm = 0
    for ev in evs:
        name = short(ev.name)
        if name == "cutlass_gemm":
            name = gemm_labels[n_gemm % 2]
            n_gemm += 1
            if not schedule_matches(ev.name, name):
                name += "(schedule?)"  # the launch-order assumption broke
        per[name] += ev.device_time / iters
    return cfg, dict(per)


def plain_calls(E, k, H, I, T, iters, device, config=None, w13_block=8):
    import pcg
    w13, w2, blk = _weights(E, H, I, device, w13_block)
    hidden, wts, ids = make_inputs(T, E, k, H, 5, device)
    for _ in range(iters):
        pcg.fused_moe(hidden, w13, w2, wts, ids, config=config, w13_block=blk)
    torch.cuda.synchronize()
    print(f"E={E} k={k} H={H} I={I} T={T}: {iters} eager calls", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 16, 128, 1024, 4096, 16384])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--plain", action="store_true", help="eager calls only (run under ncu)")
    ap.add_argument("--w13-block", type=int, default=8,
                    help="w13 row layout (8: pcg.wrap's; 0: plain, separate activation kernel)")
    ap.add_argument("--config", nargs=3, type=int, default=None,
                    help="force [block_m, tile1, tile2], e.g. -1 -1 -1 (CUTLASS, default GEMM "
                         "kernels), -1 0 1 (CUTLASS, GEMM2 on variant 1) or -2 -1 -1 (stream)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/profile_moe.py needs a CUDA GPU; nothing to do.")
        return 0
    device = torch.device("cuda")
    for s in args.shapes:
        name = next(n for n in SHAPES if n.startswith(s))
        E, k, H, I = SHAPES[name]
        for T in args.tokens:
            try:
                if args.plain:
                    plain_calls(E, k, H, I, T, args.iters, device, args.config, args.w13_block)
                    continue
                cfg, per = profile_one(E, k, H, I, T, args.iters, device, args.config,
                                       args.w13_block)
            except ValueError as exc:  # a forced config this call cannot take
                if args.config is None:
                    raise
                print(f"{name:17s} T={T:6d} config {args.config}: skipped ({exc})", flush=True)
                continue
            total = sum(per.values())
            parts = "  ".join(f"{n} {v:.1f}" for n, v in sorted(per.items(), key=lambda x: -x[1]))
            print(f"{name:17s} T={T:6d} config {cfg} kernels {total:9.1f} us | {parts}",
                  flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
