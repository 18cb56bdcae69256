"""Compile mode (pcg.wrap(model, compiler=...)) on CPU, fp32: the traced,
split graph (FX pieces, or inductor-compiled pieces) gives the unwrapped
model's outputs at many token counts (one symbolic trace), for [1, T], packed
and padded [B, S] inputs; the split is at the right places; calls the graph
cannot take run the model's own forward and are counted; the inductor cache
makes a second start faster.

Inductor compiles C++ on CPU, so its set is small (qwen3_moe, deepseek_v3,
MoETransformer); the other families' inductor runs are marked slow.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import pcg
from pcg.compile import CompiledForward, compile_forward
from pcg.models import MoETransformer, MoETransformerConfig

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import FAMILIES, VOCAB, build  # noqa: E402
from split_recorder import SplitRecorder  # noqa: E402

RTOL = 1e-4
INDUCTOR_FAST = ("moe", "qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="module", autouse=True)
def _cache_dir():
    """A fresh pcg cache for this module (no stale artifacts, honest timings)."""
    old = os.environ.get("PCG_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="pcg-cache-") as d:
        os.environ["PCG_CACHE_DIR"] = d
        yield d
        if old is None:
            os.environ.pop("PCG_CACHE_DIR", None)
        else:
            os.environ["PCG_CACHE_DIR"] = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _build(name: str) -> torch.nn.Module:
    if name == "moe":
        torch.manual_seed(0)
        return MoETransformer().eval()
    return build(name)


def _vocab(name: str) -> int:
    return MoETransformerConfig().vocab_size if name == "moe" else VOCAB


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.inference_mode()
def ref_logits(name: str, ref, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The unwrapped model on one sequence ids [T] -> [T, V]."""
    pos = positions[None] if positions is not None else torch.arange(ids.shape[0])[None]
    if name == "moe":
        return ref(ids[None], pos)[0]
    return ref(input_ids=ids[None], position_ids=pos, use_cache=False).logits[0]


_CASES = [pytest.param((name, "eager"), id=f"{name}-eager") for name in ["moe", *FAMILIES]]
_CASES += [pytest.param((name, "inductor"), id=f"{name}-inductor",
                        marks=() if name in INDUCTOR_FAST else pytest.mark.slow)
           for name in ["moe", *FAMILIES]]


@pytest.fixture(scope="module", params=_CASES)
def case(request):
    """(name, compiler, reference model, wrapped model)."""
    name, compiler = request.param
    model = _build(name)
    ref = copy.deepcopy(model)
    # debug=True: compiled pieces are checked against their eager FX versions.
    wrapped = pcg.wrap(model, compiler=compiler, debug=compiler == "inductor", progress=False)
    return name, compiler, ref, wrapped


def _fn(wrapped) -> CompiledForward:
    fn = wrapped._forward_fn
    assert isinstance(fn, CompiledForward)
    return fn


def _no_fallbacks(wrapped):
    fn = _fn(wrapped)
    assert fn.trace_error is None, fn.trace_error
    assert fn.stats["compile_fallbacks"] == {}, fn.stats["compile_fallbacks"]
    assert wrapped.report().compile_fallbacks == {}


@torch.inference_mode()
def test_single_sequence_many_lengths(case):
    """[1, T] at several T: one trace serves them all (dynamic token dim), T=1 included."""
    name, compiler, ref, wrapped = case
    g = torch.Generator().manual_seed(0)
    for t in (7, 2, 33, 1, 12, 64):
        ids = torch.randint(0, VOCAB, (1, t), generator=g)
        out = _logits(wrapped(ids))
        assert out.shape == (1, t, _vocab(name))
        err = rel_err(out[0], ref_logits(name, ref, ids[0]))
        assert err <= RTOL, f"{name}/{compiler} T={t}: relative error {err:.3g}"
    _no_fallbacks(wrapped)
    fn = _fn(wrapped)
    assert fn.stats["startup"]["pieces"] >= 2
    if compiler == "inductor":
        assert fn.stats["checks"] > 0 and fn.stats["check_max_rel_err"] <= RTOL
        if name in INDUCTOR_FAST:  # elsewhere inductor may fail on a piece: it stays eager, reported
            assert not fn.stats["startup"]["piece_compile_failures"]


