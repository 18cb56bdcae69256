"""pcg::causal_attention_out against a pure-PyTorch reference (CPU; CUDA marked gpu),
its errors, opcheck, and its replay as a recorded split call of a segment chain."""
import math
import os
import sys

import pytest
import torch

import pcg  # noqa: F401
from pcg.batch import BatchMeta
from pcg.ops import causal_attention_out

sys.path.insert(0, os.path.dirname(__file__))
from split_recorder import SplitRecorder  # noqa: E402


def reference(q, k, v, cu, scale=None, window_left=-1, rows=None, chunk=None):
    """fp64 softmax attention per sequence, causal (+ window, + chunks of
    ``chunk`` tokens from the sequence's first); pad rows zero."""
    rows = q.shape[0] if rows is None else rows
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(rows, hq, v.shape[2], dtype=torch.float64)
    for a, b in zip(cu, cu[1:]):
        s = b - a
        if s == 0:
            continue
        qs, ks, vs = (x[a:b].double() for x in (q, k, v))
        ks = ks.repeat_interleave(hq // hkv, dim=1)
        vs = vs.repeat_interleave(hq // hkv, dim=1)
        logits = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        keep = j <= i
        if window_left >= 0:
            keep &= (i - j) <= window_left
        if chunk is not None:
            keep &= (i // chunk) == (j // chunk)
        logits = logits.masked_fill(~keep, float("-inf"))
        out[a:b] = torch.einsum("hij,jhd->ihd", logits.softmax(-1), vs)
    return out


def make(rows, hq, hkv, d, dv=None, dtype=torch.float32, device="cpu", seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if strided:  # heads-major storage seen through a transpose: non-contiguous q/k/v
        q = rnd(hq, rows, d).transpose(0, 1)
        k = rnd(hkv, rows, d).transpose(0, 1)
        v = rnd(hkv, rows, dv).transpose(0, 1)
    else:
        q, k, v = rnd(rows, hq, d), rnd(rows, hkv, d), rnd(rows, hkv, dv)
    return q, k, v


CASES = [  # rows, cu_seqlens, hq, hkv, d, dv, scale, window_left
    (7, [0, 7], 4, 2, 16, 16, None, -1),
    (13, [0, 5, 6, 13], 6, 3, 8, 8, 0.3, -1),
    (20, [0, 9, 17], 4, 1, 32, 24, None, -1),  # pad rows 17..19, Dv != D (MLA-like)
    (11, [0, 11], 2, 2, 16, 16, None, 3),  # sliding window
    (9, [0, 4, 9], 4, 2, 16, 16, None, 0),  # window 1: each query sees itself
    (5, [0, 0, 5], 2, 1, 8, 8, None, -1),  # an empty sequence
    (6, [0], 2, 1, 8, 8, None, -1),  # no tokens at all: zeros
    (1, [0, 1], 8, 2, 16, 16, None, -1),  # one token: out = v per kv group
    (5, [0, 1, 2, 2, 3], 6, 3, 8, 12, None, 2),  # single-token sequences (+ an empty one), pad rows
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strided", [False, True])
def test_matches_reference_cpu(case, strided):
    rows, cu, hq, hkv, d, dv, scale, wl = case
    q, k, v = make(rows, hq, hkv, d, dv, strided=strided)
    out = torch.full((rows, hq, dv), float("nan"))
    causal_attention_out(q, k, v, out, cu if len(cu) > 1 else [0, 0], scale=scale, window_left=wl)
    ref = reference(q, k, v, cu if len(cu) > 1 else [0, 0], scale, wl, rows)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


CHUNK_CASES = [  # rows, cu_seqlens, chunk, window_left
    (29, [0, 9, 15, 15, 26], 4, -1),  # pad rows, an empty sequence
    (40, [0, 40], 16, -1),
    (23, [0, 1, 23], 5, 2),  # chunk and window together
    (12, [0, 12], 12, -1),  # one chunk holds the call: the standard path
]


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunked_layer_matches_reference(case, device):
    """A chunked layer (Llama-4) through pcg::attention: keys of the query's
    own chunk only, counted from its sequence's first token."""
    from pcg import attention as attn
    from pcg.registry import AttentionLayer
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows, cu, chunk, wl = case
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = make(rows, 4, 2, 16, dtype=dtype, device=device, strided=True)
    layer = AttentionLayer(0, chunk_size=chunk, sliding_window=None if wl < 0 else wl + 1)
    out = torch.full((rows, 4, 16), float("nan"), dtype=dtype, device=device)
    attn.compute(q, k, v, out, layer, BatchMeta(cu[-1], cu, None, rows))
    ref = reference(q.cpu(), k.cpu(), v.cpu(), cu, None, wl, rows, chunk=chunk)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    assert attn.native(layer, rows) == (rows <= chunk)


@pytest.mark.parametrize("rows,graph_attention,expect", [
    (12, True, []),  # the chunk holds the bucket, <= 64 rows: inside the graph
    (12, False, ["pcg::causal_attention_out"]),  # the chunk holds it: the C++ op is recorded
    (40, False, ["pcg::attention_out"]),  # sequences are cut: Python runs the pieces at replay
    (40, True, ["pcg::attention_out"]),
])
def test_chunked_layer_under_capture_records_the_right_call(rows, graph_attention, expect):
    """What a capture of a chunked layer (chunk 16) records per bucket size,
    and that the call it runs is right for the batch it runs."""
    from pcg.ops import graph_batch
    from pcg.registry import LayerRegistry, RunContext, running
    reg = LayerRegistry()
    reg.add_attention(chunk_size=16)
    q, k, v = make(rows, 4, 2, 16)
    rec = SplitRecorder()
    batch = BatchMeta(rows, [0, rows], None, rows, meta=torch.zeros(4 + rows + 1, dtype=torch.int64))
    ctx = RunContext(reg, batch, None, rec)
    if graph_attention:
        ctx.graph_batch = graph_batch([0, rows])
    with running(ctx):
        out = torch.ops.pcg.attention(q, k, v, 0)
    assert rec.calls == expect
    assert ctx.stats.get("graph_attention", 0) == (0 if expect else 1)
    torch.testing.assert_close(out.double(), reference(q, k, v, [0, rows], rows=rows, chunk=16),
                               rtol=1e-5, atol=1e-5)


def test_pcg_nn_chunked_attention_wrapped_and_unwrapped():
    """pcg.nn.Attention(chunk_size=...): the wrapped model (chunk pieces of
    the packed batch) equals the unwrapped one (SDPA with a chunk mask), and
    the chunks change the output (the check can fail)."""
    import copy
    from pcg.models import MoETransformer, MoETransformerConfig
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(num_layers=2)).eval()
    full = copy.deepcopy(model)
    for block in model.modules():
        if isinstance(block, pcg.nn.Attention):
            block.chunk_size = 3
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expect, unchunked = ref(ids), full(ids)
        assert (expect - unchunked).abs().max() > 1e-3
        w = pcg.wrap(model, progress=False)
        assert [l.chunk_size for l in w.registry.attention_layers] == [3, 3]
        got = w(ids)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="chunk_size"):
        pcg.nn.Attention(4, 2, 16, chunk_size=0)


def test_non_contiguous_out():
    q, k, v = make(5, 4, 2, 8)
    for cu in ([0, 5], [0, 1, 2, 3, 4, 5]):
        store = torch.full((4, 5, 8), float("nan"))
        out = store.transpose(0, 1)  # [5, 4, 8] seen through a transpose
        causal_attention_out(q, k, v, out, cu)
        torch.testing.assert_close(out.double(), reference(q, k, v, cu), rtol=1e-5, atol=1e-5)


def test_varlen_flag_and_fp16_cpu():
    q, k, v = make(12, 4, 2, 16, dtype=torch.bfloat16)
    cu = [0, 3, 12]
    a, b = torch.empty(12, 4, 16, dtype=torch.bfloat16), torch.empty(12, 4, 16, dtype=torch.bfloat16)
    causal_attention_out(q, k, v, a, cu, varlen=True)
    causal_attention_out(q, k, v, b, cu, varlen=False)
    ref = reference(q, k, v, cu)
    assert torch.equal(a, b)  # on the CPU both run per sequence
    torch.testing.assert_close(a.double(), ref, rtol=2e-2, atol=2e-2)


def test_meta_is_read_at_every_call():
    """The recorded call keeps the same meta tensor; rewriting it changes the batch."""
    q, k, v = make(10, 2, 1, 8)
    out = torch.empty(10, 2, 8)
    meta = torch.zeros(4 + 11, dtype=torch.int64)
    for cu in ([0, 10], [0, 4, 10], [0, 3]):
        BatchMeta(cu[-1], cu, None, 10, meta=meta).host_meta()
        torch.ops.pcg.causal_attention_out(q, k, v, out, meta)
        torch.testing.assert_close(out.double(), reference(q, k, v, cu, rows=10), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q, k, v = make(6, 4, 2, 8)
    out = torch.empty(6, 4, 8)
    meta = BatchMeta(6, [0, 6], None, 6).host_meta()
    op = torch.ops.pcg.causal_attention_out
    with pytest.raises(ValueError, match="'meta'.*int64 CPU"):
        op(q, k, v, out, meta.int())
    with pytest.raises(ValueError, match="num_tokens 7"):
        op(q, k, v, out, BatchMeta(7, [0, 7], None, 7).host_meta())
    bad = meta.clone()
    bad[2] = 3  # max_seqlen wrong
    with pytest.raises(ValueError, match="max_seqlen"):
        op(q, k, v, out, bad)
    bad = torch.tensor([6, 2, 6, 1, 0, 5, 4], dtype=torch.int64)  # cu runs backwards / wrong end
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(q, k, v, out, bad)
    bad = torch.tensor([6, 3, 6, 1, 0, 6], dtype=torch.int64)  # too short for 3 sequences
    with pytest.raises(ValueError, match="num_seqs 3"):
        op(q, k, v, out, bad)
    with pytest.raises(ValueError, match="'k' heads"):
        op(q, make(6, 4, 3, 8)[1], make(6, 4, 3, 8)[2], out, meta)
    with pytest.raises(ValueError, match="'out'"):
        op(q, k, v, torch.empty(6, 4, 7), meta)
    with pytest.raises(ValueError, match="'v'.*dtype"):
        op(q, k, v.double(), out, meta)
    with pytest.raises(ValueError, match="window_left"):
        op(q, k, v, out, meta, None, -2)
    bad = torch.tensor([6, 2**63 - 1, 6, 0, 0], dtype=torch.int64)  # num_seqs + 1 would wrap
    with pytest.raises(ValueError, match="num_seqs 9223372036854775807"):
        op(q, k, v, out, bad)
    with pytest.raises(ValueError, match="'q' must be a floating-point tensor"):
        op(q.int(), k.int(), v.int(), out.int(), meta)
    for scale in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'scale' must be a finite positive number"):
            op(q, k, v, out, meta, scale)


def test_opcheck():
    q, k, v = make(9, 4, 2, 8)
    out = torch.empty(9, 4, 8)
    meta = BatchMeta(8, [0, 5, 8], None, 9).host_meta()
    torch.library.opcheck(torch.ops.pcg.causal_attention_out.default, (q, k, v, out, meta, 0.5, 2),
                          test_utils=("test_schema", "test_faketensor"))


# ---- CUDA ---------------------------------------------------------------------------
GPU_CASES = [  # rows, cu_seqlens, hq, hkv, d, window_left
    (1, [0, 1], 32, 4, 128, -1),
    (6, [0, 1, 2, 3], 8, 2, 64, -1),  # single-token sequences, pad rows
    (37, [0, 37], 8, 2, 64, -1),
    (50, [0, 7, 20, 45], 8, 8, 128, -1),  # pad rows 45..49
    (33, [0, 1, 33], 4, 1, 96, 7),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("varlen", [True, False])
@pytest.mark.parametrize("short_kernel", [True, False])
def test_matches_reference_cuda(case, dtype, varlen, short_kernel):
    rows, cu, hq, hkv, d, wl = case
    q, k, v = make(rows, hq, hkv, d, dtype=dtype, device="cuda", strided=True)
    out = torch.full((rows, hq, d), float("nan"), dtype=dtype, device="cuda")
    causal_attention_out(q, k, v, out, cu, window_left=wl, varlen=varlen, short_kernel=short_kernel)
    ref = reference(q.cpu(), k.cpu(), v.cpu(), cu, None, wl, rows)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_replayed_as_a_recorded_split_call():
    """graph (q = x * 2) -> causal_attention_out -> graph (y = out + 1), replayed with
    the meta rewritten between replays: each replay sees its own batch."""
    rows, hq, hkv, d = 24, 8, 2, 64
    x, k, v = make(rows, hq, hkv, d, dtype=torch.bfloat16, device="cuda")
    meta = torch.zeros(4 + rows + 1, dtype=torch.int64)
    BatchMeta(rows, [0, rows], None, rows, meta=meta).host_meta()
    pool = torch.cuda.graph_pool_handle()
    chain = torch.classes.pcg.SegmentChain()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain.capture_begin(*pool)
        q = x * 2
        out = torch.empty(rows, hq, d, dtype=torch.bfloat16, device="cuda")
        chain.capture_end()
        torch.ops.pcg.causal_attention_out(q, k, v, out, meta)
        chain.record_call("pcg::causal_attention_out", [q, k, v, out, meta, None, -1])
        chain.capture_begin(*pool)
        y = out + 1
        chain.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    for cu in ([0, 24], [0, 5, 19], [0, 1], [0, 3, 4, 10, 24]):
        x.copy_(torch.randn_like(x))
        BatchMeta(cu[-1], cu, None, rows, meta=meta).host_meta()
        chain.replay()
        ref = reference((x * 2).cpu(), k.cpu(), v.cpu(), cu, rows=rows) + 1
        ref[cu[-1]:] = 1  # pad rows: zeros + 1
        torch.testing.assert_close(y.double().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("cu", [[0, 100], [0, 7, 90, 150], [0, 7, 20, 45], [0, 1, 2, 3]],
                         ids=["one", "varlen", "short", "tokens"])
def test_captured_in_a_cuda_graph_keeps_its_batch(cu):
    """The op captured inside a caller's CUDA graph replays the batch it was
    captured with, also after eager calls with other batches (whose staging
    buffers would reuse freed host memory) and with the meta rewritten."""
    rows, hq, hkv, d = 160, 8, 2, 64
    q, k, v = make(rows, hq, hkv, d, dtype=torch.bfloat16, device="cuda", seed=3)
    meta = torch.zeros(4 + rows + 1, dtype=torch.int64)  # room for any batch of `rows` tokens
    BatchMeta(cu[-1], cu, None, rows, meta=meta).host_meta()
    out = torch.empty(rows, hq, d, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.pcg.causal_attention_out(q, k, v, out, meta)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.ops.pcg.causal_attention_out(q, k, v, out, meta)
    other = torch.empty_like(out)
    for i, cu2 in enumerate(([0, 3, 80, 81, 160], [0, 160], [0, 10, 11])):
        BatchMeta(cu2[-1], cu2, None, rows, meta=meta).host_meta()  # the caller rewrites it
        torch.ops.pcg.causal_attention_out(q, k, v, other, meta)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = reference(q.cpu(), k.cpu(), v.cpu(), cu, rows=rows)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2,
                                   msg=lambda m: f"replay after eager call {i}: {m}")


# ---- CUDA: the short-sequence kernel (csrc/attention/short_attention_kernel.cu) ----
SHORT_CASES = [  # rows, cu_seqlens, hq, hkv, d, dv, window_left
    (1, [0, 1], 32, 4, 128, 128, -1),  # one token: out = v, through the kernel
    (64, [0, 64], 32, 4, 128, 128, -1),  # the longest sequence it takes (Qwen3 shape)
    (37, [0, 37], 8, 1, 64, 64, -1),  # odd length, group 8
    (64, [0, 0, 1, 18, 18, 39, 40], 16, 4, 96, 96, -1),  # empty + one-token sequences, pad rows 40..63
    (50, [0, 7, 20, 45], 8, 8, 256, 256, -1),  # group 1, D 256, pad rows
    (33, [0, 1, 33], 4, 1, 96, 96, 7),  # window
    (24, [0, 5, 24], 8, 2, 64, 64, 0),  # window 0: each query sees itself
    (30, [0, 13, 29], 8, 2, 128, 64, -1),  # Dv < D
    (17, [0, 17], 4, 4, 64, 256, 3),  # Dv > D, window
    (9, [0, 1, 2, 3, 4, 5, 6, 7, 8], 8, 1, 128, 128, -1),  # decode-like batch + one pad row
    (20, [0], 4, 2, 64, 64, -1),  # no tokens: all rows zero
    (4, [0, 4], 4, 2, 16, 16, -1),  # tests/test_engine.py's tiny model: D 16
    (23, [0, 9, 23], 4, 2, 16, 16, -1),
]
LAYOUTS = ["contiguous", "strided", "strided_out", "fused_qkv"]


def make_fused_qkv(rows, hq, hkv, d, dv, dtype, seed=0):
    """q, k, v as views into one [rows, (hq + hkv) * d + hkv * dv] projection
    output (what a fused qkv Linear gives): row strides wider than the heads."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (hq + hkv) * d + hkv * dv, generator=g).to("cuda", dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * dv], dim=1)
    return q.view(rows, hq, d), k.view(rows, hkv, d), v.view(rows, hkv, dv)


def make_out(rows, hq, dv, dtype, layout):
    if layout == "strided_out":  # [rows, hq, dv] seen through a transpose of heads-major storage
        return torch.full((hq, rows, dv), float("nan"), dtype=dtype, device="cuda").transpose(0, 1)
    return torch.full((rows, hq, dv), float("nan"), dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", SHORT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_short_kernel_matches_reference_and_flash(case, dtype, layout):
    rows, cu, hq, hkv, d, dv, wl = case
    cu = cu if len(cu) > 1 else [0, 0]
    if layout == "fused_qkv":
        q, k, v = make_fused_qkv(rows, hq, hkv, d, dv, dtype)
    else:
        q, k, v = make(rows, hq, hkv, d, dv, dtype=dtype, device="cuda", strided=layout != "contiguous")
    out = make_out(rows, hq, dv, dtype, layout)
    causal_attention_out(q, k, v, out, cu, window_left=wl)
    ref = reference(q.cpu(), k.cpu(), v.cpu(), cu, None, wl, rows)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)
    assert (out[cu[-1]:] == 0).all(), "pad rows must be exact zeros"
    old = make_out(rows, hq, dv, dtype, layout)  # flash (D == Dv) or SDPA (Dv != D)
    causal_attention_out(q, k, v, old, cu, window_left=wl, short_kernel=False)
    torch.testing.assert_close(out, old, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [None, 0.05])
def test_short_kernel_scale_and_all_lengths(scale):
    """Every single-sequence length 1..64 (pad rows after it), GQA group 4."""
    rows, hq, hkv, d = 64, 16, 4, 128
    q, k, v = make(rows, hq, hkv, d, dtype=torch.bfloat16, device="cuda", seed=3)
    for t in range(1, 65):
        out = torch.full((rows, hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        causal_attention_out(q, k, v, out, [0, t], scale=scale)
        ref = reference(q.cpu(), k.cpu(), v.cpu(), [0, t], scale, -1, rows)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2, msg=f"T={t}")


@pytest.mark.gpu
def test_short_kernel_one_token_rows_are_v_exactly():
    q, k, v = make(6, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
    out = torch.full((6, 8, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    causal_attention_out(q, k, v, out, [0, 1, 2, 3, 4])
    assert torch.equal(out[:4], v[:4].repeat_interleave(4, dim=1))
    assert (out[4:] == 0).all()


def _kernel_names(fn) -> list[str]:
    """Names of the GPU activities (kernels, copies, fills) of one call of fn."""
    acts = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[acts.CPU, acts.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.gpu
def test_short_kernel_is_chosen_for_short_batches_only():
    q, k, v = make(200, 32, 4, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(200, 32, 128, dtype=torch.bfloat16, device="cuda")

    def names(cu, **kw):
        return " ".join(_kernel_names(lambda: causal_attention_out(q, k, v, out, cu, **kw)))

    short = names([0, 16])  # 16 tokens + 184 pad rows: one launch, no fill kernel
    assert "short_attention_kernel" in short and "flash" not in short.lower(), short
    assert len(_kernel_names(lambda: causal_attention_out(q, k, v, out, [0, 16]))) == 1
    assert "short_attention_kernel" in names([0, 1, 2, 3])  # all-one-token batch
    assert "short_attention_kernel" not in names([0, 16], short_kernel=False)
    assert "short_attention_kernel" not in names([0, 65])  # longer than 64 tokens
    assert "short_attention_kernel" not in names([0, 100, 200])
    assert "short_attention_kernel" not in names(list(range(0, 130)))  # 129 sequences
    q32, k32, v32, out32 = (x.float() for x in (q, k, v, out))
    assert "short_attention_kernel" not in " ".join(  # fp32 keeps the old path
        _kernel_names(lambda: causal_attention_out(q32, k32, v32, out32, [0, 16])))


@pytest.mark.gpu
def test_short_kernel_declines_non_unit_head_stride():
    """q/k/v whose head dim has stride 2 fall back to the old path (still correct)."""
    rows, hq, hkv, d = 12, 4, 2, 64
    cu = [0, 5, 12]
    big = make(rows, hq, hkv, 2 * d, dtype=torch.bfloat16, device="cuda")
    q, k, v = (x[..., ::2] for x in big)
    out = torch.full((rows, hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert "short_attention_kernel" not in " ".join(
        _kernel_names(lambda: causal_attention_out(q, k, v, out, cu)))
    ref = reference(q.cpu(), k.cpu(), v.cpu(), cu)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_short_kernel_in_a_cuda_graph():
    """No host synchronisation and no staging copy: the call captures and replays."""
    rows, cu = 16, [0, 3, 11]
    q, k, v = make(rows, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.full((rows, 8, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    causal_attention_out(q, k, v, out, cu)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        causal_attention_out(q, k, v, out, cu)
    out.fill_(float("nan"))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out.double().cpu(), reference(q.cpu(), k.cpu(), v.cpu(), cu, rows=rows),
                               rtol=2e-2, atol=2e-2)


# ---- pcg::causal_attention_graph: the batch in device memory -------------------------
GRAPH_CASES = [  # rows, cu_seqlens, hq, hkv, d, dv, window_left (sequences <= 64 tokens)
    (7, [0, 7], 4, 2, 16, 16, -1),
    (13, [0, 5, 6, 13], 6, 3, 8, 8, -1),
    (20, [0, 9, 17], 4, 1, 32, 24, -1),  # pad rows, Dv != D
    (11, [0, 11], 2, 2, 16, 16, 3),  # window
    (5, [0, 0, 5], 2, 1, 8, 8, -1),  # an empty sequence
    (6, [0], 2, 1, 8, 8, -1),  # no tokens
    (64, [0, 64], 4, 2, 16, 16, -1),  # the longest sequence it takes
]


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_graph_op_matches_reference_cpu(case):
    rows, cu, hq, hkv, d, dv, wl = case
    q, k, v = make(rows, hq, hkv, d, dv, strided=True)
    out = torch.full((rows, hq, dv), float("nan"))
    pcg.ops.causal_attention_graph(q, k, v, out, pcg.ops.graph_batch(cu, capacity=8), window_left=wl)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, None, wl, rows), rtol=1e-5, atol=1e-5)


def test_graph_op_bad_batches_raise_clear_errors():
    q, k, v = make(70, 4, 2, 8)
    out = torch.empty(70, 4, 8)
    op = torch.ops.pcg.causal_attention_graph
    gb = pcg.ops.graph_batch
    with pytest.raises(ValueError, match="'batch'.*int32"):
        op(q, k, v, out, gb([0, 5]).long())
    with pytest.raises(ValueError, match="'batch'.*at least 3"):
        op(q, k, v, out, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="at most 64 tokens, got one of 70"):
        op(q, k, v, out, gb([0, 70]))
    with pytest.raises(ValueError, match="num_seqs 3 must be in"):
        op(q, k, v, out, gb([0, 1, 2, 3])[:5])  # room for 2 sequences only
    with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
        op(q, k, v, out, torch.tensor([6, 2, 0, 7, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must run from 0"):
        op(q, k, v, out, torch.tensor([6, 1, 1, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_tokens 71"):
        op(q, k, v, out, gb([0, 71]))
    with pytest.raises(ValueError, match="'out'"):
        op(q, k, v, torch.empty(70, 4, 7), gb([0, 5]))


def test_graph_op_opcheck():
    q, k, v = make(9, 4, 2, 8)
    out = torch.empty(9, 4, 8)
    torch.library.opcheck(torch.ops.pcg.causal_attention_graph.default,
                          (q, k, v, out, pcg.ops.graph_batch([0, 5, 8], 4), 0.5, 2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "strided", "fused_qkv"])
def test_graph_op_captured_follows_the_device_batch(layout):
    """Captured once; each replay reads the batch written into the device
    buffer just before it (sequence boundaries, token counts, pad rows)."""
    rows, hq, hkv, d = 64, 8, 2, 64
    if layout == "fused_qkv":
        q, k, v = make_fused_qkv(rows, hq, hkv, d, d, torch.bfloat16, seed=5)
    else:
        q, k, v = make(rows, hq, hkv, d, dtype=torch.bfloat16, device="cuda", seed=5,
                       strided=layout == "strided")
    out = torch.empty(rows, hq, d, dtype=torch.bfloat16, device="cuda")
    batch = pcg.ops.graph_batch([0, rows], 64, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pcg.ops.causal_attention_graph(q, k, v, out, batch)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pcg.ops.causal_attention_graph(q, k, v, out, batch)
    for cu in ([0, 64], [0, 5, 19], [0, 1], [0, 3, 4, 10, 64], [0], [0, 1, 2, 3, 4, 5],
               list(range(0, 65, 2))):
        batch[: len(cu) + 2].copy_(pcg.ops.graph_batch(cu))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = reference(q.cpu(), k.cpu(), v.cpu(), cu, rows=rows)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2, msg=lambda m: f"{cu}: {m}")


@pytest.mark.gpu
def test_graph_op_cuda_contract():
    q, k, v = make(80, 4, 2, 16, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(80, 4, 16, dtype=torch.bfloat16, device="cuda")
    # a sequence longer than 64 breaks the contract: its rows come out NaN, never silently wrong
    pcg.ops.causal_attention_graph(q, k, v, out, pcg.ops.graph_batch([0, 10, 80], device="cuda"))
    assert torch.isnan(out[74:80]).all() and not torch.isnan(out[:74]).any()
    ref = reference(q.cpu(), k.cpu(), v.cpu(), [0, 10], rows=10)
    torch.testing.assert_close(out[:10].double().cpu(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="CUDA bf16/fp16"):
        pcg.ops.causal_attention_graph(q.float(), k.float(), v.float(), out.float(),
                                       pcg.ops.graph_batch([0, 5], device="cuda"))
    with pytest.raises(ValueError, match="'batch'"):
        pcg.ops.causal_attention_graph(q, k, v, out, pcg.ops.graph_batch([0, 5]))  # CPU batch
    torch.library.opcheck(torch.ops.pcg.causal_attention_graph.default,
                          (q, k, v, out, pcg.ops.graph_batch([0, 5, 8], 4, "cuda"), None, -1),
                          test_utils=("test_schema", "test_faketensor"))
