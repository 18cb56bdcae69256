"""End-to-end prefill of the built-in default model, side by side:

  eager            the unwrapped Hugging Face model
  compile          torch.compile(model, dynamic=True)
  compile-ro       torch.compile(model, mode="reduce-overhead", dynamic=True)
  whole-graph      one CUDA graph of the whole forward per T, with the same
                   kernels pcg runs (pcg's MoE, pcg's attention op captured for
                   one sequence): the floor for what piecewise capture may cost
  pcg              pcg.wrap(model): piecewise graphs, attention between replays
                   (buckets <= 64 tokens: one graph, attention inside it)
  pcg-split        pcg with graph attention off (every bucket split at
                   attention), paired with its own whole graph
  pcg-inductor     pcg.wrap(model, compiler="inductor"): inductor-compiled pieces,
                   same capture engine
  pcg-embeds       pcg called with inputs_embeds (a multimodal model's merged
                   embeddings): its second graph set, timed in alternation
                   with pcg on token ids and with embeds-split, the same call
                   on pcg's split path without graphs (how it ran before)

The default model is Qwen3-30B-A3B-shaped (128 experts, top-8, H=2048, I=768,
32/4 heads) with --layers layers and random weights. Prints a table (ms and
ratios), writes JSON and a plot to --out. Also times the MoE op alone (all
layers, graph replay) to show its share of pcg's time.

On a CPU it runs a small model and checks that pcg matches the unwrapped model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import pcg
from pcg.models import qwen3_moe_model
from pcg.registry import RunContext, running
from pcg.timing import capture_graph
from pcg.timing import cuda_time_ms as time_ms
from pcg.timing import paired_time_ms
from pcg.timing import rel_err as rel

DEFAULT_T = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def whole_graph_step(wrapped, ids: torch.Tensor):
    """One CUDA graph of the whole forward (pcg's kernels, SDPA attention);
    returns the step an engine would run: copy the ids into the static input,
    replay, copy the logits out (pcg's timing includes the same steps)."""
    eng = wrapped.engine()
    t = ids.shape[1]
    pos = torch.arange(t, device=ids.device)
    static = ids[0].clone()
    ctx = RunContext(wrapped.registry, None, None)  # batch None: one sequence, SDPA
    with torch.inference_mode(), running(ctx):
        g, out = capture_graph(lambda: eng.forward_fn(static, pos))

    def step():
        static.copy_(ids[0])
        g.replay()
        return out.logits.clone()

    # The graph reads `pos` (allocated outside it) at every replay: keep it
    # alive with the step, or the allocator hands its memory to the next
    # caller (pcg's replays did, and the baseline read garbage positions).
    step.inputs = (static, pos)
    return step


def moe_only_ms(wrapped, t: int) -> float:
    """All layers' pcg::moe at t tokens (routing from random logits), graph replay."""
    layers = wrapped.registry.moe_layers
    h = layers[0].w13.shape[2]
    k = wrapped.model.config.num_experts_per_tok
    e = layers[0].w13.shape[0]
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w, ids = torch.ops.pcg.route(torch.randn(t, e, device="cuda"), k)
    with torch.inference_mode():
        for layer in layers:  # warm-up
            pcg.fused_moe(x, layer.w13, layer.w2, w, ids, w13_block=layer.w13_block)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for layer in layers:
                pcg.fused_moe(x, layer.w13, layer.w2, w, ids, w13_block=layer.w13_block)
        return time_ms(g.replay)


def run_gpu(args) -> dict:
    ts = [t for t in args.tokens if t <= args.max_t]
    model = qwen3_moe_model(args.layers, dtype=torch.bfloat16, device="cuda")
    ids = {t: torch.randint(0, model.config.vocab_size, (1, t), device="cuda") for t in ts}
    res: dict = {"config": {"layers": args.layers, "tokens": ts, "gpu": torch.cuda.get_device_name(),
                            "torch": torch.__version__}, "ms": {}, "rel_err": {}, "startup_s": {}}
    ms = res["ms"]

    def fwd(m, i):
        return m(input_ids=i, use_cache=False)

    print(f"model: Qwen3-30B-A3B-shaped, {args.layers} layers, bf16; T = {ts}", flush=True)
    with torch.inference_mode():
        ref = {t: fwd(model, ids[t]).logits.float() for t in ts}
        ms["eager"] = {t: time_ms(lambda t=t: fwd(model, ids[t])) for t in ts}
        print("eager done", flush=True)
        for name, kw in (("compile", {}), ("compile-ro", {"mode": "reduce-overhead"})):
            if name not in args.modes:
                continue
            torch._dynamo.reset()
            try:
                cm = torch.compile(model, dynamic=True, **kw)
                t0 = time.perf_counter()
                fwd(cm, ids[ts[0]])
                res["startup_s"][name] = time.perf_counter() - t0
                ms[name] = {}
                for t in ts:
                    ms[name][t] = time_ms(lambda t=t: fwd(cm, ids[t]), warmup=3)
                res["rel_err"][name] = max(rel(fwd(cm, ids[t]).logits, ref[t]) for t in ts)
                del cm
            except Exception as exc:  # a baseline that fails is reported, not fatal
                ms.pop(name, None)
                res.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{name} failed: {res['failed'][name]}", flush=True)
            torch._dynamo.reset()
            print(f"{name} done", flush=True)

    wrapped = pcg.wrap(model, max_tokens=max(ts))
    t0 = time.perf_counter()
    wrapped.capture()
    res["startup_s"]["pcg"] = time.perf_counter() - t0
    ms["pcg"] = {}
    if "whole-graph" in args.modes:  # measured in alternation with pcg: the ratio is the bar
        ms["whole-graph"] = {}
        errs = res["whole_graph_rel_err_by_t"] = {}
        for t in ts:
            step = whole_graph_step(wrapped, ids[t])
            before = rel(step()[0], ref[t][0])
            ms["whole-graph"][t], ms["pcg"][t] = paired_time_ms(
                [step, lambda t=t: wrapped(input_ids=ids[t])])
            errs[t] = {"before_timing": before, "after_timing": rel(step()[0], ref[t][0])}
            del step
        res["rel_err"]["whole-graph"] = max(max(e.values()) for e in errs.values())
        print("whole-graph and pcg done; whole-graph error vs eager by T (before/after timing):",
              {t: f"{e['before_timing']:.2e}/{e['after_timing']:.2e}" for t, e in errs.items()}, flush=True)
    else:
        ms["pcg"] = {t: time_ms(lambda t=t: wrapped(input_ids=ids[t])) for t in ts}
    res["rel_err"]["pcg"] = max(rel(wrapped(input_ids=ids[t]).logits, ref[t]) for t in ts)
    ms["moe-op"] = {t: moe_only_ms(wrapped, t) for t in ts}
    if "pcg-embeds" in args.modes:
        emb = model.get_input_embeddings()
        with torch.inference_mode():
            xs = {t: emb(ids[t]) for t in ts}
        t0 = time.perf_counter()
        wrapped.capture(inputs_embeds=True)
        res["startup_s"]["pcg-embeds"] = time.perf_counter() - t0
        nograph = pcg.wrap(model, max_tokens=max(ts), capture=False, progress=False)
        ms["pcg-embeds"], ms["embeds-split"], ratio = {}, {}, res.setdefault("embeds_over_ids", {})
        for t in ts:
            on_ids, ms["pcg-embeds"][t], ms["embeds-split"][t] = paired_time_ms(
                [lambda t=t: wrapped(input_ids=ids[t]), lambda t=t: wrapped(inputs_embeds=xs[t]),
                 lambda t=t: nograph(inputs_embeds=xs[t])])
            ratio[t] = ms["pcg-embeds"][t] / on_ids
        res["rel_err"]["pcg-embeds"] = max(rel(wrapped(inputs_embeds=xs[t]).logits, ref[t]) for t in ts)
        res["rel_err"]["embeds-split"] = max(rel(nograph(inputs_embeds=xs[t]).logits, ref[t]) for t in ts)
        print("pcg-embeds done; time over pcg on token ids (paired) by T:",
              {t: round(r, 3) for t, r in ratio.items()}, flush=True)
        del nograph
    if "pcg-split" in args.modes:
        # graph attention off: attention splits the graphs of every bucket,
        # timed in alternation with a whole graph of the same wrapper
        ws = pcg.wrap(model, max_tokens=max(ts), progress=False)
        prev, pcg.attention.USE_GRAPH_ATTENTION = pcg.attention.USE_GRAPH_ATTENTION, False
        try:
            ws.capture()
        finally:
            pcg.attention.USE_GRAPH_ATTENTION = prev
        sp = res["split"] = {"by_t": {}}
        for t in ts:
            step = whole_graph_step(ws, ids[t])
            w_ms, p_ms = paired_time_ms([step, lambda t=t: ws(input_ids=ids[t])])
            sp["by_t"][t] = {"whole_graph_ms": w_ms, "pcg_ms": p_ms, "ratio": p_ms / w_ms,
                             "rel_err": rel(ws(input_ids=ids[t]).logits, ref[t])}
            del step
        print("pcg with graph attention off (every bucket split at attention), paired with its whole graph:",
              flush=True)
        for t, r in sp["by_t"].items():
            print(f"  T={t:>5}: whole-graph {r['whole_graph_ms']:.3f} ms, pcg {r['pcg_ms']:.3f} ms, "
                  f"ratio {r['ratio']:.3f}, rel err {r['rel_err']:.2e}", flush=True)
        del ws
    if "pcg-inductor" in args.modes:  # compile mode: inductor pieces, same capture engine
        from pcg import compile as pcg_compile  # (a plain `import pcg.compile` would shadow pcg here)
        wi = pcg.wrap(model, max_tokens=max(ts), compiler="inductor")
        t0 = time.perf_counter()
        pcg_compile.warmup(wi)
        wi.capture()
        res["startup_s"]["pcg-inductor"] = time.perf_counter() - t0
        ms["pcg-inductor"] = {t: time_ms(lambda t=t: wi(input_ids=ids[t])) for t in ts}
        res["rel_err"]["pcg-inductor"] = max(rel(wi(input_ids=ids[t]).logits, ref[t]) for t in ts)
        print(wi.report(), flush=True)
    rep = wrapped.report()
    res["report"] = rep.as_dict()
    print(rep, flush=True)
    return res


def startup_only(args) -> None:
    from pcg import compile as pcg_compile
    from pcg.compile_cache import cache_root
    ts = [t for t in args.tokens if t <= args.max_t]
    model = qwen3_moe_model(args.layers, dtype=torch.bfloat16, device="cuda")
    t0 = time.perf_counter()
    wi = pcg.wrap(model, max_tokens=max(ts), compiler="inductor", progress=False)
    stats = pcg_compile.warmup(wi)
    wi.capture()
    total = time.perf_counter() - t0
    print(f"pcg-inductor start-up in a fresh process (cache {cache_root()}): {total:.1f} s; "
          f"trace/compile stats: {stats}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e_startup.json"), "w") as f:
        json.dump({"startup_s": total, "stats": stats, "cache": cache_root()}, f, indent=1, default=str)


def print_table(res: dict) -> None:
    ms = res["ms"]
    modes = [m for m in ("eager", "compile", "compile-ro", "whole-graph", "pcg", "pcg-inductor", "pcg-embeds",
                         "embeds-split") if m in ms]
    head = f"{'T':>6} " + " ".join(f"{m:>11}" for m in modes) + f" {'moe share':>9}"
    if "whole-graph" in ms:
        head += f" {'pcg/graph':>9}"
    if "compile-ro" in ms:
        head += f" {'pcg/c-ro':>8}"
    head += f" {'eager/pcg':>9}"
    print("\nprefill time, ms (median of CUDA-event timings)")
    print(head)
    for t in res["config"]["tokens"]:
        row = f"{t:>6} " + " ".join(f"{ms[m][t]:>11.3f}" for m in modes)
        row += f" {ms['moe-op'][t] / ms['pcg'][t]:>8.0%}"
        if "whole-graph" in ms:
            row += f" {ms['pcg'][t] / ms['whole-graph'][t]:>9.3f}"
        if "compile-ro" in ms:
            row += f" {ms['pcg'][t] / ms['compile-ro'][t]:>8.3f}"
        row += f" {ms['eager'][t] / ms['pcg'][t]:>8.2f}x"
        print(row)
    print("max relative error vs eager:", {k: f"{v:.2e}" for k, v in res["rel_err"].items()})
    print("start-up seconds:", {k: round(v, 1) for k, v in res["startup_s"].items()})


def plot(res: dict, path: str, title: str | None = None) -> None:
    """Prefill ms per T, one line per mode of res["ms"] (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ts = res["config"]["tokens"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for m, v in res["ms"].items():
        ax.plot(ts, [v[t] for t in ts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("prefill ms")
    ax.set_title(title or f"Qwen3-30B-A3B-shaped, {res['config']['layers']} layers, {res['config']['gpu']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_cpu(args) -> None:
    print("no GPU: checking pcg against the unwrapped model on a small Qwen3-MoE-shaped model (CPU, fp32)")
    model = qwen3_moe_model(2, dtype=torch.float32, device="cpu", hidden_size=128, moe_intermediate_size=32,
                            num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, vocab_size=512)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    worst = 0.0
    for t in (1, 7, 64, 300):
        ids = torch.randint(0, 512, (1, t))
        with torch.inference_mode():
            expect = ref(input_ids=ids, use_cache=False).logits
        t0 = time.perf_counter()
        got = wrapped(input_ids=ids).logits
        dt = (time.perf_counter() - t0) * 1e3
        worst = max(worst, rel(got, expect))
        print(f"T={t:>4}: rel err {rel(got, expect):.2e}, pcg (eager split path) {dt:.1f} ms")
    print(wrapped.report())
    if worst > 1e-4:
        sys.exit(f"mismatch: relative error {worst:.2e} > 1e-4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="*", default=DEFAULT_T)
    ap.add_argument("--max-t", type=int, default=8192)
    ap.add_argument("--modes", nargs="*", default=["compile", "compile-ro", "whole-graph", "pcg-inductor"],
                    help="modes besides eager and pcg: compile, compile-ro, whole-graph, pcg-inductor, "
                         "pcg-split (graph attention off, paired with its own whole graph), "
                         "pcg-embeds (inputs_embeds: graphs vs the split path)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--startup-only", action="store_true",
                    help="only time pcg.wrap(compiler='inductor') start-up (trace, compile, capture) "
                         "in this fresh process; run it after a full run to measure a start with the "
                         "compile cache ($PCG_CACHE_DIR) filled")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        run_cpu(args)
        return
    if args.startup_only:
        startup_only(args)
        return
    os.makedirs(args.out, exist_ok=True)
    res = run_gpu(args)
    print_table(res)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    plot(res, os.path.join(args.out, "e2e.png"))
    print(f"wrote {args.out}/e2e.json and {args.out}/e2e.png")


if __name__ == "__main__":
    main()
