"""pcg::fused_moe's w13_block argument: w13 in the block layout (B gate rows,
B up rows, alternating; pcg.interleave_w13) gives the same result as the plain
layout (gate rows, then up rows) on every path and config, bitwise: the paths
read the same values through another row index. On the CUTLASS path,
B = pcg.FUSED_W13_BLOCK applies the activation in GEMM1's epilogue instead of a
separate kernel, with the same rounding (bitwise equal too).
"""
from __future__ import annotations

import pytest
import torch

import pcg
from pcg.ops.fused_moe import fused_moe_cutlass_variants, fused_moe_paths
from pcg.timing import capture_graph
from test_fused_moe import make_case

ACTIVATIONS = ["silu", "gelu", "gelu_tanh", "swigluoai"]


def _blocked(args, kw, block, noncontig=False):
    """The same case with w13 in the block layout of `block`."""
    w13 = pcg.interleave_w13(args[1], block)
    if noncontig:  # same values, transposed storage
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
    return [args[0], w13, *args[2:]], dict(kw, w13_block=block)


# ---------------------------------------------------------------------------
# The layout helpers

@pytest.mark.parametrize("block", [8, 16, 32])
def test_interleave_layout_and_round_trip(block):
    E, I, H = 3, 96, 5
    w13 = torch.randn(E, 2 * I, H)
    b = pcg.interleave_w13(w13, block)
    for n in range(I):
        g_row = (n // block) * 2 * block + n % block
        assert torch.equal(b[:, g_row], w13[:, n])
        assert torch.equal(b[:, g_row + block], w13[:, I + n])
    assert torch.equal(pcg.deinterleave_w13(b, block), w13)
    # One expert [2I, H]
    assert torch.equal(pcg.interleave_w13(w13[0], block), b[0])
    assert pcg.interleave_w13(w13, 0) is w13


@pytest.mark.parametrize("block,I,what", [(4, 16, "power of two >= 8"), (12, 24, "power of two"),
                                          (16, 24, "divides I = 24"), (-8, 16, "got -8")])
def test_interleave_rejects_bad_blocks(block, I, what):
    with pytest.raises(ValueError, match=f"w13_block.*{what}"):
        pcg.interleave_w13(torch.zeros(2, 2 * I, 4), block)


# ---------------------------------------------------------------------------
# CPU kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("block", [8, 32])
def test_cpu_block_layout_matches_plain(block, activation, dtype):
    args, kw = make_case(13, 5, 3, 24, 96, dtype=dtype, e_global=7, bias=True, noncontig=True)
    kw["activation"] = activation
    want = pcg.fused_moe(*args, **kw)
    bargs, bkw = _blocked(args, kw, block, noncontig=True)
    assert torch.equal(pcg.fused_moe(*bargs, **bkw), want)


@pytest.mark.parametrize("block,what", [(4, "power of two >= 8"), (24, "power of two"),
                                        (16, "divides I = 40"), (-8, "got -8")])
def test_cpu_rejects_bad_w13_block(block, what):
    args, kw = make_case(5, 4, 2, 16, 40)
    with pytest.raises(ValueError, match=f"pcg::fused_moe: argument 'w13_block'.*{what}"):
        pcg.fused_moe(*args, **kw, w13_block=block)


def test_opcheck_with_w13_block_cpu():
    args, kw = make_case(9, 4, 2, 16, 16, bias=True)
    bargs, bkw = _blocked(args, kw, 8)
    torch.library.opcheck(torch.ops.pcg.fused_moe.default, bargs, bkw)


def test_fake_kernel_rejects_bad_w13_block():
    args, kw = make_case(5, 4, 2, 16, 40)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert pcg.fused_moe(*args, **kw, w13_block=8).shape == args[0].shape
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match="w13_block"):
        pcg.fused_moe(*args, **kw, w13_block=12)


def test_nn_moe_block_layout_matches_plain():
    torch.manual_seed(0)
    plain = pcg.nn.MoE(32, 24, 6, 2)
    blocked = pcg.nn.MoE(32, 24, 6, 2, w13_block=8)
    blocked.load_state_dict(plain.state_dict())
    with torch.no_grad():
        blocked.w13.copy_(pcg.interleave_w13(plain.w13, 8))
    x = torch.randn(7, 32)
    assert torch.equal(blocked(x), plain(x))
    with pytest.raises(ValueError, match="pcg.nn.MoE: argument 'w13_block'"):
        pcg.nn.MoE(32, 20, 6, 2, w13_block=8)


# ---------------------------------------------------------------------------
# GPU: every path and config

def _is_sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


sm90 = pytest.mark.skipif(not _is_sm90(), reason="needs an sm_90 GPU (H100/H200)")

