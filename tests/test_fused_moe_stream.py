"""pcg::fused_moe on the weight-streaming path (config [-2, -1, -1]; csrc/moe/moe_stream.h).

The path takes a few tokens (T * k <= 128 pairs), bf16/fp16, H and I multiples
of 8 and 16-byte aligned hidden / w13 / w2 (else a ValueError naming the
argument). Compared against test_fused_moe's float64 reference with its
tolerances (same rounding rule as the mma.sync path: the intermediate rounded
to the dtype, fp32 sums) and against the default path. The GPU tests need an
sm_80+ device.
"""
from __future__ import annotations

import math

import pytest
import torch

import pcg
from pcg.ops.fused_moe import fused_moe_paths
from pcg.timing import capture_graph
from test_fused_moe import GPU_TOL, _check_capture_replay, make_case, reference, rel_err

STREAM = [-2, -1, -1]
MAX_PAIRS = 128  # moe::kStreamMaxPairs


def _is_sm80():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


sm80 = pytest.mark.skipif(not _is_sm80(), reason="needs an sm_80+ GPU")


# ---------------------------------------------------------------------------
# Config validation (runs everywhere; the CPU kernel validates config and ignores it)

def test_stream_config_accepted_on_cpu():
    args, kw = make_case(13, 5, 2, 24, 16, dtype=torch.bfloat16, e_global=7, bias=True)
    assert torch.equal(pcg.fused_moe(*args, **kw, config=STREAM), pcg.fused_moe(*args, **kw))


@pytest.mark.parametrize("config,dtype,what", [
    ([-2, -1, -1], torch.float32, "bfloat16 or float16"),
    ([-2, 0, -1], torch.bfloat16, "stream path"),
    ([-2, -1, 4], torch.bfloat16, "stream path"),
    ([-3, -1, -1], torch.bfloat16, "block_m"),
])
def test_stream_config_errors_cpu(config, dtype, what):
    args, kw = make_case(13, 5, 2, 24, 16, dtype=dtype)
    with pytest.raises(ValueError, match=f"pcg::fused_moe: argument 'config'.*{what}"):
        pcg.fused_moe(*args, **kw, config=config)


# ---------------------------------------------------------------------------
# GPU

