"""DBRX in ``pcg.wrap``: experts with their own code and weight layout.

transformers' ``DbrxExperts`` takes the experts interface's arguments
(hidden, top-k ids, top-k weights) but not its decorator, and keeps its
weights in ``mlp.w1`` / ``mlp.v1`` / ``mlp.w2``, each [E * I, H] (gate, up,
and the down projection transposed). pcg converts them once to its layout,
in place of the module's parameters (memory is not doubled): ``mlp.w1``
holds w13 [E, 2I, H] (gate rows, then up rows, in the block layout of
``w13_block_for(I)``), ``mlp.w2`` holds w2 [E, H, I], ``mlp.v1`` is empty.
A state_dict hook gives the checkpoint layout back, a load_state_dict hook
converts a checkpoint in, and ``pcg.unwrap`` restores the parameters. The
module's instance ``forward`` becomes the experts function ``"pcg"``; the
router (softmax, top-k, p-norm) stays the model's own code.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.fused_moe import deinterleave_w13, interleave_w13, w13_block_for

EXPERTS_CLASSES = ("DbrxExperts",)


def find_experts(model: nn.Module) -> list:
    """[(name, experts module)] of DBRX-style experts."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in EXPERTS_CLASSES]


def _dims(m: nn.Module) -> tuple[int, int, int]:
    return int(m.num_experts), int(m.ffn_hidden_size), int(m.hidden_size)


def check_experts(name: str, m: nn.Module) -> None:
    """Refuse (before anything changes) a module whose weights are not DBRX's."""
    mlp = getattr(m, "mlp", None)
    cls = type(m).__name__
    try:
        E, I, H = _dims(m)
    except (AttributeError, TypeError, ValueError):
        raise NotImplementedError(f"pcg.wrap: experts module {name} ({cls}) lacks num_experts / "
                                  "ffn_hidden_size / hidden_size") from None
    if "_pcg_dbrx" in m.__dict__:  # wrapped before: pcg's layout already
        return
    shapes = [tuple(getattr(getattr(mlp, a, None), "shape", ())) for a in ("w1", "v1", "w2")]
    if any(s != (E * I, H) for s in shapes):
        raise ValueError(f"pcg.wrap: experts module {name} ({cls}): expected mlp.w1 / v1 / w2 of shape "
                         f"[E * I, H] = [{E * I}, {H}], got {shapes}")


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def to_pcg(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(w13 [E, 2I, H], w2 [E, H, I], w13_block): convert the module's weights
    in place (a module wrapped before is already converted)."""
    E, I, H = _dims(m)
    mlp = m.mlp
    if "_pcg_dbrx" not in m.__dict__:
        block = w13_block_for(I)
        with torch.no_grad():
            w13 = torch.cat([mlp.w1.view(E, I, H), mlp.v1.view(E, I, H)], dim=1)
            w13 = interleave_w13(w13.contiguous(), block)
            w2 = mlp.w2.view(E, I, H).transpose(1, 2).contiguous()
            mlp.w1, mlp.w2 = _param(w13), _param(w2)
            mlp.v1 = _param(mlp.v1.new_empty(0))
        m.__dict__["_pcg_dbrx"] = block
        mlp.__dict__["_pcg_dbrx_hooks"] = (
            mlp.register_state_dict_post_hook(_state_dict_in_model_layout),
            mlp.register_load_state_dict_pre_hook(_load_into_pcg_layout))
        mlp.__dict__["_pcg_dbrx_dims"] = (E, I, H, block)
    return mlp.w1, mlp.w2, m.__dict__["_pcg_dbrx"]


def _to_model(w13: torch.Tensor, w2: torch.Tensor, I: int, H: int, block: int) -> tuple:
    """pcg's (w13, w2) -> the checkpoint's (w1, v1, w2), each [E * I, H] (E
    from the tensors: an expert-parallel rank holds its share)."""
    E = w13.shape[0]
    w13 = deinterleave_w13(w13, block)
    return (w13[:, :I].reshape(E * I, H).contiguous(), w13[:, I:].reshape(E * I, H).contiguous(),
            w2.transpose(1, 2).reshape(E * I, H).contiguous())


def _state_dict_in_model_layout(mlp: nn.Module, state_dict: dict, prefix: str, _meta) -> None:
    _, I, H, block = mlp.__dict__["_pcg_dbrx_dims"]
    if prefix + "w1" in state_dict and prefix + "w2" in state_dict:
        w1, v1, w2 = _to_model(state_dict[prefix + "w1"].detach(), state_dict[prefix + "w2"].detach(),
                               I, H, block)
        state_dict[prefix + "w1"], state_dict[prefix + "v1"], state_dict[prefix + "w2"] = w1, v1, w2


def _load_into_pcg_layout(mlp: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    E, I, H, block = mlp.__dict__["_pcg_dbrx_dims"]
    w1, v1, w2 = (state_dict.get(prefix + k) for k in ("w1", "v1", "w2"))
    if all(isinstance(t, torch.Tensor) and tuple(t.shape) == (E * I, H) for t in (w1, v1, w2)):
        w13 = torch.cat([w1.view(E, I, H), v1.view(E, I, H)], dim=1)
        state_dict[prefix + "w1"] = interleave_w13(w13.contiguous(), block)
        state_dict[prefix + "v1"] = v1.new_empty(0)
        state_dict[prefix + "w2"] = w2.view(E, I, H).transpose(1, 2).contiguous()


def restore(m: nn.Module) -> None:
    """to_pcg backwards (pcg.unwrap, or a refused wrap)."""
    if m.__dict__.pop("_pcg_dbrx", None) is None:
        return
    mlp = m.mlp
    _, I, H, block = mlp.__dict__.pop("_pcg_dbrx_dims")
    for hook in mlp.__dict__.pop("_pcg_dbrx_hooks", ()):
        hook.remove()
    with torch.no_grad():
        w1, v1, w2 = _to_model(mlp.w1, mlp.w2, I, H, block)
    mlp.w1, mlp.v1, mlp.w2 = _param(w1), _param(v1), _param(w2)


class ExpertsForward:
    """The forward pcg.wrap gives a DBRX experts module: the experts function
    ``"pcg"`` (raises outside a wrapped forward: the weights are pcg's)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        from .hf import pcg_experts_forward
        return pcg_experts_forward(self.module, hidden_states, top_k_index, top_k_weights)


def patch_forward(m: nn.Module) -> None:
    from .hf import replace_forward
    replace_forward(m, ExpertsForward(m))
