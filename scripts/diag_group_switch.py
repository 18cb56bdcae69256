"""What a grouped GEMM pays per expert switch: the CUTLASS path's GEMMs on the
same weight bytes and tile count, once split over many experts (every tile of
a CTA a new expert: a tensormap update per tile) and once as one expert.
Needs a CUDA device with the CUTLASS path.
    DG_CONFIGS=1:1,0:0 DG_SHAPE=E,H,I,T python scripts/diag_group_switch.py

DG_CONFIGS: GEMM1:GEMM2 kernel variants per run (GEMM1 fuses the
activation: w13 in the block layout). Cases (bf16, T = 2 tokens, every token on every expert):
  groups   E experts of [H, I]          (GEMM2: E * H / tile_n tiles)
  one      1 expert of [E * H, I]       GEMM2's tiles and bytes, one group
  one13    1 expert of [H, E * I]       GEMM1's tiles and bytes, one group
  cuBLAS   x [T, I] . W [E * H, I]^T    GEMM2's bytes as one dense GEMM
Prints each kernel's median duration (graph replays under torch.profiler)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe import moe_weights  # noqa: E402
from profile_moe import short  # noqa: E402
from timeline_moe import median, profiled_calls  # noqa: E402
import pcg  # noqa: E402
from pcg.timing import capture_graph  # noqa: E402


def durations(g, reps=20):
    """(name, median duration us) of each kernel of one replay of g."""
    calls = profiled_calls(g, reps, sync_each=False)
    return [(short(calls[0][i][2]), median([c[i][1] for c in calls]))
            for i in range(len(calls[0]))]


def case(label, E, H, I, T, cfg, dev):
    torch.manual_seed(0)
    w13, w2 = moe_weights(E, H, I, dev, 8)
    hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids = torch.arange(E, device=dev, dtype=torch.int32).repeat(T, 1)
    wts = torch.full((T, E), 1.0 / E, device=dev)
    g = capture_graph(lambda: pcg.fused_moe(hidden, w13, w2, wts, ids, config=cfg, w13_block=8))[0]
    gb13 = E * 2 * I * H * 2 / 1e9
    gb2 = E * H * I * 2 / 1e9
    print(f"{label}: E={E} H={H} I={I} T={T} config={cfg} "
          f"w13 {gb13 * 1e3:.1f} MB, w2 {gb2 * 1e3:.1f} MB")
    for nm, d in durations(g):
        extra = ""
        if "gemm1" in nm:
            extra = f"  {gb13 / d * 1e3:.2f} TB/s"
        elif "gemm2" in nm:
            extra = f"  {gb2 / d * 1e3:.2f} TB/s"
        print(f"  {nm:32s} {d:8.1f} us{extra}")
    sys.stdout.flush()
    del w13, w2


def main():
    if not torch.cuda.is_available():
        print("diag_group_switch: no CUDA device")
        return
    dev = torch.device("cuda")
    E, H, I, T = (int(x) for x in os.environ.get("DG_SHAPE", "81,2048,768,2").split(","))
    for spec in os.environ.get("DG_CONFIGS", "1:1").split(","):
        cfg = [-1] + [int(v) for v in spec.split(":")]
        case("groups", E, H, I, T, cfg, dev)
        case("one (GEMM2's tiles)", 1, E * H, I, T, cfg, dev)
        if os.environ.get("DG_ONE13", "1") == "1":
            case("one13 (GEMM1's tiles)", 1, H, E * I, T, cfg, dev)
    # cuBLAS on GEMM2's bytes: x [T, I] . W [E * H, I]^T (what one dense GEMM streams at)
    w = torch.randn(E * H, I, device=dev, dtype=torch.bfloat16)
    x = torch.randn(T, I, device=dev, dtype=torch.bfloat16)
    g = capture_graph(lambda: torch.matmul(x, w.t()))[0]
    for nm, d in durations(g):
        print(f"cuBLAS [{T}, {I}] x [{E * H}, {I}]^T: {nm[:40]:40s} {d:8.1f} us  "
              f"{w.numel() * 2 / 1e9 / d * 1e3:.2f} TB/s")


if __name__ == "__main__":
    main()