@torch.inference_mode()
def test_packed_sequences(case):
    name, compiler, ref, wrapped = case
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 1, 12]
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    out = _logits(wrapped(ids[None], position_ids=pos[None]))[0]
    expect, start = [], 0
    for n in lens:
        expect.append(ref_logits(name, ref, ids[start:start + n]))
        start += n
    err = rel_err(out, torch.cat(expect))
    assert err <= RTOL, f"{name}/{compiler} packed: relative error {err:.3g}"
    _no_fallbacks(wrapped)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.inference_mode()
def test_padded_batch(case, side):
    name, compiler, ref, wrapped = case
    g = torch.Generator().manual_seed(2)
    b, s = 3, 11
    lens = [11, 6, 2]
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lens):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, s - n:] = 1
    out = _logits(wrapped(ids, attention_mask=mask))
    assert out.shape == (b, s, _vocab(name))
    padded = None
    if name == "llama4":  # its NoPE query scale follows the row index: the padded batch is the reference
        with torch.inference_mode():
            padded = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
    for i, n in enumerate(lens):
        rows = mask[i].bool()
        # real tokens at the positions the caller's row gives them (arange(S))
        expect = ref_logits(name, ref, ids[i][rows], rows.nonzero().flatten()) if padded is None \
            else padded[i][rows]
        err = rel_err(out[i][rows], expect)
        assert err <= RTOL, f"{name}/{compiler} padded {side} row {i}: relative error {err:.3g}"
        assert torch.all(out[i][~rows] == 0)
    _no_fallbacks(wrapped)


@torch.inference_mode()
def test_inputs_embeds(case):
    """inputs_embeds get their own trace (a trace is specialised to its input):
    one sequence at several lengths, and a padded batch, against the unwrapped
    model; no call runs uncompiled, and the token trace is untouched."""
    name, compiler, ref, wrapped = case
    if name == "moe":
        pytest.skip("pcg.nn models take token ids")
    g = torch.Generator().manual_seed(3)
    emb = ref.get_input_embeddings()
    wrapped(torch.randint(0, VOCAB, (1, 5), generator=g))  # the token trace exists first
    token_pieces = _fn(wrapped).stats["pieces"]
    for t in (9, 1, 30):
        x = emb(torch.randint(0, VOCAB, (1, t), generator=g))
        err = rel_err(_logits(wrapped(inputs_embeds=x)), ref(inputs_embeds=x, use_cache=False).logits)
        assert err <= RTOL, f"{name}/{compiler} inputs_embeds T={t}: relative error {err:.3g}"
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    got = _logits(wrapped(inputs_embeds=emb(ids), attention_mask=mask))
    expect = ref(inputs_embeds=emb(ids), attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    err = rel_err(got[keep], expect[keep])
    assert err <= RTOL and torch.all(got[~keep] == 0), f"{name}/{compiler} inputs_embeds padded: {err:.3g}"
    efn = wrapped._embeds_fn
    assert isinstance(efn, CompiledForward) and efn is not _fn(wrapped)
    assert efn.trace_error is None and efn.stats["compile_fallbacks"] == {}, efn.stats
    assert efn.stats["pieces"] == token_pieces  # the same split, traced on embeddings
    _no_fallbacks(wrapped)


# ---- structure ------------------------------------------------------------------------

def _moe_model(layers: int = 2):
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(num_layers=layers)).eval()


