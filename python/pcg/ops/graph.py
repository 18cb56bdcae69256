"""Graph helpers: pcg::weak_ref_tensor."""
from __future__ import annotations

import torch


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
