"""Compile mode: ``pcg.wrap(model, compiler="eager" | "inductor")``.

:func:`compile_forward` turns the wrapped model's ``forward_fn(ids, positions)``
into a function with the same signature that runs a traced, split graph:

1. Trace. The first call traces ``forward_fn`` once with dynamo
   (``torch.compile(fullgraph=True)`` and a pcg backend that receives the FX
   graph), the token dim of ``ids`` / ``positions`` marked dynamic. The layer
   ops ``pcg::attention`` / ``pcg::moe`` have fake kernels, so they stay single
   nodes. The layers' reads of pcg's running context (a ContextVar, which
   dynamo of torch <= 2.11 cannot trace) see a plain stand-in during the
   trace (:class:`_TraceRunning`). Dynamo specialises sizes 0 and 1, so the
   trace covers N >= 2; a one-token call runs padded to two tokens (a pad
   row, as in the engine's buckets) and its outputs are cut back to one row.
2. Split. The graph is cut at the split ops (every ``pcg::attention``; the
   ``pcg::moe`` of registry layers marked ``split``) with
   ``torch.fx.passes.split_module``, in the original order: piece, split op,
   piece, ..., piece.
3. Compile. ``"eager"``: the pieces run as FX GraphModules. ``"inductor"``:
   each piece is compiled by inductor (``compile_fx``) on the trace's symbolic
   fake inputs, so one compiled piece serves every token count; inductor's
   own CUDA graphs are off (pcg captures the pieces itself). A piece inductor
   fails on stays an FX piece (``stats["startup"]["piece_compile_failures"]``);
   a piece whose compile fixes the token count to a constant stays an FX
   piece and the trace is redone (``eager_pieces``); guards inductor adds
   join the trace's shape guards.
4. Run. Later calls call the split GraphModule directly, with the traced
   parameters and the new ``ids`` / ``positions`` (and their sizes for the
   symbolic placeholders); no dynamo frame, no guards but the shape guards of
   the trace's shape environment, evaluated once per distinct token count.
   The split ops are ordinary ``torch.ops.pcg.*`` calls inside the split
   graph, so :class:`pcg.capture.CaptureEngine` captures the pieces exactly as
   it captures the model's own code. A call the traced graph cannot take (a
   shape guard fails, the trace failed, an error outside a capture, a first
   call inside a capture) runs the original ``forward_fn`` and is
   counted in ``stats["compile_fallbacks"]`` (shown by ``wrapped.report()``).

Artifacts are cached on disk (see :mod:`pcg.compile_cache`): inductor's caches
live in a pcg directory keyed by the traced graph, input shapes, model config,
compiler, pcg/torch versions and rank; a second process start compiles from
that cache. ``check=True`` (``pcg.wrap(debug=True)``) compares each compiled
piece with its eager FX version on the same inputs, once per token count,
outside captures.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import time
import types
import warnings
from typing import Any, Callable, Optional

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import compile_cache as _cache
from . import registry as _reg
from .registry import LayerRegistry
from .timing import rel_err

log = logging.getLogger(__name__)

COMPILERS = ("eager", "inductor")
MIN_TOKENS = 2  # the trace's smallest token count (dynamo specialises 0 and 1)
_MISSING = object()
_RETRY = object()
_counter = itertools.count()

# Inductor settings of every compiled piece: pcg captures the pieces itself, so
# inductor's own CUDA graphs stay off; fused intermediates are rounded to bf16
# where eager PyTorch rounds them (without it, a DeepSeek-V3 model on the H200
# moved 8 of 32 tokens' routing: 0.12 from fp32 vs 0.015 for eager bf16).
# $PCG_INDUCTOR_CONFIG (a JSON object) adds or overrides settings.
def _inductor_config() -> dict:
    extra = os.environ.get("PCG_INDUCTOR_CONFIG") or "{}"
    try:
        patch = json.loads(extra)
    except json.JSONDecodeError as exc:
        raise ValueError(f"pcg: $PCG_INDUCTOR_CONFIG must be a JSON object, got {extra!r}: {exc}") from None
    if not isinstance(patch, dict):
        raise ValueError(f"pcg: $PCG_INDUCTOR_CONFIG must be a JSON object, got {extra!r}")
    return {"triton.cudagraphs": False, "emulate_precision_casts": True, **patch}


INDUCTOR_CONFIG = _inductor_config()


# ---- split ops -------------------------------------------------------------------

def _target_is(node: torch.fx.Node, packet: Any) -> bool:
    t = node.target
    return t is packet or t is getattr(packet, "default", None)


def _layer_arg(node: torch.fx.Node) -> Optional[int]:
    if "layer" in node.kwargs:
        return node.kwargs["layer"]
    if node.args and isinstance(node.args[-1], int):
        return node.args[-1]
    return None


def split_kind(node: torch.fx.Node, registry: LayerRegistry) -> Optional[str]:
    """``"attention"`` / ``"mixer"`` / ``"moe"`` when ``node`` is a split op, else None."""
    if node.op != "call_function":
        return None
    if _target_is(node, torch.ops.pcg.attention):
        return "attention"
    if _target_is(node, torch.ops.pcg.mixer):
        return "mixer"
    if _target_is(node, torch.ops.pcg.moe):
        lid = _layer_arg(node)
        if lid is not None and 0 <= lid < len(registry.moe_layers) and registry.moe(lid).split:
            return "moe"
    return None


def split_graph(gm: torch.fx.GraphModule, registry: LayerRegistry):
    """(split GraphModule, piece submodule names, split submodule names -> kind).

    Partitions in the original node order: piece 0, split 0, piece 1, ... A
    piece between two adjacent split ops is empty and does not exist."""
    part: dict[torch.fx.Node, int] = {}
    kinds: dict[int, str] = {}
    pid = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        kind = split_kind(node, registry)
        if kind is not None:
            pid += 1
            part[node] = pid
            kinds[pid] = kind
            pid += 1
        else:
            part[node] = pid
    from torch.fx.passes.split_module import split_module
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    pieces, splits = [], {}
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        idx = int(str(node.target).rsplit("_", 1)[-1])
        if idx in kinds:
            splits[node.target] = kinds[idx]
        else:
            pieces.append(node.target)
    return split, pieces, splits


def _capturing() -> bool:
    ctx = _reg._RUNNING.get()
    if ctx is not None and ctx.recorder is not None:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _CheckedPiece:
    """Debug: runs the compiled piece and, once per token count outside
    captures, its eager FX version on clones of the same inputs."""

    def __init__(self, name: str, compiled: Callable, eager: torch.fx.GraphModule,
                 owner: "CompiledForward", rtol: Optional[float]) -> None:
        self.name, self.compiled, self.eager, self.owner, self.rtol = name, compiled, eager, owner, rtol
        self.checked: set = set()

    def __call__(self, *args: Any) -> Any:
        n = self.owner._current_n
        if n in self.checked or _capturing():
            return self.compiled(*args)
        self.checked.add(n)
        ref = self.eager(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        out = self.compiled(*args)
        a, _ = tree_flatten(out)
        b, _ = tree_flatten(ref)
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                err = rel_err(x, y)
                st = self.owner.stats
                st["check_max_rel_err"] = max(st["check_max_rel_err"], err)
                st["checks"] += 1
                tol = self.rtol or (1e-4 if x.dtype == torch.float32 else 2e-2)
                if not err <= tol:
                    raise RuntimeError(
                        f"pcg compile check: piece {self.name} (compiled) differs from its eager FX "
                        f"version: relative error {err:.3g} > {tol:g} for an output of shape "
                        f"{tuple(x.shape)} at {n} tokens")
        return out


# ---- one trace --------------------------------------------------------------------

class _Specializes(Exception):
    """A piece's inductor compile fixed the token count (redo the trace without it)."""


