"""pcg.wrap on transformers MoE models on CUDA in bf16: captured piecewise
graphs replayed at bucket and non-bucket sizes, [1, T] and padded [B, S],
against the unwrapped model."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pcg

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import FAMILIES, VOCAB, build  # noqa: E402

pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu

RTOL = 2e-2
BUCKETS = [8, 32, 64]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=list(FAMILIES))
def captured(request):
    """(family, reference model, wrapped and captured model), bf16 on CUDA."""
    model = build(request.param, dtype=torch.bfloat16, device="cuda")
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, buckets=BUCKETS, progress=False).capture()
    yield request.param, ref, wrapped
    del wrapped, ref, model
    torch.cuda.empty_cache()


@torch.inference_mode()
def ref_logits(ref, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    kw = {} if positions is None else {"position_ids": positions[None]}
    return ref(input_ids=ids[None], use_cache=False, **kw).logits[0]


def _ids(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=g).cuda()


def test_capture_report(captured):
    family, _, wrapped = captured
    rep = wrapped.report()
    assert rep.capture_failures == {}, f"{family}: {rep.capture_failures}"
    assert rep.buckets == BUCKETS
    assert rep.graphs > 0
    assert rep.integration == "transformers"
    # one split call per attention layer in every bucket
    assert all(n == rep.attention_layers for n in rep.split_calls_per_bucket.values()), rep


def test_single_sequence_bucket_and_non_bucket_sizes(captured):
    family, ref, wrapped = captured
    g = torch.Generator().manual_seed(0)
    before = sum(wrapped.report().replays.values())
    sizes = [8, 5, 32, 1, 20, 64, 50, 5]
    for t in sizes:  # several replays of the same bucket with changing inputs
        ids = _ids(g, 1, t)
        out = wrapped(ids).logits
        assert out.shape == (1, t, VOCAB)
        err = rel_err(out[0], ref_logits(ref, ids[0]))
        assert err <= RTOL, f"{family} T={t}: relative error {err:.3g}"
    rep = wrapped.report()
    assert sum(rep.replays.values()) - before == len(sizes)
    assert rep.capture_failures == {}


def test_packed_sequences(captured):
    family, ref, wrapped = captured
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 1, 12]
    ids = _ids(g, sum(lens))
    pos = torch.cat([torch.arange(n) for n in lens]).cuda()
    out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    expect, start = [], 0
    for n in lens:
        expect.append(ref_logits(ref, ids[start:start + n]))
        start += n
    err = rel_err(out, torch.cat(expect))
    assert err <= RTOL, f"{family} packed: relative error {err:.3g}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(captured, side):
    family, ref, wrapped = captured
    g = torch.Generator().manual_seed(2)
    b, s = 3, 11
    lens = [11, 6, 2]
    ids = _ids(g, b, s)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lens):
        if side == "left":
            mask[i, s - n:] = 1
        else:
            mask[i, :n] = 1
    mask = mask.cuda()
    before = sum(wrapped.report().replays.values())
    out = wrapped(ids, attention_mask=mask).logits
    assert sum(wrapped.report().replays.values()) == before + 1
    keep = mask.bool()
    assert torch.all(out[~keep] == 0)
    for i in range(b):
        real = keep[i].nonzero().flatten()
        err = rel_err(out[i, real], ref_logits(ref, ids[i, real], real))
        assert err <= RTOL, f"{family} {side} padding row {i}: relative error {err:.3g}"


def test_above_largest_bucket_runs_eagerly(captured):
    family, ref, wrapped = captured
    g = torch.Generator().manual_seed(3)
    ids = _ids(g, 1, 70)
    before = dict(wrapped.report().eager_fallbacks)
    err = rel_err(wrapped(ids).logits[0], ref_logits(ref, ids[0]))
    assert err <= RTOL, f"{family} eager T=70: relative error {err:.3g}"
    after = wrapped.report().eager_fallbacks
    assert after.get("above_max_tokens", 0) == before.get("above_max_tokens", 0) + 1


def test_two_wrapped_models_capture_independently():
    a = build("qwen3_moe", dtype=torch.bfloat16, device="cuda", seed=1)
    b = build("gpt_oss", dtype=torch.bfloat16, device="cuda", seed=2)
    refs = [copy.deepcopy(a), copy.deepcopy(b)]
    wrapped = [pcg.wrap(m, buckets=[16], progress=False).capture() for m in (a, b)]
    g = torch.Generator().manual_seed(4)
    for t in (16, 9, 3):
        for w, r in zip(wrapped, refs):
            ids = _ids(g, 1, t)
            assert rel_err(w(ids).logits[0], ref_logits(r, ids[0])) <= RTOL
    for w in wrapped:
        rep = w.report()
        assert rep.capture_failures == {} and rep.graphs > 0 and rep.replays == {16: 3}
