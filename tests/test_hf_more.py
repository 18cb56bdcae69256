"""pcg.wrap on more transformers MoE families than tests/test_hf.py's:
MORE_FAMILIES from one generic tiny config, and the hybrid HYBRID_FAMILIES
(linear / lightning attention, gated delta rule, Mamba, short convolution
layers, which pcg runs per sequence as split ops: pcg::mixer). fp32 on the
CPU against the unwrapped model (single, packed and padded batches), fp32
captured on CUDA; a layer with an unknown token mixer is refused."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pcg

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import (CPU_FAMILIES, HYBRID_FAMILIES, MORE_FAMILIES, VOCAB, build_auto,  # noqa: E402
                       has_family, padding_mask)

pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _family(name: str) -> str:
    if not has_family(name):
        pytest.skip(f"transformers has no {name}")
    return name


ALL = MORE_FAMILIES + list(HYBRID_FAMILIES)
# Tiny DeepSeek sparse-attention settings (MLA + an indexer).
DSA = dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
           n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
           n_group=4, topk_group=2, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=12, index_n_heads=4, index_head_dim=16, index_topk=4)
# Families whose own forward cannot be captured (the error each bucket
# reports): PhiMoE's rotary embedding rebuilds inv_freq on the CPU every call.
NOT_CAPTURABLE = {"phimoe": "Cannot copy between CPU and CUDA tensors during CUDA graph capture"}


@pytest.fixture(scope="module", params=ALL + CPU_FAMILIES)
def pair(request):
    model = build_auto(_family(request.param))
    ref = copy.deepcopy(model)
    return request.param, ref, pcg.wrap(model, progress=False)


@torch.inference_mode()
def _ref(ref, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    kw = {} if positions is None else {"position_ids": positions[None]}
    return ref(input_ids=ids[None], use_cache=False, **kw).logits[0]


def _packed(wrapped, ref, lens: list, g: torch.Generator, device: str = "cpu"):
    """One packed batch of sequences of ``lens`` tokens through the wrapped
    model: (its logits [sum(lens), V], the unwrapped model's on each sequence alone)."""
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=g).to(device)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    return out, [_ref(ref, s) for s in torch.split(ids, lens)]


def test_registers_every_layer(pair):
    family, ref, wrapped = pair
    rep = wrapped.report()
    assert rep.attention_layers + rep.mixer_layers == ref.config.num_hidden_layers, rep
    assert (rep.mixer_layers > 0) == (family in HYBRID_FAMILIES or family == "kimi_linear"), rep
    assert rep.moe_layers >= 1, rep


@pytest.mark.parametrize("t", [1, 6, 17])
def test_single_sequence(pair, t):
    family, ref, wrapped = pair
    ids = torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(t))
    err = rel_err(wrapped(ids).logits[0], _ref(ref, ids[0]))
    assert err <= 1e-4, f"{family} T={t}: relative error {err:.3g}"


def test_packed_and_padded_match_unwrapped(pair):
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(1)
    out, expect = _packed(wrapped, ref, [5, 9, 1, 12], g)
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


