"""pcg.unwrap / WrappedModel.unwrap: the model's own implementations back
(generate, KV cache); attributes the wrapper lacks come from the model."""
from __future__ import annotations

import copy

import pytest
import torch

import pcg
from hf_models import VOCAB, build


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4", "dbrx"])
def test_unwrap_restores_the_model(family):
    model = build(family)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    w = pcg.wrap(model, progress=False)
    torch.testing.assert_close(w(ids).logits, _logits(ref, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="outside a pcg-wrapped model's forward"):
        model(ids)  # switched to pcg's implementations while wrapped
    back = pcg.unwrap(w)
    assert back is model
    # The model's own code again (its experts read pcg's weight layout), cache and generate included.
    torch.testing.assert_close(_logits(back, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    gen = back.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, ref.generate(ids, max_new_tokens=4, do_sample=False))
    with pytest.raises(RuntimeError, match="unwrapped"):
        w(ids)
    with pytest.raises(RuntimeError, match="unwrapped"):
        w.report()
    # Wrapping again works, and the retired wrapper's unwrap leaves the new wrap alone.
    w2 = pcg.wrap(back, progress=False)
    assert w.unwrap() is model
    torch.testing.assert_close(w2(ids).logits, _logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_unwrap_retires_every_wrapper_and_restores_the_original():
    model = build("qwen3_moe")
    ref = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    w1 = pcg.wrap(model, progress=False)
    w2 = pcg.wrap(model, progress=False)  # the same model wrapped twice
    w1(ids)
    back = w2.unwrap()
    for w in (w1, w2):
        with pytest.raises(RuntimeError, match="unwrapped"):
            w(ids)
    # The implementations from before the first wrap, not the first wrap's "pcg".
    assert back.config._attn_implementation != "pcg"
    torch.testing.assert_close(_logits(back, ids[:1]), _logits(ref, ids[:1]), rtol=1e-5, atol=1e-5)


def test_wrapper_forwards_attributes_and_refuses_generate():
    model = build("mixtral")
    w = pcg.wrap(model, progress=False)
    assert w.config is model.config
    assert w.get_input_embeddings() is model.get_input_embeddings()
    with pytest.raises(AttributeError):
        w.no_such_attribute
    with pytest.raises(AttributeError):
        w._no_such_private
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(NotImplementedError, match="pcg.unwrap"):
        w.generate(ids, max_new_tokens=2)


def test_unwrap_pcg_nn_model():
    from pcg.models import MoETransformer
    torch.manual_seed(0)
    model = MoETransformer().eval()
    ids = torch.randint(0, 256, (1, 7))
    w = pcg.wrap(model, progress=False)
    want = w(ids)
    back = pcg.unwrap(w)
    assert back is model
    torch.testing.assert_close(back(ids), want, rtol=1e-4, atol=1e-4)  # pcg.nn layers run eagerly
    with pytest.raises(RuntimeError, match="unwrapped"):
        w(ids)


@pytest.mark.parametrize("kind", ["qwen3_moe", "pcg_nn"])
def test_load_state_dict_assign_is_refused_while_wrapped(kind):
    """assign=True would hand the model new tensors while the captured graphs
    keep reading the old ones: refused, nothing replaced; in-place loads work;
    after unwrap the guard is gone."""
    if kind == "pcg_nn":
        from pcg.models import MoETransformer
        torch.manual_seed(0)
        model, vocab = MoETransformer().eval(), 256
    else:
        model, vocab = build(kind), VOCAB
    ids = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(2))
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = other.state_dict  # fresh dicts: torch records assign=True in a dict's _metadata for good
    w = pcg.wrap(model, progress=False)
    w2 = pcg.wrap(model, progress=False)  # a second wrapper: one guard for the model
    assert _assign_guards(model) == 1
    before = [p.data_ptr() for p in model.parameters()]
    out = w(ids)
    for target, state in ((model, sd()), (w, {f"model.{k}": v for k, v in sd().items()})):
        with pytest.raises(RuntimeError, match="assign=True"):
            target.load_state_dict(state, assign=True)
    assert [p.data_ptr() for p in model.parameters()] == before
    torch.testing.assert_close(w(ids), out, rtol=0, atol=0)
    model.load_state_dict(sd())  # in place: the wrapper runs the new weights
    assert [p.data_ptr() for p in model.parameters()] == before
    want = other(ids)
    got = w(ids)
    if kind != "pcg_nn":
        want, got = want.logits, got.logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    del w2
    back = pcg.unwrap(w)
    assert _assign_guards(back) == 0
    back.load_state_dict(sd(), assign=True)  # the guard went with the wrap


def _assign_guards(model):
    import sys
    guard = sys.modules["pcg.wrap"]._refuse_assign
    return sum(getattr(h, "hook", h) is guard for h in model._load_state_dict_pre_hooks.values())


def test_unwrap_type_error():
    with pytest.raises(TypeError, match="pcg.unwrap: expected the model pcg.wrap returned"):
        pcg.unwrap(torch.nn.Linear(2, 2))


def test_wrapped_model_stays_picklable(tmp_path):
    model = build("qwen3_moe")
    w = pcg.wrap(model, progress=False)
    torch.save(model, tmp_path / "m.pt")  # pcg keeps no unpicklable state on the model
    pcg.unwrap(w)
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(back) is type(model)


def test_wrapped_hybrid_model_stays_picklable(tmp_path):
    """A hybrid model's mixers carry pcg's forward while wrapped: it pickles, and
    the loaded model runs its own forward (outside pcg) to the same logits."""
    from hf_models import build_auto
    from test_hf_more import _family
    model = build_auto(_family("qwen3_next"))
    ref = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    w = pcg.wrap(model, progress=False)
    assert any("_pcg_orig_forward" in m.__dict__ for m in model.modules())
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    mixers = [m for m in back.modules() if "_pcg_orig_forward" in m.__dict__]
    assert mixers
    x = torch.randn(1, 5, back.config.hidden_size)
    for m in mixers:  # outside a wrapped forward: the module's own code
        torch.testing.assert_close(m(x), type(m).forward(m, x))
    torch.testing.assert_close(w(ids).logits, _logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_unwrap_hybrid_and_compiled():
    """A hybrid model (mixers' forwards patched) and a compile-mode wrap."""
    from hf_models import build_auto
    from test_hf_more import _family
    for model, kw in ((build_auto(_family("qwen3_next")), {}), (build("deepseek_v3"), {"compiler": "eager"})):
        ref = copy.deepcopy(model)
        ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
        w = pcg.wrap(model, progress=False, **kw)
        torch.testing.assert_close(w(ids).logits, _logits(ref, ids), rtol=1e-4, atol=1e-4)
        back = pcg.unwrap(w)
        assert not any("_pcg_orig_forward" in m.__dict__ for m in back.modules())
        torch.testing.assert_close(_logits(back, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
        gen = back.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(gen, ref.generate(ids, max_new_tokens=3, do_sample=False))


def _wrap_capture_unwrap(model, ids, ref_logits):
    """One wrap -> capture -> call -> unwrap cycle; the engine must be garbage after it."""
    import gc
    import weakref
    w = pcg.wrap(model, buckets=[8, 16, 32], progress=False).capture()
    torch.testing.assert_close(w(ids).logits, ref_logits, rtol=1e-3, atol=1e-3)
    engine = weakref.ref(w.engine())
    back = pcg.unwrap(w)
    del w
    gc.collect()
    torch.cuda.synchronize()
    assert engine() is None, "the unwrapped wrapper's engine (its graphs, their pool) is still alive"
    return back


@pytest.mark.gpu
def test_unwrap_on_cuda_frees_the_graphs():
    """Captured on the GPU (fp32), unwrapped: the engine and its graphs are
    freed, a second cycle keeps no memory (torch's per-stream caches, e.g. the
    cuBLAS workspace of the capture stream, are paid once per process), and the
    model generates with its own code."""
    model = build("qwen3_moe", device="cuda")
    ref = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4)).cuda()
    ref_logits = _logits(ref, ids)
    back = _wrap_capture_unwrap(model, ids, ref_logits)
    first = torch.cuda.memory_allocated()
    back = _wrap_capture_unwrap(back, ids, ref_logits)
    second = torch.cuda.memory_allocated()
    assert second - first < (1 << 20), (first, second)
    torch.testing.assert_close(_logits(back, ids), ref_logits, rtol=1e-5, atol=1e-5)
    gen = back.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, ref.generate(ids, max_new_tokens=3, do_sample=False))
