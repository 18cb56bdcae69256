"""Runs every pcg CUDA kernel on small, awkward shapes and compares with the
CPU kernels; meant to be run under compute-sanitizer:

    compute-sanitizer --tool memcheck  python3 scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck python3 scripts/sanitize_kernels.py

Exits non-zero on a mismatch. Shapes cover every fused_moe block_m (16..128),
the CUTLASS sm_90a path (on sm_90), the weight-streaming path, the multi-CTA
moe_align,
unaligned H / I (element loads), expert maps with remote experts, num_valid,
biases and each activation, route (softmax / grouped sigmoid) and EP
dispatch/combine, and causal_attention_out's short-sequence kernel (packed
batches with empty / one-token sequences, pad rows, windows, Dv != D).
"""
import os
import sys

import torch

import pcg
from pcg.ops import causal_attention_graph, causal_attention_out, graph_batch
from pcg.ops.ep import ep_combine, ep_dispatch

dev = torch.device("cuda")
failures = []


def close(name, a, b, tol):
    err = ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm().clamp_min(1e-30)).item()
    status = "ok" if err <= tol else "MISMATCH"
    print(f"{name:60s} rel err {err:.2e} {status}", flush=True)
    if err > tol:
        failures.append(name)


def moe_case(E, k, H, I, T, dtype, act="silu", bias=False, mapped=False, nvalid=None, config=None,
             w13_block=0):
    g = torch.Generator().manual_seed(T * 31 + E)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    Eg = 2 * E if mapped else E
    w, ids = torch.softmax(torch.randn(T, Eg, generator=g), -1).topk(k, -1)
    ids = ids.to(torch.int32)
    emap = None
    if mapped:  # half the global experts are remote
        emap = torch.full((Eg,), -1, dtype=torch.int32)
        emap[::2] = torch.arange(E, dtype=torch.int32)
    b13 = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(E, H, generator=g) * 0.1).to(dtype) if bias else None
    nv = torch.tensor([nvalid], dtype=torch.int32) if nvalid is not None else None
    args = [hidden, w13, w2, w, ids, emap, nv, b13, b2, act]
    ref = pcg.fused_moe(*args)
    dargs = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    dargs[1] = pcg.interleave_w13(dargs[1], w13_block)
    out = pcg.fused_moe(*dargs, config=config, w13_block=w13_block)
    torch.cuda.synchronize()
    close(f"fused_moe E={E} k={k} H={H} I={I} T={T} {dtype} {act} bias={bias} map={mapped} "
          f"nv={nvalid} config={config} w13_block={w13_block}", out, ref, 2e-2 if dtype != torch.float32 else 1e-4)


for dtype in (torch.bfloat16, torch.float16):
    moe_case(8, 2, 256, 128, 5, dtype)                        # block_m 16
    moe_case(8, 2, 256, 128, 150, dtype, bias=True)           # block_m 32
    moe_case(4, 2, 128, 96, 600, dtype, mapped=True)          # block_m 128 (remote experts)
    moe_case(16, 4, 200, 72, 70, dtype, act="swigluoai", bias=True, nvalid=41)  # unaligned
    moe_case(8, 2, 136, 40, 300, dtype, act="gelu")           # block_m 64
moe_case(8, 2, 96, 40, 33, torch.float32, bias=True)          # SIMT path
moe_case(16, 4, 64, 32, 2100, torch.bfloat16, nvalid=2050)    # multi-CTA align (3 tiles)
if torch.cuda.get_device_capability() == (9, 0):  # the CUTLASS sm_90a path
    for dtype in (torch.bfloat16, torch.float16):
        moe_case(8, 2, 256, 128, 150, dtype, bias=True, mapped=True, config=[-1, -1, -1])
        moe_case(16, 4, 200, 72, 70, dtype, act="swigluoai", bias=True, nvalid=41,
                 config=[-1, -1, -1])
    moe_case(16, 4, 64, 32, 2100, torch.bfloat16, act="gelu", config=[-1, -1, -1])
    # GEMM1 with the activation in its epilogue (w13 in the block layout), every variant
    from pcg.ops.fused_moe import fused_moe_cutlass_variants
    # and as GEMM2 (its plain epilogue); swap-AB ones also as GEMM1 of the plain layout
    for v in fused_moe_cutlass_variants():
        moe_case(16, 4, 200, 200, 70, torch.bfloat16, act="swigluoai", bias=True, nvalid=41,
                 mapped=True, config=[-1, v.id, -1], w13_block=8)
        if v.gather_a:  # GEMM1 only; also behind the three-kernel prologue (no permute)
            os.environ["PCG_MOE_PROLOGUE_MAX_PAIRS"] = "0"
            moe_case(16, 4, 200, 200, 70, torch.bfloat16, bias=True, nvalid=41, mapped=True,
                     config=[-1, v.id, -1], w13_block=8)
            moe_case(16, 4, 200, 200, 70, torch.bfloat16, bias=True, nvalid=41, mapped=True,
                     config=[-1, v.id, -1])
            del os.environ["PCG_MOE_PROLOGUE_MAX_PAIRS"]
            continue
        moe_case(16, 4, 200, 200, 70, torch.bfloat16, bias=True, nvalid=41, mapped=True,
                 config=[-1, -1, v.id], w13_block=8)
        if v.swap_ab:
            moe_case(16, 4, 200, 200, 70, torch.bfloat16, bias=True, nvalid=41, mapped=True,
                     config=[-1, v.id, v.id])
    moe_case(16, 4, 64, 32, 2100, torch.float16, config=[-1, -1, -1], w13_block=16)
