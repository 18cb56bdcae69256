"""Side by side on one GPU: fused_moe's default (tuning table, mma.sync) path vs
the CUTLASS sm_90a path (config [-1, -1, -1]), graph replay, bf16, per (shape, T);
plus the relative error of each against a float32 torch reference. A diagnostic
for the kernel issue, not a benchmark of record (bench/moe.py is)."""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, "bench")
import moe as B  # noqa: E402

import pcg  # noqa: E402
from pcg.ops.fused_moe import fused_moe_config  # noqa: E402


def ref(hidden, w13, w2, wts, ids):
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    I = w2.shape[2]
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        x = hidden[t].float()
        gu = x @ w13[e].float().t()
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        out.index_add_(0, t, (h @ w2[e].float().t()) * wts[t, j].unsqueeze(1))
    return out


def main():
    dev = torch.device("cuda")
    shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else list(B.SHAPES)
    tokens = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [64, 256, 1024, 4096, 16384]
    print(f"{'shape':18} {'T':>6} {'default us':>11} {'cutlass us':>11} {'cut/def':>8} {'TFLOP/s def':>11} {'TFLOP/s cut':>11} {'err def':>9} {'err cut':>9}")
    for name in shapes:
        E, k, H, I = B.SHAPES[name]
        g = torch.Generator(device="cpu").manual_seed(0)
        w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dev, torch.bfloat16)
        w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dev, torch.bfloat16)
        for T in tokens:
            sets = [B.make_inputs(T, E, k, H, 100 + s, dev) for s in range(3)]
            flops = 2 * T * k * 3 * H * I
            h, w, i = sets[0]
            r = ref(h, w13, w2, w, i) if T <= 4096 else None
            res = {}
            for tag, cfg in (("def", None), ("cut", [-1, -1, -1])):
                try:
                    out = pcg.fused_moe(h, w13, w2, w, i, config=cfg)
                    err = B.rel(out, r) if r is not None else float("nan")
                    fns = [lambda s=s: pcg.fused_moe(s[0], w13, w2, s[1], s[2], config=cfg) for s in sets]
                    graphs = [B.capture(f)[0] for f in fns]
                    us = B.time_us([gr.replay for gr in graphs], 20)
                    res[tag] = (us, err)
                except Exception as exc:  # report and go on
                    print(f"{name} T={T} {tag}: {type(exc).__name__}: {exc}"[:400])
                    res[tag] = (float("nan"), float("nan"))
            d, c = res["def"], res["cut"]
            print(f"{name:18} {T:6d} {d[0]:11.1f} {c[0]:11.1f} {c[0] / d[0]:8.3f} {flops / d[0] / 1e6:11.1f} "
                  f"{flops / c[0] / 1e6:11.1f} {d[1]:9.2e} {c[1]:9.2e}", flush=True)


if __name__ == "__main__":
    main()
