"""pcg.wrap on Hugging Face transformers MoE models (CPU, fp32): the wrapped
model gives the unwrapped model's logits for single sequences, packed
sequences and padded batches."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pcg

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import FAMILIES, VOCAB, build, llama, padding_mask  # noqa: E402

pytest.importorskip("transformers")

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    """(reference model, wrapped model) of one family."""
    model = build(request.param)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    return request.param, ref, wrapped


@torch.inference_mode()
def ref_logits(ref, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The unwrapped model on one sequence ids [T] -> [T, V]."""
    kw = {} if positions is None else {"position_ids": positions[None]}
    return ref(input_ids=ids[None], use_cache=False, **kw).logits[0]


def _ids(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=g)


@pytest.mark.parametrize("t", [1, 7, 33])
def test_single_sequence(pair, t):
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(t)
    ids = _ids(g, 1, t)
    out = wrapped(ids)
    assert out.logits.shape == (1, t, VOCAB)
    err = rel_err(out.logits[0], ref_logits(ref, ids[0]))
    assert err <= RTOL, f"{family} T={t}: relative error {err:.3g}"


def test_packed_sequences(pair):
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 1, 12]
    ids = _ids(g, sum(lens))
    pos = torch.cat([torch.arange(n) for n in lens])
    out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    expect, start = [], 0
    for n in lens:
        expect.append(ref_logits(ref, ids[start:start + n]))
        start += n
    err = rel_err(out, torch.cat(expect))
    assert err <= RTOL, f"{family} packed: relative error {err:.3g}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(pair, side):
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(2)
    b, s = 3, 11
    lens = [11, 6, 2]
    ids = _ids(g, b, s)
    mask = padding_mask(lens, s, side)
    out = wrapped(ids, attention_mask=mask).logits
    assert out.shape == (b, s, VOCAB)
    keep = mask.bool()
    assert torch.all(out[~keep] == 0), "pad positions must be exactly zero"
    # Each row's real tokens alone, at the positions the caller's row gives
    # them (arange(S), the transformers default without position_ids).
    # Llama-4's own code scales NoPE queries by the row index, not the
    # position, so a left-padded row alone is not the row of the padded batch:
    # it is checked against the padded batch only (below).
    for i in range(b if family != "llama4" else 0):
        real = keep[i].nonzero().flatten()
        expect = ref_logits(ref, ids[i, real], real)
        err = rel_err(out[i, real], expect)
        assert err <= RTOL, f"{family} {side} padding row {i}: relative error {err:.3g}"
    # The unwrapped model on the same padded batch agrees on real positions.
    with torch.inference_mode():
        full = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
    err = rel_err(out[keep], full[keep])
    assert err <= RTOL, f"{family} {side} padding vs masked reference: relative error {err:.3g}"


def test_positions_that_jump_start_sequences(pair):
    """position_ids [1, T] that jump without restarting at 0: transformers'
    packed-sequence rule starts a sequence at each jump, and so does pcg;
    each piece matches the unwrapped model on it alone."""
    family, ref, wrapped = pair
    if family == "llama4":
        pytest.skip("Llama-4's own NoPE query scale follows the row index, not the position: a sequence "
                    "alone at positions 20.. is not a reference (pcg uses the positions)")
    g = torch.Generator().manual_seed(4)
    ids = _ids(g, 14)
    pos = torch.tensor([0, 1, 2, 3, 4, 20, 21, 22, 23, 24, 25, 3, 4, 5])
    out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    for a, b in ((0, 5), (5, 11), (11, 14)):
        err = rel_err(out[a:b], ref_logits(ref, ids[a:b], pos[a:b]))
        assert err <= RTOL, f"{family} jumping positions, piece [{a}, {b}): relative error {err:.3g}"


def test_repeated_calls_changing_inputs(pair):
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(3)
    for t in (4, 19, 4, 30, 2):
        ids = _ids(g, 1, t)
        err = rel_err(wrapped(ids).logits[0], ref_logits(ref, ids[0]))
        assert err <= RTOL, f"{family} repeated call T={t}: relative error {err:.3g}"