for dtype in (torch.bfloat16, torch.float16):  # the weight-streaming path (T*k <= 128)
    moe_case(8, 2, 256, 128, 5, dtype, bias=True, mapped=True, config=[-2, -1, -1])
    moe_case(16, 4, 200, 72, 30, dtype, act="swigluoai", bias=True, nvalid=17,
             config=[-2, -1, -1])
    moe_case(300, 8, 72, 40, 16, dtype, act="gelu", config=[-2, -1, -1])
    moe_case(16, 4, 200, 72, 30, dtype, bias=True, config=[-2, -1, -1], w13_block=8)
# Down kernels of 12, 8 and 4 warps (moe::stream_down_warps; 132 SMs: H = 256 at T = 5 with
# 24 units, H = 2880, 4360; the stream cases above run 11 warps at T = 5 and 16 above).
moe_case(12, 3, 256, 200, 5, torch.bfloat16, config=[-2, -1, -1])
moe_case(6, 2, 2880, 40, 3, torch.bfloat16, bias=True, config=[-2, -1, -1])
moe_case(6, 3, 4360, 40, 9, torch.bfloat16, nvalid=7, config=[-2, -1, -1])
moe_case(8, 2, 136, 40, 300, torch.bfloat16, act="gelu", w13_block=8)  # mma.sync, block layout
moe_case(8, 2, 96, 48, 33, torch.float32, bias=True, w13_block=16)     # SIMT, block layout

for scoring, groups in (("softmax", 1), ("sigmoid", 4)):
    logits = torch.randn(77, 64)
    bias = torch.randn(64) if groups > 1 else None
    w_ref, i_ref = pcg.route(logits, 6, scoring=scoring, correction_bias=bias, num_groups=groups,
                             topk_groups=2 if groups > 1 else 1)
    w_gpu, i_gpu = pcg.route(logits.to(dev), 6, scoring=scoring,
                             correction_bias=bias.to(dev) if bias is not None else None,
                             num_groups=groups, topk_groups=2 if groups > 1 else 1)
    same = torch.equal(i_gpu.cpu(), i_ref)
    print(f"route {scoring} groups={groups}: ids {'equal' if same else 'DIFFER'}", flush=True)
    if not same:
        failures.append(f"route {scoring}")
    close(f"route {scoring} weights", w_gpu, w_ref, 1e-5)

T, E, k, W, H = 45, 16, 4, 4, 136
g = torch.Generator().manual_seed(3)
hidden = torch.randn(T, H, generator=g).to(torch.bfloat16)
w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, -1)
ids = ids.to(torch.int32)
er = (torch.arange(E, dtype=torch.int32) // (E // W))
el = (torch.arange(E, dtype=torch.int32) % (E // W))
nv = torch.tensor([39], dtype=torch.int32)
cpu = ep_dispatch(hidden, w, ids, er, el, W, nv)
gpu = ep_dispatch(hidden.to(dev), w.to(dev), ids.to(dev), er.to(dev), el.to(dev), W, nv.to(dev))
torch.cuda.synchronize()
counts = cpu[3]
same = torch.equal(gpu[3].cpu(), counts) and torch.equal(gpu[2].cpu(), cpu[2])
for r in range(W):  # rows past counts[r] are unused (never written)
    n = int(counts[r])
    same = same and torch.equal(gpu[0][r, :n].cpu(), cpu[0][r, :n])
    same = same and torch.equal(gpu[1][r, :n].cpu(), cpu[1][r, :n])
print(f"ep_dispatch: {'equal' if same else 'DIFFER'}", flush=True)
if not same:
    failures.append("ep_dispatch")
close("ep_combine", ep_combine(gpu[0], gpu[2]), ep_combine(cpu[0], cpu[2]), 1e-6)

# causal_attention_out: the CUDA call takes the short-sequence kernel; the CPU op is the reference.
for rows, cu, hq, hkv, d, dv, wl in ((40, [0, 0, 1, 18, 18, 33], 8, 2, 96, 96, -1),
                                     (64, [0, 64], 8, 1, 256, 64, 9),
                                     (7, [0, 1, 2, 3], 4, 4, 8, 136, -1)):
    g = torch.Generator().manual_seed(rows)
    q, k, v = (torch.randn(rows, h, x, generator=g).to(torch.bfloat16)
               for h, x in ((hq, d), (hkv, d), (hkv, dv)))
    ref = torch.empty(rows, hq, dv, dtype=torch.bfloat16)
    causal_attention_out(q, k, v, ref, cu, window_left=wl)
    out = torch.full((rows, hq, dv), float("nan"), dtype=torch.bfloat16, device=dev)
    causal_attention_out(q.to(dev), k.to(dev), v.to(dev), out, cu, window_left=wl)
    torch.cuda.synchronize()
    close(f"causal_attention_out short T={cu[-1]} rows={rows} Hq={hq} Hkv={hkv} D={d} Dv={dv} "
          f"window={wl}", out, ref, 2e-2)
    # the same kernel reading its batch from device memory (room for 64 sequences)
    out.fill_(float("nan"))
    causal_attention_graph(q.to(dev), k.to(dev), v.to(dev), out, graph_batch(cu, 64, dev),
                           window_left=wl)
    torch.cuda.synchronize()
    close(f"causal_attention_graph T={cu[-1]} rows={rows} Hq={hq} Hkv={hkv} D={d} Dv={dv} "
          f"window={wl}", out, ref, 2e-2)

print("FAILED: " + ", ".join(failures) if failures else "all kernels match the CPU kernels")
sys.exit(1 if failures else 0)