def test_jumping_positions_and_inputs_embeds(pair):
    """Positions that jump start a sequence (transformers' rule); input
    embeddings give the token ids' logits (where the family takes them)."""
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (12,), generator=g)
    pos = torch.tensor([0, 1, 2, 3, 4, 20, 21, 22, 23, 3, 4, 5])
    out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    for a, b in ((0, 5), (5, 9), (9, 12)):
        err = rel_err(out[a:b], _ref(ref, ids[a:b], pos[a:b]))
        assert err <= 1e-4, f"{family} jump piece [{a}, {b}): relative error {err:.3g}"
    with torch.inference_mode():
        x = ref.get_input_embeddings()(ids[None])
        try:
            expect = ref(inputs_embeds=x, use_cache=False).logits
        except (RuntimeError, ValueError) as exc:  # Gemma-4's per-layer inputs need input_ids
            with pytest.raises(type(exc)):
                wrapped(inputs_embeds=x)
            return
    err = rel_err(wrapped(inputs_embeds=x).logits, expect)
    assert err <= 1e-4, f"{family} inputs_embeds: relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ALL)
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
    lens = [5, 9, 1, 12]  # a packed batch replays the 32-token bucket
    out, expect = _packed(wrapped, ref, lens, g, "cuda")
    for o, e in zip(torch.split(out, lens), expect):
        err = rel_err(o, e)
        assert err <= 1e-3, f"{family} fp32 packed: relative error {err:.3g}"
    rep = wrapped.report()
    if family in NOT_CAPTURABLE:  # the model's own code; every bucket says why, and runs eagerly
        assert set(rep.capture_failures) == {8, 32}, rep
        assert all(NOT_CAPTURABLE[family] in e for e in rep.capture_failures.values()), rep
        return
    assert rep.capture_failures == {} and rep.graphs > 0, rep
    ids = torch.randint(0, VOCAB, (1, 13), generator=g).cuda()  # inputs_embeds: their own graphs
    with torch.inference_mode():
        x = ref.get_input_embeddings()(ids)
        try:
            expect = ref(inputs_embeds=x, use_cache=False).logits
        except (RuntimeError, ValueError):  # Gemma-4's per-layer inputs need input_ids
            return
    err = rel_err(wrapped(inputs_embeds=x).logits, expect)
    assert err <= 1e-3, f"{family} fp32 inputs_embeds: relative error {err:.3g}"
    rep = wrapped.report()
    assert rep.embeds_buckets == [8, 32] and rep.embeds_replays == {32: 1} and rep.capture_failures == {}, rep


@pytest.mark.parametrize("family,compiler", [("minimax", "eager"), ("qwen3_next", "inductor")])
def test_hybrid_compile_mode(family, compiler):
    """Compile mode splits the traced graph at pcg::mixer as at attention."""
    model = build_auto(_family(family))
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, progress=False, compiler=compiler)
    out, expect = _packed(wrapped, ref, [5, 9, 1, 12], torch.Generator().manual_seed(4))
    err = rel_err(out, torch.cat(expect))
    assert err <= 1e-4, f"{family} {compiler} packed: relative error {err:.3g}"
    stats = wrapped._forward_fn.stats
    assert stats["compile_fallbacks"] == {}, stats
    assert stats["split_kinds"].get("mixer", 0) == wrapped.report().mixer_layers > 0, stats


