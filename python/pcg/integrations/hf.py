"""Hugging Face transformers integration: ``pcg.wrap(model)`` on a transformers
MoE model.

No class is patched: pcg registers an attention function and an
experts function named ``"pcg"`` with transformers' own interfaces
(``AttentionInterface``, ``ExpertsInterface``) and switches the model to them
(``set_attn_implementation`` / ``set_experts_implementation``). Every attention
module (a module whose forward dispatches through the attention interface)
and every experts module (a class decorated with ``@use_experts_implementation``)
gets a layer id in the wrapped model's registry; the registered functions call
``torch.ops.pcg.attention`` / ``torch.ops.pcg.moe`` with it. Routers, shared
experts, dense layers, norms and embeddings stay the model's own code.

Llama-4's MoE blocks, whose experts do not use the experts interface, get an
instance ``forward`` that runs them through ``torch.ops.pcg.moe``
(``hf_llama4.py``). Hybrid models' other token mixers (linear / lightning
attention, gated delta rule, Mamba, short convolution), for which transformers
has no interface, get an instance ``forward`` that calls the split op
``pcg::mixer`` inside a wrapped forward (their own forward, per packed
sequence; see ``pcg/mixer.py``) and is the module's own forward everywhere else.

No attention mask is built: ``"pcg"`` is deliberately *not* registered with
``AttentionMaskInterface``. transformers' mask creation returns ``None`` right
away for an attention implementation without a mask function, before any
mask work (``find_packed_sequence_indices`` would otherwise run and
synchronise with the host on every eager call). pcg's attention knows the
sequence boundaries of the packed batch itself.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry as _reg
from ..ops.fused_moe import deinterleave_w13, interleave_w13, w13_block_for
from ..registry import LayerRegistry
from . import hf_dbrx, hf_llama4, hf_router

IMPL = "pcg"
# Keyword the wrapped forward passes the positions [1, N] to the model with,
# for attention functions that need them (Llama-4's temperature tuning):
# transformers forwards unknown keywords to the attention function.
POSITIONS_KWARG = "pcg_positions"


# ---- the functions transformers calls ------------------------------------------

def _layer_id(module: nn.Module, kind: str) -> int:
    ctx = _reg._RUNNING.get()
    if ctx is None:
        raise RuntimeError(
            f"pcg: {type(module).__name__} ran with {kind} implementation 'pcg' outside a pcg-wrapped "
            "model's forward. pcg.wrap(model) switches the model to pcg's implementations; call the "
            "wrapped model, or switch back with model.set_attn_implementation(...) / "
            "model.set_experts_implementation(...).")
    ids = getattr(module, "_pcg_layer_ids", None)
    lid = ids.get(id(ctx.registry)) if ids else None
    if lid is None:
        raise RuntimeError(f"pcg: {type(module).__name__} has no {kind} layer id in the running wrapped "
                           "model (was the module added after pcg.wrap?)")
    return lid


def pcg_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                          scaling: Optional[float] = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"pcg"``: query [1, Hq, N, D], key/value
    [1, Hkv, N, D(v)] of the packed row -> ([1, N, Hq, Dv], None)."""
    lid = _layer_id(module, "attention")
    if kwargs.get("indices") is not None:
        raise NotImplementedError(f"pcg: {type(module).__name__} passes sparse-attention indices; pcg's "
                                  "attention is dense causal")
    if query.shape[0] != 1:
        raise RuntimeError(f"pcg: attention expects one packed row (batch 1), got query of shape "
                           f"{tuple(query.shape)}")
    if attention_mask is not None:
        raise RuntimeError("pcg: attention got an explicit attention mask; pcg's attention builds "
                           "its own (causal, per packed sequence)")
    _sync_settings(module, _reg.current().registry.attention(lid), scaling, kwargs)
    temperature = module.__dict__.get("_pcg_temperature")
    if temperature is not None:
        query = _temperature_scaled(query, kwargs.get(POSITIONS_KWARG), *temperature)
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    out = torch.ops.pcg.attention(q, k, v, lid)  # [N, Hq, Dv]
    return out[None], None


