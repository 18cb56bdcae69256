"""Compile mode on CUDA: pcg.wrap(model, compiler="inductor") in bf16 (and
compiler="eager" in bf16 and fp32), its
inductor-compiled pieces captured as piecewise CUDA graphs, replayed at bucket
and non-bucket sizes against the unwrapped model; the report's counts match
the split (one graph per piece, one split call per split op), and nothing
fell back to the uncompiled forward."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pcg
from pcg.compile import CompiledForward, warmup
from pcg.models import MoETransformer, MoETransformerConfig

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import VOCAB, build, padding_mask  # noqa: E402
from test_hf_gpu import Reference, rel_err  # noqa: E402  (bf16 vs fp32 reference with flip slack)

pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu

RTOL = 2e-2
BUCKETS = [1, 2, 8, 32, 64]
GPU_FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral", "llama4", "dbrx"]


def _ids(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=g).cuda()


def _check_report(wrapped, buckets=BUCKETS, compiler="inductor"):
    rep = wrapped.report()
    fn = wrapped._forward_fn
    assert isinstance(fn, CompiledForward)
    assert fn.trace_error is None, fn.trace_error
    assert rep.capture_failures == {}, rep.capture_failures
    assert rep.buckets == buckets
    assert rep.integration.endswith("+" + compiler)
    assert not fn.stats["startup"]["piece_compile_failures"]
    # one CUDA graph per piece, one recorded call per split op, in every bucket
    assert fn.num_pieces == fn.num_splits + 1
    assert fn.num_splits == rep.attention_layers + len(rep.moe_split_layers)
    assert set(rep.segments_per_bucket.values()) == {fn.num_pieces}, (rep, fn.stats)
    assert set(rep.split_calls_per_bucket.values()) == {fn.num_splits}, (rep, fn.stats)
    assert rep.graphs == fn.num_pieces * len(buckets)
    assert rep.compile_fallbacks == {}, rep.compile_fallbacks
    return rep


@pytest.fixture(scope="module", params=GPU_FAMILIES)
def captured(request):
    model32 = build(request.param, dtype=torch.float32, device="cuda")
    ref = Reference(model32)
    model = copy.deepcopy(model32).to(torch.bfloat16)
    wrapped = pcg.wrap(model, buckets=BUCKETS, compiler="inductor", progress=False)
    startup = warmup(wrapped)  # trace + compile outside the engine's capture timing
    print(f"\n{request.param}: compile startup {startup}")
    assert startup.get("trace_error") is None, \
        f"{request.param}: tracing the forward failed: {startup['trace_error']}"
    assert startup["pieces"] == wrapped._forward_fn.num_pieces > 0
    wrapped.capture()
    yield request.param, ref, wrapped
    del wrapped, ref, model
    torch.cuda.empty_cache()


def test_capture_report(captured):
    family, _, wrapped = captured
    _check_report(wrapped)


def test_single_sequence_bucket_and_non_bucket_sizes(captured):
    family, ref, wrapped = captured
    g = torch.Generator().manual_seed(0)
    before = sum(wrapped.report().replays.values())
    sizes = [8, 5, 32, 1, 20, 64, 50, 2, 5]
    for t in sizes:
        ids = _ids(g, 1, t)
        out = wrapped(ids).logits
        assert out.shape == (1, t, VOCAB)
        err = ref.error(out[0], ids[0])
        assert err <= RTOL, f"{family} T={t}: relative error {err:.3g}: {ref.last}"
    rep = _check_report(wrapped)
    assert sum(rep.replays.values()) - before == len(sizes)
    ref.sample(wrapped)
    ref.check_aggregate(family)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(captured, side):
    family, ref, wrapped = captured
    g = torch.Generator().manual_seed(2)
    b, s = 3, 11
    lens = [11, 6, 2]
    ids = _ids(g, b, s)
    mask = padding_mask(lens, s, side)
    mask = mask.cuda()
    out = wrapped(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.all(out[~keep] == 0)
    for i in range(b):
        real = keep[i].nonzero().flatten()
        err = ref.error(out[i, real], ids[i, real], real)
        assert err <= RTOL, f"{family} {side} padding row {i}: relative error {err:.3g}: {ref.last}"
    _check_report(wrapped)


def test_above_largest_bucket_runs_the_compiled_graph_eagerly(captured):
    family, ref, wrapped = captured
    g = torch.Generator().manual_seed(3)
    ids = _ids(g, 1, 70)
    err = ref.error(wrapped(ids).logits[0], ids[0])
    assert err <= RTOL, f"{family} eager T=70: relative error {err:.3g}: {ref.last}"
    rep = _check_report(wrapped)
    assert rep.eager_fallbacks.get("above_max_tokens", 0) >= 1


@pytest.mark.parametrize("compiler", ["inductor", "eager"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_fp32_capture_matches_unwrapped_tightly(family, compiler):
    """Both compilers' pieces, captured, in fp32 (no bf16 routing flips)."""
    model = build(family, dtype=torch.float32, device="cuda")
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, buckets=[8, 32], compiler=compiler, progress=False).capture()
    g = torch.Generator().manual_seed(5)
    for t in (3, 8, 21, 32):
        ids = _ids(g, 1, t)
        with torch.inference_mode():
            expect = ref(input_ids=ids, use_cache=False).logits
        err = rel_err(wrapped(ids).logits, expect)
        assert err <= 1e-3, f"{family} {compiler} fp32 T={t}: relative error {err:.3g}"
    _check_report(wrapped, [8, 32], compiler)
    # inputs_embeds: their own trace, captured as a second graph set
    with torch.inference_mode():
        x = ref.get_input_embeddings()(_ids(g, 1, 13))
        expect = ref(inputs_embeds=x, use_cache=False).logits
    err = rel_err(wrapped(inputs_embeds=x).logits, expect)
    assert err <= 1e-3, f"{family} {compiler} fp32 inputs_embeds: relative error {err:.3g}"
    rep = wrapped.report()
    assert rep.embeds_buckets == [8, 32] and rep.embeds_replays == {32: 1}, rep
    assert rep.capture_failures == {} and rep.compile_fallbacks == {}, rep