@torch.inference_mode()
def test_split_counts_moetransformer():
    """2 layers: piece, attention, piece, attention, piece."""
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler="eager", progress=False)
    ids = torch.randint(0, 256, (1, 9))
    out = wrapped(ids)
    assert rel_err(out, ref(ids)) <= RTOL
    fn = _fn(wrapped)
    assert fn.num_pieces == 3 and fn.num_splits == 2
    assert fn.stats["split_kinds"] == {"attention": 2}
    from pcg.compile import compile_stats
    assert compile_stats(wrapped) is fn.stats
    assert compile_stats(pcg.wrap(_moe_model(1), progress=False)) is None
    tr = fn.traced
    mods = [n for n in tr.split_gm.graph.nodes if n.op == "call_module"]
    kinds = ["split" if n.target in tr.splits else "piece" for n in mods]
    assert kinds == ["piece", "split", "piece", "split", "piece"]
    # each split submodule holds exactly the one op
    for name in tr.splits:
        calls = [n for n in getattr(tr.split_gm, name).graph.nodes if n.op == "call_function"]
        assert len(calls) == 1 and "pcg.attention" in str(calls[0].target)
    # no pcg::attention left inside the pieces; pcg::moe stays inside (not split)
    for name in tr.pieces:
        targets = [str(n.target) for n in getattr(tr.split_gm, name).graph.nodes]
        assert not any("pcg.attention" in t for t in targets)
    assert sum(any("pcg.moe" in str(n.target) for n in getattr(tr.split_gm, p).graph.nodes)
               for p in tr.pieces) == 2


@torch.inference_mode()
def test_split_counts_with_split_moe():
    """MoE layers marked split (an EP mode that cannot be captured) are split ops too."""
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler="eager", progress=False)
    for layer in wrapped.registry.moe_layers:
        layer.split, layer.split_reason = True, "test"
    ids = torch.randint(0, 256, (1, 9))
    assert rel_err(wrapped(ids), ref(ids)) <= RTOL
    fn = _fn(wrapped)
    assert fn.num_pieces == 5 and fn.num_splits == 4
    assert fn.stats["split_kinds"] == {"attention": 2, "moe": 2}
    tr = fn.traced
    mods = [n.target for n in tr.split_gm.graph.nodes if n.op == "call_module"]
    assert [tr.splits.get(m, "piece") for m in mods] == [
        "piece", "attention", "piece", "moe", "piece", "attention", "piece", "moe", "piece"]


@torch.inference_mode()
def test_split_counts_hf():
    """qwen3_moe (2 layers): 3 pieces, 2 attention splits; deepseek_v3 (3 layers): 4 and 3."""
    for family, pieces, splits in (("qwen3_moe", 3, 2), ("deepseek_v3", 4, 3)):
        wrapped = pcg.wrap(build(family), compiler="eager", progress=False)
        wrapped(torch.randint(0, VOCAB, (1, 5)))
        fn = _fn(wrapped)
        assert (fn.num_pieces, fn.num_splits) == (pieces, splits), family


# ---- fallbacks -------------------------------------------------------------------------

@torch.inference_mode()
def test_fallback_run_error_counted():
    """The traced graph raising (outside a capture) runs the model's own forward."""
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler="eager", progress=False)
    ids = torch.randint(0, 256, (1, 6))
    wrapped(ids)
    fn = _fn(wrapped)

    def boom(*args):
        raise RuntimeError("forced failure")
    fn.traced.split_gm.__dict__["forward"] = boom
    out = wrapped(ids)
    assert rel_err(out, ref(ids)) <= RTOL
    assert fn.stats["compile_fallbacks"] == {"run_error:RuntimeError": 1}
    rep = wrapped.report()
    assert rep.compile_fallbacks == {"run_error:RuntimeError": 1}
    assert "compile fallbacks" in str(rep)


@torch.inference_mode()
def test_fallback_trace_failure_counted():
    """A forward dynamo cannot trace as one graph: every call runs it eagerly, counted."""
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    from pcg import nn as pcg_nn
    registry, forward_fn = pcg_nn.prepare(model)

    def breaking_forward(ids, positions):
        torch._dynamo.graph_break()
        return forward_fn(ids, positions)

    fn = compile_forward(breaking_forward, registry, "eager")
    from pcg.batch import BatchMeta
    from pcg.registry import RunContext, running
    for t in (4, 7):
        ids, pos = torch.randint(0, 256, (t,)), torch.arange(t)
        with pytest.warns(UserWarning, match="tracing the forward failed") if t == 4 else _null():
            with running(RunContext(registry, BatchMeta(t, [0, t], pos, t), None)):
                out = fn(ids, pos)
        assert rel_err(out, ref(ids[None], pos[None])) <= RTOL
    assert fn.traced is None and fn.trace_error
    assert fn.stats["compile_fallbacks"] == {"trace_failed": 2}