def test_layers_registered(pair):
    family, ref, wrapped = pair
    reg = wrapped.registry
    cfg = ref.config
    assert len(reg.attention_layers) == cfg.num_hidden_layers
    dense = getattr(cfg, "first_k_dense_replace", 0) or 0
    assert len(reg.moe_layers) == cfg.num_hidden_layers - dense
    model = wrapped.model
    assert model.config._attn_implementation == "pcg"
    assert model.config._experts_implementation == "pcg"
    # The experts weights are the module's own tensors (converted once, no second copy).
    for layer in reg.moe_layers:
        m = layer.module
        if family == "dbrx":  # its own parameter names: mlp.w1 holds w13, mlp.v1 is empty
            assert layer.w13 is m.mlp.w1 and layer.w2 is m.mlp.w2 and m.mlp.v1.numel() == 0
        else:
            assert layer.w13 is m.gate_up_proj and layer.w2 is m.down_proj
        e, two_i, h = layer.w13.shape
        assert layer.w2.shape == (e, h, two_i // 2)
    n_ref = sum(p.numel() for p in ref.parameters())
    n_wrapped = sum(p.numel() for p in model.parameters())
    assert n_ref == n_wrapped  # converted in place: no second copy of the experts
    if family == "gpt_oss":
        assert [l.sliding_window for l in reg.attention_layers] == [4, None]
        assert all(l.sinks is not None and l.fallback is not None for l in reg.attention_layers)
        assert all(l.activation == "swigluoai" and l.b13 is not None for l in reg.moe_layers)
    if family == "qwen2_moe":
        assert [l.sliding_window for l in reg.attention_layers] == [5, None]


def test_weights_reused_without_copy():
    model = build("qwen3_moe")
    w2_ptrs = [m.down_proj.data_ptr() for m in model.modules() if hasattr(m, "gate_up_proj")]
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wrapped = pcg.wrap(model)
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    # w2 is already in pcg's layout: the module's own tensor. w13 is re-laid out
    # once (pcg's block rows) and replaces the module's parameter: one copy.
    assert [l.w2.data_ptr() for l in wrapped.registry.moe_layers] == w2_ptrs
    assert all(l.w13 is m.gate_up_proj and l.w2 is m.down_proj
               for l, m in zip(wrapped.registry.moe_layers, experts))
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == nbytes


def test_gpt_oss_weights_converted():
    model = build("gpt_oss")
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    for layer, rm in zip(wrapped.registry.moe_layers,
                         [m for m in ref.modules() if type(m).__name__ == "GptOssExperts"]):
        i = rm.gate_up_proj.shape[-1] // 2
        assert layer.w13_block == pcg.FUSED_W13_BLOCK
        w13 = pcg.deinterleave_w13(layer.w13, layer.w13_block)  # pcg's block rows -> plain
        assert torch.equal(w13[:, :i], rm.gate_up_proj[:, :, 0::2].transpose(1, 2))
        assert torch.equal(w13[:, i:], rm.gate_up_proj[:, :, 1::2].transpose(1, 2))
        assert torch.equal(layer.w2, rm.down_proj.transpose(1, 2))
        assert torch.equal(layer.b13[:, :i], rm.gate_up_proj_bias[:, 0::2])
        assert torch.equal(layer.b2, rm.down_proj_bias)


def test_gpt_oss_clamped_activation():
    """A small swiglu limit makes the clamp of gpt-oss's activation matter."""
    model = build("gpt_oss", seed=5)
    for m in model.modules():
        if type(m).__name__ == "GptOssExperts":
            m.limit = 0.2
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    assert all(l.limit == pytest.approx(0.2) for l in wrapped.registry.moe_layers)
    ids = _ids(torch.Generator().manual_seed(0), 1, 13)
    err = rel_err(wrapped(ids).logits[0], ref_logits(ref, ids[0]))
    assert err <= RTOL


def test_two_wrapped_models_independent():
    a, b = build("qwen3_moe", seed=1), build("gpt_oss", seed=2)
    c = build("qwen3_moe", seed=3)
    refs = [copy.deepcopy(m) for m in (a, b, c)]
    wrapped = [pcg.wrap(m) for m in (a, b, c)]
    g = torch.Generator().manual_seed(4)
    for t in (6, 17, 3):
        for w, r in zip(wrapped, refs):
            ids = _ids(g, 1, t)
            err = rel_err(w(ids).logits[0], ref_logits(r, ids[0]))
            assert err <= RTOL


def test_model_without_experts_is_refused():
    with pytest.raises(TypeError, match="experts interface"):
        pcg.wrap(llama())


def test_plain_module_is_refused():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(TypeError, match="pcg.wrap: model Plain has no attention module"):
        pcg.wrap(Plain())


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4"])
def test_decoder_without_its_head_gives_hidden_states(family):
    """Wrapping the decoder (``model.model``) returns the last hidden states
    [B, S, H], so an engine applies the head only to the rows it samples."""
    lm = build(family)
    ref = copy.deepcopy(lm)
    w = pcg.wrap(lm.model)
    g = torch.Generator().manual_seed(6)
    ids = _ids(g, 2, 9)
    mask = padding_mask([9, 5], 9, "right")
    hidden = w(ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (2, 9, ref.config.hidden_size)
    last = torch.stack([hidden[0, 8], hidden[1, 4]])  # each sequence's last token
    with torch.inference_mode():
        expect = torch.stack([ref_logits(ref, ids[0])[8], ref_logits(ref, ids[1, :5])[4]])
    assert rel_err(lm.lm_head(last), expect) <= RTOL


def test_inputs_embeds_match_unwrapped(pair):
    """inputs_embeds [B, S, H] (a multimodal model's merged embeddings) run
    the split path: one sequence, packed positions and a padded batch."""
    family, ref, wrapped = pair
    g = torch.Generator().manual_seed(7)
    emb = ref.get_input_embeddings()
    ids = _ids(g, 2, 10)
    with torch.inference_mode():
        x = emb(ids) + 0.01 * torch.randn(2, 10, ref.config.hidden_size, generator=g)  # not a table row
        before = wrapped.report().eager_fallbacks.get("not_cuda", 0)
        got = wrapped(inputs_embeds=x[:1]).logits
        assert wrapped.report().eager_fallbacks.get("not_cuda", 0) == before + 1
        assert rel_err(got, ref(inputs_embeds=x[:1], use_cache=False).logits) <= RTOL
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
        got = wrapped(inputs_embeds=x[:1], position_ids=pos).logits[0]
        for a, b in ((0, 4), (4, 10)):
            expect = ref(inputs_embeds=x[:1, a:b], position_ids=pos[:, a:b], use_cache=False).logits[0]
            assert rel_err(got[a:b], expect) <= RTOL, (family, a, b)
        mask = padding_mask([10, 6], 10, "right")
        got = wrapped(inputs_embeds=x, attention_mask=mask).logits
        expect = ref(inputs_embeds=x, attention_mask=mask, use_cache=False).logits
        keep = mask.bool()
        assert rel_err(got[keep], expect[keep]) <= RTOL and torch.all(got[~keep] == 0)
        empty = wrapped(inputs_embeds=x[:1, :0]).logits  # an empty batch, as with token ids
        assert empty.shape == (1, 0, got.shape[-1])


def test_inputs_embeds_bad_calls_raise_clearly():
    model = build("qwen3_moe")
    w = pcg.wrap(model)
    ids = torch.randint(0, VOCAB, (1, 5))
    x = model.get_input_embeddings()(ids).detach()
    with pytest.raises(ValueError, match="exactly one"):
        w(input_ids=ids, inputs_embeds=x)
    with pytest.raises(TypeError, match="floating point"):
        w(inputs_embeds=ids[..., None].expand(1, 5, 64))
    with pytest.raises(ValueError, match="hidden_size=64"):
        w(inputs_embeds=x[..., :-1])
    with pytest.raises(ValueError, match="hidden_size"):
        w(inputs_embeds=x[0])
    with pytest.raises(TypeError, match="embedding dtype torch.float32"):
        w(inputs_embeds=x.double())
    with pytest.raises(RuntimeError, match="not_cuda"):
        w.capture(inputs_embeds=True)
    assert w.report().embeds_buckets == [] and "inputs_embeds graphs" not in str(w.report())
    from pcg.models import MoETransformer
    native = pcg.wrap(MoETransformer().eval(), progress=False)  # pcg.nn models take token ids
    with pytest.raises(NotImplementedError, match=r"pcg\.nn"):
        native(inputs_embeds=torch.zeros(1, 3, 64))


def test_dbrx_state_dict_keeps_the_checkpoint_layout():
    """DBRX's experts are converted in place (mlp.w1 holds pcg's w13, mlp.v1
    is empty): state_dict gives the checkpoint's w1 / v1 / w2 back, and an
    in-place load of a checkpoint lands in pcg's layout."""
    model = build("dbrx")
    ref = copy.deepcopy(model)
    w = pcg.wrap(model)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd_ref)
    other = build("dbrx", seed=3)
    model.load_state_dict(other.state_dict())
    ids = _ids(torch.Generator().manual_seed(8), 1, 13)
    assert rel_err(w(ids).logits[0], ref_logits(other, ids[0])) <= RTOL


def test_non_causal_attention_is_refused_before_any_change():
    model = build("qwen3_moe")
    model.model.layers[1].self_attn.is_causal = False
    w13 = model.model.layers[0].mlp.experts.gate_up_proj.clone()
    with pytest.raises(NotImplementedError, match="is not causal") as err:
        pcg.wrap(model)
    assert "multimodal" not in str(err.value)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, w13)
    assert model.config._attn_implementation != "pcg"