class _Traced:
    """The traced, split (and compiled) forward."""

    def __init__(self, owner: "CompiledForward", gm: torch.fx.GraphModule,
                 example_inputs: list, ids: torch.Tensor, positions: torch.Tensor) -> None:
        self.owner = owner
        self.gm = gm
        self.out_template: Optional[list] = None
        self.out_spec: Any = None
        self._last_flat: Any = None
        self._accepts: dict[int, bool] = {}
        self._guard_code: Optional[str] = None
        self._args_template: Optional[list] = None
        self._slots: list = []
        self.piece_errors: dict[str, str] = {}
        self.device_type = ids.device.type
        self.ids_dtype, self.pos_dtype = ids.dtype, positions.dtype
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise RuntimeError("pcg compile: placeholders and example inputs differ in number")
        self.example_inputs = list(example_inputs)
        # Where each placeholder's value comes from at run time.
        spec: list[tuple] = []
        self.fake_ids = self.fake_pos = None
        for node, ex in zip(placeholders, example_inputs):
            src = getattr(node.meta.get("grapharg"), "source", None)
            sname = src.name if isinstance(getattr(src, "name", None), str) else str(src)
            if ex is ids or sname in ("L['ids']",):
                spec.append(("ids",))
                self.fake_ids = node.meta.get("example_value")
            elif ex is positions or sname in ("L['positions']",):
                spec.append(("pos",))
                self.fake_pos = node.meta.get("example_value")
            else:
                # Parameters, buffers and other state the forward read: the
                # same objects every call (the engine relies on that too).
                spec.append(("const", ex))
        for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
            val = node.meta.get("example_value")
            if isinstance(val, torch.SymInt) or isinstance(ex, torch.SymInt):
                spec[i] = self._sym_source(node, val if isinstance(val, torch.SymInt) else ex)
        self.spec = spec
        self.shape_env = getattr(getattr(self.fake_ids, "fake_mode", None), "shape_env", None)
        self._token_syms = set()
        for fake in (self.fake_ids, self.fake_pos):
            size = fake.shape[0] if isinstance(fake, torch.Tensor) and fake.dim() else None
            if isinstance(size, torch.SymInt):
                self._token_syms |= set(size.node.expr.free_symbols)
        self.eager_pieces: list[str] = []  # left eager: inductor specialised the token count
        t0 = time.perf_counter()
        self.split_gm, self.pieces, self.splits = split_graph(gm, owner.registry)
        self.split_seconds = time.perf_counter() - t0
        self.compile_seconds = 0.0
        if owner.compiler == "inductor":
            t0 = time.perf_counter()
            self._compile_pieces()
            self.compile_seconds = time.perf_counter() - t0
        self.example_inputs = None  # holds the first call's inputs

    def _sym_source(self, node: torch.fx.Node, val: Any) -> tuple:
        """A symbolic-size placeholder: which input's dim it is."""
        expr = getattr(getattr(val, "node", None), "expr", None)
        for which, fake in (("ids", self.fake_ids), ("pos", self.fake_pos)):
            if fake is None:
                continue
            for d, s in enumerate(fake.shape):
                if isinstance(s, torch.SymInt) and expr is not None and s.node.expr == expr:
                    return ("size", which, d)
        sname = str(getattr(node.meta.get("grapharg"), "source", ""))
        for which, arg in (("ids", "L['ids']"), ("pos", "L['positions']")):
            if arg in sname:
                return ("size", which, 0)
        raise RuntimeError(f"pcg compile: cannot tell where the symbolic input {node.name} "
                           f"({sname}) comes from")

    # ---- inductor -------------------------------------------------------------
    def _compile_pieces(self) -> None:
        from torch._guards import detect_fake_mode
        from torch._inductor.compile_fx import compile_fx

        owner = self.owner
        pieces = set(self.pieces)
        split_gm = self.split_gm

        todo: list[tuple[str, list]] = []

        class _Interp(torch.fx.Interpreter):
            """Fake propagation through the split graph: each piece's (symbolic) inputs."""

            def call_module(self, target, args, kwargs):
                if target in pieces:
                    todo.append((target, list(args)))
                return super().call_module(target, args, kwargs)

        # The backend's fake mode (dynamo gives the backend its own); fakes of
        # the real example inputs made by it share the trace's symbols.
        fake_mode = detect_fake_mode()
        if fake_mode is None:
            raise RuntimeError("pcg compile: no fake mode in the backend's tracing context")
        fake_args = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                     for a in self.example_inputs]
        from torch._dispatch.python import enable_python_dispatcher
        with fake_mode, enable_python_dispatcher():  # as dynamo traced (symbolic-friendly metas)
            _Interp(split_gm).run(*fake_args)
        if self._specialized():
            raise RuntimeError("pcg compile: the token count became a constant in the split graph")
        for target, args in todo:
            if target in owner._eager_pieces:
                self.eager_pieces.append(target)
                continue
            sub = getattr(split_gm, target)
            eager = copy.deepcopy(sub) if owner.check else None
            try:
                with fake_mode:
                    fn = compile_fx(sub, args, config_patches=dict(INDUCTOR_CONFIG))
            except Exception as exc:  # noqa: BLE001 - the piece stays eager, reported
                self.piece_errors[target] = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("pcg compile: inductor failed on %s; it runs eagerly: %s", target, exc)
                if self._specialized():
                    owner._respecialize = target
                    raise _Specializes(target) from exc
                continue
            if self._specialized():
                # Inductor fixed the token count while compiling this piece:
                # the trace's shape environment now holds that guard, so the
                # trace is redone with this piece left eager.
                owner._respecialize = target
                raise _Specializes(target)
            if owner.check:
                fn = _CheckedPiece(target, fn, eager, owner, owner.check_rtol)
            # Instance attribute: found before nn.Module's submodule lookup.
            split_gm.__dict__[target] = fn

    def _specialized(self) -> bool:
        """Whether the token count's symbol has become a constant."""
        env = self.shape_env
        if env is None:
            return False
        for sym in self._token_syms:
            try:
                if env.replace(sym).is_number:
                    return True
            except Exception:  # noqa: BLE001
                return True
        return False

    # ---- run ------------------------------------------------------------------
    def args_for(self, ids: torch.Tensor, positions: torch.Tensor) -> list:
        if self._args_template is None:
            self._args_template = [s[1] if s[0] == "const" else None for s in self.spec]
            self._slots = [(i,) + s for i, s in enumerate(self.spec) if s[0] != "const"]
        args = list(self._args_template)
        for slot in self._slots:
            i, k = slot[0], slot[1]
            if k == "ids":
                args[i] = ids
            elif k == "pos":
                args[i] = positions
            else:  # ("size", which, dim)
                args[i] = int((ids if slot[2] == "ids" else positions).shape[slot[3]])
        return args

    def first_call(self, *args: Any) -> Any:
        """Dynamo's call of the backend's callable (the first run): remember
        the flat outputs to learn how the caller's result is built from them."""
        out = self.split_gm(*args)
        self._last_flat = out
        return out

    def bind_outputs(self, result: Any, ids: torch.Tensor, positions: torch.Tensor) -> bool:
        flat_out = self._last_flat
        self._last_flat = None
        if flat_out is None:
            return False
        if not isinstance(flat_out, (tuple, list)):
            flat_out = (flat_out,)
        leaves, spec = tree_flatten(result)
        template = []
        used: set = set()
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf is ids:
                    template.append(("ids",))
                    continue
                if leaf is positions:
                    template.append(("pos",))
                    continue
                idx = next((i for i, o in enumerate(flat_out) if o is leaf), None)
                if idx is None:
                    # Dynamo may hand back a new tensor object over the same
                    # memory (an alias of a graph output): match the alias.
                    key = _alias_key(leaf)
                    idx = next((i for i, o in enumerate(flat_out) if i not in used
                                and isinstance(o, torch.Tensor) and _alias_key(o) == key), None)
                if idx is None:
                    return False
                used.add(idx)
                template.append(("out", idx))
            else:
                template.append(("const", leaf))
        self.out_template, self.out_spec = template, spec
        return True

    def accepts(self, ids: torch.Tensor, positions: torch.Tensor) -> bool:
        if ids.device.type != self.device_type or ids.dtype != self.ids_dtype \
                or positions.dtype != self.pos_dtype:
            return False
        n = int(ids.shape[0])
        if int(positions.shape[0]) != n:
            return False
        ok = self._accepts.get(n)
        if ok is None:
            ok = n >= MIN_TOKENS
            if ok and self.shape_env is not None and self.fake_ids is not None \
                    and self.fake_pos is not None:
                try:
                    if self._guard_code is None:  # once: the trace's shape guards as Python
                        self._guard_code = self.shape_env.produce_guards_expression(
                            [self.fake_ids, self.fake_pos]) or ""
                    ok = not self._guard_code or bool(
                        self.shape_env.evaluate_guards_expression(self._guard_code, [ids, positions]))
                except Exception as exc:  # noqa: BLE001
                    log.debug("pcg compile: guard evaluation failed: %s", exc)
                    ok = False
            self._accepts[n] = ok
        return ok

    def run(self, ids: torch.Tensor, positions: torch.Tensor) -> Any:
        flat = self.split_gm(*self.args_for(ids, positions))
        if not isinstance(flat, (tuple, list)):
            flat = (flat,)
        leaves = []
        for t in self.out_template:
            k = t[0]
            leaves.append(flat[t[1]] if k == "out" else ids if k == "ids"
                          else positions if k == "pos" else t[1])
        return tree_unflatten(leaves, self.out_spec)


