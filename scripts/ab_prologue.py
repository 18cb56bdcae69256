"""A/B (one process, graphs replayed in alternation) of fused_moe with the
tuning table's configs and w13 in the block layout (as bench/moe.py): the
CUTLASS path's prologue as one kernel (moe_prepare.cuh) with its default limit
("prep") or up to 16384 pairs whatever the pairs per expert ("prep16k"),
against the align, permute and setup kernels ("main" and, captured last,
"main2": PCG_MOE_PROLOGUE_MAX_PAIRS=0, read at each call, so at capture). Prints "no CUDA device" and exits without one.
Each cell: per-call us of CHAIN calls in a graph (8 at T <= 128, else 1), host
launch hidden (GPU-only), and TFLOP/s counting 2*T*k*3*H*I.
    AB_TOKENS=1024,8192 python scripts/ab_prologue.py [shape ...]
AB_VARIANTS="name:KEY=V,...;..." replaces the variants: environment settings,
and CONFIG=a:b:c forces fused_moe's config (e.g. CONFIG=-1:1:4); G2=direct
takes the tuning table's config with GEMM2's variant replaced by its twin
(same tile and schedule) with the direct-store epilogue. AB_SHAPES=a,b names
the shapes when no argument does; AB_SETS the input sets the chain rotates
through (default 2), AB_REPS the timed repetitions (default 40), AB_REVERSE=1 times the variants
in the reverse of their capture order."""
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from moe import SHAPES, make_inputs, moe_weights  # noqa: E402
import pcg  # noqa: E402
from pcg.ops.fused_moe import (fused_moe_config, fused_moe_cutlass_variants,  # noqa: E402
                                w13_block_for)
from pcg.timing import capture_graph, paired_time_ms  # noqa: E402

VARIANTS = {  # name: env
    "main": {"PCG_MOE_PROLOGUE_MAX_PAIRS": "0"},
    "prep": {},
    "prep16k": {"PCG_MOE_PROLOGUE_MAX_PAIRS": "16384"},
    "main2": {"PCG_MOE_PROLOGUE_MAX_PAIRS": "0"},  # main again, captured last: the spread
}
KNOBS = ("PCG_MOE_PROLOGUE_MAX_PAIRS",)
# AB_VARIANTS="name:KEY=V,KEY=V;name2:..." replaces the variants (any knobs).
if os.environ.get("AB_VARIANTS"):
    VARIANTS = {}
    for spec in os.environ["AB_VARIANTS"].split(";"):
        vname, _, kvs = spec.partition(":")
        VARIANTS[vname] = dict(x.split("=", 1) for x in kvs.split(",") if x)
    KNOBS = tuple({key for env in VARIANTS.values() for key in env
                   if key not in ("CONFIG", "G2")})
SETS = int(os.environ.get("AB_SETS", "2"))  # input sets the chain rotates through
if not torch.cuda.is_available():
    print("ab_prologue: no CUDA device")
    sys.exit(0)
dev = torch.device("cuda")
CUTLASS_VARIANTS = fused_moe_cutlass_variants()


def twin_of(g2, kind):
    """GEMM2's variant g2 (-1: the default) -> the variant of the same kernel
    shape and schedule with the direct-store epilogue (kind "direct", the one
    kind); g2 itself when there is none."""
    assert kind == "direct", f"G2={kind}: only G2=direct is known"
    v = CUTLASS_VARIANTS[0 if g2 == -1 else g2]
    shape = (v.pingpong, v.tile_m, v.tile_n, v.tile_k, v.cluster_m, v.swap_ab)
    for w in CUTLASS_VARIANTS:
        if (w.pingpong, w.tile_m, w.tile_n, w.tile_k, w.cluster_m, w.swap_ab) == shape and \
                w.direct_store:
            return w.id
    return g2


names = sys.argv[1:] or [n for n in os.environ.get("AB_SHAPES", "").split(",") if n] or list(SHAPES)
print("GPU-only us per call (TFLOP/s); variants:", ", ".join(VARIANTS), flush=True)
for name in names:
    E, k, H, I = SHAPES[name]
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    blk = w13_block_for(I, 8)
    w13, w2 = moe_weights(E, H, I, dev, blk)
    for T in [int(x) for x in os.environ.get("AB_TOKENS", "16,32,64,128,512,1024,2048").split(",")]:
        sets = [make_inputs(T, E, k, H, 100 + i, dev) for i in range(SETS)]
        chain = 8 if T <= 128 else 1
        graphs, outs, cfgs = [], [], []
        for env in VARIANTS.values():
            for kn in KNOBS:
                os.environ.pop(kn, None)
            env = dict(env)
            cfg = env.pop("CONFIG", None)
            cfg = [int(x) for x in cfg.split(":")] if cfg else None
            g2kind = env.pop("G2", None)
            if g2kind:
                cfg = list(fused_moe_config(E, k, H, I, T, torch.bfloat16, cutlass=True,
                                            stream=True))
                if cfg[0] == -1:
                    cfg[2] = twin_of(cfg[2], g2kind)
            os.environ.update(env)

            def call(i, cfg=cfg):
                h, w, ids = sets[i % SETS]
                return pcg.fused_moe(h, w13, w2, w, ids, w13_block=blk, config=cfg)
            outs.append(call(0).float())
            cfgs.append(cfg)
            graphs.append(capture_graph(lambda: [call(i) for i in range(chain)])[0])
        for kn in KNOBS:
            os.environ.pop(kn, None)
        diffs = [(o - outs[0]).abs().max().item() for o in outs[1:]]
        fns = [g.replay for g in graphs]
        reps = int(os.environ.get("AB_REPS", "40"))
        # AB_REVERSE=1: timed in the reverse of the capture order (which one
        # runs after which), to tell the two orders' effects apart.
        order = list(range(len(fns)))[::-1] if os.environ.get("AB_REVERSE") == "1" else \
            list(range(len(fns)))
        timed = paired_time_ms([fns[i] for i in order], warmup=3, reps=reps,
                               hide_host_us=[1000.0] * len(fns))
        ms = [0.0] * len(fns)
        for i, m in zip(order, timed):
            ms[i] = m / chain
        fl = 2.0 * T * k * 3 * H * I
        cells = "  ".join(f"{v} {m * 1e3:8.2f} ({fl / (m * 1e-3) / 1e12:4.0f})"
                          for v, m in zip(VARIANTS, ms))
        forced = "  ".join(f"{v}={c}" for v, c in zip(VARIANTS, cfgs) if c is not None)
        print(f"{name:17s} T={T:5d}: {cells}  max|diff| {max(diffs):.1e}  {forced}", flush=True)
        del graphs, sets
    del w13, w2
