"""pcg-native layers for models written for pcg (and for other runtimes).

A model built from :class:`Attention` and :class:`MoE` runs as is (one
sequence, eager or inside any CUDA graph) and, after :func:`pcg.wrap`, through
the piecewise capture engine: ``wrap`` gives every layer an id in the wrapped
model's registry and the layers call ``torch.ops.pcg.attention`` /
``torch.ops.pcg.moe`` with it.

The model's forward must accept ``input_ids`` [1, T] and ``position_ids``
[1, T] as keyword arguments (packed tokens; pcg passes the real positions).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import registry as _reg
from .registry import LayerRegistry


class Attention(nn.Module):
    """Causal attention core: q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] -> [T, Hq, Dv].

    Wrapped: a split op over the packed variable-length batch. Unwrapped: one
    causal sequence through ``F.scaled_dot_product_attention``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                 chunk_size: Optional[int] = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"pcg.nn.Attention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"pcg.nn.Attention: chunk_size must be positive, got {chunk_size}")
        self.sliding_window = sliding_window
        self.chunk_size = chunk_size  # chunked attention (Llama-4): keys of the query's own chunk
        self.layer_id: Optional[int] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layer_id is not None and _reg._RUNNING.get() is not None:
            return torch.ops.pcg.attention(q, k, v, self.layer_id)
        from .attention import _sdpa
        return _sdpa(q, k, v, _reg.AttentionLayer(-1, scaling=self.scaling,
                                                  sliding_window=self.sliding_window,
                                                  chunk_size=self.chunk_size))


class MoE(nn.Module):
    """Routed experts: router -> ``pcg.route`` -> experts (``pcg::moe``).

    x [T, H] -> [T, H]. Weights in pcg's layout: ``w13`` [E, 2I, H] (gate rows,
    then up rows; with ``w13_block`` B > 0, blocks of B gate rows and B up rows
    alternate, see ``pcg.interleave_w13``), ``w2`` [E, H, I]; optional ``b13``
    [E, 2I] (gate biases, then up biases), ``b2`` [E, H]; ``correction_bias`` [E]
    (DeepSeek-V3 style selection bias). ``w13_block = pcg.FUSED_W13_BLOCK`` (8)
    lets the CUTLASS path apply the activation in the first GEMM (faster at
    large T); load a gate-then-up checkpoint through ``pcg.interleave_w13`` then.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 scoring: str = "softmax", renormalize: bool = True, num_groups: int = 1,
                 topk_groups: int = 1, scale: float = 1.0, correction_bias: bool = False,
                 activation: str = "silu", bias: bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, w13_block: int = 0) -> None:
        super().__init__()
        from .ops.fused_moe import _check_w13_block
        _check_w13_block(w13_block, intermediate_size, "pcg.nn.MoE")
        self.w13_block = w13_block
        kw = {"dtype": dtype, "device": device}
        self.top_k, self.scoring, self.renormalize = top_k, scoring, renormalize
        self.num_groups, self.topk_groups, self.scale = num_groups, topk_groups, scale
        self.activation = activation
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.b13 = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden_size, **kw)) if bias else None
        self.correction_bias = (nn.Parameter(torch.zeros(num_experts, device=device))
                                if correction_bias else None)
        nn.init.normal_(self.w13, std=hidden_size ** -0.5)
        nn.init.normal_(self.w2, std=intermediate_size ** -0.5)
        self.layer_id: Optional[int] = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        return torch.ops.pcg.route(logits, self.top_k, self.scoring, self.renormalize,
                                   self.correction_bias, self.num_groups, self.topk_groups, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        if self.layer_id is not None and _reg._RUNNING.get() is not None:
            return torch.ops.pcg.moe(x, weights, ids, self.layer_id)
        return torch.ops.pcg.fused_moe(x, self.w13, self.w2, weights, ids, None, None,
                                       self.b13, self.b2, self.activation, 1.702, 7.0, None,
                                       self.w13_block)


def uses_pcg_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (Attention, MoE)) for m in model.modules())


def prepare(model: nn.Module, ep_cfg=None):
    """Give each pcg layer of ``model`` an id in a new registry.

    Returns (registry, forward_fn) for :class:`pcg.wrap.WrappedModel`.
    """
    registry = LayerRegistry()
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            m.layer_id = registry.add_attention(module=m, scaling=m.scaling,
                                                sliding_window=m.sliding_window,
                                                chunk_size=m.chunk_size,
                                                name=name).layer_id
        elif isinstance(m, MoE):
            handle = registry.add_moe(w13=m.w13, w2=m.w2, b13=m.b13, b2=m.b2,
                                      activation=m.activation, w13_block=m.w13_block,
                                      num_global_experts=m.w13.shape[0], module=m, name=name)
            m.layer_id = handle.layer_id
            if ep_cfg is not None:
                from .distributed import shard_layer
                shard_layer(handle, ep_cfg)
                # the module keeps only this rank's experts
                m.w13, m.w2, m.b13, m.b2 = handle.w13, handle.w2, handle.b13, handle.b2

    def forward_fn(ids: torch.Tensor, positions: torch.Tensor):
        return model(input_ids=ids[None], position_ids=positions[None])

    return registry, forward_fn
