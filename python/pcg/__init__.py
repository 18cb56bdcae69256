"""pcg: piecewise CUDA graphs for Mixture-of-Experts transformers.

    import pcg
    model = pcg.wrap(model)        # same outputs, captured prefill
    print(model.report())
    torch.ops.pcg.fused_moe(...)   # native ops, also usable from C++

Importing pcg loads the native library (libpcg_ops) and registers the fake
kernels of every ``torch.ops.pcg`` operator and the Python kernels of the
layer ops (``pcg::attention``, ``pcg::moe``).
"""
from __future__ import annotations

from . import _library

_library.load()

from . import ops  # noqa: E402
from . import attention as _attention  # noqa: E402,F401  (pcg::attention kernels)
from . import moe as _moe  # noqa: E402,F401  (pcg::moe kernels)
from . import mixer as _mixer  # noqa: E402,F401  (pcg::mixer kernels)
from . import nn  # noqa: E402
from .ops import FUSED_W13_BLOCK, deinterleave_w13, fused_moe, interleave_w13, route  # noqa: E402
from .ops import weak_ref_tensor  # noqa: E402
from .registry import LayerRegistry  # noqa: E402
from .wrap import WrappedModel, wrap  # noqa: E402


def unwrap(model: WrappedModel):
    """``model.unwrap()``: the wrapped model with its own implementations back
    (see :meth:`WrappedModel.unwrap`)."""
    if not isinstance(model, WrappedModel):
        raise TypeError(f"pcg.unwrap: expected the model pcg.wrap returned, got {type(model).__name__}")
    return model.unwrap()


__version__ = "0.1.0"

__all__ = ["FUSED_W13_BLOCK", "LayerRegistry", "WrappedModel", "deinterleave_w13", "fused_moe",
           "interleave_w13", "nn", "route", "weak_ref_tensor", "unwrap", "wrap", "__version__"]