@pytest.mark.gpu
@pytest.mark.parametrize("family,compiler", [("minimax", "eager"), ("qwen3_next", "inductor")])
def test_hybrid_compile_mode_captured(family, compiler):
    """Compiled pieces captured on CUDA, split at pcg::mixer; fp32, packed batch."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_auto(_family(family), device="cuda")
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, buckets=[8, 32], progress=False, compiler=compiler).capture()
    g = torch.Generator().manual_seed(6)
    for lens in ([3], [5, 9, 1, 12]):
        out, expect = _packed(wrapped, ref, lens, g, "cuda")
        for o, e in zip(torch.split(out, lens), expect):
            err = rel_err(o, e)
            assert err <= 1e-3, f"{family} {compiler} lens {lens}: relative error {err:.3g}"
    rep = wrapped.report()
    assert rep.capture_failures == {} and rep.graphs > 0 and rep.compile_fallbacks == {}, rep
    assert all(rep.split_calls_per_bucket[b] >= rep.mixer_layers for b in rep.buckets), rep


class _Unknown(torch.nn.Module):
    """A token mixer pcg does not know (a causal running mean)."""

    def forward(self, hidden_states, *args, **kwargs):
        n = torch.arange(1, hidden_states.shape[1] + 1, device=hidden_states.device)
        return hidden_states.cumsum(1) / n[None, :, None], None


def test_unknown_token_mixer_is_refused():
    model = build_auto(_family("glm4_moe"))
    model.model.layers[1].self_attn = _Unknown()
    with pytest.raises(NotImplementedError, match="no token mixer pcg recognises"):
        pcg.wrap(model, progress=False)
    assert model.config._attn_implementation != "pcg"  # nothing was switched


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa", "axk2"])
def test_sparse_attention_with_indexer_is_refused(family):
    """DeepSeek-V3.2-style sparse attention: its indexer picks keys per query
    from a mask over the whole batch; pcg refuses it instead of running it dense."""
    _family(family)
    model = build_auto(family, **DSA, **({"gated_norm_rank": 8} if family == "axk2" else {}))
    with pytest.raises(NotImplementedError, match="top-k indexer"):
        pcg.wrap(model, progress=False)


@pytest.mark.parametrize("kind", ["indexed_attention", "deepseek_sparse_attention"])
def test_sparse_layer_type_is_refused(kind):
    """A layer whose config names it sparse is refused even without an indexer
    of its own (a layer that reuses an earlier layer's top-k)."""
    from types import SimpleNamespace
    from pcg.integrations.hf import _chunk_size
    layer = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention", kind]), layer_idx=1)
    assert _chunk_size("layers.0.self_attn", SimpleNamespace(config=layer.config, layer_idx=0)) is None
    with pytest.raises(NotImplementedError, match=kind):
        _chunk_size("layers.1.self_attn", layer)


def test_hybrid_wrapped_twice():
    model = build_auto(_family("qwen3_next"))
    ref = copy.deepcopy(model)
    w1 = pcg.wrap(model, progress=False)
    w2 = pcg.wrap(model, progress=False)
    g = torch.Generator().manual_seed(0)
    for w in (w1, w2, w1):
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        out = w(ids).logits
        for i in range(2):
            assert rel_err(out[i], _ref(ref, ids[i])) <= 1e-4
    # Outside a wrapped forward the mixers are the model's own again.
    ids = torch.randint(0, VOCAB, (1, 5), generator=g)
    mixer = next(m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    x = torch.randn(1, 5, model.config.hidden_size)
    torch.testing.assert_close(mixer(x), mixer._pcg_orig_forward(x))


class _SneakyNorm(torch.nn.Module):
    """A "norm" that also adds the running mean of the sequence: token mixing
    no structural check sees (it sits inside an attention module)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        n = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=x.dtype)
        return self.inner(x) + 0.5 * x.cumsum(-2) / n[:, None]


def test_hidden_token_mixing_is_caught_by_the_isolation_check():
    model = build_auto(_family("glm4_moe"))
    model.model.layers[0].post_attention_layernorm = _SneakyNorm(
        model.model.layers[0].post_attention_layernorm)
    ref = copy.deepcopy(model)
    with pytest.raises(NotImplementedError, match="mixes tokens across the sequences"):
        pcg.wrap(model, progress=False)
    # Refused after the switch: switched back, the model runs its own code again.
    assert model.config._attn_implementation != "pcg"
    ids = torch.randint(0, VOCAB, (1, 7))
    torch.testing.assert_close(_ref(model, ids[0]), _ref(ref, ids[0]))


def test_zaya_convolution_in_attention_is_refused():
    model = build_auto(_family("zaya"), num_experts_per_tok=1)
    with pytest.raises(NotImplementedError, match="convolution along the sequence"):
        pcg.wrap(model, progress=False)


def test_mixer_op_outside_a_wrapped_forward_raises():
    with pytest.raises(RuntimeError, match="outside a pcg-wrapped"):
        torch.ops.pcg.mixer(torch.randn(3, 8), 0)


def test_mixer_opcheck():
    from pcg.batch import BatchMeta
    from pcg.registry import LayerRegistry, RunContext, running
    reg = LayerRegistry()
    reg.add_mixer(forward=lambda x: (x.cumsum(1), None), name="cumsum")
    x = torch.randn(7, 5)
    with running(RunContext(registry=reg, batch=BatchMeta(6, [0, 2, 6], None, 7))):
        out = torch.ops.pcg.mixer(x, 0)
        torch.library.opcheck(torch.ops.pcg.mixer.default, (x, 0))
        torch.library.opcheck(torch.ops.pcg.mixer_out.default, (x, torch.empty_like(x), 0))
    expect = torch.cat([x[:2].cumsum(0), x[2:6].cumsum(0), torch.zeros(1, 5)])
    torch.testing.assert_close(out, expect)  # per sequence, pad row zero
