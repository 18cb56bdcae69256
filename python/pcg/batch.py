"""Batch packing: the caller's [1, T] or [B, S] inputs become one packed row
of real tokens plus the sequence boundaries attention needs; outputs go back
to the caller's shape with pad positions zero-filled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class BatchMeta:
    """Metadata of one packed batch of ``num_tokens`` real tokens.

    ``cu_seqlens``: host list [num_seqs + 1] of sequence starts in the packed
    row (0, len0, len0+len1, ...). ``positions``: [num_tokens] int64 positions
    (device of the inputs). ``padded_tokens``: the bucket size the graphs were
    captured for (>= num_tokens); rows past ``num_tokens`` are padding.
    ``meta``: optional CPU int64 buffer :meth:`host_meta` writes into (a
    capture engine's static one, which recorded attention calls read).
    """

    num_tokens: int
    cu_seqlens: list[int]
    positions: Optional[torch.Tensor]
    padded_tokens: int
    meta: Optional[torch.Tensor] = None
    _chunked: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def max_seqlen(self) -> int:
        return max((b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:])), default=0)

    def host_meta(self, varlen: bool = True, short_kernel: bool = True) -> torch.Tensor:
        """The batch as ``pcg::causal_attention_out`` reads it: CPU int64
        [num_tokens, num_seqs, max_seqlen, flags, cu_seqlens...], written into
        ``meta`` (allocated on first use). ``varlen``: flags bit 0;
        ``short_kernel=False`` sets bit 1 (skip the short-sequence CUDA kernel)."""
        need = META_HEAD + len(self.cu_seqlens)
        if self.meta is None:
            self.meta = torch.empty(need, dtype=torch.int64)
        elif self.meta.numel() < need:
            raise ValueError(f"pcg: a batch of {self.num_seqs} sequences needs {need} metadata "
                             f"values; the buffer holds {self.meta.numel()}")
        write_host_meta(self.meta.numpy(), self.num_tokens, self.cu_seqlens, varlen, short_kernel)
        return self.meta

    def chunked_cu_seqlens(self, chunk: int) -> list[int]:
        """Sequence boundaries of chunked attention (Llama-4): every sequence
        is cut every ``chunk`` tokens from its first, so causal attention over
        the pieces is attention within chunks. Chunks count from the
        sequence's first token, as transformers' chunked mask counts them from
        a row's first real token (a prefill without cache). Cached per chunk."""
        if chunk <= 0:
            raise ValueError(f"pcg: attention chunk size must be positive, got {chunk}")
        cached = self._chunked.get(chunk)
        if cached is None:
            cached = [self.cu_seqlens[0]]
            for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:]):
                cached.extend(range(a + chunk, b, chunk))
                cached.append(b)
            self._chunked[chunk] = cached
        return cached

META_HEAD = 4  # num_tokens, num_seqs, max_seqlen, flags; then cu_seqlens
FLAG_NO_SHORT = 2  # flags bit 1: causal_attention_out skips its short-sequence kernel


def write_host_meta(m, num_tokens: int, cu_seqlens: list[int], varlen: bool = True,
                    short_kernel: bool = True) -> None:
    """Write ``[num_tokens, num_seqs, max_seqlen, flags, cu_seqlens...]`` into
    ``m`` (a numpy int64 view with room for it); the layout
    ``pcg::causal_attention_out`` reads. Plain numpy: it runs before every replay."""
    m[0], m[1] = num_tokens, len(cu_seqlens) - 1
    m[2] = cu_seqlens[1] - cu_seqlens[0] if len(cu_seqlens) == 2 else max(
        (b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])), default=0)
    m[3] = int(varlen) | (0 if short_kernel else FLAG_NO_SHORT)
    m[META_HEAD:META_HEAD + len(cu_seqlens)] = cu_seqlens