def test_multimodal_encoder_gets_a_hint():
    """A model holding an encoder (non-causal attention) and a language model:
    the error says to wrap the language model alone."""
    class VisionLanguage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = build("qwen3_moe")
            self.vision_tower = copy.deepcopy(self.language_model.model.layers[0].self_attn)
            self.vision_tower.is_causal = False

    with pytest.raises(NotImplementedError, match="vision_tower .* not causal.*language model alone"):
        pcg.wrap(VisionLanguage())


def test_multimodal_convolution_gets_a_hint():
    """An audio encoder's convolution along the sequence: refused, with the
    same hint (a vocoder's too)."""
    for part in ("audio_tower", "code2wav"):
        model = torch.nn.Module()
        model.language_model = build("qwen3_moe")
        model.add_module(part, torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3)))
        with pytest.raises(NotImplementedError,
                           match=f"{part}.0 is a convolution along the sequence.*language model alone"):
            pcg.wrap(model)


def test_unsupported_activation_is_refused():
    model = build("qwen3_moe", hidden_act="relu2")
    with pytest.raises(NotImplementedError, match="relu2"):
        pcg.wrap(model)
    # nothing was switched
    assert model.config._experts_implementation != "pcg"


def test_post_expert_norm_is_refused_before_any_change():
    """transformers' has_post_expert_norm (each expert's output normalised
    before the weighted sum) is not what pcg's fused MoE computes."""
    model = build("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    experts.has_post_expert_norm = True
    w13 = experts.gate_up_proj.clone()
    with pytest.raises(NotImplementedError, match="has_post_expert_norm"):
        pcg.wrap(model)
    assert torch.equal(experts.gate_up_proj, w13)
    assert model.config._experts_implementation != "pcg"


def _with_gate(model, gate):
    """Every experts module of ``model`` computes its gated activation with
    ``gate(self, gate_up)`` (a subclass per module class, as a family's own
    ``_apply_gate``)."""
    for layer in model.model.layers:
        m = layer.mlp.experts
        m.__class__ = type(type(m).__name__, (type(m),), {"_apply_gate": gate})
    return model


def _silu_by_hand(self, gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def _clamped_swiglu(self, gate_up):  # MiniMax-M3's: gpt-oss's on concatenated halves
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=self.swiglu_limit)
    up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
    return (up + 1.0) * gate * torch.sigmoid(gate * self.swiglu_alpha)


def _relu_gate(self, gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.relu(gate) * up


@pytest.mark.parametrize("gate,want", [(_silu_by_hand, ("silu", None, None)),
                                       (_clamped_swiglu, ("swigluoai", 1.3, 2.5))])
def test_custom_gate_is_probed(gate, want):
    """A family's own _apply_gate that computes one of pcg's activations runs
    on pcg's kernels (found by probing it); the output is the unwrapped one."""
    model = _with_gate(build("qwen3_moe"), gate)
    for layer in model.model.layers:
        layer.mlp.experts.swiglu_alpha, layer.mlp.experts.swiglu_limit = 1.3, 2.5
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    for l in wrapped.registry.moe_layers:
        assert l.activation == want[0]
        if want[1] is not None:
            assert (l.alpha, l.limit) == pytest.approx(want[1:])
    ids = _ids(torch.Generator().manual_seed(10), 1, 12)
    assert rel_err(wrapped(ids).logits[0], ref_logits(ref, ids[0])) <= RTOL


def test_custom_gate_pcg_cannot_run_is_refused():
    model = _with_gate(build("qwen3_moe"), _relu_gate)
    with pytest.raises(NotImplementedError, match="custom gate function"):
        pcg.wrap(model)
    assert model.config._experts_implementation != "pcg"


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu_new"])
def test_tanh_gelu_experts(act):
    model = build("qwen3_moe", hidden_act=act)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    assert all(l.activation == "gelu_tanh" for l in wrapped.registry.moe_layers)
    ids = _ids(torch.Generator().manual_seed(9), 1, 12)
    assert rel_err(wrapped(ids).logits[0], ref_logits(ref, ids[0])) <= RTOL


def test_gelu_experts():
    model = build("olmoe", hidden_act="gelu")
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    assert all(l.activation == "gelu" for l in wrapped.registry.moe_layers)
    ids = _ids(torch.Generator().manual_seed(0), 1, 9)
    assert rel_err(wrapped(ids).logits[0], ref_logits(ref, ids[0])) <= RTOL


def test_calling_switched_model_directly_raises_clearly():
    model = build("mixtral")
    pcg.wrap(model)
    with pytest.raises(RuntimeError, match="outside a pcg-wrapped"):
        with torch.inference_mode():
            model(torch.zeros(1, 3, dtype=torch.long))


def test_no_mask_is_built(monkeypatch):
    """With pcg's attention transformers builds no mask at all (no mask
    function, no packed-sequence detection, which would sync with the host)."""
    import transformers.masking_utils as mu

    def boom(*args, **kwargs):
        raise AssertionError("a mask was built")

    model = build("gpt_oss")
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model)
    g = torch.Generator().manual_seed(0)
    ids = _ids(g, 12)
    pos = torch.cat([torch.arange(5), torch.arange(7)])
    expect = torch.cat([ref_logits(ref, ids[:5]), ref_logits(ref, ids[5:])])
    monkeypatch.setattr(mu, "find_packed_sequence_indices", boom)
    for key in list(mu.AttentionMaskInterface._global_mapping):
        monkeypatch.setitem(mu.AttentionMaskInterface._global_mapping, key, boom)
    out = wrapped(ids[None], position_ids=pos[None]).logits[0]
    assert rel_err(out, expect) <= RTOL


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "llama4", "dbrx"])
def test_same_model_wrapped_twice(family):
    model = build(family)
    ref = copy.deepcopy(model)
    w1 = pcg.wrap(model)
    w2 = pcg.wrap(model)
    g = torch.Generator().manual_seed(0)
    for w in (w1, w2, w1):
        ids = _ids(g, 1, 10)
        assert rel_err(w(ids).logits[0], ref_logits(ref, ids[0])) <= RTOL
