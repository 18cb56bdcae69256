"""Layer handles: every attention, MoE and (hybrid models) other token-mixer
layer of a wrapped model gets an integer id; the ops ``torch.ops.pcg.attention``
/ ``torch.ops.pcg.moe`` / ``torch.ops.pcg.mixer`` carry that id and resolve it
here.

Each wrapped model owns one :class:`LayerRegistry`. The registry of the model
that is running is published through a context variable for the duration of
its forward (:func:`running`), so two wrapped models in one process never see
each other's layers and nothing is global but the "who runs now" pointer.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

# fn(q [n,Hq,D], k [n,Hkv,D], v [n,Hkv,Dv], out [n,Hq,Dv], batch: BatchMeta, layer: AttentionLayer)
AttentionImpl = Callable[..., None]


@dataclass
class AttentionLayer:
    """One attention layer. ``impl`` (optional) replaces pcg's own attention
    for this layer: a runtime registers its kernel and KV cache this way.

    Static per-layer settings (filled at wrap time or from the first call):
    ``scaling`` (softmax scale; None = 1/sqrt(D)), ``sliding_window`` (a query
    attends keys with ``q_pos - k_pos < sliding_window``), ``chunk_size``
    (chunked attention, Llama-4: a query attends only keys of its own chunk of
    positions, ``q_pos // chunk_size == k_pos // chunk_size``), ``softcap`` (tanh
    logit soft-capping), ``sinks`` ([Hq] sink logits, gpt-oss).
    ``fallback(q4, k4, v4, mask4) -> out [1,S,Hq,Dv]`` is the model's own
    attention function, used whenever a setting has no native path.
    """

    layer_id: int
    module: Any = None
    scaling: Optional[float] = None
    sliding_window: Optional[int] = None
    chunk_size: Optional[int] = None
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None
    fallback: Optional[Callable[..., torch.Tensor]] = None
    impl: Optional[AttentionImpl] = None
    name: str = ""

    def needs_fallback(self) -> bool:
        return self.sinks is not None or self.softcap is not None


@dataclass
class MoELayer:
    """One MoE layer's experts in pcg's layout (see ``pcg.fused_moe``).

    ``w13`` [E_local, 2I, H] (gate rows, then up rows; or the block layout of
    ``w13_block``, see ``pcg.interleave_w13``), ``w2`` [E_local, H, I],
    optional biases ``b13`` [E_local, 2I] and ``b2`` [E_local, H];
    ``expert_map`` [E_global] int32 (global id -> local id or -1) for expert
    parallelism. ``split`` marks a layer whose MoE must run outside the graphs
    (an expert-parallel mode that cannot be captured); ``split_reason`` says why.
    """

    layer_id: int
    w13: torch.Tensor
    w2: torch.Tensor
    b13: Optional[torch.Tensor] = None
    b2: Optional[torch.Tensor] = None
    expert_map: Optional[torch.Tensor] = None
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    w13_block: int = 0
    num_global_experts: int = 0
    split: bool = False
    split_reason: str = ""
    ep: Any = None  # pcg.distributed.EPContext when experts are spread over ranks
    module: Any = None
    name: str = ""


@dataclass
class MixerLayer:
    """A token mixer that is not attention (linear attention, state-space,
    short convolution layers of hybrid models). It runs eagerly between graph
    replays, one sequence at a time: ``forward(x [1, s, H]) -> [1, s, H]`` (or
    a tuple whose first element is that) is the module's own forward, called
    with the module's keyword arguments of the first call that are not
    per-batch tensors (``kwargs``).
    """

    layer_id: int
    forward: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)
    n_out: int = 0  # the forward returns a tensor (0) or a tuple of n_out led by it
    module: Any = None
    name: str = ""


class LayerRegistry:
    """The layers of one wrapped model, by id (ids are 0, 1, 2, ... per kind)."""

    def __init__(self) -> None:
        self.attention_layers: list[AttentionLayer] = []
        self.moe_layers: list[MoELayer] = []
        self.mixer_layers: list[MixerLayer] = []
        self.version = 0  # bumped when a layer's implementation changes (captures go stale)

    def add_attention(self, **kwargs: Any) -> AttentionLayer:
        layer = AttentionLayer(layer_id=len(self.attention_layers), **kwargs)
        self.attention_layers.append(layer)
        return layer

    def add_moe(self, **kwargs: Any) -> MoELayer:
        layer = MoELayer(layer_id=len(self.moe_layers), **kwargs)
        self.moe_layers.append(layer)
        return layer

    def add_mixer(self, **kwargs: Any) -> MixerLayer:
        layer = MixerLayer(layer_id=len(self.mixer_layers), **kwargs)
        self.mixer_layers.append(layer)
        return layer

    def mixer(self, layer_id: int) -> MixerLayer:
        if not 0 <= layer_id < len(self.mixer_layers):
            raise KeyError(f"pcg: no mixer layer with id {layer_id} in this model "
                           f"({len(self.mixer_layers)} registered)")
        return self.mixer_layers[layer_id]

    def attention(self, layer_id: int) -> AttentionLayer:
        if not 0 <= layer_id < len(self.attention_layers):
            raise KeyError(f"pcg: no attention layer with id {layer_id} in this model "
                           f"({len(self.attention_layers)} registered)")
        return self.attention_layers[layer_id]

    def moe(self, layer_id: int) -> MoELayer:
        if not 0 <= layer_id < len(self.moe_layers):
            raise KeyError(f"pcg: no MoE layer with id {layer_id} in this model "
                           f"({len(self.moe_layers)} registered)")
        return self.moe_layers[layer_id]

    def register_attention_impl(self, layer_id: int, impl: Optional[AttentionImpl]) -> None:
        """Route attention layer ``layer_id`` to ``impl`` (None restores pcg's own).

        ``impl(q, k, v, out, batch, layer)`` gets the real tokens only:
        q [n, Hq, D], k [n, Hkv, D], v [n, Hkv, Dv], and writes out [n, Hq, Dv]
        in place. ``batch`` (:class:`pcg.batch.BatchMeta`) has the sequence
        boundaries (``cu_seqlens``) and positions of the current batch; a
        runtime with a KV cache reads its own cache state there or in its closure.
        ``layer`` carries the settings to honour (``scaling``, ``sliding_window``,
        ``chunk_size``: ``batch.chunked_cu_seqlens(chunk_size)`` cuts the batch).
        Attention is a split op, so ``impl`` runs eagerly between graph replays
        and may use host-side metadata freely. Graphs captured before the
        change are recaptured on the next call.
        """
        self.attention(layer_id).impl = impl
        self.version += 1


@dataclass
class RunContext:
    """What the pcg ops of the running forward need besides their arguments."""

    registry: LayerRegistry
    batch: Any = None  # pcg.batch.BatchMeta
    num_valid: Optional[torch.Tensor] = None  # int32 [1] on the device, inside captures
    recorder: Any = None  # pcg.capture.SegmentRecorder while capturing
    # int32 device batch of pcg::causal_attention_graph while capturing a bucket
    # whose attention stays inside the graph (layers whose tensors the kernel takes)
    graph_batch: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)


_RUNNING: contextvars.ContextVar[Optional[RunContext]] = contextvars.ContextVar(
    "pcg_running", default=None)


@contextlib.contextmanager
def running(ctx: RunContext) -> Iterator[RunContext]:
    token = _RUNNING.set(ctx)
    try:
        yield ctx
    finally:
        _RUNNING.reset(token)


def current() -> RunContext:
    ctx = _RUNNING.get()
    if ctx is None:
        raise RuntimeError(
            "pcg: a pcg layer op ran outside a pcg-wrapped model's forward. Call the model "
            "returned by pcg.wrap(...), or run inside pcg.registry.running(ctx).")
    return ctx
