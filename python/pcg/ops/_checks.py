"""Checks shared by the ops' fake (meta) kernels.

A fake kernel runs for fake tensors under torch.compile, and also whenever one
argument is a meta tensor among real ones (the Meta dispatch key wins): it must
refuse what the native launchers refuse, or the call "succeeds" with nothing
computed."""
from __future__ import annotations

from typing import Optional

import torch


def same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Every given tensor (None skipped) on the first one's device, else a
    ValueError naming the argument, as the native launchers word it."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"pcg::{op}: argument '{name}' must be on {first[1]} (as "
                             f"'{first[0]}'), got {t.device}")
