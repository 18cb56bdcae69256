"""Llama-4 in ``pcg.wrap``: MoE blocks whose experts have their own code.

transformers' Llama-4 MoE block (``Llama4TextMoe``) does not go through the
experts interface: its experts module runs every expert on every token
(``bmm`` over [E, T, H]) and the router weight scales the expert's *input*
(``expert(x * score)``), not its output. pcg gives such a block an instance
``forward`` that, inside a wrapped forward, keeps the model's own router and
shared expert and runs the routed experts through ``torch.ops.pcg.moe``:

    scores [T, E] = block.router(x)          # sigmoid of the top-k logits, 0 elsewhere
    vals, ids = scores.topk(k)
    out = block.shared_expert(x) + sum_j pcg.moe(x * vals[:, j], 1, ids[:, j])

which is the block's own result (an unselected expert gets input 0 and has no
bias: it adds 0). k = 1 (every released Llama-4) is one ``pcg::moe`` call.
The experts' weights ([E, H, 2I] gate|up, [E, I, H]) are converted to pcg's
layout once, like every experts module's; ``pcg.unwrap`` restores them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Block classes with their own expert code that pcg runs (by class name: the
# modeling module need not be imported to look for them).
BLOCK_CLASSES = ("Llama4TextMoe",)
# What pcg's experts conversion reads off an experts module: Llama-4's layout.
_LAYOUT_FLAGS = (("has_gate", True), ("has_bias", False), ("is_transposed", True),
                 ("is_concatenated", True))


def find_blocks(model: nn.Module) -> list:
    """[(name, block)] of the MoE blocks with their own expert code."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in BLOCK_CLASSES]


def check_block(name: str, block: nn.Module) -> None:
    """Refuse (before anything changes) a block whose parts are not Llama-4's."""
    experts = getattr(block, "experts", None)
    router = getattr(block, "router", None)
    cls = type(block).__name__
    if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module) or \
            not callable(getattr(block, "shared_expert", None)):
        raise NotImplementedError(f"pcg.wrap: MoE block {name} ({cls}) lacks the experts / router / "
                                  "shared_expert modules pcg runs it with")
    w13, w2 = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    converted = "_pcg_orig_layout" in experts.__dict__  # wrapped before: pcg's layout already
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor) or w13.dim() != 3 or \
            w2.dim() != 3 or (not converted and (w13.shape[2] != 2 * w2.shape[1] or
                                                 w13.shape[1] != w2.shape[2] or
                                                 w13.shape[0] != w2.shape[0])):
        raise ValueError(f"pcg.wrap: MoE block {name} ({cls}): expected experts gate_up_proj [E, H, 2I] "
                         f"and down_proj [E, I, H], got {_shape(w13)} and {_shape(w2)}")
    k = top_k(block)
    if not 1 <= k <= w13.shape[0]:
        raise ValueError(f"pcg.wrap: MoE block {name} ({cls}): top_k {k} outside 1..{w13.shape[0]} experts")


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def top_k(block: nn.Module) -> int:
    return int(getattr(block.router, "top_k", getattr(block, "top_k", 1)))


def mark_layout(experts: nn.Module) -> None:
    """Give the experts module the layout flags pcg's conversion reads (a
    module wrapped before keeps the ones the conversion left)."""
    added = [a for a, _ in _LAYOUT_FLAGS if a not in experts.__dict__ and not hasattr(type(experts), a)]
    for a, v in _LAYOUT_FLAGS:
        if a in added:
            setattr(experts, a, v)
    experts.__dict__.setdefault("_pcg_added_flags", added)


def unmark_layout(experts: nn.Module) -> None:
    """mark_layout backwards (after the layout itself is restored)."""
    for a in experts.__dict__.pop("_pcg_added_flags", ()):
        experts.__dict__.pop(a, None)


class MoeForward:
    """The forward pcg.wrap gives a Llama-4 MoE block: the routed experts
    through ``pcg::moe`` (see the module docstring). An object, not a
    closure, so that a wrapped model still pickles. Outside a wrapped
    forward it raises (the experts' weights are in pcg's layout)."""

    def __init__(self, block: nn.Module, name: str) -> None:
        self.block, self.name = block, name

    def __call__(self, hidden_states: torch.Tensor) -> tuple:
        from .hf import _layer_id
        block = self.block
        lid = _layer_id(block, "experts")
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores, logits = block.router(x)  # [T, E]: sigmoid of the top-k logits, 0 elsewhere
        if scores.dim() != 2 or scores.shape[0] != x.shape[0]:
            raise RuntimeError(f"pcg: MoE block {self.name}: its router returned scores of shape "
                               f"{tuple(scores.shape)}, expected [tokens {x.shape[0]}, experts]")
        vals, ids = torch.topk(scores, top_k(block), dim=1)
        out = block.shared_expert(x)
        ids = ids.to(torch.int32)  # what pcg::fused_moe takes (one conversion for every j)
        ones = torch.ones((x.shape[0], 1), dtype=torch.float32, device=x.device)
        for j in range(ids.shape[1]):
            routed_in = (x * vals[:, j:j + 1]).contiguous()
            out = out + torch.ops.pcg.moe(routed_in, ones, ids[:, j:j + 1].contiguous(), lid)
        return out, logits


def patch_forward(block: nn.Module, name: str) -> None:
    """Route the block through :class:`MoeForward` (``_restore_forward`` in
    pcg.integrations.hf undoes it)."""
    from .hf import replace_forward
    replace_forward(block, MoeForward(block, name))
