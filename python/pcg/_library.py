"""Find and load the native op library (libpcg_ops) into torch.ops.pcg."""
from __future__ import annotations

import glob
import os

import torch

_loaded_path: str | None = None


def library_path() -> str:
    """Path of the native library: $PCG_LIBRARY if set, else the one in the package."""
    env = os.environ.get("PCG_LIBRARY")
    if env:
        if not os.path.exists(env):
            raise ImportError(f"pcg: PCG_LIBRARY={env!r} does not exist")
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "libpcg_ops*.so")))
    if not found:
        raise ImportError(
            "pcg: the native library libpcg_ops is not built. Install the package with "
            "`pip install --no-build-isolation -e .` (see README.md), or point PCG_LIBRARY at a build."
        )
    return found[0]


def load() -> str:
    """Load libpcg_ops once; returns its path."""
    global _loaded_path
    if _loaded_path is None:
        path = library_path()
        torch.ops.load_library(path)
        _loaded_path = path
    return _loaded_path


def has_cuda_kernels() -> bool:
    """True when the loaded library registered CUDA kernels (built with CUDA)."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("pcg::fused_moe", "CUDA")
