"""Python side of the native ops: fake kernels (for torch.compile / opcheck)
and documented wrappers. Schemas live in csrc/ops.cpp."""
from .attention import causal_attention_graph, causal_attention_out, graph_batch
from .fused_moe import FUSED_W13_BLOCK, deinterleave_w13, fused_moe, interleave_w13
from .ep import ep_combine, ep_dispatch  # noqa: F401  (expert parallelism)
from .graph import stage_batch, weak_ref_tensor
from .route import route

__all__ = ["FUSED_W13_BLOCK", "causal_attention_graph", "causal_attention_out", "deinterleave_w13",
           "graph_batch", "fused_moe", "interleave_w13", "route", "stage_batch", "weak_ref_tensor"]
