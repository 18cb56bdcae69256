"""What the capture engine's SegmentRecorder does at a split op, minus the
CUDA graphs: run the op's out= variant for real and remember which call a
capture would record. Lets CPU tests check what a capture records."""
from __future__ import annotations

import torch


class SplitRecorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def split(self, op_name: str, args: list, out: torch.Tensor) -> torch.Tensor:
        ns, name = op_name.split("::")
        getattr(getattr(torch.ops, ns), name)(*args)
        self.calls.append(op_name)
        return out
