"""Where pcg::fused_moe's time goes at large T, against cuBLAS on the same
GEMMs: each kernel's median duration (graph replays under torch.profiler)
for the bench's random routing and for balanced routing (every expert
exactly T*k/E pairs: no tile is partly empty), beside cuBLAS running each
GEMM's FLOPs as one dense GEMM and as E batched GEMMs of M_e rows.
Needs a CUDA device.
    LT_SHAPES=qwen3-30b-a3b LT_TOKENS=8192 LT_CONFIGS="tab|-1:1:1" python scripts/diag_large_t.py
LT_CONFIGS: '|'-separated configs ("tab" = the tuning table's choice)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe import SHAPES, make_inputs, moe_weights  # noqa: E402
from diag_group_switch import durations  # noqa: E402
import pcg  # noqa: E402
from pcg.ops.fused_moe import w13_block_for  # noqa: E402
from pcg.timing import capture_graph  # noqa: E402


def balanced_ids(T, E, k, dev):
    """[T, k] expert ids with every expert exactly T*k/E times (T*k % E == 0)
    and k distinct experts per token: token t takes experts (t*k + j) % E,
    shuffled over tokens."""
    base = (torch.arange(T).unsqueeze(1) * k + torch.arange(k)) % E
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(0))
    return base[perm].to(dev, torch.int32)


def report(label, g, flops1, flops2):
    ds = durations(g)
    total = sum(d for _, d in ds)
    gemm = 0
    print(f"{label}: kernels sum {total:.1f} us ({(flops1 + flops2) / total / 1e6:.1f} TFLOP/s)")
    for nm, d in ds:
        extra = ""
        if nm == "cutlass_gemm":
            f = flops1 if gemm == 0 else flops2
            extra = f"  GEMM{gemm + 1} {f / d / 1e6:.1f} TFLOP/s"
            gemm += 1
        print(f"  {nm:32s} {d:8.1f} us{extra}")
    sys.stdout.flush()


def cublas(label, fn, flops):
    g = capture_graph(fn)[0]
    ds = durations(g)
    d = sum(x for _, x in ds)
    print(f"  cuBLAS {label:44s} {d:8.1f} us  {flops / d / 1e6:.1f} TFLOP/s")
    sys.stdout.flush()


def main():
    if not torch.cuda.is_available():
        print("diag_large_t: no CUDA device")
        return
    dev = torch.device("cuda")
    bf = torch.bfloat16
    for name in os.environ.get("LT_SHAPES", "qwen3-30b-a3b").split(","):
        E, k, H, I = SHAPES[name]
        torch.manual_seed(0)
        blk = w13_block_for(I, 8)
        w13, w2 = moe_weights(E, H, I, dev, blk)
        for T in [int(x) for x in os.environ.get("LT_TOKENS", "8192").split(",")]:
            P = T * k
            flops1, flops2 = 2 * P * 2 * I * H, 2 * P * H * I
            hidden, wts, ids = make_inputs(T, E, k, H, 7, dev)
            routings = [("random", ids)]
            if P % E == 0:
                routings.append(("balanced", balanced_ids(T, E, k, dev)))
            for spec in os.environ.get("LT_CONFIGS", "tab").split("|"):
                cfg = None if spec == "tab" else [int(v) for v in spec.split(":")]
                for rname, rid in routings:
                    g = capture_graph(lambda: pcg.fused_moe(hidden, w13, w2, wts, rid, config=cfg,
                                                            w13_block=blk))[0]
                    report(f"{name} T={T} {rname} config={spec}", g, flops1, flops2)
                    del g
            # cuBLAS: each GEMM's FLOPs as one dense GEMM, and as E batches of M_e rows
            a1 = torch.randn(P, H, device=dev, dtype=bf)
            b1 = torch.randn(2 * I, H, device=dev, dtype=bf)
            a2 = torch.randn(P, I, device=dev, dtype=bf)
            b2 = torch.randn(H, I, device=dev, dtype=bf)
            cublas(f"GEMM1 dense [{P}, {H}] x [{2 * I}, {H}]^T", lambda: a1 @ b1.t(), flops1)
            cublas(f"GEMM2 dense [{P}, {I}] x [{H}, {I}]^T", lambda: a2 @ b2.t(), flops2)
            if P % E == 0:
                m = P // E
                cublas(f"GEMM1 bmm {E} x [{m}, {H}] x [{2 * I}, {H}]^T",
                       lambda: torch.bmm(a1.view(E, m, H), w13.transpose(1, 2)), flops1)
                cublas(f"GEMM2 bmm {E} x [{m}, {I}] x [{H}, {I}]^T",
                       lambda: torch.bmm(a2.view(E, m, I), w2.transpose(1, 2)), flops2)
            del a1, b1, a2, b2
        del w13, w2


if __name__ == "__main__":
    main()
