"""pcg::fused_moe and pcg::moe_align against an independent float64 reference.

Rounding rule (both kernels and the reference): products accumulate in fp32
(float64 here), the intermediate act(...) is rounded to hidden's dtype before
the second product, the output is rounded to hidden's dtype. Tolerances are
relative Frobenius-norm errors: fp32 1e-5 (CPU) / 1e-4 (CUDA), fp16 5e-3,
bf16 1e-2 (the output rounding alone is ~3e-3).
"""
from __future__ import annotations

import math

import pytest
import torch

import pcg
from pcg.ops.fused_moe import (fused_moe_candidates, fused_moe_config, fused_moe_cutlass_variants,
                               fused_moe_paths, fused_moe_tiles, moe_align_max_blocks)
from pcg.timing import capture_graph

@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Many tiny per-expert matmuls: intra-op threads only add barrier waits
    (100x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
GPU_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------
# Reference

def _act(gate, up, activation, alpha, limit):
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    if activation == "gelu":
        return 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up
    if activation == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate ** 3)
        return 0.5 * gate * (1.0 + torch.tanh(inner)) * up
    assert activation == "swigluoai"
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1.0) * gate * torch.sigmoid(alpha * gate)


def reference(hidden, w13, w2, topk_weights, topk_ids, expert_map=None, num_valid=None,
              b13=None, b2=None, activation="silu", alpha=1.702, limit=7.0, config=None,
              compute_device="cpu"):
    """Loops over local experts in float64; rounds the intermediate to hidden's dtype.
    ``config`` (a kernel configuration) does not change the math and is ignored;
    ``compute_device`` runs the float64 products there (large shapes on a GPU)."""
    dev = torch.device(compute_device)
    dt = hidden.dtype
    T, H = hidden.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    x = hidden.detach().to(dev).double()
    ids = topk_ids.detach().cpu().long()
    wts = topk_weights.detach().to(dev).double()
    nv = T if num_valid is None else max(0, min(int(num_valid.cpu().reshape(-1)[0]), T))
    if expert_map is not None:
        m = expert_map.detach().cpu().long()
        inside = (ids >= 0) & (ids < m.numel())
        local = torch.where(inside, m[ids.clamp(0, m.numel() - 1)], torch.full_like(ids, -1))
    else:
        local = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, -1))
    local[nv:] = -1
    out = torch.zeros(T, H, dtype=torch.float64, device=dev)
    for e in range(E):
        toks, js = (local == e).nonzero(as_tuple=True)
        if toks.numel() == 0:
            continue
        toks, js = toks.to(dev), js.to(dev)
        gu = x[toks] @ w13[e].detach().to(dev).double().T
        if b13 is not None:
            gu = gu + b13[e].detach().to(dev).double()
        h = _act(gu[:, :I], gu[:, I:], activation, alpha, limit)
        h = h.to(dt).double()
        y = h @ w2[e].detach().to(dev).double().T
        if b2 is not None:
            y = y + b2[e].detach().to(dev).double()
        out.index_add_(0, toks, y * wts[toks, js].unsqueeze(1))
    return out.cpu()


def rel_err(out, ref):
    out = out.detach().cpu().double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / max(denom, 1e-30)


# ---------------------------------------------------------------------------
# Inputs

def make_case(T, E, k, H, I, dtype=torch.float32, device="cpu", e_global=None, bias=False,
              noncontig=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s)

    hidden = rn(T, H, s=scale)
    w13 = rn(E, 2 * I, H, s=1.0 / math.sqrt(H))
    w2 = rn(E, H, I, s=1.0 / math.sqrt(I))
    weights = torch.rand(T, k, generator=g) + 0.1
    kw = {}
    if e_global is None:
        ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    else:
        # Global ids, a few out of range; the map sends some experts to -1.
        ids = torch.randint(-1, e_global + 2, (T, k), generator=g, dtype=torch.int32)
        perm = torch.randperm(e_global, generator=g)
        emap = torch.full((e_global,), -1, dtype=torch.int32)
        emap[perm[:E]] = torch.arange(E, dtype=torch.int32)
        kw["expert_map"] = emap
    if bias:
        kw["b13"] = rn(E, 2 * I, s=0.5).to(dtype)
        kw["b2"] = rn(E, H, s=0.5).to(dtype)
    hidden, w13, w2 = hidden.to(dtype), w13.to(dtype), w2.to(dtype)
    if noncontig:
        # Transposed / strided storage holding the same values.
        hidden = hidden.t().contiguous().t()
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
        w2 = _strided(w2)
        ids = torch.stack([ids, ids], dim=2)[:, :, 0]
        weights = weights.t().contiguous().t()
    args = [hidden, w13, w2, weights, ids]
    args = [a.to(device) for a in args]
    kw = {n: v.to(device) for n, v in kw.items()}
    return args, kw


def _strided(w):
    """Same values as w, stored with a stride of 2 along the last dim."""
    buf = torch.zeros(*w.shape[:-1], 2 * w.shape[-1], dtype=w.dtype)
    buf[..., ::2] = w
    out = buf[..., ::2]
    assert not out.is_contiguous()
    return out


