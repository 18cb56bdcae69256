"""pcg: piecewise CUDA graphs for Mixture-of-Experts transformers.

    import pcg
    model = pcg.wrap(model)        # same outputs, captured prefill
    torch.ops.pcg.fused_moe(...)   # native ops, also usable from C++

Importing pcg loads the native library and registers the fake kernels of every
``torch.ops.pcg`` operator.
"""
from __future__ import annotations

from . import _library

_library.load()

from . import ops  # noqa: E402  (registers fake kernels and Python-side kernels)
from .ops import fused_moe, route, weak_ref_tensor  # noqa: E402

__version__ = "0.1.0"

__all__ = ["fused_moe", "route", "weak_ref_tensor", "__version__"]
