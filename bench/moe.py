"""MoE layer (routed experts) benchmark on one GPU, bf16:

  pcg eager     torch.ops.pcg.fused_moe called eagerly, w13 in the layout pcg.wrap
                gives it (--w13-block, default 8: the activation inside GEMM1 on
                the CUTLASS path)
  pcg graph     the same call captured in a CUDA graph, replayed (one synchronised
                replay per call: includes the host's graph launch, a few us)
  pcg chain     per-call time of CHAIN calls (rotating the input sets) captured
                back to back in one graph: the op as one node among others in a
                model's graph, its kernels and the gaps between them, no host
                launch (the GPU spins while the host enqueues the chain, so the
                events see only the GPU's work; calls under ~0.5 ms: 4-16 calls,
                about 2 ms a chain; longer calls: the graph of one call)
  grouped_mm    a torch._grouped_mm implementation (sort pairs by expert with
                torch ops, int32 offsets, grouped_mm for w13 and w2, silu*up,
                weighted scatter-add combine), captured and replayed
  TFLOP/s       FLOPs / pcg graph time (with the host's launch); "GPU TF/s"
                FLOPs / pcg chain time (the GPU's work alone)
  floor         max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s) with
                bytes = (#distinct experts hit) * 3*H*I*2 + T*H*2*2 and
                FLOPs = 2*T*topk*3*H*I (H200 measured peaks)

Routing is uniform: random logits -> softmax -> top-k (renormalised). Timings
are medians of CUDA-event timings of synchronised calls that rotate through
--sets input sets (different hidden states and routing); the three
implementations are timed in alternation (eager, graph, grouped_mm, eager, ...)
so clock drift over the run hits them alike. Prints a table, writes
JSON and a PNG plot to --out (default bench/out).

    python bench/moe.py                       # all shapes, T = 1 .. 16384
    python bench/moe.py --shapes qwen3 --tokens 1 16 256
    python bench/moe.py --cutlass             # pcg forced onto the CUTLASS sm_90a path

Without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

SHAPES = {
    # name: (E, topk, H, I)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "gpt-oss-20b": (32, 4, 2880, 2880),
}
DEFAULT_T = [2 ** i for i in range(15)]  # 1 .. 16384
PEAK_BW = 4.3e12
PEAK_FLOPS = 790e12
CHAIN_HIDE_US = 1000.0  # GPU spin before a timed chain: its host launch is not timed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_inputs(T, E, k, H, gen_seed, device):
    g = torch.Generator(device="cpu").manual_seed(gen_seed)
    hidden = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return hidden, w.to(device, torch.float32), ids.to(device, torch.int32)


def moe_weights(E, H, I, device, w13_block=0):
    """bf16 w13 [E, 2I, H] (in the block layout of w13_block, 0: plain) and w2
    [E, H, I], scaled by 1/sqrt(fan-in), drawn on `device` from torch's global
    generator (the caller seeds it)."""
    import pcg
    w13 = torch.randn(E, 2 * I, H, device=device, dtype=torch.bfloat16) * H ** -0.5
    if w13_block:
        w13 = pcg.interleave_w13(w13, w13_block)
    w2 = torch.randn(E, H, I, device=device, dtype=torch.bfloat16) * I ** -0.5
    return w13, w2


def grouped_mm_moe(hidden, w13, w2, topk_weights, topk_ids):
    """Unfused reference implementation around torch._grouped_mm (capturable)."""
    T, H = hidden.shape
    E, I2, _ = w13.shape
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    x = hidden.index_select(0, tok)
    counts = torch.zeros(E, dtype=torch.int32, device=hidden.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    y = y.float() * topk_weights.reshape(-1).index_select(0, order).unsqueeze(1)
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, tok, y)
    return out.to(hidden.dtype)


def time_us(fns, iters):
    """Median microseconds of fns[i % len(fns)]() over iters calls (events per call)."""
    from pcg.timing import cuda_time_ms
    return cuda_time_ms(fns, warmup=1, reps=iters) * 1e3


class Rotation:
    """Calls fns[start], fns[start + 1], ... in turn (one per input set), so
    repeated calls do not just measure the L2 cache."""

    def __init__(self, fns, start=0):
        self.fns, self.i = list(fns), start

    def __call__(self):
        f = self.fns[self.i % len(self.fns)]
        self.i += 1
        return f()


def paired_us(rotations, iters, hide_host_us=None):
    """Median microseconds of each rotation, measured in alternation (a, b, c,
    a, b, c, ...; events per synchronised call), so a drift of the clocks over
    the run (heavy GEMMs heat the GPU) hits every implementation alike.
    hide_host_us: per rotation, the GPU spin that hides the host's launch
    (0: the launch is timed)."""
    from pcg.timing import paired_time_ms
    ms = paired_time_ms(rotations, warmup=1, reps=iters, hide_host_us=hide_host_us)
    return [m * 1e3 if m >= 0 else float("nan") for m in ms]  # -1: no repetition was hidden


def capture(fn):
    """Captures fn() (after a warm-up on a side stream); returns (graph, output)."""
    from pcg.timing import capture_graph
    return capture_graph(fn)


def chain_len(call_us, sets):
    """Calls per chain graph: up to 16 and about 2 ms of work (longer runs of
    back-to-back heavy calls heat the GPU and slow what is timed next to them),
    one more than a multiple of `sets`; 0 (no chain) below 4 calls, i.e. for
    calls over ~0.5 ms, where the host launch is under 1% anyway."""
    n = min(16, int(2000.0 / max(call_us, 1e-3)))
    n = (n - 1) // sets * sets + 1 if n >= 1 else 0
    return n if n >= 4 else 0


def floor_us(sets, E, k, H, I, T):
    hit = statistics.mean(int(torch.unique(ids).numel()) for _, _, ids in sets)
    bytes_ = hit * 3 * H * I * 2 + T * H * 2 * 2
    flops = 2 * T * k * 3 * H * I
    return max(bytes_ / PEAK_BW, flops / PEAK_FLOPS) * 1e6, flops, hit


def bench_shape(name, E, k, H, I, tokens, args, device):
    import pcg

    g = torch.Generator(device="cpu").manual_seed(1234)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, torch.bfloat16)
    # pcg runs w13 in the layout pcg.wrap gives it (the activation fused into
    # GEMM1 on the CUTLASS path); grouped_mm the plain one.
    from pcg.ops.fused_moe import w13_block_for
    blk = w13_block_for(I, args.w13_block)
    w13p = pcg.interleave_w13(w13, blk)

    def pcg_moe(hidden, wts, ids):
        return pcg.fused_moe(hidden, w13p, w2, wts, ids, config=cfg, w13_block=blk)

    # Correctness of both implementations against each other before timing.
    hidden, wts, ids = make_inputs(args.check_t, E, k, H, 7, device)
    cfg = [-1, -1, -1] if args.cutlass else None  # [-1, -1, -1]: the CUTLASS sm_90a path
    a = pcg_moe(hidden, wts, ids)
    try:
        b = grouped_mm_moe(hidden, w13, w2, wts, ids)
        err = rel(a, b)
        gmm_ok = True
    except Exception as exc:  # e.g. a GPU without grouped_mm support
        print(f"[{name}] torch._grouped_mm unavailable: {exc}", file=sys.stderr)
        err, gmm_ok = float("nan"), False
    print(f"[{name}] check T={args.check_t}: rel err pcg vs grouped_mm = {err:.3e}")
    rows = []
    for T in tokens:
        sets = [make_inputs(T, E, k, H, 100 + s, device) for s in range(args.sets)]
        fl_us, flops, hit = floor_us(sets, E, k, H, I, T)
        eager = [lambda s=s: pcg_moe(*s) for s in sets]
        graphs = [capture(f)[0] for f in eager]
        # Chains j = 0, 1, ... start on set j; n_chain % sets == 1 ends them on set j too.
        from pcg.timing import cuda_time_ms
        n_chain = chain_len(cuda_time_ms([gr.replay for gr in graphs], warmup=1, reps=6) * 1e3,
                            len(sets))
        chains = [capture(lambda j=j: [pcg_moe(*sets[(j + i) % len(sets)])
                                       for i in range(n_chain)])[0]
                  for j in range(len(sets) if n_chain else 0)]
        # Calls too long for a chain: the one-call graphs, timed as a chain of one.
        chain_fns = [c.replay for c in chains] if chains else [gr.replay for gr in graphs]
        chain_calls = n_chain if chains else 1
        impls = [eager, [gr.replay for gr in graphs], chain_fns]
        ggraphs = []
        if gmm_ok:
            try:
                ggraphs = [capture(lambda s=s: grouped_mm_moe(s[0], w13, w2, s[1], s[2]))[0]
                           for s in sets]
                impls.append([gr.replay for gr in ggraphs])
            except Exception as exc:
                print(f"[{name}] grouped_mm T={T} failed: {exc}", file=sys.stderr)
        # Staggered starts: in the alternation no call follows a call on the
        # same input set (whose experts' weights would still be in L2); needs
        # --sets >= 3 with grouped_mm. A chain starts and ends on round r's set r.
        starts = [0, 1, 0, 2]
        if not ggraphs:
            starts[1] = 2
        timed = [Rotation(fns, st) for fns, st in zip(impls, starts)]
        # Only the chain hides its launch (1 ms of spin covers the host's
        # enqueue of one graph many times over).
        hide = [0.0, 0.0, CHAIN_HIDE_US] + ([0.0] if ggraphs else [])
        us = paired_us(timed, args.iters, hide)
        eager_us, graph_us = us[0], us[1]
        chain_us = us[2] / chain_calls
        gmm_us = us[-1] if ggraphs else float("nan")
        del graphs, ggraphs, timed, chains, chain_fns, impls
        from pcg.ops.fused_moe import fused_moe_config, fused_moe_paths
        cutlass, stream = fused_moe_paths(device)  # the paths this device lets the op take
        config = cfg or list(fused_moe_config(E, k, H, I, T, torch.bfloat16, cutlass=cutlass,
                                              stream=stream))
        row = dict(shape=name, E=E, topk=k, H=H, I=I, T=T, config=config, w13_block=blk,
                   experts_hit=hit, floor_us=fl_us,
                   pcg_eager_us=eager_us, pcg_graph_us=graph_us, pcg_chain_us=chain_us,
                   chain_calls=chain_calls, grouped_mm_us=gmm_us,
                   pcg_over_floor=graph_us / fl_us, pcg_over_grouped_mm=graph_us / gmm_us,
                   chain_over_floor=chain_us / fl_us,
                   tflops=flops / (graph_us * 1e-6) / 1e12,
                   tflops_gpu=flops / (chain_us * 1e-6) / 1e12, check_rel_err=err)
        rows.append(row)
        print(f"{name:17s} {T:6d} {fl_us:9.1f} {eager_us:9.1f} {graph_us:9.1f} {chain_us:9.1f} "
              f"{gmm_us:9.1f} {row['pcg_over_floor']:8.2f} {row['chain_over_floor']:8.2f} "
              f"{row['pcg_over_grouped_mm']:8.2f} "
              f"{row['tflops']:8.1f} {row['tflops_gpu']:8.1f}   {config}", flush=True)
        del sets
        torch.cuda.empty_cache()
    del w13, w13p, w2
    torch.cuda.empty_cache()
    return rows


def shape_panels(rows, width=5.0, height=4.0):
    """One matplotlib panel per shape of rows (in order): (fig, [(ax, shape,
    its rows)]), or None without matplotlib (after saying so)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    names = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names), height), squeeze=False)
    return fig, [(ax, name, [r for r in rows if r["shape"] == name]) for ax, name in zip(axes[0], names)]