def _routed_case(T, E, k, H, I, dtype, seed=0):
    """Inputs generated on the GPU (the large shapes are slow on the CPU); ids
    from a softmax top-k (distinct experts per token, as a router gives)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    hidden = torch.randn(T, H, generator=g, device=dev).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=dev) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=dev) / math.sqrt(I)).to(dtype)
    wts, ids = torch.softmax(torch.randn(T, E, generator=g, device=dev), -1).topk(k, -1)
    return [hidden, w13, w2, wts.float().contiguous(), ids.int().contiguous()]


def _check(args, kw, dtype, what, **op_kw):
    """Stream path vs the float64 reference and the default path."""
    out = pcg.fused_moe(*args, **kw, **op_kw, config=STREAM)
    T, H = args[0].shape
    assert out.shape == (T, H) and out.dtype == dtype and out.is_contiguous(), what
    assert torch.isfinite(out).all(), what
    ref = reference(*args, **kw, **op_kw, compute_device="cuda")
    err = rel_err(out, ref)
    assert err < GPU_TOL[dtype], f"{what}: rel err {err:.3g}"
    default = pcg.fused_moe(*args, **kw, **op_kw).double().cpu()
    assert rel_err(out, default) < GPU_TOL[dtype], what
    return out


TARGET_SHAPES = [
    # (E, k, H, I): the shapes the path is for
    (128, 8, 2048, 768),     # Qwen3-30B-A3B
    (8, 2, 4096, 14336),     # Mixtral-8x7B
    (64, 6, 2048, 1408),     # DeepSeek-V2-Lite / Qwen2-MoE-like
    (32, 4, 2880, 2880),     # gpt-oss-20b
]


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", TARGET_SHAPES, ids=lambda s: "E{}-k{}-H{}-I{}".format(*s))
def test_stream_target_shapes(shape, dtype):
    """T in 1, 2, 3, 5, 8 and the most pairs the path takes (several chunks of
    pairs per expert at Mixtral's E = 8)."""
    E, k, H, I = shape
    for T in [1, 2, 3, 5, 8, MAX_PAIRS // k]:
        args = _routed_case(T, E, k, H, I, dtype, seed=T)
        _check(args, {}, dtype, f"T={T}")
    torch.cuda.empty_cache()


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("H", [2048, 2880, 7168])
def test_stream_down_kernel_widths(H):
    """H and T pick the down kernel's warps per CTA (moe::stream_down_warps,
    stream_down_warps_beside_up): on a 132-SM H200, 2048 -> 11 at T = 1 (75
    up CTAs: one wave at 6 an SM; 6 units), 12 at T = 5 (24 units: a round
    more at 11), 16 at T = 42; 2880 -> 8, 7168 -> 4 (all five variants run)."""
    E, k, I = 12, 3, 200
    for T in [1, 5, MAX_PAIRS // k]:
        args = _routed_case(T, E, k, H, I, torch.bfloat16, seed=T)
        _check(args, {}, torch.bfloat16, f"H={H} T={T}")


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("waves", ["one at 8", "one at 6", "neither"])
def test_stream_up_ctas_per_sm(waves):
    """The up kernel's grid (I / 8 x min(T*k, E) CTAs) picks 8 CTAs an SM at
    unroll 2 where that is one wave and 6 is not (moe::stream_up_ctas_per_sm),
    else 6 at unroll 4: both variants and the window's edges at T = 1 (bf16,
    fp16), and at T = 3 (12 expert slots: several waves, 6 an SM)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    E, k, H = 12, 6, 72
    cols = {"one at 8": 8 * sms // k, "one at 6": 6 * sms // k, "neither": 8 * sms // k + 1}[waves]
    I = 8 * cols
    for T, dtype in [(1, torch.bfloat16), (1, torch.float16), (3, torch.bfloat16)]:
        args = _routed_case(T, E, k, H, I, dtype, seed=T)
        _check(args, {}, dtype, f"{waves} I={I} T={T} {dtype}")
    torch.cuda.empty_cache()


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_up_rotation_and_early_args(dtype):
    """The up kernel starts CTA x's K loop at round x mod rounds at 2 <= T <= 8
    (moe::stream_up_rotate) and reads its arguments before the PDL wait where
    its grid is one wave (moe::stream_up_early_args): K of 2, 3 and 6 rounds
    (a partial last one), at unroll 4 (T <= 8) and 2 (T > 8), one wave and
    several, against the reference."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [
        (8, 2, 2880, 64),        # 90 K steps: 6 rounds of 16 at T <= 8, the last of 10
        (4, 4, 1032, 40),        # 33 steps: 3 rounds, the last of one step
        (6, 3, 1024, 16 * sms),  # 32 steps: 2 rounds; one wave at T = 1, several from T = 2
    ]
    for E, k, H, I in cases:
        for T in (1, 2, 5, 9, 16):
            if T * k > MAX_PAIRS:
                continue
            args, kw = make_case(T, E, k, H, I, dtype=dtype, device="cuda", seed=T)
            _check(args, kw, dtype, f"E={E} k={k} H={H} I={I} T={T}")
    torch.cuda.empty_cache()


SMALL = [
    # (E, k, H, I): H, I multiples of 8 but not of 16 / 32 (row and K tails)
    (5, 3, 72, 40),
    (3, 2, 8, 8),      # one K step, half of the down kernel's 16 rows past H
    (4, 4, 24, 16),    # a second down block with 8 rows
    (2, 8, 72, 40),    # 2 experts: many pairs per expert (chunks of 8 / 16)
    (300, 2, 136, 200),
]


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "E{}-k{}-H{}-I{}".format(*s))
def test_stream_small_shapes_odd_t(shape, dtype):
    """make_case's ids repeat experts inside a token (several pairs of one token
    per expert); odd T; up to the pair limit."""
    E, k, H, I = shape
    for T in sorted({1, 3, 7, 8, 9, 13, MAX_PAIRS // k}):
        args, kw = make_case(T, E, k, H, I, dtype=dtype, device="cuda", seed=T)
        _check(args, kw, dtype, f"T={T}")


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 8, 32])
def test_stream_expert_map_and_num_valid(T, dtype):
    """Remote experts (-1), ids out of range, rows >= num_valid exact zeros."""
    for nv in sorted({-3, 0, 1, T // 2, T - 1, T, T + 5}):
        args, kw = make_case(T, 6, 4, 72, 40, dtype=dtype, device="cuda", e_global=16,
                             bias=True, seed=nv + 10)
        kw["num_valid"] = torch.tensor([nv], dtype=torch.int32, device="cuda")
        out = pcg.fused_moe(*args, **kw, config=STREAM)
        torch.cuda.synchronize()
        n = max(0, min(nv, T))
        assert (out[n:] == 0).all(), f"nv={nv}"
        ref = reference(*args, **kw)
        if n > 0 and ref.norm() > 0:
            assert rel_err(out, ref) < GPU_TOL[dtype], f"nv={nv}"


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("extra", [
    {"bias": True},
    {"bias": True, "activation": "gelu"},
    {"bias": True, "activation": "gelu_tanh"},
    {"bias": True, "activation": "swigluoai"},
    {"activation": "swigluoai", "limit": 0.5, "alpha": 1.2, "scale": 3.0},
    {"e_global": 12, "bias": True, "activation": "gelu"},
    {"noncontig": True},
    {"noncontig": True, "bias": True, "e_global": 12},
], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 6, 21])
def test_stream_bias_activation_noncontig(T, dtype, extra):
    extra = dict(extra)
    op_kw = {n: extra.pop(n) for n in ("activation", "alpha", "limit") if n in extra}
    args, kw = make_case(T, 6, 6, 72, 40, dtype=dtype, device="cuda", seed=T, **extra)
    if extra.get("noncontig") and T > 1:  # (one strided row is still contiguous)
        assert not args[0].is_contiguous()
    _check(args, kw, dtype, str(extra), **op_kw)


@pytest.mark.gpu
@sm80
def test_stream_empty():
    """T = 0, T * k = 0 (k = 0), and no pair routed here (every expert remote)."""
    args, kw = make_case(0, 4, 2, 72, 40, dtype=torch.bfloat16, device="cuda")
    out = pcg.fused_moe(*args, **kw, config=STREAM)
    assert out.shape == (0, 72)
    args, kw = make_case(3, 4, 0, 72, 40, dtype=torch.bfloat16, device="cuda")
    out = pcg.fused_moe(*args, **kw, config=STREAM)
    assert out.shape == (3, 72) and (out == 0).all()
    args, kw = make_case(5, 4, 2, 72, 40, dtype=torch.bfloat16, device="cuda", e_global=8,
                         bias=True)
    kw["expert_map"].fill_(-1)
    out = pcg.fused_moe(*args, **kw, config=STREAM)
    assert out.shape == (5, 72) and (out == 0).all()


@pytest.mark.gpu
@sm80
def test_stream_argument_errors():
    bf = torch.bfloat16
    args, kw = make_case(17, 8, 8, 32, 16, dtype=bf, device="cuda")  # 136 pairs
    with pytest.raises(ValueError, match="argument 'topk_ids'.*at most 128"):
        pcg.fused_moe(*args, **kw, config=STREAM)
    args, kw = make_case(4, 4, 2, 36, 16, dtype=bf, device="cuda")  # H % 8 != 0
    with pytest.raises(ValueError, match="argument 'hidden'.*multiple of 8"):
        pcg.fused_moe(*args, **kw, config=STREAM)
    args, kw = make_case(4, 4, 2, 32, 12, dtype=bf, device="cuda")  # I % 8 != 0
    with pytest.raises(ValueError, match="argument 'w13'.*multiple of 8"):
        pcg.fused_moe(*args, **kw, config=STREAM)
    args, kw = make_case(4, 4, 2, 32, 16, device="cuda")  # float32
    with pytest.raises(ValueError, match="argument 'config'.*bfloat16 or float16"):
        pcg.fused_moe(*args, **kw, config=STREAM)
    # A contiguous hidden 2 bytes off 16-byte alignment: an error when forced,
    # another path by default.
    args, kw = make_case(4, 4, 2, 32, 16, dtype=bf, device="cuda")
    buf = torch.empty(4 * 32 + 8, dtype=bf, device="cuda")
    hidden = buf[1:1 + 4 * 32].view(4, 32)
    hidden.copy_(args[0])
    assert hidden.is_contiguous() and hidden.data_ptr() % 16 != 0
    with pytest.raises(ValueError, match="argument 'hidden'.*16-byte aligned"):
        pcg.fused_moe(hidden, *args[1:], **kw, config=STREAM)
    out = pcg.fused_moe(hidden, *args[1:], **kw)
    assert rel_err(out, reference(*args, **kw)) < GPU_TOL[bf]


@pytest.mark.gpu
@sm80
def test_stream_path_available():
    assert fused_moe_paths("cuda")[1]


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 32])
def test_stream_capture_replay(dtype, T):
    """Captured once; new inputs, routing and num_valid per replay (bitwise equal to eager)."""
    _check_capture_replay(T, 12, 4, 72, 40, 16, dtype, [T, max(T // 2, 1), 0, T + 3], seed=400,
                          config=STREAM)


@pytest.mark.gpu
@sm80
@pytest.mark.parametrize("T", [1, 3, 16])
def test_stream_inputs_from_the_kernels_before(T):
    """Both kernels are programmatic dependents (sm_90): the up kernel of the
    kernel before it. Inputs written by the kernels right before the op (a
    router's softmax / top-k, a scale of hidden), captured in the same graph,
    must be the ones it reads: replays with new activations equal eager calls
    and the reference."""
    E, k, H, I = 64, 4, 1024, 256
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
    gate = torch.randn(E, H, generator=g, device="cuda") / math.sqrt(H)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device="cuda") / math.sqrt(H)).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g, device="cuda") / math.sqrt(I)).to(torch.bfloat16)

    def route():
        wts, ids = torch.softmax(x.float() @ gate.t(), -1).topk(k, -1)
        return x * 2, wts, ids.int()

    def run():
        h, wts, ids = route()
        return pcg.fused_moe(h, w13, w2, wts, ids, config=STREAM)

    graph, out = capture_graph(run)
    for trial in range(3):
        x.copy_(torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run()), f"trial {trial}: replay != eager"
        h, wts, ids = route()
        assert rel_err(out, reference(h, w13, w2, wts, ids, compute_device="cuda")) < GPU_TOL[torch.bfloat16]


@pytest.mark.gpu
@sm80
def test_stream_deterministic():
    args = _routed_case(8, 128, 8, 2048, 768, torch.bfloat16, seed=5)
    a = pcg.fused_moe(*args, config=STREAM)
    assert torch.equal(a, pcg.fused_moe(*args, config=STREAM))
    args, kw = make_case(16, 2, 8, 72, 40, dtype=torch.bfloat16, device="cuda", bias=True)
    a = pcg.fused_moe(*args, **kw, config=STREAM)
    assert torch.equal(a, pcg.fused_moe(*args, **kw, config=STREAM))
