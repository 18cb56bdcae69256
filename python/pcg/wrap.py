"""pcg.wrap(model): the same model, with a piecewise-captured prefill."""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import buckets as _buckets
from .batch import pack
from .capture import CaptureEngine
from .registry import LayerRegistry
from .report import Report
from .timing import rel_err


@dataclass
class Options:
    """Settings of one wrapped model (see :func:`pcg.wrap`)."""

    max_tokens: int = 2048
    buckets: Optional[list[int]] = None
    capture: bool = True  # False: always run the split path eagerly
    debug: bool = False
    debug_rtol: Optional[float] = None
    progress: bool = True
    # attention of small buckets inside the graphs (direct capture only: an
    # FX piece boundary stays where the tracer put it)
    graph_attention: bool = True


# model -> weak references to its wrappers, so unwrap() retires them all (the
# model they would run is no longer switched to pcg's implementations). Kept
# off the model: it stays picklable.
_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
# model -> the handle of its load_state_dict guard (one per model, removed by unwrap).
_ASSIGN_GUARDS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _refuse_assign(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                   *_args: Any) -> None:
    """load_state_dict pre-hook of a wrapped model: ``assign=True`` would put
    new tensors in place of the ones the captured graphs read (they would keep
    replaying the old weights, silently). An in-place load is fine."""
    if local_metadata.get("assign_to_params_buffers", False):
        raise RuntimeError(
            "pcg: load_state_dict(..., assign=True) on a wrapped model would replace the tensors its "
            "captured graphs read (they would keep using the old weights). Load in place (assign=False: "
            "the graphs then see the new weights), or pcg.unwrap the model, load, and wrap it again.")


def _guard_assign(model: nn.Module) -> None:
    if model not in _ASSIGN_GUARDS:
        _ASSIGN_GUARDS[model] = model.register_load_state_dict_pre_hook(_refuse_assign)