# ---- the compiled forward ------------------------------------------------------------

class CompiledForward:
    """``fn(ids [N] int64, positions [N] int64)``: the traced, split forward.

    Attributes: ``stats`` (dict: ``compile_fallbacks`` reason -> calls run by
    the original forward, ``pieces``, ``splits``, ``split_kinds``, ``startup``
    (trace / compile / first-run seconds, cache key and hits),
    ``check_max_rel_err``, ``checks``), ``traced`` (the :class:`_Traced`, with
    ``split_gm``, ``pieces``, ``splits``), ``trace_error``.
    """

    def __init__(self, forward_fn: Callable, registry: LayerRegistry, compiler: str = "eager",
                 check: bool = False, check_rtol: Optional[float] = None,
                 cache: bool = True) -> None:
        if compiler not in COMPILERS:
            raise ValueError(f"pcg: compiler must be one of {COMPILERS} (or None), got {compiler!r}")
        self.forward_fn = forward_fn
        self.registry = registry
        self.compiler = compiler
        self.check = check
        self.check_rtol = check_rtol
        self.cache = cache and compiler == "inductor"
        self.traced: Any = _MISSING  # _Traced once traced; None when the trace failed
        self.trace_error: Optional[str] = None
        self._eager_pieces: set = set()  # pieces inductor specialises: kept as FX
        self._respecialize: Optional[str] = None
        self._current_n = 0
        self.stats: dict[str, Any] = {"compile_fallbacks": {}, "pieces": 0, "splits": 0,
                                      "split_kinds": {}, "startup": {}, "check_max_rel_err": 0.0,
                                      "checks": 0}

    # ---- public -----------------------------------------------------------------
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> Any:
        n = int(ids.shape[0])
        if n == 0:
            return self._fallback("empty_batch", ids, positions)
        if n < MIN_TOKENS:
            # Dynamo specialises sizes 0 and 1, so the trace covers N >= 2: one
            # token runs as two, the copy a pad row like the engine's bucket
            # padding (attention zeroes it, MoE masks it by num_valid), and the
            # outputs are cut back to one row.
            reps = MIN_TOKENS - n + 1
            run_ids = torch.cat([ids] + [ids[-1:]] * (reps - 1))
            run_pos = torch.cat([positions] + [positions[-1:]] * (reps - 1))
        else:
            run_ids, run_pos = ids, positions
        tr = self.traced
        if tr is _MISSING:
            if _capturing():
                return self._fallback("first_call_in_capture", ids, positions)
            out = self._trace(run_ids, run_pos)
            if out is _MISSING:
                return self._fallback("trace_failed", ids, positions)
        elif tr is None:
            return self._fallback("trace_failed", ids, positions)
        elif not tr.accepts(run_ids, run_pos):
            return self._fallback("guard", ids, positions)
        else:
            self._current_n = int(run_ids.shape[0])
            try:
                out = tr.run(run_ids, run_pos)
            except Exception as exc:
                if _capturing():
                    raise  # the engine records a capture failure; the bucket runs eagerly
                log.warning("pcg compile: the traced graph failed (%s: %s); running the model's "
                            "forward", type(exc).__name__, exc)
                return self._fallback(f"run_error:{type(exc).__name__}", ids, positions)
        if run_ids is not ids:
            out = _cut_rows(out, int(run_ids.shape[0]), n)
        return out

    def warmup(self, ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> None:
        """Trace (and compile) now, with ``ids`` [N] as the example (outside
        any wrapped model's forward; pcg's layer ops get a one-sequence batch)."""
        if positions is None:
            positions = torch.arange(ids.shape[0], device=ids.device)
        n = int(ids.shape[0])
        from .batch import BatchMeta
        batch = BatchMeta(n, [0, n], positions, n)
        with torch.inference_mode(), _reg.running(_reg.RunContext(self.registry, batch, None)):
            self(ids, positions)

    @property
    def num_pieces(self) -> int:
        return self.stats["pieces"]

    @property
    def num_splits(self) -> int:
        return self.stats["splits"]

    # ---- internals -----------------------------------------------------------------
    def _fallback(self, reason: str, ids: torch.Tensor, positions: torch.Tensor) -> Any:
        fb = self.stats["compile_fallbacks"]
        fb[reason] = fb.get(reason, 0) + 1
        return self.forward_fn(ids, positions)

    def _cache_parts(self, gm: torch.fx.GraphModule) -> dict:
        import pcg
        shapes = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                v = node.meta.get("example_value")
                if isinstance(v, torch.Tensor):
                    shapes.append([str(tuple(v.shape)), str(v.dtype), str(v.device.type),
                                   str(v.stride())])
                else:
                    shapes.append([type(v).__name__, str(v)])
        config = None
        for layer in self.registry.attention_layers[:1] + self.registry.moe_layers[:1]:
            cfg = getattr(layer.module, "config", None)
            if cfg is not None:
                try:
                    config = cfg.to_json_string() if hasattr(cfg, "to_json_string") else repr(cfg)
                except Exception:  # noqa: BLE001
                    config = repr(cfg)
                break
        return {"graph": gm.code, "inputs": shapes, "config": config, "compiler": self.compiler,
                "pcg": getattr(pcg, "__version__", "?"), "torch": torch.__version__,
                "rank": _cache.rank(), "check": self.check, "inductor_config": INDUCTOR_CONFIG,
                "split_moe": [m.layer_id for m in self.registry.moe_layers if m.split]}

    def _trace(self, ids: torch.Tensor, positions: torch.Tensor) -> Any:
        """Trace, split, compile and run the first call; ``_MISSING`` on failure.
        A piece whose compile specialises the token count is left eager and
        the trace redone (pieces compiled before it hit inductor's cache)."""
        t0 = time.perf_counter()
        for attempt in range(1, 65):
            out = self._trace_once(ids, positions)
            if out is not _RETRY:
                break
        else:
            out = self._fallback_trace_failed("too many pieces specialise the token count")
        if self.traced not in (None, _MISSING):
            self.stats["startup"]["attempts"] = attempt
            self.stats["startup"]["total_seconds"] = round(time.perf_counter() - t0, 4)
        return out

    def _fallback_trace_failed(self, msg: str) -> Any:
        self.traced = None
        self.trace_error = msg
        # The startup stats say so too (same keys as a trace's, nothing split).
        self.stats["startup"] = {"trace_error": msg, "pieces": 0, "splits": 0,
                                 "piece_compile_failures": {}, "eager_pieces": []}
        warnings.warn(f"pcg compile: tracing the forward failed ({msg[:600]}); calls run the model's "
                      "own forward", stacklevel=4)
        return _MISSING

    def _trace_once(self, ids: torch.Tensor, positions: torch.Tensor) -> Any:
        self._current_n = int(ids.shape[0])
        holder: dict[str, Any] = {}
        times: dict[str, float] = {}
        cache_cm: list = []
        counters_before = _inductor_counters()

        def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            times["backend_start"] = time.perf_counter()
            if "traced" in holder:
                raise RuntimeError("pcg compile: the forward traced as more than one graph")
            if self.cache:
                parts = self._cache_parts(gm)
                holder["cache_key"] = ckey = _cache.make_key(parts)
                holder["cache_parts"] = {k: v for k, v in parts.items() if k not in ("graph", "inputs")}
                holder["warm"] = os.path.exists(os.path.join(_cache.entry_dir(ckey), "pcg.json"))
                cm = _cache.inductor_cache_dir(ckey)
                cm.__enter__()
                cache_cm.append(cm)
            tr = _Traced(self, gm, example_inputs, ids, positions)
            holder["traced"] = tr
            times["backend_end"] = time.perf_counter()
            return tr.first_call

        fresh = _fresh_function(self.forward_fn, next(_counter))
        t0 = time.perf_counter()
        mode = torch.inference_mode()  # compiled for inference (as pcg.wrap runs it)
        mode.__enter__()
        try:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            compiled = torch.compile(fresh, backend=backend, fullgraph=True)
            with warnings.catch_warnings(), _running_for_trace():
                warnings.simplefilter("ignore")
                result = compiled(ids, positions)
            tr = holder.get("traced")
            if tr is None:
                raise RuntimeError("pcg compile: dynamo did not call the pcg backend")
            if not tr.bind_outputs(result, ids, positions):
                raise RuntimeError("pcg compile: cannot map the forward's outputs to the graph's")
        except Exception as exc:  # noqa: BLE001 - reported; calls run the model's own forward
            if self._respecialize is not None:
                log.info("pcg compile: inductor specialises the token count in %s; it stays eager",
                         self._respecialize)
                self._eager_pieces.add(self._respecialize)
                self._respecialize = None
                return _RETRY
            return self._fallback_trace_failed(_clip(f"{type(exc).__name__}: {exc}", 3000))
        finally:
            for cm in cache_cm:
                cm.__exit__(None, None, None)
            mode.__exit__(None, None, None)
        t_end = time.perf_counter()
        self.traced = tr
        counters = _inductor_counters()
        info = {
            "trace_error": None,
            "trace_seconds": round(times.get("backend_start", t0) - t0, 4),
            "split_seconds": round(tr.split_seconds, 4),
            "compile_seconds": round(tr.compile_seconds, 4),
            "first_run_seconds": round(t_end - times.get("backend_end", t0), 4),
            "total_seconds": round(t_end - t0, 4),
            "pieces": len(tr.pieces),
            "splits": len(tr.splits),
            "piece_compile_failures": dict(tr.piece_errors),
            "eager_pieces": list(tr.eager_pieces),
            "inductor_cache": {k: counters.get(k, 0) - counters_before.get(k, 0) for k in counters},
        }
        if "cache_key" in holder:
            info["cache_key"] = holder["cache_key"]
            info["cache_warm"] = holder["warm"]
            info["cache_dir"] = _cache.entry_dir(holder["cache_key"])
            _cache.record_start(holder["cache_key"], holder["cache_parts"], info)
        self.stats["startup"] = info
        self.stats["pieces"] = len(tr.pieces)
        self.stats["splits"] = len(tr.splits)
        kinds: dict[str, int] = {}
        for k in tr.splits.values():
            kinds[k] = kinds.get(k, 0) + 1
        self.stats["split_kinds"] = kinds
        return result


def _clip(msg: str, limit: int) -> str:
    """``msg`` cut to about ``limit`` characters, keeping its start (what
    failed) and its end (dynamo's innermost user frame, where it failed)."""
    if len(msg) <= limit:
        return msg
    half = limit // 2
    return f"{msg[:half]}\n[...]\n{msg[-half:]}"


def _alias_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _inductor_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
        out = {k: v for k, v in counters["inductor"].items() if "cache" in k and isinstance(v, int)}
        out.update({f"aot_{k}": v for k, v in counters["aot_autograd"].items()
                    if "cache" in k and isinstance(v, int)})
        return out
    except Exception:  # noqa: BLE001
        return {}


class _TraceRunning:
    """Stands in for ``pcg.registry._RUNNING`` (a ``contextvars.ContextVar``)
    while dynamo traces the forward.

    The layer code the trace runs through (pcg.nn's layers, the transformers
    integration's attention / experts functions, ``registry.current()``) reads
    the running context with ``_RUNNING.get()``. Dynamo of torch 2.11 (and
    older) cannot trace ``ContextVar.get`` ("Unsupported method call"), so for the
    trace the module global is this plain object, whose ``get`` returns the
    context the trace runs in (read from the ContextVar before the trace):
    dynamo inlines it like any Python method. The value is only read at trace
    time (layer ids, settings), and the traced graph runs without dynamo, so
    nothing depends on dynamo's guards on it. Outside dynamo (the first run of
    the split graph, other threads meanwhile) ``get`` reads the real
    ContextVar, and ``set`` / ``reset`` always go to it.
    """

    def __init__(self, var: Any, ctx: Any) -> None:
        self._var = var
        self._ctx = ctx
        self.name = var.name

    def get(self, *default: Any) -> Any:
        if not torch.compiler.is_compiling():
            return self._var.get(*default)
        if self._ctx is None and default:
            return default[0]
        return self._ctx

    def set(self, value: Any) -> Any:
        return self._var.set(value)

    def reset(self, token: Any) -> None:
        self._var.reset(token)


class _running_for_trace:
    """Context manager: ``_reg._RUNNING`` is a :class:`_TraceRunning` inside."""

    def __enter__(self) -> "_running_for_trace":
        self.var = _reg._RUNNING
        if isinstance(self.var, _TraceRunning):  # nested: leave the outer one
            self.var = None
            return self
        _reg._RUNNING = _TraceRunning(self.var, self.var.get())
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.var is not None:
            _reg._RUNNING = self.var
        return False


def _fresh_function(fn: Callable, tag: int) -> Callable:
    """A new function object *and code object* calling ``fn``: dynamo caches
    compiled frames per code object, so every trace gets its own (no shared
    recompile budget between wrapped models)."""
    def pcg_forward(ids, positions):
        return fn(ids, positions)
    try:
        code = pcg_forward.__code__.replace(co_name=f"pcg_forward_{tag}",
                                            co_qualname=f"pcg_forward_{tag}")
    except TypeError:  # Python < 3.11: no co_qualname
        code = pcg_forward.__code__.replace(co_name=f"pcg_forward_{tag}")
    return types.FunctionType(code, pcg_forward.__globals__, f"pcg_forward_{tag}", None,
                              pcg_forward.__closure__)


def compile_forward(forward_fn: Callable, registry: LayerRegistry, compiler: str = "eager",
                    check: bool = False, check_rtol: Optional[float] = None,
                    cache: bool = True) -> CompiledForward:
    """The forward of compile mode (see the module docstring).

    Args:
        forward_fn: ``forward_fn(ids [N], positions [N])`` of the wrapped model.
        registry: the wrapped model's layer registry (split MoE layers).
        compiler: ``"eager"`` (FX pieces) or ``"inductor"``.
        check: compare compiled pieces with their eager versions (debug).
        check_rtol: tolerance of ``check`` (default 1e-4 fp32, 2e-2 otherwise).
        cache: keep inductor's artifacts in pcg's on-disk cache (inductor only).
    Returns:
        a :class:`CompiledForward`, called like ``forward_fn``.
    """
    return CompiledForward(forward_fn, registry, compiler, check=check, check_rtol=check_rtol,
                           cache=cache)


def _cut_rows(out: Any, padded: int, n: int) -> Any:
    """Outputs of a padded run cut back to ``n`` token rows (token dim 0, or 1
    under a leading batch dim of 1), shapes otherwise unchanged."""
    flat, spec = tree_flatten(out)
    res = []
    for t in flat:
        if isinstance(t, torch.Tensor):
            if t.dim() >= 2 and t.shape[0] == 1 and t.shape[1] == padded:
                t = t[:, :n]
            elif t.dim() >= 1 and t.shape[0] == padded:
                t = t[:n]
        res.append(t)
    return tree_unflatten(res, spec)


def compile_stats(wrapped: Any) -> Optional[dict]:
    """The compile-mode stats of a wrapped model (None when it was wrapped
    without ``compiler``): ``pieces``, ``splits``, ``split_kinds``,
    ``compile_fallbacks`` (reason -> calls), ``startup`` (``trace_error``:
    None, or why the trace failed, then ``pieces`` is 0 and calls run the
    model's own forward; ``trace_seconds``, ``compile_seconds``,
    ``total_seconds``, ``cache_warm``, ``inductor_cache`` hits/misses,
    ``cache_dir``, ...), ``check_max_rel_err``."""
    fn = getattr(wrapped, "_forward_fn", wrapped)
    return fn.stats if isinstance(fn, CompiledForward) else None


def warmup(wrapped: Any, num_tokens: Optional[int] = None) -> Optional[dict]:
    """Trace and compile a wrapped model's forward now (before ``capture()``,
    so the engine's capture time does not include compilation), with
    ``num_tokens`` (default: the largest bucket) zero ids as the example.
    Returns the startup stats (None without ``compiler``); when the trace
    failed, their ``trace_error`` says why (and ``pieces`` is 0)."""
    fn = getattr(wrapped, "_forward_fn", None)
    if not isinstance(fn, CompiledForward):
        return None
    if fn.traced is _MISSING:
        n = int(num_tokens or max(wrapped.ladder))
        fn.warmup(torch.zeros(max(n, MIN_TOKENS), dtype=torch.long, device=wrapped.device))
    return fn.stats["startup"]
