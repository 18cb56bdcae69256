"""pcg.wrap on more transformers MoE families than tests/test_hf.py's, each
from one generic tiny config (tests/hf_models.py MORE_FAMILIES): fp32 on the
CPU against the unwrapped model, fp32 captured on CUDA; and the refusal of
hybrid models (linear attention / state-space / convolution layers), whose
token mixers would run over pcg's packed row across sequence boundaries."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pcg

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import (HYBRID_FAMILIES, MORE_FAMILIES, VOCAB, build_auto, has_family,  # noqa: E402
                       padding_mask)

pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _family(name: str) -> str:
    if not has_family(name):
        pytest.skip(f"transformers has no {name}")
    return name


@pytest.fixture(scope="module", params=MORE_FAMILIES)
def pair(request):
    model = build_auto(_family(request.param))
    ref = copy.deepcopy(model)
    return request.param, ref, pcg.wrap(model, progress=False)


@torch.inference_mode()
def _ref(ref, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    kw = {} if positions is None else {"position_ids": positions[None]}
    return ref(input_ids=ids[None], use_cache=False, **kw).logits[0]


def test_registers_every_moe_layer(pair):
    family, ref, wrapped = pair
    rep = wrapped.report()
    assert rep.attention_layers == ref.config.num_hidden_layers, rep
    assert rep.moe_layers >= 1, rep


def test_packed_and_padded_match_unwrapped(pair):
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 1, 12]
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    expect, start = [], 0
    for n in lens:
        expect.append(_ref(ref, ids[start:start + n]))
        start += n
    err = rel_err(out, torch.cat(expect))
    assert err <= 1e-4, f"{family} packed: relative error {err:.3g}"
    b, s = 3, 10
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = padding_mask([10, 6, 2], s, "left")
    out = wrapped(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.all(out[~keep] == 0)
    for i in range(b):
        real = keep[i].nonzero().flatten()
        err = rel_err(out[i, real], _ref(ref, ids[i, real], real))
        assert err <= 1e-4, f"{family} padded row {i}: relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_fp32_capture_matches_unwrapped(family):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_auto(_family(family), device="cuda")
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, buckets=[8, 32], progress=False).capture()
    g = torch.Generator().manual_seed(5)
    for t in (3, 8, 21, 32):
        ids = torch.randint(0, VOCAB, (1, t), generator=g).cuda()
        with torch.inference_mode():
            expect = ref(input_ids=ids, use_cache=False).logits
        err = rel_err(wrapped(ids).logits, expect)
        assert err <= 1e-3, f"{family} fp32 T={t}: relative error {err:.3g}"
    rep = wrapped.report()
    assert rep.capture_failures == {} and rep.graphs > 0, rep


@pytest.mark.parametrize("family", list(HYBRID_FAMILIES))
def test_hybrid_model_is_refused(family):
    model = build_auto(_family(family))
    with torch.inference_mode():  # the family itself runs
        model(input_ids=torch.randint(0, VOCAB, (2, 7)), use_cache=False)
    with pytest.raises(NotImplementedError, match="across sequences"):
        pcg.wrap(model, progress=False)
    # Nothing was switched: the model still runs its own implementations.
    assert model.config._attn_implementation != "pcg"