@dataclass
class PackedInput:
    """The packed form of a caller batch and how to undo it."""

    input_ids: Optional[torch.Tensor]  # [n] int64
    inputs_embeds: Optional[torch.Tensor]  # [n, H]
    positions: Optional[torch.Tensor]  # [n] int64; None = arange(n) (one row, default positions)
    cu_seqlens: list[int]
    batch_shape: tuple[int, int]  # (B, S) of the caller
    token_index: Optional[torch.Tensor]  # [n] flat indices into B*S; None = identity

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[n, ...] packed rows -> [B, S, ...] with zeros at pad positions."""
        b, s = self.batch_shape
        if self.token_index is None:
            return t.reshape(b, s, *t.shape[1:])
        out = t.new_zeros((b * s, *t.shape[1:]))
        out.index_copy_(0, self.token_index, t)
        return out.view(b, s, *t.shape[1:])


def _starts_from_positions(pos: torch.Tensor, jumps: bool = True) -> list[int]:
    """Sequence starts of one packed row: index 0 and every token whose
    position does not follow the one before it by one (transformers' rule for
    packed position_ids: a restart at 0, or a jump, starts a sequence), or with
    ``jumps=False`` only every restart at 0 (rows of a masked batch: a masked
    hole in a row is a jump of the kept positions, not a new sequence)."""
    host = pos.detach().to("cpu")
    if host.numel() < 2:
        return [0]
    new = (host[1:] != host[:-1] + 1) if jumps else (host[1:] == 0)
    return [0] + (new.nonzero().flatten() + 1).tolist()


def pack(input_ids: Optional[torch.Tensor] = None,
         attention_mask: Optional[torch.Tensor] = None,
         position_ids: Optional[torch.Tensor] = None,
         inputs_embeds: Optional[torch.Tensor] = None) -> PackedInput:
    """Pack a caller batch.

    * ``input_ids`` [1, T] (or ``inputs_embeds`` [1, T, H]): one packed row; with
      ``position_ids`` [1, T] it holds several sequences: a token whose position
      does not follow the previous one by one (a restart at 0, or a jump)
      starts the next (transformers' packed-sequence rule; in a batch with an
      ``attention_mask``, where pad holes make the kept positions jump, only a
      restart at 0 does).
    * [B, S] with an optional ``attention_mask`` [B, S] (1 = real token, left or
      right padding): each row is one sequence (or several, by ``position_ids``);
      pad tokens are dropped. Positions default to ``arange(S)`` per row, the
      Hugging Face default, so outputs match the unwrapped model exactly.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pcg: pass exactly one of input_ids [B, S] or inputs_embeds [B, S, H]")
    lead = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and input_ids.dim() == 1:
        input_ids = input_ids[None]
        lead = input_ids
    if lead.dim() != (2 if input_ids is not None else 3):
        raise ValueError(f"pcg: input_ids must be [B, S] (inputs_embeds [B, S, H]); got shape "
                         f"{tuple(lead.shape)}")
    b, s = int(lead.shape[0]), int(lead.shape[1])
    device = lead.device
    if b == 1 and position_ids is None and attention_mask is None and input_ids is not None:
        # The common prefill call: one sequence, default positions; no device work.
        return PackedInput(input_ids=input_ids[0], inputs_embeds=None, positions=None,
                           cu_seqlens=[0, s], batch_shape=(1, s), token_index=None)
    explicit_positions = position_ids is not None
    if position_ids is not None:
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if tuple(position_ids.shape) != (b, s) and tuple(position_ids.shape) != (1, s):
            raise ValueError(f"pcg: position_ids must be [B, S] = [{b}, {s}], got "
                             f"{tuple(position_ids.shape)}")
        position_ids = position_ids.expand(b, s)
    else:
        position_ids = torch.arange(s, device=device).expand(b, s)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"pcg: attention_mask must be [B, S] = [{b}, {s}], got "
                             f"{tuple(attention_mask.shape)}")
        keep = attention_mask.reshape(-1).to(torch.bool)
        if bool(keep.all()):
            attention_mask = None
    flat_pos = position_ids.reshape(-1).to(torch.int64)
    if attention_mask is None:
        token_index = None
        flat_ids = input_ids.reshape(-1) if input_ids is not None else None
        flat_emb = inputs_embeds.reshape(b * s, inputs_embeds.shape[-1]) if inputs_embeds is not None else None
        row_lens = [s] * b
    else:
        token_index = keep.nonzero().flatten()
        flat_ids = input_ids.reshape(-1).index_select(0, token_index) if input_ids is not None else None
        flat_emb = (inputs_embeds.reshape(b * s, inputs_embeds.shape[-1]).index_select(0, token_index)
                    if inputs_embeds is not None else None)
        flat_pos = flat_pos.index_select(0, token_index)
        # Rows' lengths from the same test as the kept tokens (non-zero: a real
        # token, as transformers reads a 2-D mask; a mask of 2s or -1s counts them).
        row_lens = keep.view(b, s).sum(1).tolist()
    # Sequence boundaries: every row starts a sequence; explicit position_ids
    # that restart (or jump) start more (several packed sequences in one row). Only
    # explicit positions are read back from the device (pass them on the CPU
    # to keep prefill free of device-to-host syncs).
    row_starts = [0]
    for n in row_lens:
        row_starts.append(row_starts[-1] + int(n))
    total = row_starts[-1]
    starts = set(row_starts[:-1])
    if explicit_positions and total:
        starts |= set(_starts_from_positions(flat_pos, jumps=attention_mask is None))
    cu = sorted(x for x in starts if x < total) + [total]
    if cu[0] != 0:
        cu = [0] + cu
    return PackedInput(input_ids=flat_ids, inputs_embeds=flat_emb, positions=flat_pos,
                       cu_seqlens=cu, batch_shape=(b, s), token_index=token_index)
