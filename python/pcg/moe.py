"""pcg::moe: the opaque MoE-layer op. It finds its layer by id and runs the
experts with ``pcg::fused_moe`` (plus expert-parallel communication when the
layer's experts are spread over ranks). Inside a captured segment it is just
more kernels; a layer whose EP mode cannot be captured becomes a split op.

hidden [N, H], topk_weights [N, k] (any float dtype), topk_ids [N, k] (int32
or int64, global expert ids) -> [N, H] in hidden's dtype. Rows past the
running batch's real token count (``num_valid``) come out as exact zeros.
"""
from __future__ import annotations

import torch

from . import registry as _reg
from .registry import MoELayer

_lib = torch.library.Library("pcg", "IMPL")


def run_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                layer: MoELayer, num_valid: torch.Tensor | None) -> torch.Tensor:
    weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    if layer.ep is not None:
        return layer.ep.run(hidden, weights, ids, layer, num_valid)
    return torch.ops.pcg.fused_moe(
        hidden, layer.w13, layer.w2, weights, ids, layer.expert_map, num_valid,
        layer.b13, layer.b2, layer.activation, layer.alpha, layer.limit, None, layer.w13_block)


def _check(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"pcg::moe: argument 'hidden' must be [T, H], got {tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"pcg::moe: argument 'topk_ids' must be [T, k] with T = {hidden.shape[0]}, "
                         f"got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"pcg::moe: argument 'topk_weights' must match topk_ids' shape "
                         f"{tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")


def moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        layer: int) -> torch.Tensor:
    _check(hidden, topk_weights, topk_ids)
    ctx = _reg.current()
    handle = ctx.registry.moe(layer)
    if handle.split and ctx.recorder is not None:
        out = torch.empty_like(hidden)
        return ctx.recorder.split("pcg::moe_out", [hidden, topk_weights, topk_ids, out, layer], out)
    return run_experts(hidden, topk_weights, topk_ids, handle, ctx.num_valid)


def moe_out(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            out: torch.Tensor, layer: int) -> None:
    _check(hidden, topk_weights, topk_ids)
    ctx = _reg.current()
    out.copy_(run_experts(hidden, topk_weights, topk_ids, ctx.registry.moe(layer), ctx.num_valid))


for _key in ("CPU", "CUDA"):
    _lib.impl("moe", moe, _key)
    _lib.impl("moe_out", moe_out, _key)


@torch.library.register_fake("pcg::moe")
def _moe_fake(hidden, topk_weights, topk_ids, layer):
    return torch.empty_like(hidden)


@torch.library.register_fake("pcg::moe_out")
def _moe_out_fake(hidden, topk_weights, topk_ids, out, layer):
    return None
