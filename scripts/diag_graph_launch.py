"""What one cudaGraphLaunch costs the host on this machine, by graph size.

pcg replays one bucket as a chain of graphs (one per segment between two
attention calls); one whole-model graph launches once. This times
``CUDAGraph.replay()`` on the host for synthetic graphs of N small kernels,
with the GPU idle (synchronised before each call: the latency a prefill sees)
and back to back (10 replays queued), and a 9 x 60-node chain against one
540-node graph (the shape of an 8-layer forward).

    python scripts/diag_graph_launch.py
"""
from __future__ import annotations

import torch

from pcg.timing import cuda_time_ms, host_us


def graph_of(n: int, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(n):
            x.add_(1)
    return g


def event_us(fn) -> float:
    return cuda_time_ms(fn, reps=50) * 1e3


def main() -> None:
    x = torch.zeros(1024, device="cuda")
    print(f"{'nodes':>6} {'host idle us':>13} {'host queued us':>15} {'event us':>9}")
    for n in (1, 8, 32, 64, 128, 512):
        g = graph_of(n, x)
        g.replay()
        idle = host_us(g.replay)
        queued = host_us(lambda: [g.replay() for _ in range(10)], reps=10) / 10
        ev = event_us(g.replay)
        print(f"{n:>6} {idle:>13.1f} {queued:>15.1f} {ev:>9.1f}")
    chain = [graph_of(60, x) for _ in range(9)]
    whole = graph_of(540, x)
    for g in chain + [whole]:
        g.replay()

    def run_chain():
        for g in chain:
            g.replay()
    print(f"9 x 60-node chain: host idle {host_us(run_chain):.1f} us, event {event_us(run_chain):.1f} us")
    print(f"1 x 540-node graph: host idle {host_us(whole.replay):.1f} us, event {event_us(whole.replay):.1f} us")
    # Kernel launches between graphs (an eager attention call) for comparison.
    y = torch.zeros(1024, device="cuda")

    def run_chain_kernels():
        for g in chain:
            g.replay()
            y.add_(1)
    print(f"chain + 8 eager kernels: host idle {host_us(run_chain_kernels):.1f} us, "
          f"event {event_us(run_chain_kernels):.1f} us")
    print(f"one eager kernel: host idle {host_us(lambda: y.add_(1)):.1f} us")


if __name__ == "__main__":
    main()
