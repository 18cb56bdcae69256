"""pcg::fused_moe on the CUTLASS sm_90a path (config [-1, g1, g2]: g1 / g2 the
GEMM1 / GEMM2 kernel variants of fused_moe_cutlass_variants(), -1 the default).

The GPU tests need an sm_90 device and a build with the CUTLASS kernels (they
fail, not skip, on an sm_90 device whose build lacks them: a build for an H100
or H200 must carry them). Compared against test_fused_moe's float64 reference, with
test_fused_moe's tolerances: this path rounds gate/up and the GEMM2 rows to the
dtype once more than the mma.sync path (docs/fused_moe_paths.md).
"""
from __future__ import annotations

import math

import pytest
import torch

import pcg
from pcg.ops.fused_moe import fused_moe_cutlass_variants
from test_fused_moe import GPU_TOL, _check_capture_replay, make_case, reference, rel_err

CUTLASS = [-1, -1, -1]
VARIANTS = fused_moe_cutlass_variants()
N_VARIANTS = len(VARIANTS)
GATHER = [v.id for v in VARIANTS if v.gather_a]  # GEMM1-only kernels
# Whole-buffer TMA descriptors, A loaded by TMA (both GEMMs).
RESIDENT = [v.id for v in VARIANTS if v.resident and not v.gather_a]


def _next_gemm2(vid):
    """The first variant after vid (cyclically) that can run GEMM2."""
    for d in range(1, N_VARIANTS + 1):
        if not VARIANTS[(vid + d) % N_VARIANTS].gather_a:
            return (vid + d) % N_VARIANTS
    raise AssertionError("no GEMM2 variant")


# Each variant id runs GEMM1 once, and each that can, GEMM2 once: [-1, v, next GEMM2 variant].
VARIANT_CONFIGS = [[-1, v.id, _next_gemm2(v.id)] for v in VARIANTS]


def _config_id(c):
    return "g1={}-g2={}".format(c[1], c[2])


def _is_sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


sm90 = pytest.mark.skipif(not _is_sm90(), reason="needs an sm_90 GPU (H100/H200)")


# ---------------------------------------------------------------------------
# Config validation (runs everywhere; the CPU kernel validates config and ignores it)

def test_cutlass_config_accepted_on_cpu():
    args, kw = make_case(13, 5, 2, 24, 16, dtype=torch.bfloat16, e_global=7, bias=True)
    assert torch.equal(pcg.fused_moe(*args, **kw, config=CUTLASS), pcg.fused_moe(*args, **kw))


def test_cutlass_variant_configs_accepted_on_cpu():
    args, kw = make_case(13, 5, 2, 24, 16, dtype=torch.bfloat16, e_global=7, bias=True)
    want = pcg.fused_moe(*args, **kw)
    for g1 in range(-1, N_VARIANTS):
        for g2 in range(-1, N_VARIANTS):
            if g2 in GATHER:
                continue
            assert torch.equal(pcg.fused_moe(*args, **kw, config=[-1, g1, g2]), want)


def test_cutlass_gather_variant_is_gemm1_only_cpu():
    assert GATHER, "a GEMM1 kernel that gathers A's rows"
    args, kw = make_case(13, 5, 2, 24, 16, dtype=torch.bfloat16, e_global=7, bias=True)
    for g in GATHER:
        assert torch.equal(pcg.fused_moe(*args, **kw, config=[-1, g, -1]),
                           pcg.fused_moe(*args, **kw))
        with pytest.raises(ValueError, match=rf"config\[2\].*{g} \({VARIANTS[g].name}\) "
                                             r"gathers A's rows by token, which only GEMM1"):
            pcg.fused_moe(*args, **kw, config=[-1, -1, g])


