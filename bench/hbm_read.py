"""How fast can one call read N MB from HBM on this GPU? The practical ceiling
for the stream path at small T (it reads the hit experts' weights once).

For each size (default: the weights one fused_moe call reads at T = 1 for the
four shapes of bench/moe.py, and their w13 / w2 parts), times reads of
distinct buffers (rotating over copies so L2 holds none of them) by:
  sum      torch.sum in fp32 (one reduction kernel + a tiny second pass)
  gemv     torch.mv(W, x) with W [rows, 4096] bf16 (cuBLAS GEMV)
  stream   a Triton kernel that only reads: CTAs of CHUNK contiguous bytes each
           (one wave or a few), fp32 partial sums; the best of a few CHUNK /
           warp settings (needs triton)
each as CHAIN calls captured back to back in one graph (per-call time, no host
launch latency), and prints us and the achieved TB/s next to 4.3 TB/s.

    python bench/hbm_read.py [--mb 25 50 75 ...]
"""
from __future__ import annotations

import argparse
import sys

import torch

CHAIN = 16


def triton_reader():
    """A read-only streaming kernel (sum of bf16 chunks into one fp32 per CTA)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def read_kernel(x_ptr, out_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * CHUNK
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in tl.static_range(0, CHUNK, BLOCK):
            idx = base + off + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0,
                           eviction_policy="evict_first").to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc))

    def run(x, out, chunk, block, warps):
        n = x.numel()
        grid = (triton.cdiv(n, chunk),)
        read_kernel[grid](x, out, n, CHUNK=chunk, BLOCK=block, num_warps=warps)
    return run


def chain_us(fns):
    from pcg.timing import capture_graph, cuda_time_ms
    graph, _ = capture_graph(lambda: [fns[i % len(fns)]() for i in range(CHAIN)])
    return cuda_time_ms(graph.replay, warmup=3, reps=30) * 1e3 / CHAIN


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, nargs="*",
                    default=[25.2, 50.3, 75.5, 34.6, 69.2, 103.8, 66.4, 132.7, 199.1])
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/hbm_read.py needs a CUDA GPU; nothing to do.")
        return 0
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  (per call, {CHAIN} calls a graph)")
    reader = triton_reader()
    settings = [(16384, 4096, 4), (32768, 4096, 8), (65536, 8192, 8)]  # (CHUNK elems, BLOCK, warps)
    print(f"{'MB':>7s} {'floor us':>9s} {'sum us':>8s} {'TB/s':>6s} {'gemv us':>8s} {'TB/s':>6s} "
          f"{'stream us':>9s} {'TB/s':>6s}  best (chunk, block, warps)")
    for mb in args.mb:
        rows = max(1, int(mb * 1e6 / 2 / 4096))
        nbytes = rows * 4096 * 2
        bufs = [torch.randn(rows, 4096, device=dev, dtype=torch.bfloat16) for _ in range(args.copies)]
        x = torch.randn(4096, device=dev, dtype=torch.bfloat16)
        sum_us = chain_us([lambda b=b: b.sum(dtype=torch.float32) for b in bufs])
        gemv_us = chain_us([lambda b=b: torch.mv(b, x) for b in bufs])
        st_us, st_cfg = float("nan"), None
        if reader is not None:
            out = torch.empty(rows * 4096 // 1024 + 1, device=dev, dtype=torch.float32)
            for cfg in settings:
                us = chain_us([lambda b=b, cfg=cfg: reader(b, out, *cfg) for b in bufs])
                if st_cfg is None or us < st_us:
                    st_us, st_cfg = us, cfg
        print(f"{nbytes / 1e6:7.1f} {nbytes / 4.3e12 * 1e6:9.1f} {sum_us:8.1f} {nbytes / sum_us / 1e6:6.2f} "
              f"{gemv_us:8.1f} {nbytes / gemv_us / 1e6:6.2f} {st_us:9.1f} {nbytes / st_us / 1e6:6.2f}  "
              f"{st_cfg}", flush=True)
        del bufs
    return 0


if __name__ == "__main__":
    sys.exit(main())
