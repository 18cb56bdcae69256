"""Host cost of each piece of one pcg replay, on the real model.

bench/split_cost.py showed pcg's GPU-side time within a few percent of the
whole graph while its synchronised call time is 5-14% above: the host, not
the GPU, is the gap. This times, with the GPU idle, every segment graph's
launch and every recorded split call of one bucket (SegmentChain.replay_graph /
run_call), the whole chain, the engine's replay and the wrapped call; and the
whole-model graph's launch, for comparison.

    python scripts/diag_segment_launch.py [--layers 8] [--tokens 1 16 128]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from e2e import whole_graph_step  # noqa: E402

import pcg  # noqa: E402
from pcg.models import qwen3_moe_model  # noqa: E402
from pcg.timing import host_us  # noqa: E402


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 128])
    args = ap.parse_args()
    model = qwen3_moe_model(args.layers, dtype=torch.bfloat16, device="cuda")
    w = pcg.wrap(model, buckets=args.tokens, progress=False).capture()
    eng = w.engine()
    for t in args.tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, t), device="cuda")
        w(input_ids=ids)  # stages this batch: the pieces below replay it
        chain = eng.graphs[t].chain
        g_us = [host_us(lambda i=i: chain.replay_graph(i)) for i in range(chain.num_graphs())]
        c_us = [host_us(lambda i=i: chain.run_call(i)) for i in range(chain.num_calls())]
        step = whole_graph_step(w, ids)
        print(f"T={t}: graph launches (us): " + " ".join(f"{x:.1f}" for x in g_us))
        print("      recorded calls (us): " + " ".join(f"{x:.1f}" for x in c_us))
        print(f"      sum {sum(g_us) + sum(c_us):.1f}; chain.replay {host_us(chain.replay):.1f}; "
              f"engine.replay {host_us(lambda: eng.replay(ids[0], None, [0, t], t)):.1f}; "
              f"wrapped {host_us(lambda: w(input_ids=ids)):.1f}; whole-graph step {host_us(step):.1f}")


if __name__ == "__main__":
    main()
