"""Causal attention over packed sequences: pcg::causal_attention_out (batch
read on the host at each call) and pcg::causal_attention_graph (batch read on
the device, for captured graphs)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..batch import BatchMeta
from ._checks import same_device


@torch.library.register_fake("pcg::causal_attention_out")
def _causal_attention_out_fake(q, k, v, out, meta, scale=None, window_left=-1) -> None:
    same_device("causal_attention_out", q=q, k=k, v=v, out=out)  # meta: on the host by design
    return None


@torch.library.register_fake("pcg::causal_attention_graph")
def _causal_attention_graph_fake(q, k, v, out, batch, scale=None, window_left=-1) -> None:
    same_device("causal_attention_graph", q=q, k=k, v=v, out=out, batch=batch)
    return None


GRAPH_MAX_SEQLEN = 64  # longest sequence pcg::causal_attention_graph takes


def graph_batch(cu_seqlens: Sequence[int], capacity: Optional[int] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """The int32 batch ``pcg::causal_attention_graph`` reads:
    ``[num_tokens, num_seqs, cu_seqlens..., (zeros up to capacity)]``."""
    cu = [int(c) for c in cu_seqlens] or [0]
    vals = [cu[-1], len(cu) - 1, *cu]
    if capacity is not None:
        vals += [0] * (capacity + 3 - len(vals))
    return torch.tensor(vals, dtype=torch.int32, device=device)


def causal_attention_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           batch: torch.Tensor, *, scale: Optional[float] = None,
                           window_left: int = -1) -> None:
    """``causal_attention_out`` with the batch read from device memory when
    the kernel runs, so a CUDA graph that captured the call follows the batch
    written into ``batch`` before each replay (attention inside the graph).

    Args:
        q, k, v, out, scale, window_left: as :func:`causal_attention_out`.
        batch: int32 1-D on q's device, ``[num_tokens, num_seqs,
            cu_seqlens[0..num_seqs]]`` (:func:`graph_batch`), room for
            ``batch.numel() - 3`` sequences.

    Every sequence must be at most ``GRAPH_MAX_SEQLEN`` (64) tokens. CUDA:
    bf16/fp16, head sizes multiples of 8 up to 256, unit stride along the head
    size, row/head strides multiples of 8, 16-byte aligned starts (ValueError
    otherwise); the batch is not checked on the device (no synchronisation):
    rows of a longer sequence come out NaN. CPU: the batch is checked
    (ValueError) and computed as :func:`causal_attention_out`.
    """
    torch.ops.pcg.causal_attention_graph(q, k, v, out, batch, scale, window_left)


def causal_attention_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         cu_seqlens: Sequence[int], *, scale: Optional[float] = None,
                         window_left: int = -1, varlen: bool = True,
                         short_kernel: bool = True) -> None:
    """Causal attention of packed sequences, written into ``out``.

    Args:
        q: [rows, Hq, D] bf16/fp16/fp32 (any strides).
        k: [rows, Hkv, D], Hkv dividing Hq (grouped-query attention).
        v: [rows, Hkv, Dv].
        out: [rows, Hq, Dv], same dtype and device; rows past ``cu_seqlens[-1]``
            are padding and are written as zeros.
        cu_seqlens: host list of sequence starts ``[0, len0, len0+len1, ..., n]``.
        scale: softmax scale (None: 1/sqrt(D)).
        window_left: keys left of the query it may see (-1: all; a sliding
            window of W tokens is W - 1).
        varlen: several sequences share one flash varlen launch (CUDA bf16/fp16);
            False runs one launch per sequence.
        short_kernel: allow pcg's short-sequence CUDA kernel (False: the
            flash / SDPA paths below, for comparisons).

    CUDA builds run bf16/fp16 batches of at most 128 sequences of at most 64
    tokens (1024 tokens in all), head sizes multiples of 8 up to 256 and
    16-byte aligned rows, with pcg's one-launch kernel (pad rows included).
    Otherwise CUDA bf16/fp16 with D == Dv, D % 8 == 0, D <= 256 uses torch's
    flash kernel; everything else runs scaled_dot_product_attention per sequence.
    It reads host metadata, so pcg runs it as a split op (between graph
    replays, with the batch of each call). It may also be captured inside a
    CUDA graph; the graph then replays the batch it was captured with.
    """
    n = int(cu_seqlens[-1]) if len(cu_seqlens) else 0
    meta = BatchMeta(n, list(cu_seqlens), None, q.shape[0]).host_meta(varlen, short_kernel)
    torch.ops.pcg.causal_attention_out(q, k, v, out, meta, scale, window_left)
