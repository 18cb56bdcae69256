"""Diagnoses the whole-graph baseline error seen in the last bench/e2e.py run
(3.25e-1 vs eager while pcg was 1.39e-2): per T, the whole graph vs eager
before pcg captures, after, and after alternating with pcg replays; flash
captured alone vs eager; the whole graph with attention through Python SDPA."""
import os
import sys

import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pcg
from e2e import whole_graph_step
from pcg.models import qwen3_moe_model
from pcg.timing import rel_err as rel

ts = [1, 2, 16, 256, 2048]
model = qwen3_moe_model(8, dtype=torch.bfloat16, device="cuda")
ids = {t: torch.randint(0, model.config.vocab_size, (1, t), device="cuda") for t in ts}
with torch.inference_mode():
    ref = {t: model(input_ids=ids[t], use_cache=False).logits.float() for t in ts}
w = pcg.wrap(model, max_tokens=max(ts), progress=False)
with torch.inference_mode():
    split = {t: w.engine().eager(ids[t][0], None, [0, t]).logits.float() for t in ts}
for t in ts:
    s = whole_graph_step(w, ids[t])
    a = rel(s()[0], ref[t][0]); del s
    print(f"T={t}: before capture: whole vs eager {a:.3g}; pcg eager split vs eager {rel(split[t], ref[t]):.3g}", flush=True)
w.capture()
for t in ts:
    s = whole_graph_step(w, ids[t])
    a = rel(s()[0], ref[t][0])
    for _ in range(3):
        p = w(input_ids=ids[t]).logits
        s()
    b = rel(s()[0], ref[t][0])
    c = rel(p, ref[t])
    print(f"T={t}: after capture: whole {a:.3g}, after alternating {b:.3g}; pcg {c:.3g}", flush=True)
    del s

# flash inside a capture vs eager, alone
from pcg.batch import BatchMeta
for t in (2, 256, 2048):
    q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, 4, 128, device="cuda", dtype=torch.bfloat16)
    o1, o2 = torch.empty_like(q), torch.empty_like(q)
    meta = BatchMeta(t, [0, t], None, t).host_meta()
    torch.ops.pcg.causal_attention_out(q, k, v, o1, meta)
    g = torch.cuda.CUDAGraph()
    st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        torch.ops.pcg.causal_attention_out(q, k, v, o2, meta)
    torch.cuda.current_stream().wait_stream(st)
    with torch.cuda.graph(g):
        torch.ops.pcg.causal_attention_out(q, k, v, o2, meta)
    o2.zero_(); g.replay(); torch.cuda.synchronize()
    print(f"flash captured vs eager T={t}: {rel(o2, o1):.3g}", flush=True)

# the whole graph with attention through Python SDPA (the old path)
from pcg.attention import _sdpa
def py_impl(q, k, v, out, batch, layer):
    out[:] = _sdpa(q, k, v, layer)
for L in w.registry.attention_layers:
    L.impl = py_impl
for t in ts:
    s = whole_graph_step(w, ids[t])
    print(f"T={t}: whole with python SDPA: {rel(s()[0], ref[t][0]):.3g}", flush=True)
    del s
