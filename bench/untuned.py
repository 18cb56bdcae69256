"""fused_moe at small and mid T on shapes the tuning table does not hold: the
config pcg picks for them (no config argument) against the stream path, the
heuristic mma.sync tiles and the CUTLASS path forced, side by side in one process.

Untuned shapes stream the weights up to 128 (token, k) pairs
(moe::kStreamGuessMaxPairs), and large experts take CUTLASS above that from one
row per expert (moe::kCutlassLargeExpertElems); this measures those guesses. Times as bench/moe.py
(bf16, random routing, input sets and weight copies rotated so L2 holds none):
  graph  one synchronised graph replay per call
  chain  per-call time of calls captured back to back in one graph
Table to stdout, JSON to --out, a plot beside it (chain time over the floor
against T, per shape); --plot JSON redraws the plot of a saved run.

    python bench/untuned.py [--shapes E,k,H,I ...] [--tokens 1 2 4 ...]
    python bench/untuned.py --plot bench/results/untuned_s15.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe import floor_us, make_inputs, shape_panels  # noqa: E402

# Shapes of public models, none in csrc/moe/fused_moe_tuning.h.
SHAPES = {
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "qwen2-57b-a14b": (64, 8, 3584, 2560),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
    "deepseek-v3": (256, 8, 7168, 2048),
    # Llama-4 Scout (top-1). (Maverick, 128 experts of this size, needs 32 GB a
    # weight set: too big for SETS copies.)
    "llama4-scout": (16, 1, 5120, 8192),
}
SETS, CHAIN = 4, 16


def parse_shape(text):
    if text in SHAPES:
        return text, SHAPES[text]
    vals = [int(v) for v in text.split(",")]
    if len(vals) != 4:
        raise SystemExit(f"--shapes: a name of {sorted(SHAPES)} or E,k,H,I, got {text!r}")
    return text, tuple(vals)


def plot(rows, path):
    """Chain time / floor against T for the picked config, the stream path and
    the default tiles, one panel per shape."""
    panels = shape_panels(rows, 4.5, 3.8)
    if panels is None:
        return
    fig, panels = panels
    for ax, name, rs in panels:
        for key, label in [("picked_chain_us", "picked"), ("stream_chain_us", "stream path"),
                           ("tiles_chain_us", "default tiles"), ("cutlass_chain_us", "CUTLASS")]:
            pts = [(r["T"], r[key] / r["floor_us"]) for r in rs if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(1.3, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("chain time / floor")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                  "untuned.json"))
    ap.add_argument("--plot", metavar="JSON", help="only redraw the plot of a saved run")
    args = ap.parse_args()
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f)["rows"], os.path.splitext(args.plot)[0] + ".png")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/untuned.py needs a CUDA GPU")
    import pcg
    from pcg.ops.fused_moe import fused_moe_config, fused_moe_paths
    from pcg.timing import capture_graph, paired_time_ms

    dev = torch.device("cuda")
    cutlass, stream = fused_moe_paths(dev)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  paths: cutlass={cutlass} stream={stream}")
    print(f"{'shape':17s} {'T':>4s} {'floor':>7s} | {'picked':>14s} {'graph':>7s} {'chain':>7s} | "
          f"{'stream g':>8s} {'chain':>7s} | {'tiles':>12s} {'graph':>7s} {'chain':>7s} | {'cutlass g':>9s} {'chain':>7s} | "
          "chain x floor: picked / tiles")
    rows = []
    for text in args.shapes:
        name, (E, k, H, I) = parse_shape(text)
        torch.manual_seed(0)
        copies = max(1, min(SETS, int(40e9 // (E * 3 * H * I * 2))))
        ws = [(torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H ** -0.5,
               torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I ** -0.5) for _ in range(copies)]
        for T in args.tokens:
            sets = [make_inputs(T, E, k, H, 100 + i, dev) for i in range(SETS)]
            fl, _, _ = floor_us(sets, E, k, H, I, T)
            picked = fused_moe_config(E, k, H, I, T, cutlass=cutlass, stream=stream)
            tiles = fused_moe_config(E, k, H, I, T, cutlass=False, stream=False)
            configs = [("picked", None), ("tiles", list(tiles))]
            if stream and T * k <= 128:
                configs.insert(1, ("stream", [-2, -1, -1]))
            if cutlass:  # where the CUTLASS rules (16 rows / large experts) should sit
                configs.append(("cutlass", [-1, -1, -1]))
            fns, ref = [], None
            for label, cfg in configs:
                def call(i, cfg=cfg):
                    h, w, ids = sets[i % SETS]
                    w13, w2 = ws[i % copies]
                    return pcg.fused_moe(h, w13, w2, w, ids, config=cfg)
                singles = [capture_graph(lambda i=i: call(i))[0] for i in range(SETS)]
                chain, _ = capture_graph(lambda: [call(i) for i in range(CHAIN)])
                out = call(0)
                if ref is None:
                    ref = out.float()
                err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                if err > 2e-2:
                    raise SystemExit(f"{name} T={T} {label}: output differs from the picked config's ({err:.2e})")
                it = iter(range(10 ** 9))
                fns += [lambda s=singles, it=it: s[next(it) % SETS].replay(), chain.replay]
            ms = paired_time_ms(fns, warmup=3, reps=args.reps)
            res = {label: (ms[2 * j] * 1e3, ms[2 * j + 1] * 1e3 / CHAIN) for j, (label, _) in enumerate(configs)}
            nan = (float("nan"), float("nan"))
            st, cu = res.get("stream", nan), res.get("cutlass", nan)
            print(f"{name:17s} {T:4d} {fl:7.1f} | {str(list(picked)):>14s} {res['picked'][0]:7.1f} {res['picked'][1]:7.1f} | "
                  f"{st[0]:8.1f} {st[1]:7.1f} | {str(list(tiles)):>12s} {res['tiles'][0]:7.1f} {res['tiles'][1]:7.1f} | "
                  f"{cu[0]:9.1f} {cu[1]:7.1f} | {res['picked'][1] / fl:.2f} / {res['tiles'][1] / fl:.2f}", flush=True)
            rows.append({"shape": name, "E": E, "topk": k, "H": H, "I": I, "T": T, "floor_us": fl,
                         "picked": list(picked), "tiles": list(tiles),
                         **{f"{lab}_graph_us": v[0] for lab, v in res.items()},
                         **{f"{lab}_chain_us": v[1] for lab, v in res.items()}})
        del ws
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    plot(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
