"""pcg.wrap(model) (router="pcg", the default): transformers routers that one
pcg.route kernel reproduces run it; the others keep their own code. CPU (fp32) checks of
the probe and the outputs, and a GPU check in bf16 inside captured graphs."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pcg
from pcg.integrations import hf_router

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import FAMILIES, VOCAB, build  # noqa: E402

pytest.importorskip("transformers")

# Families whose routers pcg.route reproduces (softmax / sigmoid top-k, with
# renormalisation, correction bias, groups, scale as each has them).
ROUTED = {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def routers(model):
    return [(n, m) for n, m in model.named_modules() if hf_router.is_router(m)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrapped_with_pcg_routers_matches_unwrapped(family):
    model = build(family)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, router="pcg", progress=False)
    rep = wrapped.report()
    on_pcg = [n for n, v in rep.routers.items() if v == "pcg.route"]
    assert set(rep.routers) == {n for n, _ in routers(model)}
    if family in ROUTED:
        assert on_pcg and len(on_pcg) == len(rep.routers), rep.routers
        assert "routers:" in str(rep)
    g = torch.Generator().manual_seed(3)
    for t in (1, 9, 40):
        ids = torch.randint(0, VOCAB, (1, t), generator=g)
        with torch.inference_mode():
            want = ref(input_ids=ids, use_cache=False).logits
        err = rel_err(wrapped(ids).logits, want)
        assert err <= 1e-4, f"{family} T={t}: relative error {err:.3g}"


@pytest.mark.parametrize("family", sorted(ROUTED))
def test_switched_router_returns_what_its_own_code_returns(family):
    """Same logits bit for bit, same experts as sets, weights to rounding, the
    router's output dtypes (ids int64), on inputs the probe never saw."""
    model = build(family)
    ref = copy.deepcopy(model)
    pcg.wrap(model, router="pcg", progress=False)
    g = torch.Generator().manual_seed(11)
    for (n, m), (_, r) in zip(routers(model), routers(ref)):
        assert "_pcg_orig_forward" in m.__dict__, n
        x = torch.randn(333, m.weight.shape[1], generator=g)
        with torch.inference_mode():
            logits, w, ids = m(x)
            rlogits, rw, rids = r(x)
        assert torch.equal(logits, rlogits)
        assert ids.dtype == rids.dtype and w.dtype == rw.dtype
        assert torch.equal(ids.sort(-1).values, rids.sort(-1).values)
        got = w.gather(1, ids.argsort(-1))
        want = rw.gather(1, rids.argsort(-1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_router_pcg_route_cannot_reproduce_keeps_its_forward():
    """A router whose rule is not pcg.route's (here: weights squared) stays on
    its own code, and the model still matches."""
    model = build("qwen3_moe")
    for _, m in routers(model):
        own = m.forward

        def squared(h, own=own):
            logits, w, ids = own(h)
            return logits, w * w, ids
        m.forward = squared
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, router="pcg", progress=False)
    assert set(wrapped.report().routers.values()) == {"own forward (pcg.route does not reproduce it)"}
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ref(input_ids=ids, use_cache=False).logits
    assert rel_err(wrapped(ids).logits, want) <= 1e-4


def test_group_limited_greedy_keeps_its_forward():
    """DeepSeek-V2's group-limited greedy is not pcg.route's group rule: never
    switched, even where probes could not tell them apart."""
    model = build("deepseek_v2")
    wrapped = pcg.wrap(model, router="pcg", progress=False)
    assert wrapped.report().routers
    assert "pcg.route" not in wrapped.report().routers.values()
    greedy = build("deepseek_v2", topk_method="greedy", n_group=1, topk_group=1)
    wrapped = pcg.wrap(greedy, router="pcg", progress=False)
    assert set(wrapped.report().routers.values()) == {"pcg.route"}


def test_router_model_keeps_routers_and_unwrap_restores():
    model = build("mixtral")
    wrapped = pcg.wrap(model, router="model", progress=False)
    assert wrapped.report().routers == {}
    assert all("_pcg_orig_forward" not in m.__dict__ for _, m in routers(model))
    wrapped = pcg.wrap(model, progress=False)  # the default: pcg.route
    assert set(wrapped.report().routers.values()) == {"pcg.route"}
    assert all("_pcg_orig_forward" in m.__dict__ for _, m in routers(model))
    wrapped = pcg.wrap(model, router="model", progress=False)  # wrapped again: own code back
    assert all("_pcg_orig_forward" not in m.__dict__ for _, m in routers(model))
    wrapped = pcg.wrap(model, router="pcg", progress=False)
    pcg.unwrap(wrapped)
    assert all("_pcg_orig_forward" not in m.__dict__ for _, m in routers(model))


def test_bad_router_argument():
    with pytest.raises(ValueError, match="router"):
        pcg.wrap(build("qwen3_moe"), router="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", sorted(ROUTED))
def test_pcg_routers_in_captured_graphs_cuda(family):
    """bf16 on the GPU, captured: router="pcg" against router="model" (same
    weights); both replay; the routers' own outputs agree on fresh inputs."""
    model = build(family, torch.bfloat16, "cuda")
    other = copy.deepcopy(model)
    fast = pcg.wrap(model, router="pcg", max_tokens=64, progress=False)
    slow = pcg.wrap(other, router="model", max_tokens=64, progress=False)
    assert set(fast.report().routers.values()) == {"pcg.route"}
    g = torch.Generator().manual_seed(5)
    for t in (1, 5, 37):
        ids = torch.randint(0, VOCAB, (1, t), generator=g).cuda()
        a, b = fast(ids).logits.float(), slow(ids).logits.float()
        assert rel_err(a, b) <= 2e-2, f"{family} T={t}: {rel_err(a, b):.3g}"
    assert sum(fast.report().replays.values()) >= 3
    for (n, m), (_, r) in zip(routers(model), routers(other)):
        x = torch.randn(257, m.weight.shape[1], generator=g).to("cuda", torch.bfloat16)
        with torch.inference_mode():
            logits, w, ids = m(x)
            rlogits, rw, rids = r(x)
        assert torch.equal(logits, rlogits), n
        sel = torch.softmax(logits.float(), -1) if family not in ("deepseek_v3",) else None
        same = (ids.sort(-1).values == rids.sort(-1).values).all(-1)
        if sel is not None:  # a different set only between equal scores
            tied = (sel.gather(1, ids).sort(-1).values == sel.gather(1, rids).sort(-1).values).all(-1)
            assert bool((same | tied).all()), n
        assert same.float().mean() >= 0.95, n
