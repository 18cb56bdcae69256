"""Expert-parallel token exchange: pcg::ep_dispatch and pcg::ep_combine.

Buffer contract (W ranks, capacity C >= T rows per destination rank; see
``csrc/moe/ep_kernels.h``):

* ``ep_dispatch`` writes every valid token (``t < num_valid``) ONCE per rank
  owning at least one of its top-k experts, at slot ``s`` = number of earlier
  tokens going to that rank (token order, deterministic):
  ``send_hidden[r, s] = hidden[t]``; ``send_meta[r, s, j]`` = the local id on
  ``r`` of expert ``topk_ids[t, j]`` or -1 when it lives elsewhere;
  ``send_meta[r, s, k + j]`` = the float32 bits of ``topk_weights[t, j]`` (0.0
  when elsewhere); ``slot_map[t, r] = s`` (-1: nothing sent); ``counts[r]`` =
  slots used. Unused slots get ids -1 and weight 0, so a receiver may run its
  experts over all ``W*C`` received rows with no host-side count.
* ``ep_combine``: ``out[t] = sum_r recv[r, slot_map[t, r]]`` over the ranks
  with a slot (ascending r, fp32 accumulation), zero rows otherwise. The
  router weights travel with the rows and are applied by the expert kernel on
  the owning rank, so each returned row is that rank's weighted partial sum.

The worst case per destination is T rows (every token once), so the fixed
buffers are [W, T, H] — not [W, T*k, H] — and the capacity depends only on
the bucket size: dispatch, both ``all_to_all_single`` calls and combine need
no host-side sizes and capture in CUDA graphs.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import same_device

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, op: str, arg: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"pcg::{op}: argument '{arg}' {msg}")


@torch.library.register_fake("pcg::ep_dispatch")
def _ep_dispatch_fake(hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid,
                      send_hidden, send_meta, slot_map, counts):
    op = "ep_dispatch"
    same_device(op, hidden=hidden, topk_weights=topk_weights, topk_ids=topk_ids,
                expert_rank=expert_rank, expert_local=expert_local, num_valid=num_valid,
                send_hidden=send_hidden, send_meta=send_meta, slot_map=slot_map, counts=counts)
    _check(hidden.dim() == 2, op, "hidden", f"must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    _check(topk_ids.dim() == 2, op, "topk_ids", f"must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    _check(send_hidden.dim() == 3, op, "send_hidden",
           f"must be 3-D [W, C, H], got shape {tuple(send_hidden.shape)}")
    _check(send_meta.dim() == 3, op, "send_meta",
           f"must be 3-D [W, C, 2k], got shape {tuple(send_meta.shape)}")
    _check(hidden.dtype in _FLOATS, op, "hidden", f"must be float32/float16/bfloat16, got {hidden.dtype}")
    _check(send_hidden.dtype == hidden.dtype, op, "send_hidden",
           f"must have hidden's dtype {hidden.dtype}, got {send_hidden.dtype}")
    torch._check(send_hidden.shape[1] >= hidden.shape[0],
                 lambda: "pcg::ep_dispatch: argument 'send_hidden' dim 1 must be >= T")
    torch._check(slot_map.shape[0] == hidden.shape[0],
                 lambda: "pcg::ep_dispatch: argument 'slot_map' dim 0 must be T")
    return None


@torch.library.register_fake("pcg::ep_combine")
def _ep_combine_fake(recv, slot_map, out):
    op = "ep_combine"
    same_device(op, recv=recv, slot_map=slot_map, out=out)
    _check(recv.dim() == 3, op, "recv", f"must be 3-D [W, C, H], got shape {tuple(recv.shape)}")
    _check(slot_map.dim() == 2, op, "slot_map", f"must be 2-D [T, W], got shape {tuple(slot_map.shape)}")
    _check(out.dim() == 2, op, "out", f"must be 2-D [T, H], got shape {tuple(out.shape)}")
    torch._check(slot_map.shape[1] == recv.shape[0],
                 lambda: "pcg::ep_combine: argument 'slot_map' dim 1 must be W = recv.size(0)")
    return None


@torch.library.register_fake("pcg::ep_dispatch_peer")
def _ep_dispatch_peer_fake(hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid,
                           peer_ptrs, rank, capacity, hidden_offset, meta_offset, slot_map, counts):
    op = "ep_dispatch_peer"
    same_device(op, hidden=hidden, topk_weights=topk_weights, topk_ids=topk_ids,
                expert_rank=expert_rank, expert_local=expert_local, num_valid=num_valid,
                peer_ptrs=peer_ptrs, slot_map=slot_map, counts=counts)
    _check(hidden.dim() == 2, op, "hidden", f"must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    _check(peer_ptrs.dim() == 1 and peer_ptrs.dtype == torch.int64, op, "peer_ptrs",
           f"must be a 1-D int64 tensor of W addresses, got {peer_ptrs.dtype} {tuple(peer_ptrs.shape)}")
    torch._check(capacity >= hidden.shape[0],
                 lambda: "pcg::ep_dispatch_peer: argument 'capacity' must be >= T")
    return None


@torch.library.register_fake("pcg::ep_return_peer")
def _ep_return_peer_fake(y, meta, peer_ptrs, rank, back_offset):
    op = "ep_return_peer"
    same_device(op, y=y, meta=meta, peer_ptrs=peer_ptrs)
    _check(y.dim() == 2, op, "y", f"must be 2-D [W*C, H], got shape {tuple(y.shape)}")
    _check(meta.dim() == 3, op, "meta", f"must be 3-D [W, C, 2k], got shape {tuple(meta.shape)}")
    return None


def ep_dispatch(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                expert_rank: torch.Tensor, expert_local: torch.Tensor, world_size: int,
                num_valid: Optional[torch.Tensor] = None, capacity: Optional[int] = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack tokens per destination rank (allocating the buffers).

    Args:
        hidden: [T, H] float32/float16/bfloat16, any strides.
        topk_weights: [T, k] float32 router weights; topk_ids: [T, k] int32 global ids.
        expert_rank: [E] int32 owner rank of each global expert; expert_local: [E]
            int32 its local id on the owner. Ids outside [0, E) and owners outside
            [0, world_size) are dropped.
        world_size: W, the number of ranks.
        num_valid: optional int32 one-element tensor: rows t >= num_valid are not sent.
        capacity: rows per destination (default T; must be >= T).

    Returns:
        ``(send_hidden [W, C, H], send_meta [W, C, 2k] int32, slot_map [T, W] int32,
        counts [W] int32)``, layout in the module docstring.
    """
    T, H = hidden.shape
    k = topk_ids.shape[1]
    C = T if capacity is None else int(capacity)
    dev = hidden.device
    send_hidden = torch.empty((world_size, C, H), dtype=hidden.dtype, device=dev)
    send_meta = torch.empty((world_size, C, 2 * k), dtype=torch.int32, device=dev)
    slot_map = torch.empty((T, world_size), dtype=torch.int32, device=dev)
    counts = torch.empty((world_size,), dtype=torch.int32, device=dev)
    torch.ops.pcg.ep_dispatch(hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid,
                              send_hidden, send_meta, slot_map, counts)
    return send_hidden, send_meta, slot_map, counts