CASES = [
    # (T, E, k, H, I, extra)
    (0, 8, 2, 72, 40, {}),
    (1, 8, 2, 72, 40, {}),
    (3, 8, 2, 72, 40, {}),
    (17, 8, 2, 72, 40, {}),
    (128, 8, 2, 72, 40, {}),
    (1000, 8, 2, 72, 40, {}),
    (17, 256, 8, 64, 32, {}),
    (128, 256, 8, 33, 20, {}),
    (1000, 64, 6, 48, 24, {}),
    (3, 4, 1, 16, 8, {}),
    (37, 5, 3, 33, 17, {"bias": True}),
    (37, 6, 4, 72, 40, {"e_global": 16}),
    (128, 6, 4, 40, 24, {"e_global": 16, "bias": True, "activation": "gelu"}),
    (17, 8, 2, 72, 40, {"activation": "gelu"}),
    (29, 8, 2, 72, 40, {"activation": "gelu_tanh", "bias": True}),
    (17, 8, 2, 72, 40, {"activation": "swigluoai", "bias": True}),
    (64, 8, 2, 72, 40, {"activation": "swigluoai", "limit": 0.5, "alpha": 1.2, "scale": 3.0}),
    (53, 8, 3, 72, 40, {"noncontig": True}),
    (53, 7, 3, 33, 18, {"noncontig": True, "bias": True, "e_global": 12}),
]


def _split_extra(extra):
    case_kw = {k: v for k, v in extra.items() if k in ("e_global", "bias", "noncontig", "scale")}
    op_kw = {k: v for k, v in extra.items() if k in ("activation", "alpha", "limit", "config")}
    return case_kw, op_kw


def _check_case(T, E, k, H, I, extra, dtype, device, tol, num_valid=None):
    case_kw, op_kw = _split_extra(extra)
    args, kw = make_case(T, E, k, H, I, dtype=dtype, device=device, **case_kw)
    if num_valid is not None:
        kw["num_valid"] = torch.tensor([num_valid], dtype=torch.int32, device=device)
    out = pcg.fused_moe(*args, **kw, **op_kw)
    assert out.shape == (T, H) and out.dtype == dtype and out.is_contiguous()
    assert out.device.type == torch.device(device).type
    ref = reference(*args, **kw, **op_kw)
    if T:
        assert torch.isfinite(out).all()
        err = rel_err(out, ref)
        assert err < tol, f"rel err {err:.3g} >= {tol}"
    if num_valid is not None:
        nv = max(0, min(num_valid, T))
        assert (out[nv:] == 0).all()
    return out


# ---------------------------------------------------------------------------
# CPU

@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-H{c[3]}-I{c[4]}-"
                         + "-".join(f"{a}" for a in c[5].items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_reference(case, dtype):
    T, E, k, H, I, extra = case
    _check_case(T, E, k, H, I, extra, dtype, "cpu", TOL[dtype])


@pytest.mark.parametrize("num_valid", [0, 1, 10, 17, 40])
def test_cpu_num_valid(num_valid):
    _check_case(17, 8, 3, 72, 40, {"e_global": 12, "bias": True}, torch.float32, "cpu",
                TOL[torch.float32], num_valid=num_valid)


def test_cpu_fp16():
    _check_case(29, 8, 2, 40, 24, {"bias": True}, torch.float16, "cpu", TOL[torch.float16])


def test_all_pairs_dropped_gives_zeros():
    args, kw = make_case(9, 4, 2, 16, 8, e_global=8)
    args[4] = torch.full_like(args[4], 100)  # every id out of range
    out = pcg.fused_moe(*args, **kw)
    assert (out == 0).all()


def test_duplicate_expert_in_topk():
    args, _ = make_case(5, 4, 3, 16, 8)
    args[4] = torch.tensor([[1, 1, 1]] * 5, dtype=torch.int32)
    out = pcg.fused_moe(*args)
    assert rel_err(out, reference(*args)) < 1e-5


def _opcheck_args(device, dtype=torch.float32):
    args, kw = make_case(11, 6, 2, 24, 16, dtype=dtype, device=device, e_global=9, bias=True)
    kw["num_valid"] = torch.tensor([7], dtype=torch.int32, device=device)
    return args, kw


def test_opcheck_fused_moe_cpu():
    args, kw = _opcheck_args("cpu")
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, kw)
    kw["activation"] = "swigluoai"
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, kw)


