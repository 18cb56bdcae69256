"""Prefill of the default model (Qwen3-30B-A3B-shaped, random weights, bf16)
wrapped with its own routers (``router="model"``: linear, softmax, top-k,
renormalise, cast: ~6 kernels a layer) against ``router="pcg"`` (linear +
one pcg.route kernel), both captured, timed in alternation per T. Also the
router step alone (all layers' routers of one call, graph replay) both ways.

Prints a table (ms, ratio), writes JSON and a plot to --out.
    python bench/router.py [--layers 8] [--tokens 1 4 16 ...] [--out bench/out]
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch

import pcg
from e2e import plot  # bench/ is this script's directory, so on sys.path
from pcg.integrations import hf_router
from pcg.models import qwen3_moe_model
from pcg.timing import capture_graph, paired_time_ms
from pcg.timing import rel_err as rel

DEFAULT_T = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def routers_step(model, t: int):
    """A graph of every router of ``model`` on a [t, H] input (the router
    step of one prefill call, no experts or attention)."""
    rs = [m for m in model.modules() if hf_router.is_router(m)]
    x = torch.randn(t, rs[0].weight.shape[1], device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        g, _ = capture_graph(lambda: [r(x) for r in rs])
    return g.replay


def run(args) -> dict:
    model = qwen3_moe_model(args.layers, dtype=torch.bfloat16, device="cuda")
    other = copy.deepcopy(model)
    own = pcg.wrap(model, router="model", max_tokens=max(args.tokens), progress=False)
    fast = pcg.wrap(other, router="pcg", max_tokens=max(args.tokens), progress=False)
    routed = sum(v == "pcg.route" for v in fast.report().routers.values())
    own.capture()
    fast.capture()
    res = {"config": {"layers": args.layers, "tokens": args.tokens, "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "routers_on_pcg_route": routed},
           "ms": {"router=model": {}, "router=pcg": {}}, "routers_us": {"router=model": {}, "router=pcg": {}},
           "rel_err": {}}
    print(f"model: Qwen3-30B-A3B-shaped, {args.layers} layers, bf16; {routed} routers on pcg.route", flush=True)
    for t in args.tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, t), device="cuda")
        a, b = paired_time_ms([lambda: own(input_ids=ids), lambda: fast(input_ids=ids)], warmup=3,
                              reps=args.reps)
        res["ms"]["router=model"][t], res["ms"]["router=pcg"][t] = a, b
        res["rel_err"][t] = rel(fast(input_ids=ids).logits, own(input_ids=ids).logits)
        ra, rb = paired_time_ms([routers_step(model, t), routers_step(other, t)], warmup=3, reps=args.reps)
        res["routers_us"]["router=model"][t] = ra * 1e3
        res["routers_us"]["router=pcg"][t] = rb * 1e3
    return res


def print_table(res: dict) -> None:
    ms, rus = res["ms"], res["routers_us"]
    print("\nprefill ms (median, graphs replayed in alternation); routers: all layers' router step, us")
    print(f"{'T':>6} {'router=model':>13} {'router=pcg':>11} {'pcg/model':>10} "
          f"{'routers model':>14} {'routers pcg':>12} {'rel err':>9}")
    for t in res["config"]["tokens"]:
        a, b = ms["router=model"][t], ms["router=pcg"][t]
        print(f"{t:>6} {a:>13.3f} {b:>11.3f} {b / a:>10.3f} {rus['router=model'][t]:>14.1f} "
              f"{rus['router=pcg'][t]:>12.1f} {res['rel_err'][t]:>9.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="*", default=DEFAULT_T)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/router.py times CUDA graphs: it needs a GPU "
                         "(tests/test_hf_router.py checks the routers on the CPU)")
    res = run(args)
    print_table(res)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "router.json"), "w") as f:
        json.dump(res, f, indent=1)
    try:
        plot(res, os.path.join(args.out, "router.png"),
             title=f"pcg.wrap router choice, {res['config']['layers']} layers, {res['config']['gpu']}")
    except ImportError:
        print("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
