"""A/B (one process, graphs replayed in alternation): pcg.route launched as a
programmatic dependent of the kernel before it (default) against a plain
launch (PCG_ROUTE_PDL=0, read at capture). Each graph holds 16 router steps
as a model runs them: logits = x @ W^T (cuBLAS), then pcg.route; per-step us.
    python scripts/ab_route_pdl.py"""
import os
import torch
import pcg  # noqa: F401
from pcg.timing import capture_graph, paired_time_ms

SHAPES = {"qwen3-30b-a3b": (128, 8, 2048), "deepseek-v2-lite": (64, 6, 2048), "gpt-oss-20b": (32, 4, 2880),
          "mixtral-8x7b": (8, 2, 4096)}
CHAIN = 16
dev = torch.device("cuda")
print("router step (linear + pcg.route) us per step in a graph of 16; PDL / plain / ratio", flush=True)
for name, (E, k, H) in SHAPES.items():
    W = torch.randn(E, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
    for T in (1, 16, 256):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        graphs, outs = [], []
        for env in ("1", "0"):
            os.environ["PCG_ROUTE_PDL"] = env

            def step():
                return torch.ops.pcg.route(torch.nn.functional.linear(x, W), k, "softmax", True, None, 1, 1, 1.0)
            outs.append(step())
            graphs.append(capture_graph(lambda: [step() for _ in range(CHAIN)])[0])
        os.environ.pop("PCG_ROUTE_PDL", None)
        same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
        a, b = (m * 1e3 / CHAIN for m in paired_time_ms([g.replay for g in graphs], warmup=3, reps=60))
        print(f"{name:17s} T={T:4d}: {a:6.2f} / {b:6.2f} / {a / b:.3f}  equal: {same}", flush=True)