def _align_args(T, k, E, block_m, device, e_global=None, num_valid=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if e_global is None:
        ids = torch.randint(-1, E + 1, (T, k), generator=g, dtype=torch.int32)
        emap = None
    else:
        ids = torch.randint(-1, e_global + 1, (T, k), generator=g, dtype=torch.int32)
        emap = torch.randint(-1, E, (e_global,), generator=g, dtype=torch.int32)
        emap = emap.to(device)
    nvt = None if num_valid is None else torch.tensor([num_valid], dtype=torch.int32,
                                                      device=device)
    mb = moe_align_max_blocks(T * k, E, block_m)
    sorted_pairs = torch.full((mb * block_m,), 12345, dtype=torch.int32, device=device)
    block_expert = torch.full((mb,), 12345, dtype=torch.int32, device=device)
    num_blocks = torch.full((1,), 12345, dtype=torch.int32, device=device)
    return (ids.to(device), emap, nvt, E, block_m, sorted_pairs, block_expert, num_blocks)


def _check_align(args, stable):
    ids, emap, nvt, E, bm, sp, be, nb = args
    T, k = ids.shape
    ids_c, sp, be = ids.cpu().long(), sp.cpu(), be.cpu()
    nb = int(nb.cpu()[0])
    nv = T if nvt is None else max(0, min(int(nvt.cpu()[0]), T))
    n_global = E if emap is None else emap.numel()
    flat = ids_c.reshape(-1)
    local = torch.full_like(flat, -1)
    inside = (flat >= 0) & (flat < n_global)
    if emap is None:
        local[inside] = flat[inside]
    else:
        local[inside] = emap.cpu().long()[flat[inside]]
    local[(local < 0) | (local >= E)] = -1
    local[nv * k:] = -1
    counts = torch.bincount(local[local >= 0], minlength=E)
    blocks = (counts + bm - 1) // bm
    assert nb == int(blocks.sum())
    expected_be = torch.repeat_interleave(torch.arange(E), blocks)
    assert torch.equal(be[:nb].long(), expected_be)
    assert (be[nb:] == -1).all()
    assert (sp[nb * bm:] == -1).all()
    off = 0
    for e in range(E):
        n, c = int(blocks[e]) * bm, int(counts[e])
        run = sp[off:off + n].long()
        assert (run[c:] == -1).all()
        want = (local == e).nonzero().reshape(-1)
        got = run[:c]
        if stable:
            assert torch.equal(got, want)
        else:
            assert torch.equal(got.sort().values, want)
        off += n


@pytest.mark.parametrize("T,k,E,bm,e_global,num_valid", [
    (0, 2, 4, 16, None, None), (1, 1, 1, 16, None, None), (17, 2, 8, 16, None, None),
    (100, 8, 256, 16, None, 60), (1000, 6, 64, 64, 80, None), (300, 4, 5, 32, 9, 1000),
    (50, 3, 7, 1, None, 0), (2000, 8, 16, 64, None, 1999)])
def test_moe_align_cpu(T, k, E, bm, e_global, num_valid):
    args = _align_args(T, k, E, bm, "cpu", e_global, num_valid)
    torch.ops.pcg.moe_align(*args)
    _check_align(args, stable=True)


def test_opcheck_moe_align_cpu():
    args = _align_args(40, 3, 6, 16, "cpu", 9, 30)
    torch.library.opcheck(torch.ops.pcg.moe_align.default, args)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args, kw = _opcheck_args("cpu", torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.pcg.fused_moe(*args, **kw)
    assert out.shape == args[0].shape and out.dtype == torch.bfloat16
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match="'w13'"):
        torch.ops.pcg.fused_moe(args[0], args[1][0], *args[2:])


def test_compile_fullgraph():
    args, kw = _opcheck_args("cpu")

    @torch.compile(fullgraph=True, backend="eager")
    def f(*a):
        return torch.ops.pcg.fused_moe(*a, **kw) * 2

    assert torch.equal(f(*args), 2 * torch.ops.pcg.fused_moe(*args, **kw))


# ---------------------------------------------------------------------------
# Kernel configurations (block_m, GEMM1 tile, GEMM2 tile)

def _heuristic_block_m(T, k, E):
    """Reference of the pre-tuning rule: rows per block from the pairs per expert."""
    per_expert = T * k // E if E > 0 else T * k
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64 if per_expert <= 256 else 128


def _default_tiles(block_m):
    """The default tiles of a block_m: the first GEMM1 / GEMM2 tile of the list with that BM."""
    tiles = fused_moe_tiles()
    t1 = next(t.id for t in tiles if t.gated and t.block_m == block_m)
    t2 = next(t.id for t in tiles if not t.gated and t.block_m == block_m)
    return t1, t2


def test_tiles_list():
    tiles = fused_moe_tiles()
    assert [t.id for t in tiles] == list(range(len(tiles)))
    assert len({t.name for t in tiles}) == len(tiles)
    for t in tiles:
        assert t.block_m in (16, 32, 64, 128)
        assert t.block_m % (16 * t.warps_m) == 0 and t.bn % (16 * t.warps_n) == 0
        assert t.bk % 16 == 0 and t.stages >= 2
        b_rows = 2 * t.bn if t.gated else t.bn
        assert t.smem == t.stages * (t.block_m + b_rows) * (t.bk + 8) * 2 + 12 * t.block_m
        assert t.smem <= 227 * 1024
        assert t.name.startswith("g" if t.gated else "d")
        assert t.name.startswith(f"{t.name[0]}{t.block_m}x{t.bn}x{t.bk}_w{t.warps_m}x{t.warps_n}")
    for bm in (16, 32, 64, 128):
        assert any(t.gated and t.block_m == bm for t in tiles)
        assert any(not t.gated and t.block_m == bm for t in tiles)
    # Today's defaults keep their ids (the tuning table names tiles by id).
    assert [_default_tiles(bm) for bm in (16, 32, 64, 128)] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    cands = fused_moe_candidates()
    assert {c[1] for c in cands} | {c[2] for c in cands} == {t.id for t in tiles}


# Shapes no tuning table will hold (odd sizes).
@pytest.mark.parametrize("E,k,H,I", [(6, 2, 72, 40), (37, 3, 101, 75), (1, 1, 8, 8)])
def test_config_op_heuristic_for_unknown_shapes(E, k, H, I):
    for T in [0, 1, 3, 17, 100, 128, 1000, 5000, 100000]:
        bm = _heuristic_block_m(T, k, E)
        for dt in (torch.bfloat16, torch.float16):
            assert fused_moe_config(E, k, H, I, T, dt) == (bm, *_default_tiles(bm))
        assert fused_moe_config(E, k, H, I, T, torch.float32) == (bm, -1, -1)


def test_config_op_table_choices_are_valid():
    """Whatever the checked-in table holds (bench shapes), each choice is a valid config."""
    tiles = {t.id: t for t in fused_moe_tiles()}
    for E, k, H, I in [(128, 8, 2048, 768), (8, 2, 4096, 14336), (64, 6, 2048, 1408),
                       (32, 4, 2880, 2880)]:
        for T in [1, 2, 5, 16, 100, 256, 1000, 4096, 16384, 10 ** 6]:
            bm, t1, t2 = fused_moe_config(E, k, H, I, T)
            assert tiles[t1].gated and not tiles[t2].gated
            assert tiles[t1].block_m == bm == tiles[t2].block_m
            assert fused_moe_config(E, k, H, I, T, torch.float16) == (bm, t1, t2)
            assert fused_moe_config(E, k, H, I, T, torch.float32) == (
                _heuristic_block_m(T, k, E), -1, -1)


@pytest.mark.parametrize("E,k,H,I", [(6, 2, 72, 40), (37, 3, 101, 75), (2, 1, 64, 32),
                                     (128, 8, 4096, 1536)])
def test_config_op_paths_for_unknown_shapes(E, k, H, I):
    """Untuned shapes take the CUTLASS path (when the call can) once experts
    average 16 rows, else the stream path (when the call can) up to 128
    (token, k) pairs, else CUTLASS for large experts (H * I >= 6 Mi) from one
    row per expert, else the heuristic tiles; never a path for float32."""
    for T in [0, 1, 3, 8, 16, 17, 31, 32, 33, 42, 43, 64, 65, 100, 128, 129, 1000, 5000]:
        many_rows = T * k >= 16 * E
        streamable = 1 <= T and T * k <= 128
        large = H * I >= 6 << 20 and T * k >= E
        want_cutlass = many_rows or (large and not streamable)
        want_stream = not many_rows and streamable
        bm = _heuristic_block_m(T, k, E)
        heur = (bm, *_default_tiles(bm))
        for dt in (torch.bfloat16, torch.float16):
            got = fused_moe_config(E, k, H, I, T, dt, cutlass=True, stream=True)
            want = (-1, -1, -1) if want_cutlass else (-2, -1, -1) if want_stream else heur
            assert got == want, (T, dt)
            # Without the stream path (the call could not take it): CUTLASS or the tiles.
            got = fused_moe_config(E, k, H, I, T, dt, cutlass=True)
            assert got == ((-1, -1, -1) if many_rows or large else heur), (T, dt)
            # Without the CUTLASS path, the stream guess still stops at 128 pairs.
            got = fused_moe_config(E, k, H, I, T, dt, stream=True)
            assert got == ((-2, -1, -1) if 1 <= T and T * k <= 128 else heur), (T, dt)
            assert fused_moe_config(E, k, H, I, T, dt) == heur
        assert fused_moe_config(E, k, H, I, T, torch.float32, cutlass=True, stream=True) == (
            bm, -1, -1)


def test_config_op_table_with_paths_is_valid():
    """With both paths available, every table choice is a path or a valid tile pair,
    and without them the same call gets an mma.sync config."""
    tiles = {t.id: t for t in fused_moe_tiles()}
    n_variants = len(fused_moe_cutlass_variants())
    for E, k, H, I in [(128, 8, 2048, 768), (8, 2, 4096, 14336), (64, 6, 2048, 1408),
                       (32, 4, 2880, 2880)]:
        for T in [1, 2, 5, 16, 100, 256, 1000, 4096, 16384, 10 ** 6]:
            cfg = fused_moe_config(E, k, H, I, T, cutlass=True, stream=True)
            bm, t1, t2 = cfg
            if bm == -1:  # CUTLASS GEMM kernel variants (-1: the default)
                assert {t1, t2} <= {-1} | set(range(n_variants)), cfg
                continue
            if bm == -2:  # the stream path takes no tiles
                assert (t1, t2) == (-1, -1), cfg
                continue
            assert tiles[t1].gated and not tiles[t2].gated and tiles[t1].block_m == bm


def test_config_op_errors():
    with pytest.raises(ValueError, match="pcg::fused_moe_config: argument 'dtype'"):
        torch.ops.pcg.fused_moe_config(8, 2, 64, 32, 10, torch.int32)
    with pytest.raises(ValueError, match="pcg::fused_moe_config: argument 'T'"):
        torch.ops.pcg.fused_moe_config(8, 2, 64, 32, -1, torch.bfloat16)


def _bad_configs():
    """(config, dtype, what the message says)."""
    bf = torch.bfloat16
    return [
        ([16, 0], bf, "3 ints"),
        ([16, 0, 4, 0], bf, "3 ints"),
        ([], bf, "3 ints"),
        ([48, -1, -1], bf, "block_m"),
        ([0, -1, -1], bf, "block_m"),
        ([16, 10 ** 6, 4], bf, "tile1"),
        ([16, -2, 4], bf, "tile1"),
        ([16, 0, 10 ** 6], bf, "tile2"),
        ([16, 4, 4], bf, "GEMM1"),     # a GEMM2 tile as tile1
        ([16, 0, 0], bf, "GEMM2"),     # a GEMM1 tile as tile2
        ([32, 0, -1], bf, "BM"),       # tile of block_m 16
        ([128, -1, 4], bf, "BM"),
        ([16, 0, 4], torch.float32, "float32"),
        ([16, -1, 4], torch.float32, "float32"),
    ]


def _config_case(dtype, device="cpu"):
    return make_case(13, 5, 2, 24, 16, dtype=dtype, device=device, e_global=7, bias=True)


def test_config_errors_name_the_argument_cpu():
    for config, dtype, what in _bad_configs():
        args, kw = _config_case(dtype)
        with pytest.raises(ValueError, match=f"pcg::fused_moe: argument 'config'.*{what}"):
            pcg.fused_moe(*args, **kw, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_config_none_equals_default_cpu(dtype):
    """The CPU kernel validates config and otherwise ignores it."""
    args, kw = _config_case(dtype)
    E, k, H, I = 5, 2, 24, 16
    default = pcg.fused_moe(*args, **kw)
    assert torch.equal(pcg.fused_moe(*args, **kw, config=None), default)
    assert torch.equal(torch.ops.pcg.fused_moe(*args, **kw, config=None), default)
    assert torch.equal(pcg.fused_moe(*args, **kw, config=fused_moe_config(E, k, H, I, 13, dtype)),
                       default)
    if dtype == torch.float32:
        configs = [(bm, -1, -1) for bm in (16, 32, 64, 128)]
    else:
        configs = fused_moe_candidates() + [(bm, -1, -1) for bm in (16, 32, 64, 128)]
    for config in configs:
        assert torch.equal(pcg.fused_moe(*args, **kw, config=config), default), config
    ref = reference(*args, **kw)
    assert rel_err(default, ref) < TOL[dtype]


def test_opcheck_fused_moe_config_cpu():
    args, kw = _opcheck_args("cpu")
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, dict(kw, config=[32, -1, -1]))
    args, kw = _opcheck_args("cpu", torch.bfloat16)
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, dict(kw, config=[128, 18, 20]))


