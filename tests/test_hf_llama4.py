"""pcg.wrap on Llama-4 (CPU, fp32) beyond the family tests of test_hf.py:
top-2 routing (the router weight scales each expert's input), dense and MoE
layers interleaved, chunk boundaries, the settings taken over and given
back, and the layer types pcg refuses."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pcg
from pcg.batch import BatchMeta

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import VOCAB, build  # noqa: E402

pytest.importorskip("transformers")

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@torch.inference_mode()
def _alone(ref, ids: torch.Tensor) -> torch.Tensor:
    return ref(input_ids=ids[None], use_cache=False).logits[0]


def _packed(wrapped, ref, lens: list, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    return out, torch.cat([_alone(ref, s) for s in torch.split(ids, lens)])


def test_chunked_boundaries():
    b = BatchMeta(26, [0, 9, 15, 15, 26], None, 32)
    assert b.chunked_cu_seqlens(4) == [0, 4, 8, 9, 13, 15, 15, 19, 23, 26]
    assert b.chunked_cu_seqlens(100) == [0, 9, 15, 15, 26]
    assert b.chunked_cu_seqlens(1) == list(range(0, 10)) + list(range(10, 16)) + [15] + list(range(16, 27))
    with pytest.raises(ValueError, match="positive"):
        b.chunked_cu_seqlens(0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_and_dense_layers(top_k):
    """Top-2 is two pcg::moe calls (each expert's input scaled by its own
    weight); layers 0 and 2 are dense (interleave step 2)."""
    model = build("llama4", num_experts_per_tok=top_k, interleave_moe_layer_step=2)
    ref = copy.deepcopy(model)
    w = pcg.wrap(model, progress=False)
    assert len(w.registry.moe_layers) == 2 and len(w.registry.attention_layers) == 4
    for lens in ([37], [17, 1, 20, 5]):
        out, expect = _packed(w, ref, lens)
        assert rel_err(out, expect) <= RTOL, (top_k, lens)


def test_chunks_and_temperature_are_exercised():
    """The tiny model's chunk (16) and temperature floor (8) change its
    logits at these lengths: without them the tests above could not fail."""
    model = build("llama4")
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    base = _alone(model, ids)
    for override in (dict(attention_chunk_size=4096), dict(floor_scale=4096)):
        other = build("llama4", **override)
        assert rel_err(_alone(other, ids), base) > 1e-2, override
    w = pcg.wrap(model, progress=False)
    reg = w.registry
    assert [l.chunk_size for l in reg.attention_layers] == [16, 16, 16, None]
    assert w.report().attention_kinds == {"chunked 16": 3, "full": 1}
    assert "attention: 3 chunked 16, 1 full" in str(w.report())
    # The NoPE layer's temperature is pcg's while wrapped (the model's own is off).
    attn = [m for m in model.modules() if type(m).__name__ == "Llama4TextAttention"]
    assert [m.attn_temperature_tuning for m in attn] == [True, True, True, False]
    assert "_pcg_temperature" in attn[3].__dict__
    with torch.inference_mode():
        assert rel_err(w(ids[None]).logits[0], base) <= RTOL


def test_state_dict_keeps_the_checkpoint_layout_and_unwrap_restores():
    model = build("llama4")
    ref = copy.deepcopy(model)
    w = pcg.wrap(model, progress=False)
    experts = model.model.layers[0].feed_forward.experts
    assert experts.gate_up_proj.shape[1] == 2 * 32  # pcg's [E, 2I, H]
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd_ref)
    # An in-place load of the checkpoint layout lands in pcg's layout.
    model.load_state_dict(sd_ref)
    out, expect = _packed(w, ref, [12, 21])
    assert rel_err(out, expect) <= RTOL
    pcg.unwrap(w)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), sd_ref.values()))
    assert not hasattr(experts, "has_gate") and "_pcg_orig_forward" not in model.model.layers[0].feed_forward.__dict__
    attn = [m for m in model.modules() if type(m).__name__ == "Llama4TextAttention"]
    assert all(m.attn_temperature_tuning for m in attn)


def _refused_unchanged(model, match: str, exc: type) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        pcg.wrap(model, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.config._attn_implementation != "pcg"


@pytest.mark.parametrize("kind", ["window_attention", "deepseek_sparse_attention", "qwen_sparse_attention"])
def test_attention_layer_types_without_a_kernel_are_refused(kind):
    model = build("llama4")
    model.config.layer_types[1] = kind
    _refused_unchanged(model, kind, NotImplementedError)


def test_chunked_layer_without_a_chunk_size_is_refused():
    model = build("llama4")
    model.config.attention_chunk_size = None
    _refused_unchanged(model, "attention_chunk_size", ValueError)


def test_moe_block_with_unexpected_experts_is_refused():
    model = build("llama4")
    experts = model.model.layers[2].feed_forward.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.data[:, :-1])  # I no longer matches
    _refused_unchanged(model, "gate_up_proj", ValueError)


def test_wrapped_model_pickles_and_wraps_again(tmp_path):
    """The block's pcg forward is an object, so a wrapped Llama-4 pickles; the
    loaded copy (weights in pcg's layout) wraps again to the same logits."""
    model = build("llama4")
    ref = copy.deepcopy(model)
    pcg.wrap(model, progress=False)
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    out, expect = _packed(pcg.wrap(back, progress=False), ref, [20, 3])
    assert rel_err(out, expect) <= RTOL

