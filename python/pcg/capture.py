"""Direct piecewise capture: one forward per bucket, cut into CUDA-graph
segments at the split ops, replayed by the C++ ``pcg::SegmentChain``.

Capture of bucket N: the forward runs on static input buffers inside a capture
session. Segment 0 starts capturing into the shared pool; a split op allocates
its output inside the running segment (so it lives in the pool at a fixed
address), ends the segment, runs once for real, is recorded with weak
references to its tensors, and the next segment starts. Replay: graph 0, call
0, graph 1, ... in one C++ call.

Shared rules: one pool for every segment and bucket; largest bucket first (so
smaller buckets reuse the memory it grew); only weak references to
intermediates and outputs (the pool may reuse their memory across buckets:
outputs are copied out right after each replay); static inputs sized for the
largest bucket; pad rows masked by the device-side ``num_valid``; Python GC off
during capture.
"""
from __future__ import annotations

import contextlib

import gc
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import attention as _attention
from .batch import META_HEAD, BatchMeta, write_host_meta
from .ops.attention import GRAPH_MAX_SEQLEN, graph_batch
from .registry import LayerRegistry, RunContext, running

# The split op a standard attention layer records (C++ end to end; it reads
# the engine's host metadata, not the Python context).
NATIVE_SPLIT = "pcg::causal_attention_out"

ForwardFn = Callable[[torch.Tensor, torch.Tensor], Any]  # (ids [N], positions [N]) -> outputs


class SegmentRecorder:
    """Cuts the running capture at split ops (used by the split ops' kernels)."""

    def __init__(self, chain: Any, pool: tuple[int, int]) -> None:
        self.chain = chain
        self.pool = pool

    def split(self, op_name: str, args: list, out: torch.Tensor) -> torch.Tensor:
        self.chain.capture_end()
        ns, name = op_name.split("::")
        getattr(getattr(torch.ops, ns), name)(*args)  # runs once for real: errors surface now
        # Device tensors live in the graph pool: weak references. Host tensors
        # (attention metadata) are tiny and must outlive the capture: kept.
        weak = [torch.ops.pcg.weak_ref_tensor(a) if isinstance(a, torch.Tensor) and a.is_cuda else a
                for a in args]
        self.chain.record_call(op_name, weak)
        self.chain.capture_begin(*self.pool)
        return out


@dataclass
class BucketGraphs:
    """The captured forward of one bucket."""

    size: int
    chain: Any  # torch.classes.pcg.SegmentChain
    outputs: list  # weak refs to the flat outputs
    out_spec: Any
    capture_seconds: float
    memory_bytes: int
    graph_attention: int = 0  # attention calls captured inside the graphs (device batch)
    # What the recorded split calls read at replay: the engine's host metadata
    # (pcg::causal_attention_out) and/or the running context (splits whose
    # kernels live in Python); a replay prepares only what its chain needs.
    reads_host_meta: bool = True
    reads_context: bool = True


@dataclass
class CaptureStats:
    capture_seconds: float = 0.0
    graph_memory_bytes: int = 0
    replays: dict = field(default_factory=dict)  # bucket -> count
    fallbacks: dict = field(default_factory=dict)  # reason -> count
    failures: dict = field(default_factory=dict)  # bucket -> error text
    debug_max_rel_err: float = 0.0
    recaptures: int = 0  # captures redone after a layer's implementation changed

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every engine's captures (captures run one
    at a time): torch caches a cuBLAS workspace per stream for the life of the
    process, so a new stream per wrap would keep another one per wrap."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _CAPTURE_STREAMS[index]


def _slice_tokens(t: torch.Tensor, padded: int, n: int) -> torch.Tensor:
    """Drop pad rows from an output whose token dim is 0 ([N, ...]) or 1 ([1, N, ...])."""
    if t.dim() >= 2 and t.shape[0] == 1 and t.shape[1] == padded:
        return t[0, :n]
    if t.dim() >= 1 and t.shape[0] == padded:
        return t[:n]
    return t