@torch.inference_mode()
def test_warmup_after_a_failed_trace_reports_it():
    """warmup() / compile_stats after a failed trace: the startup stats say
    why (trace_error), with no pieces, instead of missing keys."""
    from pcg.compile import compile_stats, warmup
    wrapped = pcg.wrap(_moe_model(2), compiler="eager", max_tokens=8, progress=False)
    fn = _fn(wrapped)
    real = fn.forward_fn

    def breaking_forward(ids, positions):
        torch._dynamo.graph_break()
        return real(ids, positions)
    fn.forward_fn = breaking_forward
    with pytest.warns(UserWarning, match="tracing the forward failed"):
        st = warmup(wrapped)
    assert fn.traced is None and st["trace_error"] == fn.trace_error
    assert st["pieces"] == 0 and st["splits"] == 0 and fn.num_pieces == 0
    assert warmup(wrapped) is st and compile_stats(wrapped)["startup"] is st
    assert fn.stats["compile_fallbacks"] == {"trace_failed": 1}


@torch.inference_mode()
def test_trace_reads_the_running_context_without_contextvar_get():
    """Dynamo < 2.12 cannot trace ContextVar.get (the layers' _RUNNING.get()):
    during the trace registry._RUNNING is a plain stand-in returning the
    running context, and the ContextVar is back afterwards."""
    import contextvars

    from pcg import registry as reg
    from pcg.compile import _running_for_trace, _TraceRunning, warmup
    var = reg._RUNNING
    wrapped = pcg.wrap(_moe_model(2), compiler="eager", max_tokens=8, progress=False)
    fn = _fn(wrapped)
    seen = []
    real = fn.forward_fn

    def forward(ids, positions):
        seen.append(type(reg._RUNNING))
        return real(ids, positions)
    fn.forward_fn = forward
    st = warmup(wrapped)
    assert st["trace_error"] is None and st["pieces"] == 3
    assert seen and all(t is _TraceRunning for t in seen), seen
    assert reg._RUNNING is var and isinstance(var, contextvars.ContextVar)
    # the stand-in: get() under dynamo -> the context it was made in; outside
    # dynamo get() and set/reset use the ContextVar (other threads see theirs)
    ctx = reg.RunContext(wrapped.registry)
    with reg.running(ctx), _running_for_trace():
        stand_in = reg._RUNNING
        assert isinstance(stand_in, _TraceRunning) and stand_in.get() is ctx
        assert reg.current() is ctx
        token = stand_in.set(None)
        assert var.get() is None and stand_in.get() is None
        stand_in.reset(token)
        assert var.get() is ctx
        import threading
        other = []
        th = threading.Thread(target=lambda: other.append(reg._RUNNING.get()))
        th.start()
        th.join()
        assert other == [None]
    assert reg._RUNNING is var and var.get() is None
    with _running_for_trace():
        assert reg._RUNNING.get() is None and reg._RUNNING.get("d") == "d"
    assert reg._RUNNING is var


@torch.inference_mode()
def test_fallback_shape_guard_counted():
    """A call whose shapes fail the trace's shape guards runs the model's forward."""
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler="eager", progress=False)
    wrapped(torch.randint(0, 256, (1, 6)))
    fn = _fn(wrapped)
    assert fn.traced.accepts(torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long))
    # int32 ids were not traced: guarded by pcg, the forward runs the original code.
    ids = torch.randint(0, 256, (8,))
    from pcg.batch import BatchMeta
    from pcg.registry import RunContext, running
    with running(RunContext(wrapped.registry, BatchMeta(8, [0, 8], torch.arange(8), 8), None)):
        out = fn(ids.to(torch.int32), torch.arange(8))
    assert rel_err(out, ref(ids[None])) <= RTOL
    assert fn.stats["compile_fallbacks"] == {"guard": 1}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_bad_compiler():
    with pytest.raises(ValueError, match="compiler"):
        pcg.wrap(_moe_model(1), compiler="tvm")


