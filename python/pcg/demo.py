"""python -m pcg.demo: wrap the built-in default model and show what pcg does.

On a GPU: the Qwen3-30B-A3B-shaped model (random weights, 8 layers by
default), eager vs pcg prefill at a few token counts, plus the report.
On a CPU: a small model of the same family; checks that the wrapped model's
outputs match the unwrapped model (the CPU runs the same split path eagerly).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import pcg
from pcg.models import qwen3_moe_model
from pcg.timing import cuda_time_ms as _time_ms
from pcg.timing import rel_err as _rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 256, 1024])
    ap.add_argument("--cpu", action="store_true", help="run the CPU demo even if a GPU is present")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    if gpu:
        model = qwen3_moe_model(args.layers, dtype=torch.bfloat16, device="cuda")
        ref = copy.deepcopy(model)
        print(f"default model: Qwen3-30B-A3B-shaped, {args.layers} layers, bf16, random weights")
        ids_by_t = {t: torch.randint(0, 151936, (1, t), device="cuda") for t in args.tokens}
        eager_ms = {}
        with torch.inference_mode():
            for t, ids in ids_by_t.items():
                eager_ms[t] = _time_ms(lambda: ref(input_ids=ids, use_cache=False))
            expected = {t: ref(input_ids=ids, use_cache=False).logits for t, ids in ids_by_t.items()}
        wrapped = pcg.wrap(model, max_tokens=max(2048, max(args.tokens)))
        t0 = time.perf_counter()
        wrapped.capture()
        print(f"captured in {time.perf_counter() - t0:.1f} s")
        print(f"{'tokens':>7} {'eager ms':>9} {'pcg ms':>8} {'speedup':>8} {'rel err':>8}")
        for t, ids in ids_by_t.items():
            ms = _time_ms(lambda: wrapped(input_ids=ids))
            err = _rel(wrapped(input_ids=ids).logits, expected[t])
            print(f"{t:>7} {eager_ms[t]:>9.2f} {ms:>8.2f} {eager_ms[t] / ms:>7.2f}x {err:>8.1e}")
    else:
        print("no GPU: CPU demo on a small Qwen3-MoE-shaped model (fp32); graphs need CUDA, so the "
              "wrapped model runs the same split path eagerly")
        model = qwen3_moe_model(2, dtype=torch.float32, device="cpu", hidden_size=256,
                                moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                vocab_size=1024)
        ref = copy.deepcopy(model)
        wrapped = pcg.wrap(model)
        for t in args.tokens:
            ids = torch.randint(0, 1024, (1, t))
            with torch.inference_mode():
                expect = ref(input_ids=ids, use_cache=False).logits
            err = _rel(wrapped(input_ids=ids).logits, expect)
            status = "ok" if err <= 1e-4 else "MISMATCH"
            print(f"tokens {t:>5}: relative error vs unwrapped {err:.2e} {status}")
            if err > 1e-4:
                raise SystemExit(1)
    print(wrapped.report())


if __name__ == "__main__":
    main()
