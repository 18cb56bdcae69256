"""On-disk cache of pcg's compile mode.

Every compiled forward gets a directory under the pcg cache root
(``$PCG_CACHE_DIR``, else ``~/.cache/pcg``)::

    <root>/compile/<key>/inductor/   TORCHINDUCTOR_CACHE_DIR while pcg compiles
                                     (inductor's FX graph cache, AOTAutograd
                                     cache, generated C++/Triton code, .so files)
    <root>/compile/<key>/pcg.json    what the key was made of, and the measured
                                     trace / compile times of every start

``key`` hashes the traced graph's code (which carries the model's structure and
constants), the shapes/dtypes/devices of its inputs and parameters (the model
config as far as the graph can see it), the model config itself when pcg can
find one, the compiler, the pcg and torch versions and the distributed rank.
Inductor writes its own files atomically; ``pcg.json`` is written to a temp
file and moved into place with ``os.replace``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Iterator, Optional


def cache_root() -> str:
    root = os.environ.get("PCG_CACHE_DIR")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "pcg")
    return os.path.abspath(root)


def rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # noqa: BLE001
        pass
    return int(os.environ.get("RANK", "0") or 0)


def make_key(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def entry_dir(key: str) -> str:
    return os.path.join(cache_root(), "compile", key)


def write_json_atomic(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def record_start(key: str, parts: dict, timings: dict) -> dict:
    """Append this start's timings to ``pcg.json`` (atomically); returns the
    manifest. ``timings['warm']`` says whether the entry existed before."""
    path = os.path.join(entry_dir(key), "pcg.json")
    manifest = read_json(path) or {"key": key, "parts": parts, "starts": []}
    manifest["starts"] = (manifest.get("starts") or [])[-19:] + [dict(timings, time=time.time())]
    try:
        write_json_atomic(path, manifest)
    except OSError:
        pass  # a read-only cache must not break the model
    return manifest


@contextlib.contextmanager
def inductor_cache_dir(key: Optional[str]) -> Iterator[Optional[str]]:
    """Point inductor's caches (TORCHINDUCTOR_CACHE_DIR) at the entry of ``key``
    for the duration of the block; the previous setting is restored after."""
    if key is None:
        yield None
        return
    path = os.path.join(entry_dir(key), "inductor")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        yield None
        return
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # pragma: no cover
        def clear_caches() -> None:
            pass
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    clear_caches()
    try:
        yield path
    finally:
        clear_caches()
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
