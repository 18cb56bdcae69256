"""pcg::attention: causal attention over the packed variable-length batch of
the running forward. It is a split op: it runs eagerly between graph replays,
so it reads the real per-batch metadata (sequence boundaries) every time.

Standard layers (causal, optional sliding window and scale, GQA) run the C++
op ``pcg::causal_attention_out`` (flash on CUDA bf16/fp16, SDPA otherwise); a
capture records that op itself, so replays never enter Python for attention.
In buckets of at most 64 tokens every sequence is at most 64 tokens long, so
standard CUDA layers there run ``pcg::causal_attention_graph`` inside the
graph instead (the batch is read from device memory the engine rewrites
before each replay): no split at all (default; USE_GRAPH_ATTENTION).
Layers with attention sinks or logit soft-capping go through the model's own
attention function, and a runtime's registered implementation replaces both.
Chunked layers (Llama-4) are standard ones in calls their chunk holds (every
bucket up to the chunk size); longer calls cut every sequence into chunks and
run the C++ op over the pieces.

q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] -> out [N, Hq, Dv] where N is the
padded token count of the bucket; only the first ``batch.num_tokens`` rows are
real and the pad rows of ``out`` are written as zeros.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import registry as _reg
from .batch import BatchMeta
from .registry import AttentionLayer

_lib = torch.library.Library("pcg", "IMPL")

# Packed batches on CUDA share one flash varlen launch when True; False runs
# one launch per sequence (for debugging and accuracy comparisons). Read when
# a batch's metadata is written (each call; at replay by the engine).
USE_VARLEN = True
# CUDA bf16/fp16 batches of short sequences (<= 64 tokens each) run pcg's
# one-launch kernel when True; False keeps them on flash (comparisons). Read
# like USE_VARLEN. Env PCG_SHORT_ATTENTION=0 turns the kernel off in C++.
USE_SHORT_KERNEL = True
# Default on (env PCG_GRAPH_ATTENTION=0 turns it off): standard CUDA layers of
# buckets <= GRAPH_MAX_SEQLEN tokens stay inside the captured graph
# (pcg::causal_attention_graph, the batch read on the device) instead of
# splitting it, so a small bucket replays as one graph. Read at capture.
# Measured (bench/RESULTS.md, session 6): pcg/whole-graph 1.063 / 1.060 /
# 1.055 / 1.048 at T = 1 / 4 / 16 / 64 against 1.140 / 1.107 / 1.084 / 1.081
# for the split in the same run.
USE_GRAPH_ATTENTION = os.environ.get("PCG_GRAPH_ATTENTION", "1") != "0"


def _window_mask(n: int, window: int | None, device: torch.device,
                 chunk: int | None = None) -> torch.Tensor:
    """[n, n] bool, True where query i may attend key j (causal, optional
    window, optional chunks of ``chunk`` tokens)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= (i - j) < window
    if chunk is not None:
        keep &= (i // chunk) == (j // chunk)
    return keep


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
    """One sequence with torch SDPA: q [s, Hq, D] ... -> [s, Hq, Dv]."""
    s = q.shape[0]
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, s, D]
    window = layer.sliding_window if layer.sliding_window is not None and layer.sliding_window < s else None
    chunk = layer.chunk_size if layer.chunk_size is not None and layer.chunk_size < s else None
    if window is not None or chunk is not None:
        mask = _window_mask(s, window, q.device, chunk)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=layer.scaling,
                                           enable_gqa=kh.shape[1] != qh.shape[1])
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=layer.scaling,
                                           enable_gqa=kh.shape[1] != qh.shape[1])
    return o[0].transpose(0, 1)


def _model_fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    layer: AttentionLayer) -> torch.Tensor:
    """One sequence through the model's own attention function, with an
    additive causal (+window) mask, for settings pcg has no native path for."""
    s = q.shape[0]
    keep = _window_mask(s, layer.sliding_window, q.device)
    mask = torch.zeros((1, 1, s, s), dtype=q.dtype, device=q.device)
    mask.masked_fill_(~keep, torch.finfo(q.dtype).min)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    out = layer.fallback(qh, kh, vh, mask)  # [1, s, Hq, Dv]
    return out[0]


def window_left(layer: AttentionLayer) -> int:
    """Keys a query may see to its left (-1: all): q_pos - k_pos < sliding_window."""
    return -1 if layer.sliding_window is None else max(0, layer.sliding_window - 1)


