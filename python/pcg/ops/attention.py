"""Causal attention over packed sequences: pcg::causal_attention_out."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..batch import BatchMeta


@torch.library.register_fake("pcg::causal_attention_out")
def _causal_attention_out_fake(q, k, v, out, meta, scale=None, window_left=-1) -> None:
    return None


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