# ---- cache --------------------------------------------------------------------------------

def test_cache_key_and_atomic_manifest(tmp_path, monkeypatch):
    from pcg import compile_cache as cc
    monkeypatch.setenv("PCG_CACHE_DIR", str(tmp_path))
    parts = {"graph": "x", "torch": torch.__version__, "rank": 0}
    assert cc.make_key(parts) == cc.make_key(dict(parts))
    assert cc.make_key(parts) != cc.make_key(dict(parts, rank=1))
    key = cc.make_key(parts)
    m = cc.record_start(key, parts, {"total_seconds": 1.0})
    m = cc.record_start(key, parts, {"total_seconds": 0.5})
    assert [s["total_seconds"] for s in m["starts"]] == [1.0, 0.5]
    d = cc.entry_dir(key)
    assert d.startswith(str(tmp_path))
    assert sorted(os.listdir(d)) == ["pcg.json"]  # no temp files left behind
    with cc.inductor_cache_dir(key) as path:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == path
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != path


_STARTUP_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[2])
import torch, pcg
from pcg.models import MoETransformer
name = sys.argv[1]
torch.manual_seed(0)
if name == "moe":
    model = MoETransformer().eval()
else:
    from hf_models import build
    model = build(name)
wrapped = pcg.wrap(model, compiler="inductor", progress=False)
t1 = time.perf_counter()
with torch.inference_mode():
    out = wrapped(torch.arange(9)[None] % 100)
t2 = time.perf_counter()
out = out if isinstance(out, torch.Tensor) else out.logits
info = dict(wrapped._forward_fn.stats["startup"], first_call_seconds=t2 - t1,
            import_and_build_seconds=t1 - t0, checksum=float(out.double().sum()))
print("PCG_STARTUP " + json.dumps(info))
"""


def _start(cache: str, name: str) -> dict:
    env = dict(os.environ, PCG_CACHE_DIR=cache)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    res = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, name, os.path.dirname(__file__)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PCG_STARTUP ")][-1]
    return json.loads(line[len("PCG_STARTUP "):])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe", "qwen3_moe"])
def test_startup_time_with_cache(tmp_path, name):
    """Two process starts on one pcg cache: the second compiles from inductor's
    cached artifacts (FX graph cache hits), and is faster."""
    cold = _start(str(tmp_path), name)
    warm = _start(str(tmp_path), name)
    print(f"\n{name}: cold start: {cold['first_call_seconds']:.2f} s first call "
          f"(trace {cold['trace_seconds']:.2f}, compile {cold['compile_seconds']:.2f}); "
          f"warm start: {warm['first_call_seconds']:.2f} s (trace {warm['trace_seconds']:.2f}, "
          f"compile {warm['compile_seconds']:.2f}); cache {warm['inductor_cache']}")
    assert cold["cache_key"] == warm["cache_key"]
    assert not cold["cache_warm"] and warm["cache_warm"]
    assert warm["inductor_cache"].get("fxgraph_cache_hit", 0) == warm["pieces"]
    assert warm["compile_seconds"] < cold["compile_seconds"]
    assert warm["checksum"] == cold["checksum"]
    manifest = json.load(open(os.path.join(warm["cache_dir"], "pcg.json")))
    assert len(manifest["starts"]) == 2


@torch.inference_mode()
def test_piece_that_specialises_stays_eager(monkeypatch):
    """A piece whose inductor compile turns the token count into a constant is
    left as FX and the trace redone (simulated: the check reports a
    specialisation right after the first piece's compile, once)."""
    from pcg import compile as pc
    calls = {"n": 0}
    real = pc._Traced._specialized

    def fake(self):
        calls["n"] += 1
        return True if calls["n"] == 2 else real(self)  # 1: after fake propagation; 2: piece 0
    monkeypatch.setattr(pc._Traced, "_specialized", fake)
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler="inductor", progress=False)
    for t in (5, 9):
        ids = torch.randint(0, 256, (1, t))
        assert rel_err(wrapped(ids), ref(ids)) <= RTOL
    fn = _fn(wrapped)
    st = fn.stats["startup"]
    assert st["attempts"] == 2 and st["eager_pieces"] == ["submod_0"], st
    assert fn.stats["compile_fallbacks"] == {}
    assert not isinstance(fn.traced.split_gm.__dict__.get("submod_0"), type(lambda: 0))
    assert "submod_0" not in fn.traced.split_gm.__dict__  # the FX piece itself
    assert "submod_2" in fn.traced.split_gm.__dict__  # compiled


