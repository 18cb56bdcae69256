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

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, op: str, arg: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"pcg::{op}: argument '{arg}' {msg}")


@torch.library.register_fake("pcg::ep_dispatch")
def _ep_dispatch_fake(hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid,
                      send_hidden, send_meta, slot_map, counts):
    op = "ep_dispatch"
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
    _check(recv.dim() == 3, op, "recv", f"must be 3-D [W, C, H], got shape {tuple(recv.shape)}")
    _check(slot_map.dim() == 2, op, "slot_map", f"must be 2-D [T, W], got shape {tuple(slot_map.shape)}")
    _check(out.dim() == 2, op, "out", f"must be 2-D [T, H], got shape {tuple(out.shape)}")
    torch._check(slot_map.shape[1] == recv.shape[0],
                 lambda: "pcg::ep_combine: argument 'slot_map' dim 1 must be W = recv.size(0)")
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


def split_meta(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., 2k]`` int32 metadata rows -> (local ids [..., k] int32, weights [..., k] float32),
    views of ``meta`` (no copy)."""
    k = meta.shape[-1] // 2
    return meta[..., :k], meta[..., k:].view(torch.float32)


__all__ = ["ep_combine", "ep_dispatch", "split_meta"]