def plot(rows, path):
    panels = shape_panels(rows)
    if panels is None:
        return
    fig, panels = panels
    for ax, name, rs in panels:
        ts = [r["T"] for r in rs]
        for key, label in [("floor_us", "floor"), ("pcg_graph_us", "pcg graph"),
                           ("pcg_chain_us", "pcg chain"),
                           ("pcg_eager_us", "pcg eager"), ("grouped_mm_us", "grouped_mm graph")]:
            ax.plot(ts, [r[key] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("us")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES),
                    help="shape names or unique prefixes: " + ", ".join(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=DEFAULT_T)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sets", type=int, default=3, help="rotated input sets")
    ap.add_argument("--check-t", type=int, default=256)
    ap.add_argument("--cutlass", action="store_true",
                    help="force pcg onto config [-1, -1, -1] (the CUTLASS sm_90a path)")
    ap.add_argument("--w13-block", type=int, default=8,
                    help="pcg's w13 row layout (8 = pcg.FUSED_W13_BLOCK, what pcg.wrap uses; "
                         "0: gate rows then up rows, the activation as a separate kernel)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/moe.py needs a CUDA GPU; nothing to do.")
        return 0
    names = []
    for s in args.shapes:
        match = [n for n in SHAPES if n.startswith(s)]
        if len(match) != 1:
            ap.error(f"unknown or ambiguous shape {s!r}; choose from {list(SHAPES)}")
        names.append(match[0])
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'shape':17s} {'T':>6s} {'floor':>9s} {'eager':>9s} {'graph':>9s} {'chain':>9s} "
          f"{'gmm':>9s} {'pcg/flr':>8s} {'chn/flr':>8s} {'pcg/gmm':>8s} {'TFLOP/s':>8s} {'GPU TF/s':>8s}   "
          f"config (-1: CUTLASS, -2: stream)   (us)")
    rows = []
    for name in names:
        E, k, H, I = SHAPES[name]
        # Each shape's weights in fresh allocations, as a model load places them: carved
        # from the previous shape's cached blocks, DeepSeek-V2-Lite's T = 1 ran 10% slower
        # after Mixtral's (session 20; not the GPU's heat: a 5 s pause changed nothing).
        torch.cuda.empty_cache()
        rows += bench_shape(name, E, k, H, I, args.tokens, args, device)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, iters=args.iters,
                sets=args.sets, cutlass=args.cutlass, w13_block=args.w13_block, peak_bw=PEAK_BW,
                peak_flops=PEAK_FLOPS)
    stem = "moe_cutlass" if args.cutlass else "moe"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {os.path.join(args.out, f'{stem}.json')}")
    plot(rows, os.path.join(args.out, f"{stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
