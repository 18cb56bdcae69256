"""Python side of the native ops: fake kernels (for torch.compile / opcheck)
and documented wrappers. Schemas live in csrc/ops.cpp."""
from .attention import causal_attention_graph, causal_attention_out, graph_batch
from .fused_moe import fused_moe
from .ep import ep_combine, ep_dispatch  # noqa: F401  (expert parallelism)
from .graph import stage_batch, weak_ref_tensor
from .route import route

__all__ = ["causal_attention_graph", "causal_attention_out", "graph_batch", "fused_moe", "route", "stage_batch",
           "weak_ref_tensor"]