# Every variant on both GEMMs (swap-AB ones pair gate and up rows in GEMM1's epilogue;
# gather ones run GEMM1 only).
CUTLASS_CONFIGS = [[-1, v.id, -1 if v.gather_a else v.id] for v in fused_moe_cutlass_variants()]
MMA_CONFIGS = [None, [16, -1, -1], [32, -1, -1], [64, -1, -1], [128, -1, -1]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", MMA_CONFIGS, ids=str)
@pytest.mark.parametrize("T", [3, 300])
def test_gpu_mma_paths_block_layout_match_plain(T, config, dtype):
    args, kw = make_case(T, 6, 3, 72, 40, dtype=dtype, device="cuda", e_global=9, bias=True,
                         noncontig=True)
    want = pcg.fused_moe(*args, **kw, config=config)
    bargs, bkw = _blocked(args, kw, 8, noncontig=True)
    assert torch.equal(pcg.fused_moe(*bargs, **bkw, config=config), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T", [1, 5, 16])
def test_gpu_stream_path_block_layout_matches_plain(T, activation, dtype):
    if not fused_moe_paths("cuda")[1]:
        pytest.skip("no stream path on this device")
    args, kw = make_case(T, 10, 8, 256, 96, dtype=dtype, device="cuda", bias=True)
    kw["activation"] = activation
    want = pcg.fused_moe(*args, **kw, config=[-2, -1, -1])
    for block in (8, 32):
        bargs, bkw = _blocked(args, kw, block)
        assert torch.equal(pcg.fused_moe(*bargs, **bkw, config=[-2, -1, -1]), want)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CUTLASS_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(6, 3, 72, 40), (8, 2, 256, 200), (32, 8, 1024, 768)],
                         ids=lambda s: "E{}-k{}-H{}-I{}".format(*s))
@pytest.mark.parametrize("T", [7, 1000])
def test_gpu_cutlass_fused_activation_matches_separate(T, shape, config, dtype):
    """B = 8: GEMM1's epilogue applies the activation (no gate_up, no activation
    kernel); B = 16: the separate activation kernel reads the block layout.
    I = 200: 2I = 400 is not a multiple of any tile's N (partial n-tiles)."""
    E, k, H, I = shape
    args, kw = make_case(T, E, k, H, I, dtype=dtype, device="cuda", bias=True)
    want = pcg.fused_moe(*args, **kw, config=config)
    for block in [8] + ([16] if I % 16 == 0 else []):
        bargs, bkw = _blocked(args, kw, block)
        assert torch.equal(pcg.fused_moe(*bargs, **bkw, config=config), want), block


# GEMM1 on the default kernel and on a swap-AB one (each has its own gated epilogue).
SWAP_GEMM1 = next(v.id for v in fused_moe_cutlass_variants() if v.swap_ab)
GATED_CONFIGS = [[-1, -1, -1], [-1, SWAP_GEMM1, -1]]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("config", GATED_CONFIGS, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_cutlass_fused_activation_every_activation(activation, bias, config):
    args, kw = make_case(700, 16, 4, 256, 128, dtype=torch.bfloat16, device="cuda", e_global=20,
                         bias=bias, scale=3.0)
    kw["activation"] = activation
    want = pcg.fused_moe(*args, **kw, config=config)
    bargs, bkw = _blocked(args, kw, pcg.FUSED_W13_BLOCK)
    assert torch.equal(pcg.fused_moe(*bargs, **bkw, config=config), want)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("config", GATED_CONFIGS, ids=str)
def test_gpu_cutlass_fused_activation_skips_the_activation_kernel(config):
    """The fused path really runs: with B = 8 no activation kernel is launched
    (GEMM1's epilogue does its work); with the plain layout one is."""
    args, kw = make_case(500, 8, 2, 128, 64, dtype=torch.bfloat16, device="cuda")

    def kernels(block):
        bargs, bkw = _blocked(args, kw, block)
        pcg.fused_moe(*bargs, **bkw, config=config)  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            pcg.fused_moe(*bargs, **bkw, config=config)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    fused, plain = kernels(pcg.FUSED_W13_BLOCK), kernels(0)
    assert any("gated_act_kernel" in n for n in plain), plain
    assert not any("gated_act_kernel" in n for n in fused), fused
    assert len(fused) == len(plain) - 1, (fused, plain)


@pytest.mark.gpu
@sm90
def test_gpu_cutlass_fused_activation_capture_replay():
    T, E, k, H, I = 600, 12, 4, 128, 64
    args, kw = make_case(T, E, k, H, I, dtype=torch.bfloat16, device="cuda", e_global=15,
                         bias=True)
    bargs, bkw = _blocked(args, kw, pcg.FUSED_W13_BLOCK)
    hidden, w13b, w2, wts, ids = bargs
    num_valid = torch.tensor([T], dtype=torch.int32, device="cuda")

    def run(w13=w13b, block=pcg.FUSED_W13_BLOCK):
        return pcg.fused_moe(hidden, w13, w2, wts, ids, num_valid=num_valid,
                             config=[-1, -1, -1], **dict(bkw, w13_block=block))

    graph, out = capture_graph(run)
    for trial, nv in enumerate([T, 311, 0, 599]):
        g = torch.Generator().manual_seed(trial)
        hidden.copy_(torch.randn(T, H, generator=g).to(hidden.dtype))
        ids.copy_(torch.randint(-1, 17, (T, k), generator=g, dtype=torch.int32))
        wts.copy_(torch.rand(T, k, generator=g))
        num_valid.fill_(nv)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run()), trial
        assert torch.equal(out, run(args[1], 0)), trial  # the plain layout, separate activation
        assert (out[nv:] == 0).all()


