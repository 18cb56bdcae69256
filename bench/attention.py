"""One attention split call: pcg's short-sequence kernel vs the flash path.

For each T (one sequence of T tokens in a bucket of T rows, plus a packed
variant of several sequences), times ``pcg::causal_attention_out`` called from
Python on prepared tensors (as a replay calls it, minus the dispatcher hop from
C++) in three ways:
  event_us  CUDA-event time of one synchronised call (host work before the
            first kernel counts, as in a split between two graph replays);
  loop_us   mean of 200 calls enqueued back to back (GPU-side cost per call
            once the host runs ahead);
  host_us   median host time to enqueue one call.
``short`` lets the kernel run (meta flags 1); ``flash`` sets flags bit 1, so
the batch takes torch's flash kernel (+ the copy into ``out``) as before.
Qwen3-30B-A3B attention shape by default: Hq=32, Hkv=4, D=128, bf16.

    python bench/attention.py --tokens 1 2 4 8 16 32 64
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import pcg  # noqa: F401  (loads the op library)
from pcg.batch import BatchMeta
from pcg.timing import cuda_time_ms, host_us


def loop_us(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def measure(cu: list[int], rows: int, hq: int, hkv: int, d: int, dtype, reps: int) -> dict:
    q = torch.randn(rows, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(rows, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(rows, hkv, d, device="cuda", dtype=dtype)
    res = {}
    outs = {}
    for mode in ("short", "flash"):
        meta = BatchMeta(cu[-1], cu, None, rows).host_meta(varlen=True, short_kernel=mode == "short")
        out = torch.empty(rows, hq, d, device="cuda", dtype=dtype)
        outs[mode] = out

        def call(meta=meta, out=out):
            torch.ops.pcg.causal_attention_out(q, k, v, out, meta, None, -1)

        res[mode] = {"event_us": cuda_time_ms(call, warmup=5, reps=reps) * 1e3,
                     "loop_us": loop_us(call), "host_us": host_us(call, reps=50)}
    res["max_abs_diff"] = (outs["short"].float() - outs["flash"].float()).abs().max().item()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention bench: no CUDA device; nothing to measure")
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = [(f"T={t}", [0, t], t) for t in args.tokens]
    # Packed batches: 4 sequences of T/4 tokens, in a bucket with pad rows.
    shapes += [(f"4x{t // 4} pad {t}", [0, t // 4, t // 2, 3 * t // 4, t], 2 * t)
               for t in args.tokens if t >= 8]
    rows = []
    print(f"Hq={args.hq} Hkv={args.hkv} D={args.head_dim} {args.dtype}; times in us")
    print(f"{'batch':<16} {'short ev':>9} {'flash ev':>9} {'short loop':>11} {'flash loop':>11} "
          f"{'short host':>11} {'flash host':>11} {'max|diff|':>10}")
    for name, cu, n_rows in shapes:
        r = measure(cu, n_rows, args.hq, args.hkv, args.head_dim, dtype, args.reps)
        s, f = r["short"], r["flash"]
        print(f"{name:<16} {s['event_us']:9.1f} {f['event_us']:9.1f} {s['loop_us']:11.1f} "
              f"{f['loop_us']:11.1f} {s['host_us']:11.1f} {f['host_us']:11.1f} {r['max_abs_diff']:10.2e}")
        rows.append({"batch": name, "cu_seqlens": cu, "rows": n_rows, **r})
    print("(T=1 'flash' is the one-token path: a copy of v, no flash launch)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention.json")
    with open(path, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "hq": args.hq, "hkv": args.hkv, "head_dim": args.head_dim, "dtype": args.dtype,
                   "results": rows}, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
