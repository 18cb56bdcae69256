"""Built-in models.

* :class:`MoETransformer`: a small decoder written with :mod:`pcg.nn` layers
  (the pcg-native path; used by tests and as the example for runtimes).
* :func:`qwen3_moe_config` / :func:`qwen3_moe_model`: a Qwen3-30B-A3B-shaped
  Hugging Face model with random weights and a configurable layer count (no
  download), the default model of the demo and of ``bench/e2e.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import nn as pcg_nn
from .ops.fused_moe import w13_block_for


@dataclass
class MoETransformerConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    num_experts: int = 8
    top_k: int = 2
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    # w13's row layout (pcg.nn.MoE): None picks pcg.FUSED_W13_BLOCK when it
    # divides intermediate_size (the activation inside GEMM1), else 0.
    w13_block: Optional[int] = None


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **kw) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **kw))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on [T, H, D] at positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, c: MoETransformerConfig, **kw) -> None:
        super().__init__()
        self.c = c
        self.norm1 = _RMSNorm(c.hidden_size, c.rms_eps, **kw)
        self.qkv = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=False, **kw)
        self.o = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False, **kw)
        self.attn = pcg_nn.Attention(c.num_heads, c.num_kv_heads, c.head_dim)
        self.norm2 = _RMSNorm(c.hidden_size, c.rms_eps, **kw)
        # Default: the layout that fuses the activation on the CUTLASS path.
        block = w13_block_for(c.intermediate_size) if c.w13_block is None else c.w13_block
        self.moe = pcg_nn.MoE(c.hidden_size, c.intermediate_size, c.num_experts, c.top_k,
                              w13_block=block, **kw)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c = self.c
        t = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1)
        q = _rope(q.view(t, c.num_heads, c.head_dim), pos, c.rope_theta)
        k = _rope(k.view(t, c.num_kv_heads, c.head_dim), pos, c.rope_theta)
        a = self.attn(q, k, v.view(t, c.num_kv_heads, c.head_dim))
        x = x + self.o(a.reshape(t, -1))
        return x + self.moe(self.norm2(x))


class MoETransformer(nn.Module):
    """Decoder of pcg.nn layers: ``forward(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V]``."""

    def __init__(self, config: Optional[MoETransformerConfig] = None, dtype=None, device=None) -> None:
        super().__init__()
        c = self.config = config or MoETransformerConfig()
        kw = {"dtype": dtype, "device": device}
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size, **kw)
        self.blocks = nn.ModuleList([_Block(c, **kw) for _ in range(c.num_layers)])
        self.norm = _RMSNorm(c.hidden_size, c.rms_eps, **kw)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, **kw)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"MoETransformer takes one packed row input_ids [1, T], got {tuple(input_ids.shape)}")
        ids = input_ids[0]
        pos = position_ids[0] if position_ids is not None else torch.arange(ids.shape[0], device=ids.device)
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, pos)
        return self.lm_head(self.norm(x))[None]


def qwen3_moe_config(num_layers: int = 8, **overrides):
    """A Qwen3-30B-A3B-shaped transformers config (128 experts, top-8,
    H=2048, I=768, 32 q heads / 4 kv heads of 128) with ``num_layers`` layers."""
    from transformers import Qwen3MoeConfig
    kw = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
              num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
              num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
              mlp_only_layers=[], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def qwen3_moe_model(num_layers: int = 8, dtype=torch.bfloat16, device="cuda", seed: int = 0,
                    **overrides) -> nn.Module:
    """The default model: random weights (std 0.02), eval mode, no download."""
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    cfg = qwen3_moe_config(num_layers, **overrides)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3MoeForCausalLM(cfg).to(dtype)
    return model.eval()