def test_cutlass_variant_list():
    assert [v.id for v in VARIANTS] == list(range(N_VARIANTS))
    assert len({v.name for v in VARIANTS}) == N_VARIANTS
    # Variant 0 (config id -1) is the kernel both GEMMs ran before variants existed.
    v0 = VARIANTS[0]
    assert (v0.pingpong, v0.tile_m, v0.tile_n, v0.tile_k, v0.cluster_m, v0.swap_ab,
            v0.direct_store) == (False, 128, 256, 64, 1, False, False)
    for v in VARIANTS:
        assert v.cluster_m in (1, 2) and v.tile_k % 64 == 0
        a_rows = v.tile_n if v.swap_ab else v.tile_m  # wgmma's A operand: 64-row granules
        assert a_rows % 64 == 0
        assert v.pingpong or a_rows >= 128  # cooperative: two warpgroups share A's rows
        assert not v.swap_ab or v.cluster_m == 1
    assert any(v.swap_ab for v in VARIANTS) and not all(v.swap_ab for v in VARIANTS)
    assert any(v.direct_store for v in VARIANTS)
    for v in VARIANTS:
        if v.gather_a:  # token rows as wgmma's A, spread over a warp's lanes
            assert not v.swap_ab and not v.direct_store and v.tile_m % 32 == 0
            assert v.resident  # B from the whole weights
        if v.resident:  # tokens as A, weights as B
            assert not v.swap_ab
    assert RESIDENT


def test_cutlass_swap_ab_gemm1_takes_the_block_layout_cpu():
    """Swap-AB kernels run GEMM1 with the activation in their epilogue too (w13 in
    the block layout): every variant is a valid GEMM1 of either layout (the CPU
    kernel validates the config and computes the same result)."""
    swap = [v.id for v in VARIANTS if v.swap_ab]
    assert swap
    args, kw = make_case(13, 5, 2, 24, 16, dtype=torch.bfloat16, e_global=7, bias=True)
    want = pcg.fused_moe(*args, **kw)
    blk = pcg.interleave_w13(args[1], 8)
    bargs = [args[0], blk] + list(args[2:])
    for g in swap:
        assert torch.equal(pcg.fused_moe(*bargs, **kw, w13_block=8, config=[-1, g, g]), want)
        assert torch.equal(pcg.fused_moe(*args, **kw, config=[-1, g, g]), want)


@pytest.mark.parametrize("config,dtype,what", [
    ([-1, -1, -1], torch.float32, "bfloat16 or float16"),
    ([-1, 0, 1], torch.float32, "bfloat16 or float16"),
    ([-1, N_VARIANTS, -1], torch.bfloat16,
     rf"config\[1\] \(GEMM1's kernel on the CUTLASS path.*got {N_VARIANTS} in"),
    ([-1, -1, N_VARIANTS + 7], torch.bfloat16,
     rf"config\[2\] \(GEMM2's kernel on the CUTLASS path.*got {N_VARIANTS + 7} in"),
    ([-1, -2, 0], torch.bfloat16, r"config\[1\] \(GEMM1's kernel.*variant id in \[0, "),
    ([-2, 0, -1], torch.bfloat16, "stream path"),
    ([-3, -1, -1], torch.bfloat16, "block_m"),
])
def test_cutlass_config_errors_cpu(config, dtype, what):
    args, kw = make_case(13, 5, 2, 24, 16, dtype=dtype)
    with pytest.raises(ValueError, match=f"pcg::fused_moe: argument 'config'.*{what}"):
        pcg.fused_moe(*args, **kw, config=config)


# ---------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
def test_cutlass_rejected_off_sm90():
    if _is_sm90():
        pytest.skip("sm_90 device: the path runs")
    args, kw = make_case(16, 4, 2, 64, 32, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="argument 'config'.*(sm_90|lacks)"):
        pcg.fused_moe(*args, **kw, config=CUTLASS)