def native(layer: AttentionLayer, rows: int) -> bool:
    """True when the layer runs ``pcg::causal_attention_out`` on the batch's own
    metadata (C++ end to end: a capture records the op itself) for a call of
    ``rows`` tokens. A chunked layer is one when its chunk holds every row (no
    sequence is cut: Llama-4's 8192 against buckets of at most that); longer
    calls run the op on the chunk pieces, from Python (:func:`compute`)."""
    if layer.impl is not None or layer.needs_fallback():
        return False
    return not layer.chunk_size or rows <= layer.chunk_size


def _boundaries(layer: AttentionLayer, batch: BatchMeta) -> list[int]:
    """The pieces causal attention runs over: the sequences, each cut at its
    chunk boundaries for a chunked layer."""
    return batch.chunked_cu_seqlens(layer.chunk_size) if layer.chunk_size else batch.cu_seqlens


def compute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            layer: AttentionLayer, batch: BatchMeta | None) -> None:
    if batch is None:
        batch = BatchMeta(q.shape[0], [0, q.shape[0]], None, q.shape[0])
    if native(layer, q.shape[0]):
        meta = batch.host_meta(USE_VARLEN, USE_SHORT_KERNEL)
        torch.ops.pcg.causal_attention_out(q, k, v, out, meta, layer.scaling, window_left(layer))
        return
    n, cu = batch.num_tokens, _boundaries(layer, batch)
    if layer.impl is not None:  # it reads layer.chunk_size / sliding_window itself
        layer.impl(q[:n], k[:n], v[:n], out[:n], batch, layer)
    elif not layer.needs_fallback():  # chunked: the C++ op over the chunk pieces
        meta = BatchMeta(n, cu, None, batch.padded_tokens).host_meta(USE_VARLEN, USE_SHORT_KERNEL)
        torch.ops.pcg.causal_attention_out(q, k, v, out, meta, layer.scaling, window_left(layer))
        return
    else:
        if layer.fallback is None:
            raise RuntimeError(f"pcg: attention layer {layer.layer_id} ({layer.name}) uses sinks or "
                               "soft-capping but has no fallback attention function")
        for a, b in zip(cu, cu[1:]):
            if b > a:
                out[a:b] = _model_fallback(q[a:b], k[a:b], v[a:b], layer)
    if n < out.shape[0]:
        out[n:].zero_()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"pcg::attention: q, k, v must be [T, heads, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError("pcg::attention: q, k, v must have the same token count")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"pcg::attention: argument 'k' heads ({k.shape[1]}) must divide q heads "
                         f"({q.shape[1]}) and equal v heads ({v.shape[1]})")
    if q.shape[2] != k.shape[2]:
        raise ValueError("pcg::attention: q and k head sizes differ")


def attention_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  layer: int) -> None:
    _check(q, k, v)
    ctx = _reg.current()
    compute(q, k, v, out, ctx.registry.attention(layer), ctx.batch)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    _check(q, k, v)
    ctx = _reg.current()
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    spec = ctx.registry.attention(layer)
    standard = native(spec, q.shape[0])
    if ctx.recorder is not None:
        # Inside a capture: end the segment here, run and record the split call.
        # Standard layers record the C++ op itself (no Python at replay); its
        # batch metadata is the engine's static host tensor, rewritten per replay.
        if standard and ctx.graph_batch is not None:
            try:  # checked before any launch: a refusal leaves the capture as it was
                torch.ops.pcg.causal_attention_graph(q, k, v, out, ctx.graph_batch, spec.scaling,
                                                     window_left(spec))
            except ValueError:
                pass  # tensors the kernel does not take (dtype, head sizes, strides): split
            else:
                ctx.stats["graph_attention"] = ctx.stats.get("graph_attention", 0) + 1
                return out
        if standard:
            if ctx.batch is None or ctx.batch.meta is None:
                raise RuntimeError("pcg: capturing attention needs the capture engine's batch metadata "
                                   "buffer (BatchMeta.meta), which replays rewrite")
            meta = ctx.batch.host_meta(USE_VARLEN, USE_SHORT_KERNEL)
            return ctx.recorder.split("pcg::causal_attention_out",
                                      [q, k, v, out, meta, spec.scaling, window_left(spec)], out)
        return ctx.recorder.split("pcg::attention_out", [q, k, v, out, layer], out)
    compute(q, k, v, out, spec, ctx.batch)
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("attention", attention, _key)
    _lib.impl("attention_out", attention_out, _key)


@torch.library.register_fake("pcg::attention")
def _attention_fake(q, k, v, layer):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


@torch.library.register_fake("pcg::attention_out")
def _attention_out_fake(q, k, v, out, layer):
    return None