def _temperature_scaled(query: torch.Tensor, positions: Optional[torch.Tensor], floor_scale: float,
                        attn_scale: float) -> torch.Tensor:
    """Llama-4's attention temperature tuning of NoPE layers, by position:
    query [1, Hq, N, D] * (log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1).
    The model computes it from the row index (``arange``), which over pcg's
    packed row would be the wrong position for every sequence but the first;
    pcg takes the setting over at wrap time and uses the positions its
    forward passes down ([1, N], keyword POSITIONS_KWARG: an argument, so a
    compiled trace reads the call's positions, not the first call's).
    Each sequence alone gets the model's own numbers, bit for bit."""
    if positions is None:
        raise RuntimeError("pcg: a Llama-4 NoPE attention layer got no positions from the wrapped "
                           f"forward (keyword {POSITIONS_KWARG!r} did not reach the attention function)")
    n = query.shape[2]
    scales = torch.log1p(torch.floor((positions.reshape(-1).float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (query * scales.view(1, 1, n, 1)).to(query.dtype)


def _sync_settings(module: nn.Module, layer: Any, scaling: Optional[float], kwargs: dict) -> None:
    """Settings the model passes to the attention function win over the ones
    read from the module at wrap time (they are what its own kernels get)."""
    if scaling is not None and layer.scaling != scaling:
        layer.scaling = float(scaling)
    s_aux = kwargs.get("s_aux", kwargs.get("sinks"))
    softcap = kwargs.get("softcap")
    changed = False
    if isinstance(s_aux, torch.Tensor) and layer.sinks is not s_aux:
        layer.sinks, changed = s_aux, True
    if softcap and layer.softcap != softcap:
        layer.softcap, changed = float(softcap), True
    if changed and layer.fallback is None:
        layer.fallback = _fallback_for(module, layer)
        if layer.fallback is None:
            raise NotImplementedError(
                f"pcg: attention module {type(module).__name__} uses sinks or logit soft-capping but "
                "its modeling file has no eager_attention_forward to run them with")


def pcg_experts_forward(module: nn.Module, hidden_states: torch.Tensor,
                        top_k_index: Optional[torch.Tensor] = None,
                        top_k_weights: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
    """transformers experts function ``"pcg"``: hidden [N, H], ids [N, k],
    weights [N, k] -> [N, H] (router weights applied, summed over k)."""
    if top_k_index is None:
        top_k_index = kwargs.pop("router_indices", None)
    if top_k_weights is None:
        top_k_weights = kwargs.pop("routing_weights", None)
    if top_k_index is None or top_k_weights is None:
        raise TypeError(f"pcg: {type(module).__name__} was called without routing (top_k_index, "
                        "top_k_weights)")
    lid = _layer_id(module, "experts")
    shape = hidden_states.shape
    hidden = hidden_states.reshape(-1, shape[-1])
    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    ids = top_k_index.reshape(hidden.shape[0], -1)
    weights = top_k_weights.reshape(hidden.shape[0], -1)
    out = torch.ops.pcg.moe(hidden, weights, ids, lid)
    return out.view(shape)


def register() -> None:
    """Register the ``"pcg"`` attention and experts functions with transformers
    (idempotent; done by :func:`prepare`)."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    if AttentionInterface._global_mapping.get(IMPL) is not pcg_attention_forward:
        AttentionInterface.register(IMPL, pcg_attention_forward)
    if ExpertsInterface._global_mapping.get(IMPL) is not pcg_experts_forward:
        ExpertsInterface.register(IMPL, pcg_experts_forward)


# ---- finding the layers ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _forward_uses_attention_interface(cls: type) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


def _is_attention_module(m: nn.Module) -> bool:
    """A module that calls transformers' attention interface in its forward."""
    if getattr(m, "config", None) is None or not hasattr(m.config, "_attn_implementation"):
        return False
    return _forward_uses_attention_interface(type(m))


def _is_experts_module(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("has_gate", "is_transposed", "is_concatenated", "has_bias")) \
        and hasattr(m, "config")


def _configs(model: nn.Module) -> list:
    """Every distinct config object held by the model or its modules."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return list(seen.values())


def unprepare(model: nn.Module) -> None:
    """Undo prepare: the attention / experts implementations saved before the
    first wrap, the mixers' forwards, and the expert weights' layout (a
    module's own eager code may ignore the layout flags: gpt-oss's indexes
    gate / up as interleaved columns). For a model pcg.wrap refuses late, and
    for pcg.unwrap."""
    model.__dict__.pop("_pcg_routers", None)
    for cfg, attn, experts in model.__dict__.pop("_pcg_saved_implementations", []):
        cfg._attn_implementation = attn
        if experts is not None:
            cfg._experts_implementation = experts
    for m in model.modules():
        if "_pcg_orig_forward" in m.__dict__:
            _restore_forward(m)
        for hook in m.__dict__.pop("_pcg_state_dict_hooks", ()):
            hook.remove()
        if "_pcg_orig_layout" in m.__dict__:
            _restore_experts_layout(m)
        hf_llama4.unmark_layout(m)
        hf_dbrx.restore(m)
        _restore_temperature(m)


def _restore_experts_layout(m: nn.Module) -> None:
    """_convert_experts backwards: pcg's layout to the module's original
    layout and flags."""
    transposed, interleaved = m.__dict__.pop("_pcg_orig_layout")
    layout = (m.__dict__.pop("_pcg_w13_block", 0), transposed, interleaved)
    with torch.no_grad():
        _set_param(m, "gate_up_proj", _w13_to_model(m.gate_up_proj, *layout))
        if transposed:
            _set_param(m, "down_proj", m.down_proj.transpose(1, 2).contiguous())
        if interleaved and m.has_bias:
            _set_param(m, "gate_up_proj_bias", _interleave(m.gate_up_proj_bias).contiguous())
    m.is_transposed = transposed
    m.is_concatenated = not interleaved


# ---- the experts' layouts: the module's own ([E, H, 2I] when transposed; gate /
# up columns alternating when interleaved) and pcg's ([E, 2I, H], w13 in blocks of
# `block` gate and up rows) ------------------------------------------------------

def _w13_to_model(w: torch.Tensor, block: int, transposed: bool, interleaved: bool) -> torch.Tensor:
    w = deinterleave_w13(w, block)
    if interleaved:
        w = _interleave(w)
    if transposed:
        w = w.transpose(1, 2)
    return w.contiguous()


def _w13_to_pcg(w: torch.Tensor, block: int, transposed: bool, interleaved: bool) -> torch.Tensor:
    if transposed:
        w = w.transpose(1, 2)
    if interleaved:
        w = _deinterleave(w)
    return interleave_w13(w.contiguous(), block)


def _experts_state(m: nn.Module) -> tuple:
    return (m.__dict__.get("_pcg_w13_block", 0), *m.__dict__["_pcg_orig_layout"])


def _state_dict_in_model_layout(m: nn.Module, state_dict: dict, prefix: str, _meta) -> None:
    """state_dict hook of a converted experts module: the checkpoint layout
    (the module's own) rather than pcg's. The experts' tensors are converted
    copies (memory: one more gate_up_proj; unwrap first to avoid them)."""
    block, transposed, interleaved = _experts_state(m)
    for name, fn in (("gate_up_proj", lambda w: _w13_to_model(w, block, transposed, interleaved)),
                     ("down_proj", (lambda w: w.transpose(1, 2).contiguous()) if transposed else None),
                     ("gate_up_proj_bias", (lambda b: _interleave(b).contiguous()) if interleaved
                      else None)):
        if fn is not None and prefix + name in state_dict:
            state_dict[prefix + name] = fn(state_dict[prefix + name].detach())


def _load_state_dict_into_pcg_layout(m: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook of a converted experts module: a checkpoint in
    the module's own layout is converted to pcg's before it is copied into the
    (captured) tensors in place."""
    block, transposed, interleaved = _experts_state(m)
    for name, fn in (("gate_up_proj", lambda w: _w13_to_pcg(w, block, transposed, interleaved)),
                     ("down_proj", (lambda w: w.transpose(1, 2).contiguous()) if transposed else None),
                     ("gate_up_proj_bias", (lambda b: _deinterleave(b).contiguous()) if interleaved
                      else None)):
        w = state_dict.get(prefix + name)
        if fn is not None and isinstance(w, torch.Tensor) and w.dim() >= 2:
            state_dict[prefix + name] = fn(w)


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Dim 1 gate0, up0, gate1, up1, ... -> gate rows, then up rows (pcg's layout)."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """_deinterleave backwards."""
    half = t.shape[1] // 2
    return torch.stack([t[:, :half], t[:, half:]], dim=2).flatten(1, 2)


def _switch_implementations(model: nn.Module) -> list:
    """Switch the model (and every sub-config its modules hold) to "pcg";
    returns [(config, attention impl, experts impl)] as they were."""
    saved = [(cfg, cfg._attn_implementation, getattr(cfg, "_experts_implementation", None))
             for cfg in _configs(model)]
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()  # type: ignore[assignment]
    if isinstance(model, PreTrainedModel):
        model.set_attn_implementation(IMPL)
        model.set_experts_implementation(IMPL)
    # Sub-configs that no PreTrainedModel owns (or a plain nn.Module holding
    # transformers layers): set the config fields directly.
    for cfg in _configs(model):
        if cfg._attn_implementation != IMPL:
            cfg._attn_implementation = IMPL
        if hasattr(cfg, "_experts_implementation") and cfg._experts_implementation != IMPL:
            cfg._experts_implementation = IMPL
    return saved


def _is_sliding(module: nn.Module) -> Optional[int]:
    """The sliding window a layer's mask uses in the unwrapped model (None: full)."""
    cfg = module.config
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if isinstance(layer_types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(layer_types):
        w = window if layer_types[idx] == "sliding_attention" else None
    elif hasattr(module, "sliding_window"):
        w = module.sliding_window
    else:
        w = window
    if w is None or not isinstance(w, int) or w <= 0:
        return None
    return int(w)


# Attention layer types (transformers' config.layer_types) whose keys are not
# a causal (sliding) window or position chunk of the sequence: pcg refuses them.
_UNSUPPORTED_LAYER_TYPES = ("window_attention", "compressed_sparse_attention",
                            "heavily_compressed_attention", "minimax_m3_sparse",
                            "deepseek_sparse_attention", "qwen_sparse_attention",
                            "indexed_attention")  # the last: later transformers' name for the sparse ones


def _layer_type(module: nn.Module) -> Optional[str]:
    layer_types = getattr(module.config, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if isinstance(layer_types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(layer_types):
        return layer_types[idx]
    return None


def _chunk_size(name: str, module: nn.Module) -> Optional[int]:
    """The position chunk a chunked-attention layer (Llama-4) attends within
    (None: not chunked); refuses layer types pcg has no attention for."""
    kind = _layer_type(module)
    if kind in _UNSUPPORTED_LAYER_TYPES:
        raise NotImplementedError(f"pcg.wrap: attention module {name} ({type(module).__name__}) is a "
                                  f"{kind!r} layer; pcg's attention is causal over each sequence "
                                  "(optionally a sliding window or a position chunk)")
    if kind != "chunked_attention":
        return None
    chunk = getattr(module.config, "attention_chunk_size", None)
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"pcg.wrap: attention module {name} ({type(module).__name__}) is a chunked "
                         f"attention layer without a positive config.attention_chunk_size ({chunk!r})")
    return chunk


def _take_temperature(module: nn.Module) -> None:
    """Llama-4's NoPE layers scale queries by a function of the row index
    (attn_temperature_tuning); pcg applies it by position instead
    (:func:`_temperature_scaled`) and turns the module's own off until unwrap."""
    if "_pcg_temperature" in module.__dict__:  # wrapped before
        return
    if getattr(module, "attn_temperature_tuning", False) is True and \
            getattr(module, "use_rope", True) in (False, 0) and \
            hasattr(module, "floor_scale") and hasattr(module, "attn_scale"):
        module._pcg_temperature = (float(module.floor_scale), float(module.attn_scale))
        module.attn_temperature_tuning = False


def _restore_temperature(module: nn.Module) -> None:
    if module.__dict__.pop("_pcg_temperature", None) is not None:
        module.attn_temperature_tuning = True


def _eager_function(module: nn.Module) -> Optional[Callable]:
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None) if mod is not None else None
    return fn if callable(fn) else None


def _fallback_for(module: nn.Module, layer: Any) -> Optional[Callable]:
    """``fallback(q4, k4, v4, mask4) -> [1, S, Hq, Dv]``: the modeling file's own
    eager attention bound to ``module``, with the layer's settings passed as
    the model passes them (mask additive, dropout 0)."""
    eager = _eager_function(module)
    if eager is None:
        return None

    def fallback(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor,
                 mask4: torch.Tensor) -> torch.Tensor:
        kw: dict[str, Any] = {"sliding_window": layer.sliding_window}
        if layer.sinks is not None:
            kw["s_aux"] = layer.sinks
        if layer.softcap is not None:
            kw["softcap"] = layer.softcap
        scaling = layer.scaling if layer.scaling is not None else q4.shape[-1] ** -0.5
        out, _ = eager(module, q4, k4, v4, mask4, scaling=scaling, dropout=0.0, **kw)
        return out
    return fallback


# Name parts of a multimodal model's encoders (their attention is not causal).
_ENCODER_WORDS = re.compile(r"(vision|visual|image|audio|speech|encoder|vit|siglip|wav|vocoder)", re.IGNORECASE)


def _check_causal(name: str, m: nn.Module) -> None:
    if getattr(m, "is_causal", True) is not False:
        return
    raise NotImplementedError(f"pcg.wrap: attention module {name} ({type(m).__name__}) is not causal; "
                              f"pcg runs causal (decoder) attention only.{_encoder_hint(name, m)}")


def _encoder_hint(name: str, m: nn.Module) -> str:
    """What to wrap instead where module ``name`` looks like part of a
    multimodal model's encoder (vision, audio, speech...); "" otherwise."""
    if not (_ENCODER_WORDS.search(name) or _ENCODER_WORDS.search(type(m).__name__)):
        return ""
    return (" It looks like a multimodal model's encoder: pcg.wrap the language model alone (for "
            "example model.language_model or model.model.language_model, a *ForCausalLM or its "
            "decoder) and run the encoder as it is.")


def _add_attention(registry: LayerRegistry, name: str, m: nn.Module) -> int:
    """Register an attention module (prepare has checked it: _check_causal, _chunk_size)."""
    sinks = getattr(m, "sinks", None)
    if not isinstance(sinks, torch.Tensor):
        sinks = None
    softcap = getattr(m.config, "attn_logit_softcapping", None)
    softcap = float(softcap) if softcap else None
    scaling = getattr(m, "scaling", None)
    layer = registry.add_attention(module=m, scaling=float(scaling) if scaling is not None else None,
                                   sliding_window=_is_sliding(m), chunk_size=_chunk_size(name, m),
                                   softcap=softcap, sinks=sinks, name=name)
    layer.fallback = _fallback_for(m, layer)
    if layer.fallback is None and layer.needs_fallback():
        raise NotImplementedError(
            f"pcg.wrap: attention module {name} ({type(m).__name__}) uses "
            f"{'sinks' if sinks is not None else 'logit soft-capping'} but its modeling file has no "
            "eager_attention_forward to run it with")
    _take_temperature(m)
    return layer.layer_id


# ---- experts: weights in pcg's layout -------------------------------------------

# Attribute pairs (alpha, limit) under which transformers' experts keep
# gpt-oss's clamped SwiGLU constants (gpt-oss; MiniMax-M3).
_SWIGLU_ATTRS = (("alpha", "limit"), ("swiglu_alpha", "swiglu_limit"))


def _swigluoai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def _gate_candidates(m: nn.Module) -> list:
    """(activation, alpha, limit, fn(gate, up)) that pcg's kernels run, for
    probing a custom ``_apply_gate``."""
    plain = [("silu", F.silu), ("gelu", F.gelu), ("gelu_tanh", functools.partial(F.gelu, approximate="tanh"))]
    out = [(a, 1.702, 7.0, lambda g, u, f=f: f(g) * u) for a, f in plain]
    for an, ln in _SWIGLU_ATTRS:
        alpha, limit = getattr(m, an, None), getattr(m, ln, None)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, limit)):
            out.insert(0, ("swigluoai", float(alpha), float(limit),
                           lambda g, u, a=float(alpha), lim=float(limit): _swigluoai(g, u, a, lim)))
    return out


def _probe_gate(m: nn.Module) -> Optional[tuple[str, float, float]]:
    """The (activation, alpha, limit) of pcg's kernels that an experts module's
    own ``_apply_gate`` computes, found by running it on probe rows (float64,
    values on both sides of any clamp) in the module's own gate/up layout
    (concatenated halves or interleaved columns); None when none matches."""
    interleaved = m.__dict__.get("_pcg_orig_layout", (None, not m.is_concatenated))[1]
    cands = _gate_candidates(m)
    span = max([abs(c[2]) for c in cands if c[0] == "swigluoai"] + [4.0]) * 2 + 1
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(24, 16, generator=g, dtype=torch.float64) * 2 - 1,
                   (torch.rand(24, 16, generator=g, dtype=torch.float64) * 2 - 1) * span])
    try:
        with torch.no_grad():
            y = type(m)._apply_gate(m, x.clone())  # a clone: the gate may work in place
    except Exception:  # noqa: BLE001 - any failure: not a gate pcg can run
        return None
    gate, up = (x[:, ::2], x[:, 1::2]) if interleaved else x.chunk(2, dim=-1)
    for act, alpha, limit, fn in cands:
        ref = fn(gate, up)
        if isinstance(y, torch.Tensor) and y.shape == ref.shape and \
                torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-9):
            return act, alpha, limit
    return None


def _activation(name: str, m: nn.Module, act: Any = None) -> tuple[str, float, float]:
    """(activation, alpha, limit) of an experts module in pcg's terms (its
    ``act_fn``, or ``act`` where the module keeps it elsewhere). A custom
    ``_apply_gate`` is accepted where it computes one of pcg's activations
    (gpt-oss's and MiniMax-M3's clamped SwiGLU: swigluoai), found by probing it."""
    from transformers.integrations.moe import _default_apply_gate
    apply_gate = getattr(type(m), "_apply_gate", None)
    cls = type(m).__name__
    if apply_gate is not None and apply_gate is not _default_apply_gate:
        found = _probe_gate(m)
        if found is not None:
            return found
        raise NotImplementedError(f"pcg.wrap: experts module {name} ({cls}) has a custom gate "
                                  "function (_apply_gate) that computes none of pcg's activations "
                                  "(silu, gelu, tanh gelu, gpt-oss's clamped swigluoai)")
    act = getattr(m, "act_fn", None) if act is None else act
    hidden_act = getattr(getattr(m, "config", None), "hidden_act", None)
    from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation, SiLUActivation
    if isinstance(act, (SiLUActivation, nn.SiLU)) or act is F.silu:
        return "silu", 1.702, 7.0
    if type(act) is GELUActivation or (isinstance(act, nn.GELU) and act.approximate == "none") or \
            act is F.gelu:  # F.gelu's default is the exact (erf) form
        return "gelu", 1.702, 7.0
    if type(act) in (GELUTanh, NewGELUActivation) or \
            (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh", 1.702, 7.0
    raise NotImplementedError(
        f"pcg.wrap: experts module {name} ({cls}) uses activation "
        f"{hidden_act!r} ({type(act).__name__}); pcg's fused MoE supports silu, exact (erf) gelu, tanh gelu and "
        "gpt-oss's swigluoai")


def _set_param(m: nn.Module, attr: str, t: torch.Tensor) -> None:
    old = getattr(m, attr)
    if old is t:
        return
    if isinstance(old, nn.Parameter) or attr in m._parameters:
        setattr(m, attr, nn.Parameter(t, requires_grad=False))
    else:
        setattr(m, attr, t)


def _convert_experts(name: str, m: nn.Module) -> tuple:
    """(w13 [E,2I,H], w2 [E,H,I], b13 [E,2I]|None, b2 [E,H]|None, w13_block) in
    pcg's layout: w13 in the block layout of FUSED_W13_BLOCK when I allows it
    (the CUTLASS path's activation in GEMM1's epilogue), gate rows then up rows
    otherwise (w13_block 0). The weights are converted once and replace the
    module's parameters, so memory is not doubled; the module remembers its
    layout (wrapped again, or unwrapped: restore())."""
    cls = type(m).__name__
    if not m.has_gate:
        raise NotImplementedError(f"pcg.wrap: experts module {name} ({cls}) is not gated (up_proj "
                                  "only); pcg's fused MoE runs gated experts (gate_up_proj)")
    transposed, interleaved = bool(m.is_transposed), not m.is_concatenated
    # The layout before the first wrap, for restore() (wrapped twice: already pcg's).
    m.__dict__.setdefault("_pcg_orig_layout", (transposed, interleaved))
    # Wrapped before: the weights are in pcg's (block) layout already; the
    # tensors stay the same, shared with any wrapper still alive.
    block = m.__dict__.get("_pcg_w13_block", 0)
    with torch.no_grad():
        # [E, H, 2I] -> [E, 2I, H]; gate0, up0, gate1, up1, ... -> gate rows, then up rows
        _set_param(m, "gate_up_proj", _w13_to_pcg(m.gate_up_proj, 0, transposed, interleaved))
        w2 = m.down_proj
        if transposed:  # [E, I, H] -> [E, H, I]
            w2 = w2.transpose(1, 2)
        _set_param(m, "down_proj", w2.contiguous())
        if m.has_bias:
            b13 = m.gate_up_proj_bias
            if interleaved:
                b13 = _deinterleave(b13)
            _set_param(m, "gate_up_proj_bias", b13.contiguous())
            _set_param(m, "down_proj_bias", m.down_proj_bias.contiguous())
    # The module's weights are now in pcg's layout.
    m.is_transposed = False
    m.is_concatenated = True
    w13, w2 = m.gate_up_proj, m.down_proj
    b13 = m.gate_up_proj_bias if m.has_bias else None
    b2 = m.down_proj_bias if m.has_bias else None
    E, two_i, H = w13.shape if w13.dim() == 3 else (0, 1, 0)
    if w13.dim() != 3 or two_i % 2 or tuple(w2.shape) != (E, H, two_i // 2) or \
            (b13 is not None and tuple(b13.shape) != (E, two_i)) or \
            (b2 is not None and tuple(b2.shape) != (E, H)):
        raise ValueError(f"pcg.wrap: experts module {name} ({cls}): unexpected weight shapes "
                         f"gate_up_proj {tuple(w13.shape)}, down_proj {tuple(w2.shape)} (pcg layout)")
    if block:  # wrapped before
        return w13, w2, b13, b2, block
    block = w13_block_for(two_i // 2)
    if block:
        with torch.no_grad():
            _set_param(m, "gate_up_proj", interleave_w13(w13, block))
        m.__dict__["_pcg_w13_block"] = block
        w13 = m.gate_up_proj
    # state_dict() / load_state_dict() keep speaking the module's own layout.
    if "_pcg_state_dict_hooks" not in m.__dict__:
        m.__dict__["_pcg_state_dict_hooks"] = (
            m.register_state_dict_post_hook(_state_dict_in_model_layout),
            m.register_load_state_dict_pre_hook(_load_state_dict_into_pcg_layout))
    return w13, w2, b13, b2, block


# ---- token mixers other than attention -------------------------------------------

# Class-name parts of transformers' sequence mixers that do not go through the
# attention interface (linear / lightning attention, gated delta rules, state
# space models, short convolutions, recurrences).
_MIXER_NAME = re.compile(r"(^|_)(linear_attention|lightning|delta|mamba\d*|ssm|short_conv|rwkv\d*|"
                         r"recurrent|retention|hyena|conv1d)(_|$)")
# Class-name words of modules that act on each token alone (a layer made of
# these and of experts needs no token mixer: Nemotron-H's MoE-only blocks).
_TOKENWISE_WORDS = {"norm", "rms", "layernorm", "router", "gate", "gating", "experts", "expert",
                    "mlp", "moe", "act", "activation", "rotary", "scale", "scaling", "dropout",
                    "identity", "linear", "embedding"}


def _name_words(cls_name: str) -> str:
    """``GatedDeltaNet`` -> ``gated_delta_net``, ``FalconSSMLayer`` -> ``falcon_ssm_layer``."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+\d*[a-z]*|[A-Z]+\d*|\d+", cls_name)
    return "_".join(w.lower() for w in words)


def _find_mixers(model: nn.Module, attention: list) -> list:
    """The token mixers of a hybrid model that are not attention modules:
    [(name, module)], outermost matches only.

    pcg packs a batch's sequences into one row and only its attention op knows
    where a sequence ends; a linear-attention, state-space or convolution layer
    run over the packed row would mix tokens across sequences (a silently wrong
    result), so each one becomes a split op that runs per sequence. Every layer
    of a decoder-layer list that holds attention must hold an attention module
    or a recognised mixer (class-name parts: _MIXER_NAME); a layer with neither
    mixes tokens in a way pcg does not know, and the model is refused."""
    name_of_model = type(model).__name__
    attn_names = {n for n, _ in attention}
    modules = dict(model.named_modules())
    found = []
    for n, m in modules.items():
        cls = type(m)
        if n in attn_names or not cls.__module__.startswith("transformers."):
            continue
        if not _MIXER_NAME.search(_name_words(cls.__name__)) or \
                any(n.startswith(f + ".") for f, _ in found):
            continue
        # A decoder layer named after its mixer (JambaMambaDecoderLayer) holds
        # experts or attention: the mixer is inside it.
        if any(_is_experts_module(c) or _is_attention_module(c) for c in m.modules()):
            continue
        found.append((n, m))
    # A convolution along the sequence outside those mixers (Zaya's attention
    # convolves its q/k projections first) would run over the packed row.
    for n, m in modules.items():
        if isinstance(m, nn.Conv1d) and m.kernel_size[0] > 1 and \
                not any(n.startswith(f + ".") for f, _ in found):
            raise NotImplementedError(
                f"pcg.wrap: model {name_of_model}: module {n} is a convolution along the sequence "
                f"(kernel {m.kernel_size[0]}) outside any token mixer pcg runs per sequence: over pcg's "
                f"packed row it would mix tokens across sequences.{_encoder_hint(n, m)}")
    names = attn_names | {n for n, _ in found}
    lists = {n.rsplit(".", 2)[0] for n in names if n.count(".") >= 2}
    for list_name in sorted(lists):
        layers = modules.get(list_name)
        if not isinstance(layers, nn.ModuleList):
            continue
        for i, layer in enumerate(layers):
            prefix = f"{list_name}.{i}."
            if not any(a.startswith(prefix) for a in names) and not _tokenwise(layer):
                children = ", ".join(type(c).__name__ for c in layer.children())
                raise NotImplementedError(
                    f"pcg.wrap: model {name_of_model}: layer {list_name}.{i} ({type(layer).__name__}: "
                    f"{children}) has no attention module using transformers' attention interface "
                    "and no token mixer pcg recognises (linear attention, gated delta rule, Mamba, "
                    "short convolution), so it mixes tokens some other way. pcg packs a batch's "
                    "sequences into one row: such a layer would mix tokens across sequences.")
    return found


def _tokenwise(layer: nn.Module) -> bool:
    """True when every leaf module of ``layer`` acts on each token alone
    (norms, linear maps, activations, routers, experts): no token mixer."""
    for m in layer.modules():
        if next(m.children(), None) is not None or _is_experts_module(m):
            continue
        if isinstance(m, (nn.Linear, nn.Dropout, nn.Identity)) or \
                type(m).__module__.startswith("torch.nn.modules.activation"):
            continue
        if not set(_name_words(type(m).__name__).split("_")) & _TOKENWISE_WORDS:
            return False
    return True


# Arguments of a mixer's forward that carry per-batch state pcg does not keep
# (prefill without a cache): they must be None.
_CACHE_ARGS = ("past_key_values", "cache_params", "past_key_value", "layer_past")


class _MixerArgs:
    """What a mixer's forward takes (read once, outside any trace): the
    per-sequence calls get the model's non-tensor arguments as passed, and
    None for per-batch tensors (masks, positions, rotary tables) the forward
    requires; optional per-batch tensors are dropped."""

    def __init__(self, orig: Callable, name: str) -> None:
        self.name = name
        try:
            params = list(inspect.signature(orig).parameters.values())
        except (TypeError, ValueError):
            params = []
        plain = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self.positional = [p.name for p in plain[1:]]  # after hidden_states
        self.required = {p.name for p in plain[1:] if p.default is inspect.Parameter.empty}
        # What a call gets before (or without: a compiled forward replays no
        # Python side effect) the model's first call: None for every required one.
        self.defaults = {k: None for k in self.required}

    def __call__(self, args: tuple, kwargs: dict) -> dict:
        given = dict(zip(self.positional, args))
        given.update(kwargs)
        out = {}
        for k, v in given.items():
            if k in _CACHE_ARGS and v is not None:
                raise NotImplementedError(f"pcg: mixer {self.name} got a cache ({k}); pcg runs "
                                          "prefill without one (use_cache=False)")
            if isinstance(v, torch.Tensor) or (
                    isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)):
                if k in self.required:
                    out[k] = None
            else:
                out[k] = v
        return out


def _probe_outputs(m: nn.Module, orig: Callable, spec: _MixerArgs, hidden: int) -> Optional[int]:
    """The forward's return convention on a one-token dummy row: 0 (a tensor)
    or the length of the tuple it returns; None if the probe fails (then the
    op's first eager run tells)."""
    p = next(iter(m.parameters()), None)
    x = torch.zeros(1, 1, hidden, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    try:
        with torch.no_grad():
            y = orig(x, **spec.defaults)
    except Exception:  # noqa: BLE001 - a probe only
        return None
    return len(y) if isinstance(y, (tuple, list)) else 0


class _ClassForward:
    """A module's own class forward, callable and picklable (a bound method
    pickles as getattr(module, "forward"), which on load would find the
    patched forward instead)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


class _MixerForward:
    """The forward pcg.wrap gives a mixer module: pcg::mixer inside a wrapped
    forward, the module's own forward everywhere else. An object, not a
    closure, so that a wrapped model still pickles."""

    def __init__(self, module: nn.Module, orig: Callable, spec: "_MixerArgs", name: str) -> None:
        self.module, self.orig, self.spec, self.name = module, orig, spec, name

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        ctx = _reg._RUNNING.get()
        if ctx is None:
            return self.orig(hidden_states, *args, **kwargs)
        lid = _layer_id(self.module, "mixer")
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1:
            raise RuntimeError(f"pcg: mixer {self.name} expects one packed row [1, T, H], got "
                               f"{tuple(hidden_states.shape)}")
        running = ctx.registry.mixer(lid)  # this registry's layer (a model wrapped twice has two)
        running.kwargs = self.spec(args, kwargs)
        y = torch.ops.pcg.mixer(hidden_states[0], lid)[None]
        n = running.n_out  # the module's return convention: a tensor, or a tuple led by it
        return (y,) + (None,) * (n - 1) if n else y


def _own_forward(m: nn.Module) -> Callable:
    """The module's forward as pcg keeps it (``_pcg_orig_forward``): its class
    forward as a picklable :class:`_ClassForward` in the common case."""
    orig = m.forward
    if getattr(orig, "__self__", None) is m and \
            getattr(orig, "__func__", None) is getattr(type(m), "forward", None):
        return _ClassForward(m)
    return orig


def replace_forward(m: nn.Module, forward: Callable) -> None:
    """Give ``m`` the instance forward ``forward``; the module's own is kept
    for :func:`_restore_forward` (a module wrapped before gets its own back
    first)."""
    if "_pcg_orig_forward" in m.__dict__:
        _restore_forward(m)
    m._pcg_orig_forward = _own_forward(m)
    m.forward = forward


def _patch_mixer(m: nn.Module, layer: Any, hidden: int) -> None:
    """Route the module's forward through pcg::mixer inside a wrapped forward
    (its own forward everywhere else)."""
    spec = _MixerArgs(m.forward, layer.name)  # the real signature
    orig = _own_forward(m)
    layer.kwargs = dict(spec.defaults)
    n_out = _probe_outputs(m, orig, spec, hidden)
    if n_out is not None:
        layer.n_out = n_out
    m.forward = _MixerForward(m, orig, spec, layer.name)
    m._pcg_orig_forward = orig


def _restore_forward(m: nn.Module) -> None:
    """_patch_mixer backwards."""
    orig = m.__dict__.pop("_pcg_orig_forward")
    if isinstance(orig, _ClassForward):
        m.__dict__.pop("forward", None)  # the class's forward again
    else:
        m.forward = orig


# ---- prepare ---------------------------------------------------------------------

def prepare(model: nn.Module, ep_cfg: Any = None, router: str = "pcg"):
    """Register the layers of a transformers MoE ``model`` with a new registry
    and switch it to pcg's attention and experts functions (and, with
    ``router="pcg"``, the routers pcg.route reproduces to it: hf_router).

    Returns (registry, forward_fn) for :class:`pcg.wrap.WrappedModel`.
    """
    name_of_model = type(model).__name__
    attention = [(n, m) for n, m in model.named_modules() if _is_attention_module(m)]
    experts = [(n, m) for n, m in model.named_modules() if _is_experts_module(m)]
    blocks = hf_llama4.find_blocks(model)  # MoE blocks with their own expert code (Llama-4)
    dbrx = hf_dbrx.find_experts(model)  # experts with their own weight layout (DBRX)
    mixers = _find_mixers(model, attention)
    if not attention and not mixers:
        raise TypeError(
            f"pcg.wrap: model {name_of_model} has no attention module using transformers' attention "
            "interface (ALL_ATTENTION_FUNCTIONS); pcg.wrap supports transformers MoE models and models "
            "built from pcg.nn layers")
    if not experts and not blocks and not dbrx:
        raise TypeError(
            f"pcg.wrap: model {name_of_model} has no experts module using transformers' experts "
            "interface (use_experts_implementation); pcg.wrap supports Mixture-of-Experts models whose "
            "experts use it, Llama-4 and DBRX (dense models, and other MoE families with their own "
            "expert code such as JetMoE, are not supported)")
    for n, m in attention:
        if isinstance(getattr(m, "indexer", None), nn.Module):
            raise NotImplementedError(
                f"pcg.wrap: model {name_of_model}: attention module {n} ({type(m).__name__}) is sparse "
                "attention with a top-k indexer (DeepSeek-V3.2 style): it selects keys per query from "
                "a mask over the whole batch, and pcg's attention is dense causal per packed sequence")
    # Check everything before changing anything (the mixers are checked above).
    for n, m in experts:
        if not m.has_gate:
            raise NotImplementedError(f"pcg.wrap: experts module {n} ({type(m).__name__}) is not "
                                      "gated (up_proj only); pcg's fused MoE runs gated experts "
                                      "(gate_up_proj)")
        if getattr(m, "has_post_expert_norm", False):
            raise NotImplementedError(f"pcg.wrap: experts module {n} ({type(m).__name__}) normalises "
                                      "each expert's output before the weighted sum "
                                      "(has_post_expert_norm); pcg's fused MoE sums them directly")
    for n, m in attention:
        _check_causal(n, m)
        _chunk_size(n, m)
    for n, b in blocks:
        hf_llama4.check_block(n, b)
    for n, m in dbrx:
        hf_dbrx.check_experts(n, m)
    activations = {n: _activation(n, m) for n, m in experts}
    activations.update({f"{n}.experts": _activation(f"{n}.experts", b.experts) for n, b in blocks})
    activations.update({n: _activation(n, m.mlp, getattr(m.mlp, "activation_fn", None)) for n, m in dbrx})

    register()
    registry = LayerRegistry()
    for n, m in attention:
        lid = _add_attention(registry, n, m)
        _remember_id(m, registry, lid)
    for n, m in mixers:
        if "_pcg_orig_forward" in m.__dict__:  # wrapped before: patch the module's own forward again
            _restore_forward(m)
        layer = registry.add_mixer(forward=m.forward, module=m, name=n)
        _remember_id(m, registry, layer.layer_id)
        _patch_mixer(m, layer, int(getattr(model.config, "hidden_size", 0) or 0))
    for n, m in experts:
        _remember_id(m, registry, _add_experts(registry, n, m, activations[n], ep_cfg))
    for n, b in blocks:
        hf_llama4.mark_layout(b.experts)
        lid = _add_experts(registry, f"{n}.experts", b.experts, activations[f"{n}.experts"], ep_cfg)
        _remember_id(b.experts, registry, lid)
        _remember_id(b, registry, lid)
        hf_llama4.patch_forward(b, n)
    for n, m in dbrx:
        w13, w2, block = hf_dbrx.to_pcg(m)
        handle = _register_moe(registry, n, m, (w13, w2, None, None, block), activations[n], ep_cfg)
        if ep_cfg is not None:  # the module keeps only this rank's experts
            _set_param(m.mlp, "w1", handle.w13)
            _set_param(m.mlp, "w2", handle.w2)
        _remember_id(m, registry, handle.layer_id)
        hf_dbrx.patch_forward(m)
    saved = _switch_implementations(model)
    # Wrapped twice: keep the implementations the model had before the first wrap.
    model.__dict__.setdefault("_pcg_saved_implementations", saved)
    model.eval()
    if router == "pcg":  # probed in eval mode, as they will run
        model.__dict__["_pcg_routers"] = hf_router.switch_routers(model, replace_forward, _restore_forward)
    else:
        for m in model.modules():  # wrapped before with router="pcg": their own code again
            if hf_router.is_router(m) and "_pcg_orig_forward" in m.__dict__:
                _restore_forward(m)
        model.__dict__.pop("_pcg_routers", None)

    # Positions for the attention function, only where a layer needs them (a
    # model whose forward takes no extra keywords is called as before).
    needs_positions = any("_pcg_temperature" in m.__dict__ for _, m in attention)

    def forward_fn(ids: torch.Tensor, positions: torch.Tensor):
        """ids [N] token ids, or [N, H] input embeddings (the eager path)."""
        extra = {POSITIONS_KWARG: positions[None]} if needs_positions else {}
        inputs = {"inputs_embeds": ids[None]} if ids.dim() == 2 else {"input_ids": ids[None]}
        return model(**inputs, position_ids=positions[None], use_cache=False, **extra)

    return registry, forward_fn


def _add_experts(registry: LayerRegistry, name: str, m: nn.Module, activation: tuple,
                 ep_cfg: Any) -> int:
    """Convert an experts module's weights to pcg's layout and register them
    (this rank's share of them under expert parallelism); the layer id."""
    w13, w2, b13, b2, w13_block = _convert_experts(name, m)
    handle = _register_moe(registry, name, m, (w13, w2, b13, b2, w13_block), activation, ep_cfg)
    if ep_cfg is not None:  # the module keeps only this rank's experts
        _set_param(m, "gate_up_proj", handle.w13)
        _set_param(m, "down_proj", handle.w2)
        if handle.b13 is not None:
            _set_param(m, "gate_up_proj_bias", handle.b13)
        if handle.b2 is not None:
            _set_param(m, "down_proj_bias", handle.b2)
    return handle.layer_id


def _register_moe(registry: LayerRegistry, name: str, m: nn.Module, weights: tuple,
                  activation: tuple, ep_cfg: Any) -> Any:
    """Register converted weights (w13, w2, b13, b2, w13_block) as an MoE
    layer; under expert parallelism the handle keeps this rank's share."""
    w13, w2, b13, b2, w13_block = weights
    act, alpha, limit = activation
    handle = registry.add_moe(w13=w13, w2=w2, b13=b13, b2=b2, activation=act, alpha=alpha,
                              limit=limit, w13_block=w13_block,
                              num_global_experts=int(w13.shape[0]), module=m, name=name)
    if ep_cfg is not None:
        from ..distributed import shard_layer
        shard_layer(handle, ep_cfg)
    return handle


def _remember_id(m: nn.Module, registry: LayerRegistry, lid: int) -> None:
    ids = m.__dict__.get("_pcg_layer_ids")
    if ids is None:
        ids = {}
        m._pcg_layer_ids = ids
    ids[id(registry)] = lid
    m._pcg_layer_id = lid
