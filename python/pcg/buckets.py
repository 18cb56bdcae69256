"""Token-count buckets: a batch of n tokens replays the smallest bucket >= n."""
from __future__ import annotations

import bisect
from typing import Iterable, Optional, Sequence


def default_ladder(max_tokens: int = 2048) -> list[int]:
    """1, 2, 4, 8, then steps of about 1/4 of the size (16, 24, 32, 40, 48, 64,
    80, 96, 128, 160, ...) so padding wastes at most ~25%, up to ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"pcg: max_tokens must be >= 1, got {max_tokens}")
    sizes = {1, 2, 4, 8}
    size = 8
    while size < max_tokens:
        step = max(8, 1 << max(0, (size.bit_length() - 3)))
        size += step
        sizes.add(size)
    sizes = {s for s in sizes if s < max_tokens}
    sizes.add(max_tokens)
    return sorted(sizes)


def make_ladder(buckets: Optional[Iterable[int]] = None, max_tokens: int = 2048) -> list[int]:
    if buckets is None:
        return default_ladder(max_tokens)
    sizes = sorted({int(b) for b in buckets})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"pcg: buckets must be positive token counts, got {list(buckets)}")
    return sizes


def pick(ladder: Sequence[int], n: int) -> Optional[int]:
    """Smallest bucket >= n, or None when n exceeds the largest bucket."""
    i = bisect.bisect_left(ladder, n)
    return ladder[i] if i < len(ladder) else None