def _finish(t: torch.Tensor, leaf: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    return t if leaf is None else leaf(t)


class CaptureEngine:
    """Captures and replays the bucketed piecewise graphs of one forward."""

    def __init__(self, forward_fn: ForwardFn, registry: LayerRegistry, device: torch.device,
                 ladder: list[int], params: Callable[[], list[torch.Tensor]],
                 progress: bool = True, graph_attention: bool = True,
                 embeds: Optional[tuple[int, torch.dtype]] = None) -> None:
        """``embeds`` (hidden size, dtype): the graphs take input embeddings
        [n, H] of that dtype instead of token ids [n] (a wrap's second engine,
        for ``inputs_embeds``; the forward must accept either)."""
        self.forward_fn = forward_fn
        self.graph_attention = graph_attention
        self.registry = registry
        self.device = device
        self.ladder = ladder
        self.params = params
        self.progress = progress
        self.graphs: dict[int, BucketGraphs] = {}
        self.stats = CaptureStats()
        self.captured = False
        self._param_ptrs: list[int] = []
        self._sentinels: list[tuple[weakref.ref, int]] = []  # (parameter, its address at capture)
        max_n = max(ladder)
        self.static_ids = torch.zeros(max_n, dtype=torch.int64, device=device)
        # The graphs' input embeddings (embeds engines): written by a copy before
        # each replay; pad rows keep earlier batches' rows (finite, masked as pad ids are).
        self.static_embeds = (torch.zeros(max_n, embeds[0], dtype=embeds[1], device=device)
                              if embeds is not None else None)
        # Positions hold arange(max_n) until a batch brings its own: the common
        # one-sequence call then copies nothing but the ids.
        self.static_pos = torch.arange(max_n, dtype=torch.int64, device=device)
        self._pos_is_arange = True
        # One int32 device block [num_tokens, num_seqs, cu_seqlens...]: its
        # first value is the num_valid the graphs mask pad rows with, the whole
        # block is what pcg::causal_attention_graph reads in buckets <=
        # GRAPH_MAX_SEQLEN. A replay writes it with one pcg::stage_batch launch.
        self.batch_dev = graph_batch([0], GRAPH_MAX_SEQLEN, device)
        self.num_valid = self.batch_dev[:1]
        # The batch metadata the recorded attention calls read (rewritten per replay).
        self.host_meta = torch.zeros(META_HEAD + max_n + 1, dtype=torch.int64)
        self._host_meta_np = self.host_meta.numpy()
        self.registry_version = -1  # the registry's version the graphs were captured with
        self.pool: Optional[tuple[int, int]] = None
        self.stream: Optional[torch.cuda.Stream] = None

    def _static_inputs(self, n: int) -> torch.Tensor:
        return self.static_ids[:n] if self.static_embeds is None else self.static_embeds[:n]

    # ---- capture ------------------------------------------------------------
    def capture(self, pool: Optional[tuple[int, int]] = None) -> None:
        """Capture every bucket (largest first) into ``pool`` (a
        ``torch.cuda.graph_pool_handle()``; None: a new one). Engines that
        replay one at a time on one stream may share a pool: outputs are copied
        out right after each replay, so graphs may reuse each other's memory."""
        if self.captured:
            return
        if not hasattr(torch.classes.pcg, "SegmentChain"):
            raise RuntimeError("pcg: the native library was built without CUDA; cannot capture")
        self.pool = tuple(pool) if pool is not None else tuple(torch.cuda.graph_pool_handle())
        self.stream = _capture_stream(self.device)
        sizes = sorted(self.ladder, reverse=True)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            desc = "pcg capture" + ("" if self.static_embeds is None else " (inputs_embeds)")
            bar = tqdm(total=len(sizes), desc=desc, unit="bucket", leave=False)
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                # One eager warm-up at the largest size initialises lazy state
                # (library handles, kernel selection) outside any capture.
                self._eager_static(sizes[0])
                for n in sizes:
                    try:
                        self.graphs[n] = self._capture_bucket(n)
                    except Exception as exc:  # noqa: BLE001 - reported, bucket runs eagerly
                        self.stats.failures[n] = f"{type(exc).__name__}: {exc}"
                        torch.cuda.synchronize(self.device)
                        if not self.graphs:
                            # The failed bucket's graphs were the pool's only users:
                            # destroying them released it, so the next bucket
                            # captures into a fresh one.
                            self.pool = tuple(torch.cuda.graph_pool_handle())
                    if bar is not None:
                        bar.set_postfix(tokens=n)
                        bar.update(1)
        finally:
            if gc_was_enabled:
                gc.enable()
            if bar is not None:
                bar.close()
        self.stats.capture_seconds = time.perf_counter() - t0
        self.stats.graph_memory_bytes = sum(g.memory_bytes for g in self.graphs.values())
        self._record_params()
        self.registry_version = self.registry.version
        self.captured = True

    def _record_params(self) -> None:
        """The parameter addresses the graphs read: all of them (the debug
        check) and three samples (first, middle, last: the per-call check)."""
        params = self.params()
        self._param_ptrs = [p.data_ptr() for p in params]
        picks = sorted({0, len(params) // 2, len(params) - 1}) if params else []
        self._sentinels = [(weakref.ref(params[i]), params[i].data_ptr()) for i in picks]

    def params_moved(self) -> bool:
        """Whether a sampled parameter has a new address since capture (or is
        gone): ``.to(dtype)`` / ``.half()`` / ``.to(device)`` on the model
        move every one. About a microsecond: checked before every replay.
        A single replaced tensor elsewhere is caught only by the debug check."""
        for ref, ptr in self._sentinels:
            t = ref()
            if t is None or t.data_ptr() != ptr:
                return True
        return False

    def _eager_static(self, n: int) -> Any:
        self.num_valid.fill_(n)
        batch = BatchMeta(n, [0, n], self.static_pos[:n], n, meta=self.host_meta)
        with running(RunContext(self.registry, batch, self.num_valid)):
            return self.forward_fn(self._static_inputs(n), self.static_pos[:n])

    def _capture_bucket(self, n: int) -> BucketGraphs:
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        t0 = time.perf_counter()
        self.num_valid.fill_(n)
        chain = torch.classes.pcg.SegmentChain()
        recorder = SegmentRecorder(chain, self.pool)
        batch = BatchMeta(n, [0, n], self.static_pos[:n], n, meta=self.host_meta)
        batch.host_meta(_attention.USE_VARLEN, _attention.USE_SHORT_KERNEL)
        ctx = RunContext(self.registry, batch, self.num_valid, recorder)
        if self.graph_attention and _attention.USE_GRAPH_ATTENTION and n <= GRAPH_MAX_SEQLEN:
            # Every batch of this bucket has sequences <= n tokens: attention
            # can read its batch on the device, inside the graph (each replay
            # stages the whole block first; capture writes only num_valid).
            ctx.graph_batch = self.batch_dev
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with running(ctx), torch.cuda.stream(self.stream):
            chain.capture_begin(*self.pool)
            try:
                out = self.forward_fn(self._static_inputs(n), self.static_pos[:n])
                chain.capture_end()
            except BaseException:
                chain.abort()
                raise
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        flat, spec = tree_flatten(out)
        weak = [torch.ops.pcg.weak_ref_tensor(t) if isinstance(t, torch.Tensor) else t for t in flat]
        del out, flat
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        calls = chain.call_names()
        return BucketGraphs(n, chain, weak, spec, time.perf_counter() - t0, max(0, used),
                            ctx.stats.get("graph_attention", 0),
                            reads_host_meta=NATIVE_SPLIT in calls,
                            reads_context=any(c != NATIVE_SPLIT for c in calls))

    # ---- run ----------------------------------------------------------------
    def replay(self, ids: torch.Tensor, positions: Optional[torch.Tensor], cu_seqlens: list[int],
               bucket: int, leaf: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Any:
        """Replay bucket ``bucket`` for n = len(ids) real tokens; outputs trimmed to n rows
        (copies, not views of the graph's buffers), then passed through ``leaf``
        (e.g. the caller's unpacking; one pytree pass for both). ``ids``: token
        ids [n], or for an embeds engine input embeddings [n, H] of its dtype.

        ``positions`` None means arange(n). Pad rows keep whatever ids and
        positions the buffers hold (valid values from earlier batches): their
        MoE rows are masked by ``num_valid`` and attention writes them as zeros.
        """
        n = int(ids.shape[0])
        g = self.graphs[bucket]
        if self.static_embeds is not None:
            self.static_embeds[:n].copy_(ids)
            ids = self.static_ids[:n]  # staged onto itself: the kernel also writes positions and the batch
        elif ids.dtype != torch.int64:
            ids = ids.long()
        if positions is None:
            if not self._pos_is_arange:
                torch.arange(self.static_pos.shape[0], out=self.static_pos)
                self._pos_is_arange = True
        else:
            positions = positions.long()
            self._pos_is_arange = False
        if g.graph_attention:  # what the attention captured inside the graphs reads
            # empty sequences dropped: at most n <= GRAPH_MAX_SEQLEN remain
            cu = [c for i, c in enumerate(cu_seqlens) if i == 0 or c != cu_seqlens[i - 1]]
            values = [n, len(cu) - 1, *cu]
        else:
            values = [n]  # num_valid
        # Everything before the first graph launch delays the GPU (measured:
        # the host, not the GPU, is most of pcg's gap to one whole graph):
        # write only what the recorded calls read, stage with one kernel.
        if g.reads_host_meta:
            write_host_meta(self._host_meta_np, n, cu_seqlens, _attention.USE_VARLEN, _attention.USE_SHORT_KERNEL)
        ctx = (running(RunContext(self.registry, BatchMeta(n, cu_seqlens, self.static_pos[:n], bucket,
                                                           meta=self.host_meta), self.num_valid))
               if g.reads_context else contextlib.nullcontext())
        with ctx:
            g.chain.replay_staged(ids, positions, self.static_ids, self.static_pos, self.batch_dev, values)
        self.stats.replays[bucket] = self.stats.replays.get(bucket, 0) + 1
        flat = [_finish(_slice_tokens(t, bucket, n).clone(), leaf) if isinstance(t, torch.Tensor)
                else t for t in g.outputs]
        return tree_unflatten(flat, g.out_spec)

    def eager(self, ids: torch.Tensor, positions: Optional[torch.Tensor], cu_seqlens: list[int],
              padded_to: Optional[int] = None,
              leaf: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              forward_fn: Optional[ForwardFn] = None) -> Any:
        """The same split path without graphs (CPU, or above the largest bucket).
        ``ids`` [n] token ids, or [n, H] input embeddings where the forward
        takes them (the transformers integration).

        ``padded_to`` > n runs that many rows, the pad rows masked by a device
        ``num_valid`` = n (expert parallelism needs equal shapes on every rank;
        an empty batch runs one masked row so its outputs still get shapes).
        Outputs are trimmed to the n real rows, then passed through ``leaf``.
        ``forward_fn`` runs instead of the engine's own (compile mode traces
        token ids and input embeddings separately).
        """
        n = int(ids.shape[0])
        run = n if padded_to is None else padded_to
        if run < n:
            raise RuntimeError(f"pcg: cannot pad {n} tokens to {run}")
        num_valid = None
        if run > n:  # ids [n], or input embeddings [n, H]
            ids = torch.cat([ids, ids.new_zeros((run - n, *ids.shape[1:]))])
            pad_pos = torch.zeros(run - n, dtype=torch.int64, device=ids.device)
            positions = (torch.arange(run, device=ids.device) if positions is None
                         else torch.cat([positions, pad_pos]))
            num_valid = torch.tensor([n], dtype=torch.int32, device=ids.device)
        elif positions is None:
            positions = torch.arange(n, device=ids.device)
        batch = BatchMeta(n, cu_seqlens, positions[:n], run)
        with running(RunContext(self.registry, batch, num_valid)):
            out = (forward_fn or self.forward_fn)(ids, positions)
        flat, spec = tree_flatten(out)
        return tree_unflatten([_finish(_slice_tokens(t, run, n), leaf) if isinstance(t, torch.Tensor)
                               else t for t in flat], spec)

    def check_params_unchanged(self) -> None:
        """Debug: the graphs read parameters at their capture-time addresses."""
        now = [p.data_ptr() for p in self.params()]
        if now != self._param_ptrs:
            moved = sum(a != b for a, b in zip(now, self._param_ptrs)) + abs(len(now) - len(self._param_ptrs))
            raise RuntimeError(
                f"pcg debug: {moved} parameter/buffer tensors moved since capture (the graphs would "
                "read stale memory). Re-wrap the model, or call .capture(force=True) after changing weights.")

    def reset(self) -> None:
        self.graphs.clear()
        self.captured = False
        self.registry_version = -1
        self._sentinels = []
