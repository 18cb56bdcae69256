"""A/B (one process, graphs replayed in alternation) of the up kernel's K
rotation and early argument reads against the rules (library of branch
wip/s21-rot-knob: knobs PCG_STREAM_UP_ROT / PCG_STREAM_UP_EARLY override
moe::stream_up_rotate / stream_up_early_args, read at each call). Chain =
per-call time of 16 calls in one graph, 4 weight copies rotated.
    python scripts/ab_rot_s21.py [shape ...]"""
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from moe import SHAPES as BENCH_SHAPES, make_inputs, floor_us  # noqa: E402
SHAPES = dict(BENCH_SHAPES, **{"olmoe-like": (64, 8, 2048, 1024), "e32-k4-h4096-i2048": (32, 4, 4096, 2048)})
import pcg  # noqa: E402
from pcg.timing import capture_graph, paired_time_ms  # noqa: E402

VARIANTS = {"rule": {}, "norot": {"PCG_STREAM_UP_ROT": "0"}, "rot": {"PCG_STREAM_UP_ROT": "1"},
            "noearly": {"PCG_STREAM_UP_EARLY": "0"}}
KNOBS = ("PCG_STREAM_UP_ROT", "PCG_STREAM_UP_EARLY")
SETS, CHAIN = 4, 16
dev = torch.device("cuda")
names = sys.argv[1:] or ["qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b", "mixtral-8x7b"]
print("chain us per call (x floor); variants:", ", ".join(VARIANTS), flush=True)
for name in names:
    E, k, H, I = SHAPES[name]
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    copies = max(1, min(SETS, int(40e9 // (E * 3 * H * I * 2))))
    ws = [(torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H ** -0.5,
           torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I ** -0.5) for _ in range(copies)]
    for T in [int(x) for x in os.environ.get("AB_TOKENS", "1,2,4,8,16,32").split(",")]:
        if T * k > 128:
            continue
        sets = [make_inputs(T, E, k, H, 100 + i, dev) for i in range(SETS)]
        fl, _, _ = floor_us(sets, E, k, H, I, T)
        chains, outs = [], []
        for env in VARIANTS.values():
            for kn in KNOBS:
                os.environ.pop(kn, None)
            os.environ.update(env)

            def call(i):
                h, w, ids = sets[i % SETS]
                w13, w2 = ws[i % copies]
                return pcg.fused_moe(h, w13, w2, w, ids, config=[-2, -1, -1])
            outs.append(call(0).float())
            chains.append(capture_graph(lambda: [call(i) for i in range(CHAIN)])[0])
        for kn in KNOBS:
            os.environ.pop(kn, None)
        diff = max((o - outs[0]).abs().max().item() for o in outs[1:])
        ms = paired_time_ms([c.replay for c in chains], warmup=3, reps=60)
        us = [m * 1e3 / CHAIN for m in ms]
        cells = "  ".join(f"{v} {u:7.2f} ({u / fl:.3f})" for v, u in zip(VARIANTS, us))
        print(f"{name:17s} T={T:3d}: floor {fl:7.1f}  {cells}  max|diff| {diff:.1e}", flush=True)
        del chains
    del ws
