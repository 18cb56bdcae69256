"""Where a MoE layer's routing time goes at small T (one H200, graphs of 16
calls, per-call us, timed in alternation): pcg.route alone (top-k and top-1),
torch's softmax + topk + renormalise, one tiny kernel (a graph node's floor),
and, at T <= 16, a pcg layer's MoE step (pcg.route + fused_moe) against
fused_moe alone on the same routing (the chain of bench/moe.py).
    python scripts/diag_route_cost.py"""
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from moe import SHAPES  # noqa: E402
import pcg  # noqa: E402
from pcg.timing import capture_graph, paired_time_ms  # noqa: E402

SETS, CHAIN = 4, 16
dev = torch.device("cuda")
tiny = torch.zeros(1, device=dev)


def torch_route(x, k):
    w, ids = torch.softmax(x.float(), dim=-1).topk(k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids.to(torch.int32)


def route(x, k):
    return torch.ops.pcg.route(x, k, "softmax", True, None, 1, 1, 1.0)


for name, (E, k, H, I) in SHAPES.items():
    torch.manual_seed(0)
    copies = max(1, min(SETS, int(40e9 // (E * 3 * H * I * 2))))
    ws = [(torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H ** -0.5,
           torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I ** -0.5) for _ in range(copies)]
    for T in (1, 16, 256):
        logits = [torch.randn(T, E, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
        hidden = [torch.randn(T, H, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
        routed = [route(x, k) for x in logits]

        def moe(i, w, ids):
            w13, w2 = ws[i % copies]
            return pcg.fused_moe(hidden[i % SETS], w13, w2, w, ids, config=[-2, -1, -1])

        fns = {
            "pcg.route top-k": lambda i: route(logits[i % SETS], k),
            "pcg.route top-1": lambda i: route(logits[i % SETS], 1),
            "torch softmax+topk": lambda i: torch_route(logits[i % SETS], k),
            "one tiny kernel": lambda i: tiny.add_(1),
        }
        if T <= 16:
            fns["route+fused_moe"] = lambda i: moe(i, *route(logits[i % SETS], k))
            fns["fused_moe alone"] = lambda i: moe(i, *routed[i % SETS])
        chains = [capture_graph(lambda f=f: [f(i) for i in range(CHAIN)])[0] for f in fns.values()]
        ms = paired_time_ms([c.replay for c in chains], warmup=3, reps=60)
        print(f"{name:17s} T={T:4d}: " + "  ".join(f"{n} {m * 1e3 / CHAIN:6.2f}" for n, m in zip(fns, ms)),
              flush=True)
        del chains
    del ws
    torch.cuda.empty_cache()