def _gpu_case(T, E, k, H, I, dtype, seed=0, e_global=None):
    """Inputs generated on the GPU (the large shapes are slow on the CPU)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    hidden = torch.randn(T, H, generator=g, device=dev).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=dev) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=dev) / math.sqrt(I)).to(dtype)
    logits = torch.randn(T, e_global or E, generator=g, device=dev)
    wts, ids = torch.softmax(logits, -1).topk(k, -1)
    kw = {}
    if e_global is not None:
        # Expert parallel: this rank owns E of e_global experts, the rest map to -1.
        emap = torch.full((e_global,), -1, dtype=torch.int32, device=dev)
        perm = torch.randperm(e_global, generator=g, device=dev)
        emap[perm[:E]] = torch.arange(E, dtype=torch.int32, device=dev)
        kw["expert_map"] = emap
    return [hidden, w13, w2, wts.float().contiguous(), ids.int().contiguous()], kw


SHAPES = [
    # (E, k, H, I)
    (8, 2, 256, 128),
    (128, 8, 2048, 768),     # Qwen3-30B-A3B
    (8, 2, 4096, 1792),      # Mixtral-8x7B with I / 8
    (5, 3, 72, 40),          # tiny, E not a power of two
]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-k{}-H{}-I{}".format(*s))
@pytest.mark.parametrize("T", [1, 7, 300, 4099])
def test_cutlass_matches_reference(T, shape, dtype):
    E, k, H, I = shape
    args, kw = _gpu_case(T, E, k, H, I, dtype, seed=T)
    out = pcg.fused_moe(*args, **kw, config=CUTLASS)
    torch.cuda.synchronize()
    assert out.shape == (T, H) and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = reference(*args, **kw, compute_device="cuda")
    err = rel_err(out, ref)
    assert err < GPU_TOL[dtype], f"rel err {err:.3g}"
    # And close to the mma.sync path.
    assert rel_err(out, pcg.fused_moe(*args, **kw).double().cpu()) < GPU_TOL[dtype]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 3, 72, 40), (128, 8, 2048, 768)],
                         ids=lambda s: "E{}-k{}-H{}-I{}".format(*s))
@pytest.mark.parametrize("T", [7, 4099])
@pytest.mark.parametrize("config", VARIANT_CONFIGS, ids=_config_id)
def test_cutlass_variants_match_reference(config, T, shape, dtype):
    """Every kernel variant on GEMM1 and on GEMM2 (odd shapes: partial tiles,
    odd tile counts per expert for the M-pair clusters), against the reference
    and against the default variants."""
    E, k, H, I = shape
    args, kw = _gpu_case(T, E, k, H, I, dtype, seed=T + config[1])
    out = pcg.fused_moe(*args, **kw, config=config)
    torch.cuda.synchronize()
    assert out.shape == (T, H) and torch.isfinite(out).all()
    ref = reference(*args, **kw, compute_device="cuda")
    err = rel_err(out, ref)
    assert err < GPU_TOL[dtype], f"config {config}: rel err {err:.3g}"
    assert rel_err(out, pcg.fused_moe(*args, **kw, config=CUTLASS).double().cpu()) < GPU_TOL[dtype]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("config", VARIANT_CONFIGS, ids=_config_id)
def test_cutlass_variants_empty_experts(config):
    """Experts with no rows (M_e = 0), remote experts and num_valid < T."""
    T, nv = 300, 123
    args, kw = _gpu_case(T, 24, 4, 512, 256, torch.bfloat16, seed=config[2], e_global=64)
    kw["num_valid"] = torch.tensor([nv], dtype=torch.int32, device="cuda")
    out = pcg.fused_moe(*args, **kw, config=config)
    torch.cuda.synchronize()
    assert (out[nv:] == 0).all()
    ref = reference(*args, **kw, compute_device="cuda")
    assert rel_err(out, ref) < GPU_TOL[torch.bfloat16]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,nv", [(300, 123), (300, 0), (4099, 4098), (7, 100)])
def test_cutlass_num_valid_and_expert_map(T, nv, dtype):
    args, kw = _gpu_case(T, 24, 4, 512, 256, dtype, seed=nv, e_global=64)
    kw["num_valid"] = torch.tensor([nv], dtype=torch.int32, device="cuda")
    out = pcg.fused_moe(*args, **kw, config=CUTLASS)
    torch.cuda.synchronize()
    assert (out[min(nv, T):] == 0).all()
    if nv > 0:
        ref = reference(*args, **kw, compute_device="cuda")
        assert rel_err(out, ref) < GPU_TOL[dtype]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("H", [2056, 4104])  # rows of 257 and 513 16-byte vectors
@pytest.mark.parametrize("T,nv", [(5, 5), (3000, 3000), (3000, 2111)])
def test_cutlass_same_experts_remote_and_long_rows(T, nv, H):
    """The token-major permute (a row read once, stored to each of its slots):
    every token routed to the same two local experts (two runs of nv rows) and
    two remote ones, every third token only to remote experts (no slot at all),
    num_valid <= T, and rows longer than one permute chunk (4 KiB) with a tail."""
    E, k, I, e_global = 8, 4, 128, 12
    args, _ = _gpu_case(T, E, k, H, I, torch.bfloat16, seed=H + nv)
    emap = torch.full((e_global,), -1, dtype=torch.int32, device="cuda")
    emap[:E] = torch.arange(E, dtype=torch.int32, device="cuda")
    ids = torch.tensor([E - 2, E, E - 1, E + 1], dtype=torch.int32, device="cuda").repeat(T, 1)
    ids[::3] = torch.tensor([E, E + 1, E + 2, E + 3], dtype=torch.int32, device="cuda")
    args[4] = ids.contiguous()
    kw = {"expert_map": emap, "num_valid": torch.tensor([nv], dtype=torch.int32, device="cuda")}
    out = pcg.fused_moe(*args, **kw, config=CUTLASS)
    torch.cuda.synchronize()
    assert (out[nv:] == 0).all()
    assert (out[0:nv:3] == 0).all()  # only remote experts
    ref = reference(*args, **kw, compute_device="cuda")
    assert rel_err(out, ref) < GPU_TOL[torch.bfloat16]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("extra", [
    {"bias": True},
    {"e_global": 16, "bias": True, "activation": "gelu"},
    {"activation": "gelu_tanh"},
    {"activation": "swigluoai", "bias": True},
    {"e_global": 12},   # ids out of range and experts mapped to -1
], ids=str)
@pytest.mark.parametrize("T", [1, 37, 1000])
def test_cutlass_bias_activation_map(T, extra):
    extra = dict(extra)
    op_kw = {"activation": extra.pop("activation")} if "activation" in extra else {}
    args, kw = make_case(T, 6, 3, 72, 40, dtype=torch.bfloat16, device="cuda", **extra)
    out = pcg.fused_moe(*args, **kw, **op_kw, config=CUTLASS)
    ref = reference(*args, **kw, **op_kw)
    assert rel_err(out, ref) < GPU_TOL[torch.bfloat16]


@pytest.mark.gpu
@sm90
def test_cutlass_shape_errors():
    args, kw = make_case(8, 4, 2, 36, 16, dtype=torch.bfloat16, device="cuda")  # H % 8 != 0
    with pytest.raises(ValueError, match="argument 'hidden'.*multiple of 8"):
        pcg.fused_moe(*args, **kw, config=CUTLASS)
    args, kw = make_case(8, 4, 2, 32, 12, dtype=torch.bfloat16, device="cuda")  # I % 8 != 0
    with pytest.raises(ValueError, match="argument 'w13'.*multiple of 8"):
        pcg.fused_moe(*args, **kw, config=CUTLASS)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 24, 600])
def test_cutlass_capture_replay(dtype, T):
    """Captured once; new inputs, routing and num_valid per replay (bitwise equal to eager)."""
    _check_capture_replay(T, 12, 4, 72, 40, 16, dtype, [T, max(T // 2, 1), 0, T + 3], seed=300,
                          config=CUTLASS)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("config", [VARIANT_CONFIGS[-1], VARIANT_CONFIGS[1]], ids=_config_id)
@pytest.mark.parametrize("T", [24, 600])
def test_cutlass_capture_replay_forced_variants(config, T):
    """A forced variant config captured once and replayed with new inputs."""
    _check_capture_replay(T, 12, 4, 72, 40, 16, torch.bfloat16, [T, max(T // 2, 1), 0, T + 3],
                          seed=400, config=config)


def _ptr_array_twin(g):
    """The variant with CUTLASS's own mainloop (per-expert TMA descriptors, A by
    TMA) and variant g's schedule and tile."""
    v = VARIANTS[g]
    same = [w.id for w in VARIANTS if not w.gather_a and not w.direct_store and not w.resident and
            (w.pingpong, w.tile_m, w.tile_n, w.tile_k, w.cluster_m, w.swap_ab) ==
            (v.pingpong, v.tile_m, v.tile_n, v.tile_k, v.cluster_m, v.swap_ab)]
    assert same, v
    return same[0]