def ep_combine(recv: torch.Tensor, slot_map: torch.Tensor,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum each token's returned rows: ``out[t] = sum_r recv[r, slot_map[t, r]]``.

    Args:
        recv: [W, C, H] float32/float16/bfloat16 rows returned by the expert ranks.
        slot_map: [T, W] int32 from :func:`ep_dispatch`.
        out: optional contiguous [T, H] output in recv's dtype.

    Returns:
        out [T, H] (zero rows for tokens that sent nothing).
    """
    if out is None:
        out = torch.empty((slot_map.shape[0], recv.shape[2]), dtype=recv.dtype, device=recv.device)
    torch.ops.pcg.ep_combine(recv, slot_map, out)
    return out


def peer_layout(world_size: int, capacity: int, row_bytes: int, top_k: int) -> tuple[int, int, int, int]:
    """Byte layout of one rank's peer workspace: (hidden_offset, meta_offset,
    back_offset, total bytes) for receive rows [W, C, row_bytes], received
    metadata [W, C, 2k] int32 and returned rows [W, C, row_bytes], 256-byte aligned."""
    def up(x: int) -> int:
        return (x + 255) // 256 * 256
    rows = up(world_size * capacity * row_bytes)
    meta = up(world_size * capacity * 2 * top_k * 4)
    return 0, rows, rows + meta, rows + meta + rows


def ep_dispatch_peer(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     expert_rank: torch.Tensor, expert_local: torch.Tensor, peer_ptrs: torch.Tensor,
                     rank: int, capacity: int, hidden_offset: int, meta_offset: int,
                     num_valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ep_dispatch` writing straight into every rank's mapped workspace.

    ``peer_ptrs`` [W] int64 (on hidden's device): each rank's workspace base
    address, mapped into this process (16-byte aligned). Rank ``rank``'s slot s
    for rank r lands at ``peer_ptrs[r] + hidden_offset + (rank*capacity + s) *
    row_bytes`` (metadata at ``meta_offset``, same indexing): rank r's
    workspace then holds what ``all_to_all_single`` of the send buffers would
    have delivered. Returns (slot_map [T, W], counts [W]). The caller orders
    the writes with the peers (a barrier) before anyone reads them.
    """
    T = hidden.shape[0]
    W = peer_ptrs.shape[0]
    slot_map = torch.empty((T, W), dtype=torch.int32, device=hidden.device)
    counts = torch.empty((W,), dtype=torch.int32, device=hidden.device)
    torch.ops.pcg.ep_dispatch_peer(hidden, topk_weights, topk_ids, expert_rank, expert_local,
                                   num_valid, peer_ptrs, rank, capacity, hidden_offset, meta_offset,
                                   slot_map, counts)
    return slot_map, counts


def ep_return_peer(y: torch.Tensor, meta: torch.Tensor, peer_ptrs: torch.Tensor, rank: int,
                   back_offset: int) -> None:
    """Send expert outputs ``y`` [W*C, H] back: row (src, s) goes to rank src's
    workspace at ``back_offset + (rank*C + s) * row_bytes`` when the received
    metadata ``meta`` [W, C, 2k] of that slot holds a local expert id >= 0."""
    torch.ops.pcg.ep_return_peer(y, meta, peer_ptrs, rank, back_offset)


def split_meta(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., 2k]`` int32 metadata rows -> (local ids [..., k] int32, weights [..., k] float32),
    views of ``meta`` (no copy)."""
    k = meta.shape[-1] // 2
    return meta[..., :k], meta[..., k:].view(torch.float32)


__all__ = ["ep_combine", "ep_dispatch", "ep_dispatch_peer", "ep_return_peer", "peer_layout", "split_meta"]