# ---------------------------------------------------------------------------
# pcg.wrap: transformers experts in the block layout, and back on unwrap

@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_wrap_uses_the_block_layout_and_unwrap_restores(family):
    from hf_models import VOCAB, build
    model = build(family)
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    before = [(m.gate_up_proj.clone(), m.down_proj.clone()) for m in experts]
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    first = None
    for _ in range(2):  # wrapped twice: the layout is converted once
        w = pcg.wrap(model, progress=False)
        layers = w.registry.moe_layers
        assert layers and all(layer.w13_block == pcg.FUSED_W13_BLOCK for layer in layers)
        for layer in layers:
            assert layer.w13 is layer.module.gate_up_proj  # converted in place, not copied
        if first is None:
            first = [layer.w13 for layer in layers]
        else:  # the second wrap shares the first one's tensors
            assert all(a is layer.w13 for a, layer in zip(first, layers))
        torch.testing.assert_close(w(ids).logits, ref, rtol=1e-4, atol=1e-4)
    back = pcg.unwrap(w)
    for m, (w13, w2) in zip(experts, before):
        assert torch.equal(m.gate_up_proj, w13) and torch.equal(m.down_proj, w2)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)


@pytest.mark.gpu
def test_gpu_wrapped_model_block_layout_matches_plain():
    """pcg's own model, captured: w13 in the block layout (the default) against
    the same weights in the plain layout, bf16, every bucket's path (stream,
    mma.sync, CUTLASS with the fused activation): bitwise equal, wrapped and
    unwrapped."""
    import copy
    from pcg.models import MoETransformer, MoETransformerConfig
    torch.manual_seed(5)
    cfg = MoETransformerConfig(num_layers=3, hidden_size=128, intermediate_size=64, num_experts=16,
                               top_k=4)
    blocked = MoETransformer(cfg, dtype=torch.bfloat16, device="cuda").eval()
    plain = copy.deepcopy(blocked)
    for m in plain.modules():
        if isinstance(m, pcg.nn.MoE):
            assert m.w13_block == pcg.FUSED_W13_BLOCK
            with torch.no_grad():
                m.w13.copy_(pcg.deinterleave_w13(m.w13, m.w13_block))
            m.w13_block = 0
    buckets = [4, 16, 64, 96]
    wb = pcg.wrap(copy.deepcopy(blocked), buckets=buckets, progress=False).capture()
    wp = pcg.wrap(copy.deepcopy(plain), buckets=buckets, progress=False).capture()
    g = torch.Generator(device="cpu").manual_seed(0)
    for n in (1, 3, 16, 17, 50, 64, 80, 97):
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=g).cuda()
        with torch.inference_mode():
            assert torch.equal(wb(ids), wp(ids)), n
            assert torch.equal(blocked(ids), plain(ids)), n


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_wrapped_state_dict_speaks_the_model_layout(family):
    """state_dict() of a wrapped transformers model is the checkpoint layout (not
    pcg's), and load_state_dict() of a checkpoint updates the captured weights in
    place: the wrapped model then computes what the checkpoint's model does."""
    from hf_models import VOCAB, build
    model, ref = build(family), build(family)
    other = build(family, seed=9)  # another checkpoint of the same architecture
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    w = pcg.wrap(model, progress=False)
    sd, want = model.state_dict(), ref.state_dict()
    assert sd.keys() == want.keys()
    assert all(torch.equal(sd[k], want[k]) for k in want)
    ptrs = [layer.w13.data_ptr() for layer in w.registry.moe_layers]
    model.load_state_dict(other.state_dict())
    assert [layer.w13.data_ptr() for layer in w.registry.moe_layers] == ptrs  # in place
    with torch.no_grad():
        torch.testing.assert_close(w(ids).logits, other(ids).logits, rtol=1e-4, atol=1e-4)
    back = pcg.unwrap(w)
    sd = back.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in other.state_dict().items())
