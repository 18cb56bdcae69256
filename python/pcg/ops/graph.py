"""Graph helpers: pcg::weak_ref_tensor, pcg::stage_batch."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._checks import same_device


@torch.library.register_fake("pcg::weak_ref_tensor")
def _weak_ref_tensor_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def weak_ref_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor aliasing ``t``'s memory (same sizes, strides, dtype, device) that does
    not own or keep alive its storage. Reading it after ``t``'s storage is freed
    reads whatever now lives there: the caller keeps the owner alive as long as
    the reference is read.

    Args:
        t: any dense tensor, CPU or CUDA, any dtype and layout of strides.
    Returns:
        a tensor with ``t``'s sizes/strides/dtype/device and ``data_ptr()``.
    """
    return torch.ops.pcg.weak_ref_tensor(t)


@torch.library.register_fake("pcg::stage_batch")
def _stage_batch_fake(ids, positions, static_ids, static_pos, batch, values) -> None:
    same_device("stage_batch", static_ids=static_ids, ids=ids, positions=positions,
                static_pos=static_pos, batch=batch)
    return None


def stage_batch(ids: torch.Tensor, positions: Optional[torch.Tensor], static_ids: torch.Tensor,
                static_pos: torch.Tensor, batch: torch.Tensor, values: Sequence[int]) -> None:
    """Write a replay's inputs into the static buffers its graphs read, in one
    launch on the current stream (capturable; nothing allocated or pinned).

    Args:
        ids: int64 [n] token ids (any stride), on the buffers' device.
        positions: int64 [n] positions, or None to leave ``static_pos`` as it is.
        static_ids: int64 [N >= n], contiguous; ``static_ids[:n] = ids``.
        static_pos: int64 [N >= n], contiguous; ``static_pos[:n] = positions``.
        batch: int32 [M], contiguous; ``batch[:len(values)] = values``.
        values: at most 256 ints that fit in int32 (e.g. ``[num_valid]``, or
            ``[num_tokens, num_seqs, *cu_seqlens]`` for attention inside a graph).
    """
    torch.ops.pcg.stage_batch(ids, positions, static_ids, static_pos, batch, list(values))
