"""bf16 accuracy of pcg against the unwrapped model, anchored on fp32.

For each transformers family (tiny random models of tests/hf_models.py), on
CUDA: the unwrapped model's own bf16 error against its fp32 logits, pcg's
(captured) bf16 error against the same fp32 logits, and the direct distance
between the two bf16 outputs; also pcg's split path run eagerly (no graphs,
no padding to a bucket) and with pcg's attention forced to per-sequence SDPA,
to separate capture/padding, attention and MoE numerics. Token counts that
are not bucket sizes (--buckets) replay a larger bucket with masked pad rows.
Errors are over --seeds random inputs per T (tiny random models flip near-tied
routing under any rounding change, so single calls are noisy). Prints a table,
writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

import pcg
import pcg.attention
from pcg.timing import rel_err as rel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hf_models import FAMILIES, VOCAB, build  # noqa: E402


@torch.inference_mode()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, nargs="*", default=[5, 20, 50, 64])
    ap.add_argument("--buckets", type=int, nargs="*", default=[8, 32, 64])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/accuracy.py needs a CUDA device")
        return
    rows = []
    print(f"{'family':>12} {'T':>4} {'hf16-vs-32':>10} {'pcg16-vs-32':>11} {'eager16-vs-32':>13} "
          f"{'pcg-vs-hf16':>11} {'pcg(sdpa)-vs-32':>15}")
    for fam in args.families or list(FAMILIES):
        m32 = build(fam, dtype=torch.float32, device="cuda")
        hf16 = copy.deepcopy(m32).to(torch.bfloat16)
        wrapped = pcg.wrap(copy.deepcopy(hf16), buckets=args.buckets, progress=False).capture()
        eager = pcg.wrap(copy.deepcopy(hf16), buckets=args.buckets, capture=False, progress=False)
        g = torch.Generator().manual_seed(0)
        for t in args.tokens:
            sq = dict(r32=0.0, hf16=0.0, pcg16=0.0, eager16=0.0, pcg_hf=0.0, sdpa=0.0)
            for _ in range(args.seeds):
                ids = torch.randint(0, VOCAB, (1, t), generator=g).cuda()
                r32, r16 = logits(m32, ids), logits(hf16, ids)
                p16 = wrapped(ids).logits.float()
                e16 = eager(ids).logits.float()
                pcg.attention.USE_VARLEN = False
                p16s = wrapped(ids).logits.float()
                pcg.attention.USE_VARLEN = True
                sq["r32"] += r32.norm().item() ** 2
                sq["hf16"] += (r16 - r32).norm().item() ** 2
                sq["pcg16"] += (p16 - r32).norm().item() ** 2
                sq["eager16"] += (e16 - r32).norm().item() ** 2
                sq["sdpa"] += (p16s - r32).norm().item() ** 2
                sq["pcg_hf"] += (p16 - r16).norm().item() ** 2
            n = sq["r32"] ** 0.5
            row = dict(family=fam, tokens=t, seeds=args.seeds, hf16_vs_32=sq["hf16"] ** 0.5 / n,
                       pcg16_vs_32=sq["pcg16"] ** 0.5 / n, eager16_vs_32=sq["eager16"] ** 0.5 / n,
                       pcg_vs_hf16=sq["pcg_hf"] ** 0.5 / n, pcg_sdpa_vs_32=sq["sdpa"] ** 0.5 / n)
            rows.append(row)
            print(f"{fam:>12} {t:>4} {row['hf16_vs_32']:>10.4f} {row['pcg16_vs_32']:>11.4f} "
                  f"{row['eager16_vs_32']:>13.4f} {row['pcg_vs_hf16']:>11.4f} "
                  f"{row['pcg_sdpa_vs_32']:>15.4f}", flush=True)
        del wrapped, eager, hf16, m32
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