@torch.inference_mode()
def test_warmup_before_first_call():
    from pcg.compile import warmup
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler="eager", max_tokens=32, progress=False)
    st = warmup(wrapped)
    assert st["pieces"] == 3 and st["total_seconds"] > 0
    tr = _fn(wrapped).traced
    assert warmup(wrapped) is st  # traced once
    ids = torch.randint(0, 256, (1, 11))
    assert rel_err(wrapped(ids), ref(ids)) <= RTOL
    assert _fn(wrapped).traced is tr and _fn(wrapped).stats["compile_fallbacks"] == {}
    assert warmup(pcg.wrap(_moe_model(1), progress=False)) is None


def _meta_buffer(n):
    """The static attention-metadata buffer a capture engine owns (recorded calls read it)."""
    return torch.zeros(4 + n + 1, dtype=torch.int64)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@torch.inference_mode()
def test_split_ops_reach_the_recorder_inside_a_capture(compiler):
    """Inside a capture session (a recorder in the running context) the split
    graph's split ops go to the recorder, one call per split op, pieces run
    around them (no debug comparisons inside), a one-token bucket included."""
    from pcg.batch import BatchMeta
    from pcg.compile import warmup
    from pcg.registry import RunContext, running
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler=compiler, debug=True, max_tokens=16, progress=False)
    warmup(wrapped)  # as the engine's eager warm-up: traced outside the capture
    fn = _fn(wrapped)
    checks = fn.stats["checks"]
    for n in (16, 8, 1):
        rec = SplitRecorder()
        ids = torch.randint(0, 256, (n,))
        pos = torch.arange(n)
        ctx = RunContext(wrapped.registry, BatchMeta(n, [0, n], pos, n, meta=_meta_buffer(n)),
                         torch.tensor([n], dtype=torch.int32), rec)
        with running(ctx):
            out = fn(ids, pos)
        assert rec.calls == ["pcg::causal_attention_out"] * fn.num_splits
        assert out.shape == (1, n, 256)
        assert rel_err(out, ref(ids[None], pos[None])) <= RTOL
    assert fn.stats["checks"] == checks  # no checks inside captures
    assert fn.stats["compile_fallbacks"] == {}


@torch.inference_mode()
def test_first_call_inside_a_capture_falls_back():
    from pcg.batch import BatchMeta
    from pcg.registry import RunContext, running
    model = _moe_model(2)
    ref = copy.deepcopy(model)
    wrapped = pcg.wrap(model, compiler="eager", progress=False)
    fn = _fn(wrapped)
    rec = SplitRecorder()
    ids, pos = torch.randint(0, 256, (6,)), torch.arange(6)
    with running(RunContext(wrapped.registry, BatchMeta(6, [0, 6], pos, 6, meta=_meta_buffer(6)), None, rec)):
        out = fn(ids, pos)
    assert rel_err(out, ref(ids[None])) <= RTOL
    assert fn.stats["compile_fallbacks"] == {"first_call_in_capture": 1}
    assert rec.calls == ["pcg::causal_attention_out"] * 2