def test_fake_config_length():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args, kw = _opcheck_args("cpu", torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.pcg.fused_moe(*args, **kw, config=[16, 8, 11])
        assert out.shape == args[0].shape
        with pytest.raises(ValueError, match="'config'"):
            torch.ops.pcg.fused_moe(*args, **kw, config=[16, 8])


def test_compile_fullgraph_config():
    args, kw = _opcheck_args("cpu", torch.bfloat16)

    @torch.compile(fullgraph=True, backend="eager")
    def f(*a):
        return torch.ops.pcg.fused_moe(*a, **kw, config=[64, 14, 15]) * 2

    assert torch.equal(f(*args), 2 * torch.ops.pcg.fused_moe(*args, **kw))


# ---------------------------------------------------------------------------
# Errors

def _bad_inputs(device):
    args, kw = make_case(6, 4, 2, 16, 8, device=device, e_global=6, bias=True)
    h, w13, w2, wts, ids = args
    i32 = dict(dtype=torch.int32, device=device)
    return [
        ("hidden", dict(hidden=h.long())),
        ("hidden", dict(hidden=h[None])),
        ("w13", dict(w13=w13.double())),
        ("w13", dict(w13=w13[:, :-1])),
        ("w13", dict(w13=w13[:, :, :-1])),
        ("w13", dict(w13=w13[0])),
        ("w2", dict(w2=w2[:, :-1])),
        ("w2", dict(w2=w2[:, :, :-1])),
        ("w2", dict(w2=w2[:-1])),
        ("w2", dict(w2=w2.to(torch.bfloat16))),
        ("topk_weights", dict(topk_weights=wts.double())),
        ("topk_weights", dict(topk_weights=wts[:, :1])),
        ("topk_weights", dict(topk_weights=wts[:-1])),
        ("topk_ids", dict(topk_ids=ids.long())),
        ("topk_ids", dict(topk_ids=ids[:-1])),
        ("topk_ids", dict(topk_ids=ids.reshape(-1))),
        ("expert_map", dict(expert_map=kw["expert_map"].long())),
        ("expert_map", dict(expert_map=kw["expert_map"][None])),
        ("num_valid", dict(num_valid=torch.tensor([1, 2], **i32))),
        ("num_valid", dict(num_valid=torch.tensor([1], dtype=torch.int64, device=device))),
        ("b13", dict(b13=kw["b13"][:, :-1])),
        ("b13", dict(b13=kw["b13"].double())),
        ("b2", dict(b2=kw["b2"][:-1])),
        ("b2", dict(b2=kw["b2"][:, :, None])),
        ("activation", dict(activation="relu")),
    ], args, kw


def _call_with(args, kw, override):
    names = ["hidden", "w13", "w2", "topk_weights", "topk_ids"]
    full = dict(zip(names, args))
    full.update(kw)
    full.update(override)
    return torch.ops.pcg.fused_moe(**full)


def test_errors_name_the_argument_cpu():
    cases, args, kw = _bad_inputs("cpu")
    for name, override in cases:
        with pytest.raises(ValueError, match=f"pcg::fused_moe: argument '{name}'"):
            _call_with(args, kw, override)


def test_moe_align_outputs_sharing_memory_are_refused():
    args = list(_align_args(20, 2, 4, 16, "cpu"))
    a = list(args)
    a[7] = a[6][:1]  # num_blocks inside block_expert
    with pytest.raises(ValueError, match="'num_blocks' must share no memory with 'block_expert'"):
        torch.ops.pcg.moe_align(*a)
    a = list(args)
    assert a[0].numel() >= a[6].numel()
    a[6] = a[0].view(-1)[:a[6].numel()]  # block_expert inside topk_ids
    with pytest.raises(ValueError, match="'block_expert' must share no memory with 'topk_ids'"):
        torch.ops.pcg.moe_align(*a)


def test_moe_align_errors():
    args = list(_align_args(20, 2, 4, 16, "cpu"))
    bad = [
        ("topk_ids", 0, args[0].long()),
        ("block_m", 4, 0),
        ("sorted_pairs", 5, args[5][:-1]),
        ("block_expert", 6, args[6][:-1]),
        ("num_blocks", 7, args[7].long()),
        ("num_local_experts", 3, -1),
    ]
    for name, pos, val in bad:
        a = list(args)
        a[pos] = val
        with pytest.raises(ValueError, match=f"pcg::moe_align: argument '{name}'"):
            torch.ops.pcg.moe_align(*a)


# ---------------------------------------------------------------------------
# CUDA

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-H{c[3]}-I{c[4]}-"
                         + "-".join(f"{a}" for a in c[5].items()))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_matches_reference(case, dtype):
    T, E, k, H, I, extra = case
    _check_case(T, E, k, H, I, extra, dtype, "cuda", GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("T,E,k,H,I", [(4096, 128, 8, 256, 96), (9000, 8, 2, 128, 72),
                                       (300, 32, 4, 2880 // 8, 2880 // 8)])
def test_cuda_large(dtype, T, E, k, H, I):
    _check_case(T, E, k, H, I, {"bias": True}, dtype, "cuda", GPU_TOL[dtype], num_valid=T - 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("per_expert", [3, 30, 100, 400])  # block_m 16, 32, 64, 128
@pytest.mark.parametrize("H,I", [(72, 40), (33, 20), (136, 264)])
def test_cuda_every_block_m(dtype, per_expert, H, I):
    E, k = 6, 2
    T = per_expert * E // k
    _check_case(T, E, k, H, I, {"e_global": 9, "bias": True, "activation": "swigluoai"}, dtype,
                "cuda", GPU_TOL[dtype], num_valid=T - 3)


@pytest.mark.gpu
@pytest.mark.parametrize("num_valid", [0, 1, 16, 17, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_num_valid(num_valid, dtype):
    _check_case(17, 8, 3, 72, 40, {"e_global": 12, "bias": True}, dtype, "cuda", GPU_TOL[dtype],
                num_valid=num_valid)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_misaligned_weights(dtype):
    """Contiguous weights whose base is not 16-byte aligned take the element-load path."""
    args, kw = make_case(40, 4, 2, 64, 32, dtype=dtype, device="cuda")
    w13 = args[1]
    flat = torch.empty(w13.numel() + 1, dtype=dtype, device="cuda")
    flat[1:] = w13.reshape(-1)
    args[1] = flat[1:].view(w13.shape)
    assert args[1].is_contiguous() and args[1].data_ptr() % 16 != 0
    out = pcg.fused_moe(*args, **kw)
    assert rel_err(out, reference(*args, **kw)) < GPU_TOL[dtype]


@pytest.mark.gpu
def test_cuda_matches_cpu_bf16():
    args, kw = make_case(200, 16, 4, 72, 40, dtype=torch.bfloat16, e_global=20, bias=True)
    cpu = pcg.fused_moe(*args, **kw)
    cuda = pcg.fused_moe(*[a.cuda() for a in args], **{n: v.cuda() for n, v in kw.items()})
    assert rel_err(cuda, cpu.double()) < 1e-2


@pytest.mark.gpu
def test_cuda_deterministic():
    args, kw = make_case(1000, 16, 4, 72, 40, dtype=torch.bfloat16, device="cuda")
    a = pcg.fused_moe(*args, **kw)
    b = pcg.fused_moe(*args, **kw)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,bm,e_global,num_valid", [
    (0, 2, 4, 16, None, None), (1, 1, 1, 16, None, None), (17, 2, 8, 16, None, None),
    (100, 8, 256, 16, None, 60), (1000, 6, 64, 64, 80, None), (300, 4, 5, 32, 9, 1000),
    (50, 3, 7, 1, None, 0), (20000, 8, 128, 64, None, 19999), (5000, 2, 3000, 16, None, None),
    (3000, 4, 16384, 16, 20000, None),
    # several 4096-pair tiles (multi-CTA align): boundaries, num_valid inside a tile, E = 1
    (8193, 1, 7, 16, None, 4097), (4097, 2, 1, 128, None, None), (12289, 1, 9, 16, 11, 0),
    (16384, 8, 128, 16, None, None)])
def test_moe_align_cuda(T, k, E, bm, e_global, num_valid):
    args = _align_args(T, k, E, bm, "cuda", e_global, num_valid)
    torch.ops.pcg.moe_align(*args)
    _check_align(args, stable=False)


@pytest.mark.gpu
def test_opcheck_cuda():
    args, kw = _opcheck_args("cuda", torch.bfloat16)
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, kw)
    torch.library.opcheck(torch.ops.pcg.moe_align.default, _align_args(40, 3, 6, 16, "cuda", 9, 30))


@pytest.mark.gpu
def test_errors_name_the_argument_cuda():
    cases, args, kw = _bad_inputs("cuda")
    cases = cases + [("w2", dict(w2=args[2].cpu())), ("num_valid",
                     dict(num_valid=torch.tensor([1], dtype=torch.int32))),
                     ("expert_map", dict(expert_map=kw["expert_map"].cpu()))]
    for name, override in cases:
        with pytest.raises(ValueError, match=f"pcg::fused_moe: argument '{name}'"):
            _call_with(args, kw, override)


def _check_capture_replay(T, E, k, H, I, EG, dtype, num_valids, seed, config=None):
    """Captures fused_moe once, then per trial writes new inputs and num_valid in
    place and replays: bitwise equal to an eager call, zero rows >= num_valid,
    close to the reference."""
    args, kw = make_case(T, E, k, H, I, dtype=dtype, device="cuda", e_global=EG, bias=True)
    hidden, w13, w2, wts, ids = args
    num_valid = torch.tensor([T], dtype=torch.int32, device="cuda")

    def run():
        return pcg.fused_moe(hidden, w13, w2, wts, ids, num_valid=num_valid, config=config, **kw)

    graph, out = capture_graph(run)
    for trial, nv in enumerate(num_valids):
        g = torch.Generator().manual_seed(seed + trial)
        hidden.copy_(torch.randn(T, H, generator=g).to(dtype))
        ids.copy_(torch.randint(-1, EG + 2, (T, k), generator=g, dtype=torch.int32))
        wts.copy_(torch.rand(T, k, generator=g))
        num_valid.fill_(nv)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run()), f"trial {trial}: replay != eager"
        assert (out[min(nv, T):] == 0).all()
        if nv > 0:
            ref = reference(hidden, w13, w2, wts, ids, num_valid=num_valid, **kw)
            assert rel_err(out, ref) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 24, 600])
def test_cuda_graph_capture_replay(dtype, T):
    _check_capture_replay(T, 12, 4, 72, 40, 16, dtype, [T, max(T // 2, 1), 0, T + 3], seed=100)


# ---------------------------------------------------------------------------
# CUDA: kernel configurations

# Every valid (block_m, tile1, tile2) of the list (each tile id at least once).
_CANDIDATES = fused_moe_candidates()


def _skip_unless_fits(config):
    """Tiles needing more shared memory than this GPU has are refused (sm_80: 163 KB)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limit = props.shared_memory_per_block_optin
    tiles = {t.id: t for t in fused_moe_tiles()}
    big = [tiles[t].name for t in config[1:] if t >= 0 and tiles[t].smem > limit]
    if big:
        pytest.skip(f"tiles {big} need more than this device's {limit} B of shared memory")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# H, I not multiples of 64 (N and K tails of every tile); 101/75 not multiples of 8
# (element loads); T gives several row blocks per expert at every block_m.
@pytest.mark.parametrize("H,I,act", [(200, 136, "swigluoai"), (101, 75, "silu")])
@pytest.mark.parametrize("config", _CANDIDATES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_every_tile_config(config, H, I, act, dtype):
    _skip_unless_fits(config)
    T, E, k = 150, 6, 2
    _check_case(T, E, k, H, I, {"e_global": 9, "bias": True, "activation": act,
                                "config": config}, dtype, "cuda", GPU_TOL[dtype],
                num_valid=T - 7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_config_default_tiles_and_fp32(dtype):
    """-1 picks block_m's default tiles (bitwise the same kernels); fp32 takes block_m."""
    args, kw = make_case(300, 6, 2, 72, 40, dtype=dtype, device="cuda", bias=True)
    for bm in (16, 32, 64, 128):
        a = pcg.fused_moe(*args, **kw, config=[bm, -1, -1])
        assert torch.equal(a, pcg.fused_moe(*args, **kw, config=[bm, *_default_tiles(bm)]))
        assert rel_err(a, reference(*args, **kw)) < GPU_TOL[dtype]
    args, kw = make_case(300, 6, 2, 72, 40, device="cuda", bias=True)
    for bm in (16, 32, 64, 128):
        out = pcg.fused_moe(*args, **kw, config=[bm, -1, -1])
        assert rel_err(out, reference(*args, **kw)) < GPU_TOL[torch.float32]


@pytest.mark.gpu
# An untuned shape: stream (6 pairs), tiles (130 pairs < 16 rows x 12 experts), CUTLASS.
@pytest.mark.parametrize("T", [3, 65, 500])
def test_cuda_config_none_is_the_table_choice(T):
    E, k, H, I = 12, 2, 72, 40
    args, kw = make_case(T, E, k, H, I, dtype=torch.bfloat16, device="cuda")
    cutlass, stream = fused_moe_paths("cuda")
    chosen = fused_moe_config(E, k, H, I, T, cutlass=cutlass, stream=stream)
    if stream and T == 3:
        assert chosen == (-2, -1, -1)
    if T == 65:
        assert chosen[0] > 0  # mma.sync tiles
    out = pcg.fused_moe(*args, **kw)
    assert torch.equal(out, pcg.fused_moe(*args, **kw, config=chosen))
    assert rel_err(out, reference(*args, **kw)) < GPU_TOL[torch.bfloat16]


@pytest.mark.gpu
def test_cuda_config_errors_name_the_argument():
    for config, dtype, what in _bad_configs():
        args, kw = _config_case(dtype, "cuda")
        with pytest.raises(ValueError, match=f"pcg::fused_moe: argument 'config'.*{what}"):
            pcg.fused_moe(*args, **kw, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(128, 18, 20), (128, 17, 19), (16, 9, 12)])
def test_cuda_graph_capture_replay_forced_config(config):
    _skip_unless_fits(config)
    T = 700
    _check_capture_replay(T, 4, 2, 136, 200, 6, torch.bfloat16, [T, T // 3, 0], seed=200,
                          config=config)


def _bench_shapes():
    """bench/moe.py's SHAPES (the shapes the checked-in table is tuned for)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "moe.py")
    spec = importlib.util.spec_from_file_location("_pcg_bench_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SHAPES


_TABLE_T = sorted({2 ** i for i in range(15)} | {3 * 2 ** i for i in range(1, 13)})


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_bench_shapes()))
def test_cuda_table_choices_on_bench_shapes(name):
    """Every config the table chooses for a bench shape, run on that shape at the
    smallest T mapping to it (capped at 1024 tokens, the config forced there)."""
    E, k, H, I = _bench_shapes()[name]
    first_t = {}
    cutlass, stream = fused_moe_paths("cuda")
    for T in _TABLE_T:
        first_t.setdefault(fused_moe_config(E, k, H, I, T), T)  # the mma.sync choices
        first_t.setdefault(fused_moe_config(E, k, H, I, T, cutlass=cutlass, stream=stream), T)
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(5)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device="cuda") * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device="cuda") * I ** -0.5).to(dtype)
    for config, T in first_t.items():
        T = min(T, 1024)
        hidden = torch.randn(T, H, generator=g, device="cuda").to(dtype)
        wts = torch.rand(T, k, generator=g, device="cuda") + 0.1
        ids = torch.rand(T, E, generator=g, device="cuda").topk(k).indices.to(torch.int32)
        out = pcg.fused_moe(hidden, w13, w2, wts, ids, config=config)
        ref = reference(hidden, w13, w2, wts, ids, compute_device="cuda")
        err = rel_err(out, ref)
        assert err < GPU_TOL[dtype], f"config {config} at T={T}: rel err {err:.3g}"
    del w13, w2
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_opcheck_cuda_config():
    args, kw = _opcheck_args("cuda", torch.bfloat16)
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, dict(kw, config=[128, 17, 20]))
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, dict(kw, config=[16, 8, 11]))
    args, kw = _opcheck_args("cuda")
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, args, dict(kw, config=[64, -1, -1]))