def _check_twins(case, block, seed, config, twin_config):
    """fused_moe under `config` equals it under `twin_config` bit for bit on one
    case (T, E, k, H, I, e_global, num_valid) with w13 in layout `block` (0:
    plain); rows past num_valid are zero and the rest not all zero."""
    T, E, k, H, I, eg, nv = case
    args, kw = _gpu_case(T, E, k, H, I, torch.bfloat16, seed=seed, e_global=eg)
    kw["num_valid"] = torch.tensor([nv], dtype=torch.int32, device="cuda")
    if block:
        args[1] = pcg.interleave_w13(args[1], block)
        kw["w13_block"] = block
    got = pcg.fused_moe(*args, **kw, config=config)
    want = pcg.fused_moe(*args, **kw, config=twin_config)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert (got[nv:] == 0).all() and got[:nv].abs().max() > 0


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("prologue", ["kernels", "one"])
@pytest.mark.parametrize("block", [0, 8])  # GEMM1's plain and fused-activation epilogues
@pytest.mark.parametrize("case", [
    # (T, E, k, H, I, e_global, num_valid)
    (7, 5, 3, 72, 40, None, 7),            # K = 72: a partial K tile; tiles past M
    (300, 24, 4, 520, 256, 64, 123),       # remote experts, num_valid < T, empty experts
    (4099, 128, 8, 2048, 768, None, 4099),  # Qwen3-30B-A3B: many tiles per expert
    (1000, 8, 2, 4104, 264, None, 999),    # rows of 513 vectors, few experts
], ids=str)
@pytest.mark.parametrize("g", GATHER)
def test_cutlass_gather_equals_tma_twin(g, case, block, prologue, monkeypatch):
    """GEMM1 gathering A's rows by token (no permute; the pipeline's three-kernel
    prologue skips it) equals the same tile loading the permuted rows by TMA, bit
    for bit: the same rows, in the same order, meet the same wgmma sequence."""
    if prologue == "kernels":
        monkeypatch.setenv("PCG_MOE_PROLOGUE_MAX_PAIRS", "0")
    twin = _ptr_array_twin(g)
    _check_twins(case, block, case[0] + g, [-1, g, twin], [-1, twin, twin])


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("block", [0, 8])  # GEMM1's plain and fused-activation epilogues
@pytest.mark.parametrize("case", [
    # (T, E, k, H, I, e_global, num_valid)
    (7, 5, 3, 72, 40, None, 7),            # K = 72 / 40: partial K tiles; N = 80 / 72 < a tile
    (300, 24, 4, 520, 256, 64, 123),       # remote experts, num_valid < T, empty experts
    (4099, 128, 8, 2048, 768, None, 4099),  # Qwen3-30B-A3B: many tiles per expert
    (1000, 8, 2, 4104, 264, None, 999),    # N = 528 / 4104: N tiles past an expert's weights
], ids=str)
@pytest.mark.parametrize("g", RESIDENT)
def test_cutlass_resident_equals_ptr_array_twin(g, case, block):
    """Both GEMMs with TMA descriptors over the whole sorted rows and weights (a
    group's tile reads the next group's rows and the next expert's weights
    past its own, which the epilogue does not store) equal CUTLASS's per-expert
    descriptors, bit for bit, in every stored element."""
    twin = _ptr_array_twin(g)
    _check_twins(case, block, case[0] + 7 * g, [-1, g, g], [-1, twin, twin])


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("g", GATHER)
@pytest.mark.parametrize("T", [24, 600])
def test_cutlass_capture_replay_gather_three_kernel_prologue(g, T, monkeypatch):
    """A gather GEMM1 behind the three-kernel prologue (align, setup: the setup
    waits for the align itself with no permute between them), captured once."""
    monkeypatch.setenv("PCG_MOE_PROLOGUE_MAX_PAIRS", "0")
    _check_capture_replay(T, 12, 4, 72, 40, 16, torch.bfloat16, [T, max(T // 2, 1), 0, T + 3],
                          seed=500 + g, config=[-1, g, -1])


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("T", [64, 600])  # both sides of the reduce's few-token switch (512)
def test_cutlass_chained_calls_in_one_graph(T):
    """Three calls captured in one graph, each taking its rows and (through a softmax
    and top-k of its first E columns) its routing from the previous call's output plus
    a residual: the replay equals the same chain run eagerly, bit for bit, for two
    inputs. The path's kernels are programmatic dependents of the kernel before them;
    one that read its inputs before that kernel finished would differ."""
    E, k, H, I = 8, 2, 2056, 264
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(23)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device="cuda") * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device="cuda") * I ** -0.5).to(dtype)

    def chain(x):
        for _ in range(3):
            w, ids = torch.softmax(x[:, :E].float() * 4.0, dim=-1).topk(k, dim=-1)
            x = pcg.fused_moe(x, w13, w2, w, ids.to(torch.int32), config=CUTLASS) + x
        return x

    inputs = [torch.randn(T, H, generator=g, device="cuda").to(dtype) for _ in range(2)]
    static_x = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(static_x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x)
    for x in inputs:
        want = chain(x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, want)
        assert static_out.abs().max().item() > 0


