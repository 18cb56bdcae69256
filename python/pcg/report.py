"""wrapped.report(): what was captured and how calls ran, measured not estimated."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Report:
    integration: str
    attention_layers: int
    moe_layers: int
    moe_split_layers: dict  # layer id -> reason it runs outside the graphs
    buckets: list  # captured bucket sizes, ascending
    segments_per_bucket: dict  # bucket -> graphs in its chain
    split_calls_per_bucket: dict  # bucket -> recorded split calls
    graphs: int  # CUDA graphs in total
    capture_seconds: float
    graph_memory_bytes: int  # device memory the captures took (cudaMemGetInfo deltas)
    replays: dict  # bucket -> replays
    eager_fallbacks: dict  # reason -> calls
    capture_failures: dict = field(default_factory=dict)  # bucket -> error
    debug_max_rel_err: float = 0.0
    compile_fallbacks: dict = field(default_factory=dict)  # compile mode: reason -> calls run uncompiled
    graph_attention_per_bucket: dict = field(default_factory=dict)  # bucket -> attention calls inside its graphs
    mixer_layers: int = 0  # hybrid models' other token mixers (split ops, run per sequence)
    attention_kinds: dict = field(default_factory=dict)  # "full" / "sliding W" / "chunked C" -> layers
    # The graphs inputs_embeds calls replay (a second set, same pool; counted in
    # graphs / capture_seconds / graph_memory_bytes above).
    embeds_buckets: list = field(default_factory=list)  # captured bucket sizes, ascending
    embeds_replays: dict = field(default_factory=dict)  # bucket -> replays
    # pcg.wrap(router="pcg"): router module name -> "pcg.route" or why it runs its own code.
    routers: dict = field(default_factory=dict)

    @property
    def graph_attention_buckets(self) -> list:
        """Buckets with attention captured inside their graphs."""
        return [n for n, c in self.graph_attention_per_bucket.items() if c]

    @classmethod
    def build(cls, wrapped) -> "Report":
        eng = wrapped._engine
        graphs = eng.graphs if eng is not None else {}
        stats = eng.stats if eng is not None else None
        emb = wrapped._embeds_engine
        emb_graphs = emb.graphs if emb is not None else {}
        emb_stats = emb.stats if emb is not None else None
        failures = dict(stats.failures) if stats else {}
        compile_fallbacks = dict((getattr(wrapped._forward_fn, "stats", None) or {}).get("compile_fallbacks", {}))
        if wrapped._embeds_fn is not None:  # compile mode's trace on inputs_embeds
            compile_fallbacks.update({f"inputs_embeds {k}": v
                                      for k, v in wrapped._embeds_fn.stats["compile_fallbacks"].items()})
        if emb_stats:
            failures.update({f"inputs_embeds {n}": e for n, e in emb_stats.failures.items()})
        return cls(
            integration=wrapped.integration,
            attention_layers=len(wrapped.registry.attention_layers),
            moe_layers=len(wrapped.registry.moe_layers),
            moe_split_layers={m.layer_id: m.split_reason for m in wrapped.registry.moe_layers if m.split},
            buckets=sorted(graphs),
            segments_per_bucket={n: int(g.chain.num_graphs()) for n, g in sorted(graphs.items())},
            split_calls_per_bucket={n: int(g.chain.num_calls()) for n, g in sorted(graphs.items())},
            graphs=sum(int(g.chain.num_graphs()) for g in (*graphs.values(), *emb_graphs.values())),
            capture_seconds=sum(s.capture_seconds for s in (stats, emb_stats) if s),
            graph_memory_bytes=sum(s.graph_memory_bytes for s in (stats, emb_stats) if s),
            replays=dict(sorted(stats.replays.items())) if stats else {},
            eager_fallbacks=dict(stats.fallbacks) if stats else {},
            capture_failures=failures,
            debug_max_rel_err=stats.debug_max_rel_err if stats else 0.0,
            compile_fallbacks=compile_fallbacks,
            graph_attention_per_bucket={n: g.graph_attention for n, g in sorted(graphs.items())},
            mixer_layers=len(wrapped.registry.mixer_layers),
            attention_kinds=_attention_kinds(wrapped.registry.attention_layers),
            embeds_buckets=sorted(emb_graphs),
            embeds_replays=dict(sorted(emb_stats.replays.items())) if emb_stats else {},
            routers=dict(getattr(wrapped.model, "__dict__", {}).get("_pcg_routers", {})),
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        segs = sorted(set(self.segments_per_bucket.values()))
        lines = [
            f"pcg report ({self.integration})",
            f"  layers: {self.attention_layers} attention, {self.moe_layers} MoE"
            + (f", {self.mixer_layers} other token mixers (split, per sequence)" if self.mixer_layers else "")
            + (f", {len(self.moe_split_layers)} MoE as split ops" if self.moe_split_layers else ""),
            "  attention: " + (", ".join(f"{n} {k}" for k, n in self.attention_kinds.items()) or "-"),
            f"  buckets captured: {len(self.buckets)} "
            + (f"({self.buckets[0]}..{self.buckets[-1]} tokens)" if self.buckets else ""),
            f"  segments per bucket: {segs[0] if len(segs) == 1 else segs}" if segs else "  segments per bucket: -",
            f"  CUDA graphs: {self.graphs}",
            f"  attention inside the graphs: buckets {self.graph_attention_buckets[0]}.."
            f"{self.graph_attention_buckets[-1]} tokens" if self.graph_attention_buckets
            else "  attention inside the graphs: none" + (" (split at every attention)" if self.buckets else ""),
            f"  capture time: {self.capture_seconds:.2f} s",
            f"  graph memory: {self.graph_memory_bytes / 2**20:.1f} MiB",
            f"  replays: {sum(self.replays.values())}"
            + (f" (by bucket {self.replays})" if self.replays else ""),
            f"  eager fallbacks: {self.eager_fallbacks or 'none'}",
        ]
        if self.embeds_buckets:
            lines.insert(-1, f"  inputs_embeds graphs: {len(self.embeds_buckets)} buckets, replays "
                             f"{sum(self.embeds_replays.values())}"
                             + (f" (by bucket {self.embeds_replays})" if self.embeds_replays else ""))
        if self.routers:
            n = sum(v == "pcg.route" for v in self.routers.values())
            lines.insert(2, f"  routers: {n} of {len(self.routers)} on pcg.route"
                            + ("" if n == len(self.routers) else
                               f" (own code: {sorted(k for k, v in self.routers.items() if v != 'pcg.route')})"))
        if self.moe_split_layers:
            lines.append(f"  MoE split layers: {self.moe_split_layers}")
        if self.capture_failures:
            lines.append(f"  capture failures: {self.capture_failures}")
        if self.compile_fallbacks:
            lines.append(f"  compile fallbacks: {self.compile_fallbacks}")
        if self.debug_max_rel_err:
            lines.append(f"  debug: max relative error replay vs eager {self.debug_max_rel_err:.3g}")
        return "\n".join(lines)


def _attention_kinds(layers: list) -> dict:
    """Layers per kind of key set: full causal, sliding window, position chunks."""
    kinds: dict = {}
    for layer in layers:
        kind = ("full" if layer.sliding_window is None else f"sliding {layer.sliding_window}")
        if layer.chunk_size:
            kind = f"chunked {layer.chunk_size}" + ("" if layer.sliding_window is None else f" + {kind}")
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))