@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_eager_compiler_bf16_matches_unwrapped(family):
    """compiler="eager" (FX pieces, no inductor) in bf16, captured: the engine issue's bf16 bar."""
    model32 = build(family, dtype=torch.float32, device="cuda")
    ref = Reference(model32)
    model = copy.deepcopy(model32).to(torch.bfloat16)
    wrapped = pcg.wrap(model, buckets=BUCKETS, compiler="eager", progress=False).capture()
    g = torch.Generator().manual_seed(3)
    for t in (8, 5, 32, 1, 20, 64, 50, 2):
        ids = _ids(g, 1, t)
        err = ref.error(wrapped(ids).logits[0], ids[0])
        assert err <= RTOL, f"{family} eager compiler T={t}: relative error {err:.3g}: {ref.last}"
    _check_report(wrapped, BUCKETS, "eager")
    ref.sample(wrapped)
    ref.check_aggregate(family)


def test_moetransformer_inductor_debug_check():
    """pcg.nn model, bf16, debug=True: compiled pieces checked against their
    eager FX versions during the capture's warm-up; replays checked against
    the eager split path."""
    torch.manual_seed(0)
    cfg = MoETransformerConfig(num_layers=3)
    model32 = MoETransformer(cfg, device="cuda").eval()
    model = copy.deepcopy(model32).to(torch.bfloat16)
    wrapped = pcg.wrap(model, buckets=[4, 16], compiler="inductor", debug=True,
                       progress=False).capture()
    fn = wrapped._forward_fn
    assert fn.num_pieces == 4 and fn.num_splits == 3
    assert fn.stats["checks"] > 0 and fn.stats["check_max_rel_err"] <= RTOL
    g = torch.Generator().manual_seed(6)
    for t in (4, 11, 16, 1):
        ids = torch.randint(0, cfg.vocab_size, (1, t), generator=g).cuda()
        out = wrapped(ids)
        with torch.inference_mode():
            expect32 = model32(ids)
            own = model(ids)  # the unwrapped bf16 model (outside a wrapped forward)
        direct = rel_err(out, own)
        assert direct <= RTOL or rel_err(out, expect32) <= rel_err(own, expect32) + 0.05, \
            f"T={t}: relative error {direct:.3g} vs unwrapped bf16"
    _check_report(wrapped, [4, 16])
    assert wrapped.report().debug_max_rel_err <= RTOL