@pytest.mark.gpu
@sm90
def test_cutlass_deterministic():
    args, kw = _gpu_case(4099, 128, 8, 2048, 768, torch.bfloat16, seed=5)
    a = pcg.fused_moe(*args, **kw, config=CUTLASS)
    b = pcg.fused_moe(*args, **kw, config=CUTLASS)
    assert torch.equal(a, b)


def _prepare_case(T, E, k, H, I, e_global, nv, skew, seed):
    """Routing for the prologue tests: remote experts (e_global > E), ids out of
    range, num_valid < T, and with `skew` most pairs on expert 0 (runs of many
    16-row blocks)."""
    args, kw = _gpu_case(T, E, k, H, I, torch.bfloat16, seed=seed, e_global=e_global)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    ids = args[4]
    if skew:
        hot = torch.rand(T, k, generator=g, device="cuda") < 0.7
        # expert_map's preimage of local expert 0 keeps ids distinct per token
        # only loosely; duplicates within a token are allowed by the contract.
        zero = (kw["expert_map"] == 0).nonzero()[0, 0].int()
        ids = torch.where(hot, zero, ids)
    ids[0, 0] = e_global + 3  # out of range: no slot
    args[4] = ids.int().contiguous()
    kw["num_valid"] = torch.tensor([nv], dtype=torch.int32, device="cuda")
    return args, kw


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("T,E,k,H,nv,skew", [
    (1, 128, 8, 2048, 1, False),      # Qwen3 shape, one token
    (16, 128, 8, 2048, 16, False),
    (64, 128, 8, 2048, 61, True),     # most pairs on one expert
    (1024, 128, 8, 2048, 1000, False),  # 8192 pairs: 32 ids a thread, one round
    (2048, 128, 8, 2048, 2048, False),  # 16384 pairs: the prologue's limit, two rounds
    (37, 5, 3, 4104, 37, True),       # rows of 513 vectors: a token's pieces span CTAs
    (300, 24, 33, 264, 250, False),   # top_k > 32
    (9, 7, 2, 72, 0, False),          # no valid row
])
def test_cutlass_one_kernel_prologue_matches_kernels(T, E, k, H, nv, skew, monkeypatch):
    """The one-kernel prologue (moe_prepare.cuh: align + permute + setup, used
    up to kPrepareMaxPairs = 16384 pairs) against the three-kernel one, bitwise: both
    give each expert the same rows (stable order in the former, any order in
    the latter, which the GEMMs' per-row results do not depend on)."""
    args, kw = _prepare_case(T, E, k, H, 40, e_global=E + 9, nv=nv, skew=skew, seed=T + k)
    monkeypatch.setenv("PCG_MOE_PROLOGUE_MAX_PAIRS", "0")
    want = pcg.fused_moe(*args, **kw, config=CUTLASS)
    monkeypatch.delenv("PCG_MOE_PROLOGUE_MAX_PAIRS")
    got = pcg.fused_moe(*args, **kw, config=CUTLASS)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert (got[nv:] == 0).all()
    if nv > 0:
        ref = reference(*args, **kw, compute_device="cuda")
        assert rel_err(got, ref) < GPU_TOL[torch.bfloat16]