class WrappedModel(nn.Module):
    """A model whose forward replays captured piecewise graphs.

    Call it like the original (``input_ids`` [1, T] or [B, S], optional
    ``attention_mask`` [B, S] and ``position_ids``); outputs come back in the
    caller's shape, pad positions zero-filled. ``inputs_embeds`` [B, S, H]
    (transformers models; the dtype of the model's input embeddings; in
    compile mode traced on their own) replay a second set of graphs, captured on the first such call
    (or by ``capture(inputs_embeds=True)``) into the same memory pool; with
    ``ep=`` every rank captures a set on a call where any rank needs it.
    ``capture()`` captures every bucket now (otherwise the first call does);
    ``report()`` says what was captured and how calls ran.
    """

    def __init__(self, model: nn.Module, registry: LayerRegistry, forward_fn, options: Options,
                 integration: str, ep: Any = None) -> None:
        super().__init__()
        self.model = model
        self.registry = registry
        self.options = options
        self.integration = integration
        self.ep = ep  # pcg.distributed.EPConfig or None
        self._forward_fn = forward_fn
        self.ladder = _buckets.make_ladder(options.buckets, options.max_tokens)
        self._engine: Optional[CaptureEngine] = None
        self._embeds_engine: Optional[CaptureEngine] = None  # graphs on inputs_embeds, made on first use
        self._embeds_fn: Any = None  # compile mode: the forward traced on inputs_embeds
        self._vocab: Optional[int] = None  # input embedding rows (0: unknown), read on first use
        self._device: Optional[torch.device] = None  # cached: read on every call
        self._unwrapped = False
        _WRAPPERS.setdefault(model, []).append(weakref.ref(self))
        _guard_assign(model)

    # ---- helpers --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return self._device

    def _apply(self, *args: Any, **kwargs: Any) -> "WrappedModel":
        self._device = None  # .to() / .cuda() on the wrapper may move the model
        return super()._apply(*args, **kwargs)

    def _params(self) -> list[torch.Tensor]:
        tensors = [p for p in self.model.parameters()] + [b for b in self.model.buffers()]
        for layer in self.registry.moe_layers:
            tensors += [t for t in (layer.w13, layer.w2, layer.b13, layer.b2, layer.expert_map)
                        if t is not None]
        return tensors

    def _check_token_range(self, ids: torch.Tensor) -> None:
        """Out-of-vocabulary ids would fault the embedding kernel inside a graph
        (a device-side assert ends the CUDA context). Checked when the real
        tokens are still on the host (or in debug mode): a device tensor would
        cost a synchronisation per call."""
        if ids.numel() == 0 or not (ids.device.type == "cpu" or self.options.debug):
            return
        if self._vocab is None:
            emb = getattr(self.model, "get_input_embeddings", lambda: None)()
            self._vocab = int(getattr(emb, "num_embeddings", 0) or 0)
        if self._vocab > 0:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self._vocab:
                raise ValueError(f"pcg: input_ids must be in [0, {self._vocab}) (the input embedding's "
                                 f"size), got values in [{lo}, {hi}]")

    def _check_wrapped(self) -> None:
        if self._unwrapped:
            raise RuntimeError("pcg: this wrapper was unwrapped (pcg.unwrap / WrappedModel.unwrap): call "
                               "the model it returned, or pcg.wrap the model again")

    def engine(self) -> CaptureEngine:
        self._check_wrapped()
        if self._engine is not None and self._engine.device != self.device:
            self._engine = None  # the model moved to another device: its graphs are of no use
            self._embeds_engine = None
        if self._engine is None:
            self._engine = CaptureEngine(self._forward_fn, self.registry, self.device, self.ladder,
                                         self._params, progress=self.options.progress,
                                         graph_attention=self.options.graph_attention)
        return self._engine

    def embeds_engine(self) -> CaptureEngine:
        """The engine whose graphs take input embeddings (``inputs_embeds``),
        made on first use; it shares the token engine's memory pool, and both
        are reset when the weights move."""
        eng = self.engine()
        old = self._embeds_engine
        # new on another device or dtype (model.to(...) since): the old buffers no longer fit
        if old is None or old.device != eng.device or old.static_embeds.dtype != self._embeds_dtype():
            self._embeds_engine = CaptureEngine(
                self._embeds_forward_fn(), self.registry, eng.device, self.ladder, self._params,
                progress=self.options.progress, graph_attention=self.options.graph_attention,
                embeds=(self._required_hidden_size(), self._embeds_dtype()))
        return self._embeds_engine

    def _graph_pool(self) -> tuple[int, int]:
        """The memory pool every engine of this wrap captures into (one, so the
        inputs_embeds graphs reuse the token graphs' memory)."""
        for e in (self._engine, self._embeds_engine):
            if e is not None and e.captured and e.pool is not None:
                return e.pool
        return tuple(torch.cuda.graph_pool_handle())

    def _capture_engine(self, eng: CaptureEngine, moved: bool) -> None:
        """Capture ``eng`` (a no-op when it is up to date). It is reset first
        when a layer's attention implementation changed (its recorded calls
        are stale) or the weights moved (its graphs read the old tensors); so
        is the wrap's other engine when the same holds for it (it captures
        again on its next use)."""
        def stale(e: CaptureEngine) -> bool:
            return e.captured and (e.registry_version != self.registry.version or e.params_moved())
        if eng.captured and (moved or eng.registry_version != self.registry.version):
            for e in (self._engine, self._embeds_engine):
                if e is not None and (e is eng or stale(e)):
                    e.reset()
            eng.stats.recaptures += 1
        eng.capture(pool=self._graph_pool())

    def _hidden_size(self) -> Optional[int]:
        """The width inputs_embeds rows must have (None: the model does not say)."""
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            emb = getattr(self.model, "get_input_embeddings", lambda: None)()
            hidden = getattr(emb, "embedding_dim", None)
        return hidden if isinstance(hidden, int) else None

    def _required_hidden_size(self) -> int:
        hidden = self._hidden_size()
        if hidden is None:
            raise NotImplementedError("pcg: inputs_embeds needs the model's hidden size (config.hidden_size)")
        return hidden

    def _embeds_dtype(self) -> torch.dtype:
        """The dtype inputs_embeds must have: the input embeddings' (the
        model's layers take that dtype; another one fails in them)."""
        emb = getattr(self.model, "get_input_embeddings", lambda: None)()
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def _can_capture(self) -> Optional[str]:
        """None when graphs may be used, else the reason they are not."""
        if not self.options.capture:
            return "capture_disabled"
        if self.device.type != "cuda":
            return "not_cuda"
        return None

    # ---- public ---------------------------------------------------------------
    def capture(self, force: bool = False, inputs_embeds: bool = False) -> "WrappedModel":
        """Capture every bucket now (largest first), with a progress bar.

        Args:
            force: capture again (e.g. after replacing weight tensors).
            inputs_embeds: also capture the graphs ``inputs_embeds`` calls
                replay (otherwise the first such call captures them).
        With ``ep=``, capturing runs the EP collectives: every rank calls this
        with the same arguments.
        """
        reason = self._can_capture()
        if reason is not None:
            raise RuntimeError(f"pcg: cannot capture ({reason}); calls run the split path eagerly")
        eng = self.engine()
        if inputs_embeds:
            self._check_embeds_supported()
        if force:
            for e in (eng, self._embeds_engine):
                if e is not None:
                    e.reset()
        self._capture_engine(eng, moved=False)
        if inputs_embeds:
            self._capture_engine(self.embeds_engine(), moved=False)
        return self

    def report(self) -> Report:
        self._check_wrapped()
        return Report.build(self)

    def unwrap(self) -> nn.Module:
        """The model with its own implementations back, for what pcg does not
        run (``generate``, a KV cache): undoes pcg.wrap's switch of a
        transformers model's attention / experts implementations and of its
        hybrid mixers' forwards, and frees the captured graphs. Every wrapper
        of the model is unusable afterwards (its calls raise); wrapping the
        model again works. Expert weights pcg.wrap converted to its layout
        are converted back. Not for an expert-parallel wrap: the model then
        holds only this rank's experts.

        Returns:
            the wrapped ``nn.Module`` (the same object ``pcg.wrap`` was given).
        """
        if self.ep is not None:
            raise NotImplementedError("pcg: cannot unwrap an expert-parallel wrap: the model holds only "
                                      "this rank's experts")
        model = self.model
        if self._unwrapped:  # already retired (the model may be wrapped again since: leave that be)
            return model
        if self.integration.startswith("transformers"):
            from .integrations import hf
            hf.unprepare(model)
        guard = _ASSIGN_GUARDS.pop(model, None)
        if guard is not None:
            guard.remove()
        for ref in _WRAPPERS.pop(model, []):
            w = ref()
            if w is not None:
                w._unwrapped = True
                w._engine = w._embeds_engine = None  # their graphs and memory pool go with them
                w._embeds_fn = None
                w.registry = LayerRegistry()  # and its references to the weights
        return model

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "pcg.wrap captures prefill without a KV cache, so it does not run generation. "
            "pcg.unwrap(wrapped) gives back the model with its own implementations (KV cache, "
            "generate); an engine plugs its cached attention into pcg with "
            "registry.register_attention_impl")

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the wrapped model (``config``,
        ``get_input_embeddings()``, ...), as torch.compile's wrapper does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("_"):
                raise
            return getattr(model, name)

    @torch.inference_mode()
    def forward(self, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        out = self._replay_one_sequence(input_ids, attention_mask, position_ids, inputs_embeds, kwargs)
        if out is not None:
            return out
        if kwargs.get("past_key_values") is not None:
            raise NotImplementedError(
                "pcg.wrap runs prefill without a KV cache: past_key_values is not supported. Register "
                "your runtime's attention (registry.register_attention_impl) to use a cache.")
        kwargs.pop("use_cache", None)
        if kwargs:
            raise TypeError(f"pcg: unsupported forward arguments {sorted(kwargs)}; the wrapped model "
                            "takes input_ids, attention_mask and position_ids")
        if inputs_embeds is not None:
            self._check_embeds(input_ids, inputs_embeds)
        if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()
                                      or input_ids.dtype == torch.bool):
            raise TypeError(f"pcg: input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        packed = pack(input_ids, attention_mask, position_ids, inputs_embeds)
        embeds = packed.inputs_embeds is not None
        if not embeds:
            self._check_token_range(packed.input_ids)
        moved = self._moved(self._embeds_engine if embeds else self._engine)  # the engine this call runs
        if moved:
            # .to(dtype) / .half() / .to(device) since capture (on the wrapper or on the model
            # itself): the graphs read the old tensors. Debug mode raises instead, naming how many.
            logging.getLogger("pcg").warning("pcg: the model's weights moved since capture (e.g. "
                                             ".to() / .half()); capturing again")
            self._device = None  # read the device again: the model may have moved
        x = (packed.inputs_embeds if embeds else packed.input_ids).to(self.device)
        pos = packed.positions.to(self.device) if packed.positions is not None else None
        eng = self.engine()  # the token engine: eager runs and the call statistics
        n = packed.num_tokens
        reason = self._can_capture()
        # EP: every rank picks the bucket (and eager padding) from the group's
        # largest token count, so all collectives see equal shapes; and captures
        # the graph sets any rank needs now (a capture runs collectives).
        if self.ep is None:
            n_run, any_ids, any_embeds = n, not embeds, embeds
        else:
            n_run, any_ids, any_embeds = self.ep.agree_tokens(n, self.device, embeds)
        bucket = _buckets.pick(self.ladder, n_run)
        if reason is None and bucket is None:
            reason = "above_max_tokens"
        if n_run == 0:  # nothing real anywhere: one masked pad row gives the outputs their shapes
            reason = reason or "empty_batch"
            n_run = 1
        run = eng
        if reason is None:
            # (an engine made anew by engine() / embeds_engine() is not captured: moved is moot)
            if any_ids:
                self._capture_engine(eng, self._moved(eng) if embeds else moved)
            if any_embeds:
                self._capture_engine(self.embeds_engine(), moved if embeds else self._moved(self._embeds_engine))
            if self.ep is not None:
                self.ep.sync_captured([e for e in (eng, self._embeds_engine) if e is not None and e.captured])
            run = self._embeds_engine if embeds else eng
            if bucket not in run.graphs:
                reason = "capture_failed"

        unpack = _unpacker(packed)
        if reason is not None:
            eng.stats.fallback(reason)
            return self._eager(eng, x, pos, packed.cu_seqlens, n_run, unpack)
        if self.options.debug:
            run.check_params_unchanged()
        out = run.replay(x, pos, packed.cu_seqlens, bucket, leaf=unpack)
        if self.options.debug:
            self._debug_compare(out, self._eager(eng, x, pos, packed.cu_seqlens, n_run, unpack))
        return out

    def _moved(self, e: Optional[CaptureEngine]) -> bool:
        """Whether ``e``'s graphs read weights that have moved since (not in
        debug mode, whose per-call check raises instead)."""
        return e is not None and e.captured and not self.options.debug and e.params_moved()

    def _check_embeds(self, input_ids: Optional[torch.Tensor], embeds: torch.Tensor) -> None:
        if input_ids is not None:
            raise ValueError("pcg: pass exactly one of input_ids [B, S] or inputs_embeds [B, S, H]")
        self._check_embeds_supported()
        if not embeds.is_floating_point():
            raise TypeError(f"pcg: inputs_embeds must be floating point, got dtype {embeds.dtype}")
        hidden = self._hidden_size()
        if embeds.dim() != 3 or (hidden is not None and embeds.shape[-1] != hidden):
            raise ValueError(f"pcg: inputs_embeds must be [B, S, hidden_size={hidden}], got shape "
                             f"{tuple(embeds.shape)}")
        want = self._embeds_dtype()
        if embeds.dtype != want:
            raise TypeError(f"pcg: inputs_embeds must have the model's embedding dtype {want} (its layers "
                            f"take that dtype), got {embeds.dtype}")

    def _check_embeds_supported(self) -> None:
        if not self.integration.startswith("transformers"):
            raise NotImplementedError(
                f"pcg: inputs_embeds is supported for transformers models (this wrap: {self.integration}, "
                "whose forward takes token ids); pass input_ids")

    def _replay_one_sequence(self, input_ids, attention_mask, position_ids, inputs_embeds,
                             kwargs) -> Any:
        """The common prefill call, replayed with as little host work as
        possible before the first graph launch (the host's latency there is
        most of pcg's gap to a whole-model graph): one sequence already on the
        model's GPU, default positions, captured bucket; ``input_ids`` [1, T]
        int64, or ``inputs_embeds`` [1, T, H] in the embeds engine's dtype.
        None when anything else applies; the general path then handles it."""
        if inputs_embeds is None:
            eng, x = self._engine, input_ids
            if x is None or x.dtype is not torch.int64 or x.dim() != 2:
                return None
        else:
            eng, x = self._embeds_engine, inputs_embeds
            if (input_ids is not None or eng is None or x.dim() != 3
                    or x.dtype != eng.static_embeds.dtype or x.shape[2] != eng.static_embeds.shape[1]):
                return None
        if (eng is None or not eng.captured or not self.options.capture or attention_mask is not None
                or position_ids is not None
                or (kwargs and (len(kwargs) > 1 or "use_cache" not in kwargs))
                or self.ep is not None or self.options.debug or x.shape[0] != 1
                or eng.registry_version != self.registry.version or x.device != eng.device
                or self.device != eng.device  # a model moved since capture: the general path decides
                or eng.params_moved()):
            return None
        n = x.shape[1]
        bucket = _buckets.pick(self.ladder, n)
        if n == 0 or bucket not in eng.graphs:
            return None

        def to_caller(t: torch.Tensor) -> torch.Tensor:  # [n, ...] -> [1, n, ...]
            return t[None] if t.dim() >= 1 and t.shape[0] == n else t
        return eng.replay(x[0], None, [0, n], bucket, leaf=to_caller)

    def _eager(self, eng: CaptureEngine, ids: torch.Tensor, pos: Optional[torch.Tensor],
               cu_seqlens: list[int], n_run: int, leaf: Any = None) -> Any:
        """The split path without graphs; ``ids`` token ids [n] or input
        embeddings [n, H] (each with its own forward in compile mode)."""
        fn = self._embeds_forward_fn() if ids.dim() == 2 else None
        if self.ep is None:
            return eng.eager(ids, pos, cu_seqlens, padded_to=max(n_run, int(ids.shape[0])), leaf=leaf,
                             forward_fn=fn)
        return self.ep.eager(eng, ids, pos, cu_seqlens, n_run, leaf=leaf, forward_fn=fn)  # num_valid = n

    def _embeds_forward_fn(self) -> Any:
        """The forward that takes input embeddings: the wrap's own, or in
        compile mode a second compiled forward (a trace is specialised to its
        input: token ids [N] int64, or embeddings [N, H])."""
        from .compile import CompiledForward
        base = self._forward_fn
        if not isinstance(base, CompiledForward):
            return base
        if self._embeds_fn is None:
            self._embeds_fn = CompiledForward(base.forward_fn, base.registry, base.compiler,
                                              check=base.check, check_rtol=base.check_rtol,
                                              cache=base.cache)
        return self._embeds_fn

    def _debug_compare(self, replayed: Any, eager: Any) -> None:
        from torch.utils._pytree import tree_flatten
        a, _ = tree_flatten(replayed)
        b, _ = tree_flatten(eager)
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                err = rel_err(x, y)
                eng = self.engine()
                eng.stats.debug_max_rel_err = max(eng.stats.debug_max_rel_err, err)
                tol = self.options.debug_rtol or (1e-4 if x.dtype == torch.float32 else 3e-2)
                if not err <= tol:
                    raise RuntimeError(f"pcg debug: replay differs from eager (relative error {err:.3g} "
                                       f"> {tol:g}) for an output of shape {tuple(x.shape)}")


def _unpacker(packed: Any) -> Any:
    """leaf for the engine: [n, ...] rows of the packed batch -> the caller's layout."""
    n = packed.num_tokens

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return packed.unpack(t) if t.dim() >= 1 and t.shape[0] == n else t
    return unpack


def wrap(model: nn.Module, *, max_tokens: int = 2048, buckets: Optional[Iterable[int]] = None,
         capture: bool = True, debug: bool = False, progress: bool = True,
         ep: Any = None, ep_mode: str = "allreduce", placement: str = "contiguous",
         compiler: Optional[str] = None, router: str = "pcg") -> WrappedModel:
    """Wrap a Hugging Face transformers MoE model, or a model built from
    :mod:`pcg.nn` layers, for piecewise CUDA-graph prefill.

    Args:
        model: the model (on the device it will run on; eval mode).
        max_tokens: largest captured bucket; batches above it run eagerly.
        buckets: explicit bucket sizes (overrides the default ladder).
        capture: False runs the same split path without graphs.
        debug: check parameter addresses at every replay and compare each replay
            with an eager run of the same batch (slow; for debugging).
        progress: show a progress bar while capturing.
        ep: a ``torch.distributed`` process group for expert parallelism.
        ep_mode: ``"allreduce"``, ``"alltoall"`` or the intranode peer-mapped
            ``"alltoall_peer"`` (with ``ep``; see :mod:`pcg.distributed`).
        placement: ``"contiguous"`` or ``"round_robin"`` expert placement (with ``ep``).
        compiler: None (direct capture of the model's own code), ``"eager"`` (FX
            pieces split at pcg's split ops) or ``"inductor"`` (pieces compiled by
            inductor); compiled pieces are captured by the same engine.
        router: ``"pcg"`` (default): each router of a transformers model that one
            ``pcg.route`` kernel reproduces (checked on probe tokens at wrap time: the
            same logits, the same experts but for ties between equal scores, the same
            weights to the output dtype's rounding) runs it instead of its 4-8 small
            kernels; the others keep their own code (``report().routers`` says which).
            ``"model"``: every router runs its own code. Models of :mod:`pcg.nn`
            layers always route with ``pcg.route``.
    Returns:
        a :class:`WrappedModel` with the model's call signature (prefill only).
    Raises:
        TypeError / NotImplementedError for models pcg cannot run correctly, with
        the reason: no experts module, experts or attention it has no kernel for,
        a token mixer it does not recognise. A transformers model (without
        ``ep``) is also run twice on two tiny packed batches that differ in
        their first sequence only: if the second sequence's logits change, the
        model mixes tokens across packed sequences somewhere pcg cannot see, and
        it is refused.
    """
    if router not in ("model", "pcg"):
        raise ValueError(f"pcg.wrap: router must be \"model\" or \"pcg\", got {router!r}")
    options = Options(max_tokens=max_tokens, buckets=list(buckets) if buckets is not None else None,
                      capture=capture, debug=debug, progress=progress,
                      graph_attention=compiler is None)
    from . import nn as pcg_nn
    ep_cfg = None
    if ep is not None:
        from .distributed import EPConfig
        ep_cfg = EPConfig(group=ep, mode=ep_mode, placement=placement)
    if pcg_nn.uses_pcg_layers(model):
        registry, forward_fn = pcg_nn.prepare(model, ep_cfg)
        integration = "pcg.nn"
    else:
        from .integrations import hf
        registry, forward_fn = hf.prepare(model, ep_cfg, router=router)
        integration = "transformers"
    if integration == "transformers" and ep_cfg is None:
        try:
            _check_sequences_isolated(model, registry, forward_fn)
        except NotImplementedError:
            if not any(ref() is not None for ref in _WRAPPERS.get(model, [])):
                hf.unprepare(model)
            raise
    if compiler is not None:
        from .compile import compile_forward
        forward_fn = compile_forward(forward_fn, registry, compiler, check=debug)
        integration += f"+{compiler}"
    return WrappedModel(model, registry, forward_fn, options, integration, ep=ep_cfg)


@torch.inference_mode()
def _check_sequences_isolated(model: nn.Module, registry: LayerRegistry, forward_fn) -> None:
    """pcg packs a batch's sequences into one row; only its attention and
    mixer ops know the boundaries. Run two packed batches [a, b] and [a', b]
    that differ in the first sequence only, through pcg's split path (no
    graphs): b's logits must not change. They do when the model mixes tokens
    some way pcg did not recognise (a convolution or recurrence hidden in a
    module): refuse the model rather than give packed batches wrong outputs.
    b's rows run the same kernels in both batches, so any change is leakage."""
    import logging
    from .capture import CaptureEngine
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = int(getattr(emb, "num_embeddings", 0) or 0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if vocab < 2:
        return
    g = torch.Generator().manual_seed(0)
    la, lb = 5, 6
    a1 = torch.randint(0, vocab, (la,), generator=g)
    a2 = (a1 + 1 + torch.randint(0, vocab - 1, (la,), generator=g)) % vocab  # differs everywhere
    b = torch.randint(0, vocab, (lb,), generator=g)
    pos = torch.cat([torch.arange(la), torch.arange(lb)]).to(device)
    eng = CaptureEngine(forward_fn, registry, device, [la + lb], lambda: [], progress=False)
    try:
        outs = [eng.eager(torch.cat([a, b]).to(device), pos, [0, la, la + lb]) for a in (a1, a2)]
    except Exception as exc:  # noqa: BLE001 - the model's first call will show it
        logging.getLogger("pcg").warning("pcg.wrap: the sequence-isolation check could not run "
                                         "(%s: %s)", type(exc).__name__, exc)
        return
    from torch.utils._pytree import tree_flatten

    def logits(out: Any) -> Optional[torch.Tensor]:  # the first per-token float output
        return next((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                     and t.is_floating_point() and t.dim() >= 2 and la + lb in t.shape[:2]), None)
    x, y = logits(outs[0]), logits(outs[1])
    if x is None or y is None:
        return
    tok = 0 if x.shape[0] == la + lb else 1
    err = rel_err(x.narrow(tok, la, lb), y.narrow(tok, la, lb))
    # b's rows run the same deterministic kernels both times (bit-identical
    # in practice); the margin covers atomics-ordered sums in half precision.
    tol = 1e-3 if x.dtype == torch.float32 else 2e-2
    if not err <= tol:
        raise NotImplementedError(
            f"pcg.wrap: model {type(model).__name__} mixes tokens across the sequences of a packed "
            f"batch outside the layers pcg splits at (changing one sequence moved another's logits by "
            f"{err:.3g}): it has a token mixer pcg does not recognise, so it is not supported")
