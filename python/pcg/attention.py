"""pcg::attention: causal attention over the packed variable-length batch of
the running forward. It is a split op: it runs eagerly between graph replays,
so it reads the real per-batch metadata (sequence boundaries) every time.

q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] -> out [N, Hq, Dv] where N is the
padded token count of the bucket; only the first ``batch.num_tokens`` rows are
real and the pad rows of ``out`` are written as zeros.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from . import registry as _reg
from .batch import BatchMeta
from .registry import AttentionLayer

_lib = torch.library.Library("pcg", "IMPL")

# Packed batches on CUDA go through torch's flash varlen kernel when True;
# False runs SDPA per sequence (for debugging and accuracy comparisons).
USE_VARLEN = True


def _window_mask(n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[n, n] bool, True where query i may attend key j (causal, optional window)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= (i - j) < window
    return keep


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
    """One sequence with torch SDPA: q [s, Hq, D] ... -> [s, Hq, Dv]."""
    s = q.shape[0]
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, s, D]
    if layer.sliding_window is not None and layer.sliding_window < s:
        mask = _window_mask(s, layer.sliding_window, q.device)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=layer.scaling,
                                           enable_gqa=kh.shape[1] != qh.shape[1])
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=layer.scaling,
                                           enable_gqa=kh.shape[1] != qh.shape[1])
    return o[0].transpose(0, 1)


_VARLEN_ARGS = {"window_size", "scale"}


@functools.cache
def _has_gqa(fn) -> bool:
    return "enable_gqa" in inspect.signature(fn).parameters


@functools.cache
def _varlen_attn():
    """torch's flash varlen kernel, when this torch has the form pcg needs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if _VARLEN_ARGS <= set(inspect.signature(varlen_attn).parameters) else None


@functools.cache
def _varlen_attn_out():
    """The out= variant (writes the split op's output buffer directly), if any."""
    try:
        from torch.nn.attention.varlen import varlen_attn_out
    except ImportError:
        return None
    return varlen_attn_out if _VARLEN_ARGS <= set(inspect.signature(varlen_attn_out).parameters) else None


def _varlen_ok(q: torch.Tensor, v: torch.Tensor, layer: AttentionLayer) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == v.shape[-1]
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and not layer.needs_fallback()
            and USE_VARLEN and _varlen_attn() is not None)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            layer: AttentionLayer, batch: BatchMeta) -> None:
    """All sequences of the batch in one flash varlen launch."""
    n = batch.num_tokens
    cu = batch.cu_seqlens_tensor(q.device)
    left = -1 if layer.sliding_window is None else layer.sliding_window - 1
    kq, vq = k[:n], v[:n]
    kw = dict(scale=layer.scaling, window_size=(left, 0))
    fn_out = _varlen_attn_out()
    if k.shape[1] != q.shape[1]:
        if _has_gqa(_varlen_attn()):
            kw["enable_gqa"] = True
        else:  # older torch: expand the kv heads (prefill-sized copies only)
            rep = q.shape[1] // k.shape[1]
            kq, vq = kq.repeat_interleave(rep, dim=1), vq.repeat_interleave(rep, dim=1)
    args = (q[:n], kq, vq, cu, cu, batch.max_seqlen, batch.max_seqlen)
    if fn_out is not None and out.is_contiguous() and (
            "enable_gqa" not in kw or _has_gqa(fn_out)):
        fn_out(out[:n], *args, **kw)
    else:
        out[:n] = _varlen_attn()(*args, **kw)


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


def compute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            layer: AttentionLayer, batch: BatchMeta | None) -> None:
    n = q.shape[0] if batch is None else batch.num_tokens
    cu = [0, n] if batch is None else batch.cu_seqlens
    if layer.impl is not None:
        layer.impl(q[:n], k[:n], v[:n], out[:n], batch, layer)
    elif batch is not None and batch.num_seqs > 1 and _varlen_ok(q, v, layer):
        # several sequences: one varlen launch instead of a launch per sequence
        _varlen(q, k, v, out, layer, batch)
    else:
        if layer.needs_fallback() and layer.fallback is None:
            raise RuntimeError(f"pcg: attention layer {layer.layer_id} ({layer.name}) uses sinks or "
                               "soft-capping but has no fallback attention function")
        fn = _model_fallback if layer.needs_fallback() else _sdpa
        for a, b in zip(cu, cu[1:]):
            if b > a:
                out[a:b] = fn(q[a:b], k[a:b], v[a:b], layer)
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
    if ctx.recorder is not None:
        # Inside a capture: end the segment here, run and record the split call.
        return ctx.recorder.split("pcg::attention_out", [q, k, v, out, layer], out)
    compute(q, k, v, out, ctx.registry.attention(layer), ctx.batch)
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
