"""Expert parallelism (EP): the experts of every MoE layer spread over the
ranks of a ``torch.distributed`` process group.

    dist.init_process_group("nccl", timeout=timedelta(seconds=60))
    model = pcg.wrap(model, ep=dist.group.WORLD, ep_mode="alltoall")

Every rank builds the same model (same weights); ``wrap`` keeps only this
rank's experts (the other experts' weights are sliced away and dropped) and
puts the global -> local expert map (-1 for remote experts) on the model's
device. Each rank calls the wrapped model with its own batch (any size,
zero included); every call is collective.

Placement (``placement=``): ``"contiguous"`` (rank r owns experts
[r*E/W, (r+1)*E/W), balanced when W does not divide E), ``"round_robin"``
(expert e on rank e % W) or an explicit sequence of E owner ranks.

Modes (``ep_mode=``):

* ``"allreduce"``: tokens are replicated on every rank: each rank gathers the
  (hidden, top-k) rows of all ranks (``all_gather_into_tensor``; pad rows
  masked with expert id -1), runs its local experts on all of them
  (``pcg::fused_moe`` with the expert map) and the partial outputs are summed
  with ``all_reduce``; each rank keeps its own rows. Simple, W x the
  tokens through the experts' routing; good for small W and small batches.
* ``"alltoall"``: each valid token is sent once to every rank owning one of
  its experts (``pcg::ep_dispatch`` into fixed [W, T_bucket, ...] buffers,
  then ``all_to_all_single``), experts run on the received rows (unused
  slots carry expert id -1), results come back with a second
  ``all_to_all_single`` and ``pcg::ep_combine`` sums them in token order.

* ``"alltoall_peer"`` (intranode, CUDA only; run on two H200s so far, where
  it is the fastest mode): the same exchange without NCCL. Every rank's workspace
  (receive rows, received metadata, returned rows) lives in torch symmetric
  memory mapped into every rank of the node; ``pcg::ep_dispatch_peer`` writes
  each token straight into its owners' workspaces (the copy is the NVLink
  transfer), a symmetric-memory barrier orders the ranks, experts run on the
  received rows, ``pcg::ep_return_peer`` writes the outputs straight back, a
  second barrier, then ``pcg::ep_combine``. No collective runs per layer, so
  it is captured with any group backend. The workspace is allocated (a
  collective, host-blocking rendezvous) the first time a size is needed — the
  engine's eager warm-up at the largest bucket, before any capture.

All modes use fixed shapes derived from the bucket only (no host-side
counts), so on NCCL they are captured inside the CUDA-graph pieces. A backend
whose collectives cannot be captured (gloo with CUDA tensors, any other
backend) makes each MoE layer a split op (``layer.split``, with
``split_reason``; ``wrapped.report()`` lists them): it then runs eagerly
between graph replays, staging through host memory for gloo. On CPU the
whole model runs eagerly anyway.

Before every call the ranks agree on the token count (one ``all_reduce(MAX)``
of a one-element tensor), pick the bucket from it and, on the eager path, pad
to it, so every collective sees equal shapes; pad rows never reach an expert
(``num_valid`` masking). A rank with no tokens still joins every collective.

Failure handling (a rank died, hangs or stopped calling the model): the
token agreement waits at most ``EPConfig.timeout`` seconds (set
``wrapped.ep.timeout``, or the environment variable ``PCG_EP_TIMEOUT``;
default: the process group's own timeout) and raises a
``RuntimeError`` saying which rank gave up. Every other collective is bounded
by the process group's timeout: pass ``timeout=timedelta(...)`` to
``dist.init_process_group`` / ``dist.new_group`` (that is the knob; gloo
raises, NCCL's watchdog aborts the communicator — keep
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` at its default). Collectives replayed
inside a CUDA graph are not watched by NCCL's watchdog: the per-call
agreement, which is not captured, is what detects a dead peer before a replay.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

MODES = ("allreduce", "alltoall", "alltoall_peer")
PLACEMENTS = ("contiguous", "round_robin")

Placement = Union[str, Sequence[int]]


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("pcg EP: torch.distributed is not available in this torch build")
    return dist


# ---- placement -------------------------------------------------------------------

def place_experts(num_experts: int, world_size: int, placement: Placement = "contiguous") -> list[int]:
    """Owner rank of each of ``num_experts`` global experts over ``world_size`` ranks.

    ``"contiguous"``: rank r owns [r*E//W, (r+1)*E//W) (block sizes differ by at
    most one); ``"round_robin"``: expert e on rank e % W; a sequence: taken as
    the owner list itself (validated).
    """
    if world_size < 1:
        raise ValueError(f"pcg EP: world_size must be >= 1, got {world_size}")
    if num_experts < 0:
        raise ValueError(f"pcg EP: num_experts must be >= 0, got {num_experts}")
    if isinstance(placement, str):
        if placement == "contiguous":
            return [next(r for r in range(world_size) if e < (r + 1) * num_experts // world_size)
                    for e in range(num_experts)]
        if placement == "round_robin":
            return [e % world_size for e in range(num_experts)]
        raise ValueError(f"pcg EP: placement must be one of {PLACEMENTS} or a list of owner ranks, "
                         f"got {placement!r}")
    owner = [int(r) for r in placement]
    if len(owner) != num_experts:
        raise ValueError(f"pcg EP: an explicit placement must list one owner rank per expert "
                         f"({num_experts}), got {len(owner)}")
    bad = [r for r in owner if not 0 <= r < world_size]
    if bad:
        raise ValueError(f"pcg EP: placement ranks must be in [0, {world_size}), got {bad[:4]}")
    return owner


def local_experts(owner: Sequence[int], rank: int) -> list[int]:
    """Global ids of the experts ``rank`` owns, ascending (local id = index)."""
    return [e for e, r in enumerate(owner) if r == rank]


def expert_tables(owner: Sequence[int]) -> tuple[list[int], list[int]]:
    """(expert_rank, expert_local): owner rank and local id on the owner of every expert."""
    seen: dict[int, int] = {}
    local = []
    for r in owner:
        local.append(seen.get(r, 0))
        seen[r] = local[-1] + 1
    return list(owner), local


def expert_map(owner: Sequence[int], rank: int) -> list[int]:
    """Global id -> local id on ``rank``, -1 for experts owned elsewhere."""
    ranks, local = expert_tables(owner)
    return [lo if r == rank else -1 for r, lo in zip(ranks, local)]


# ---- config (one per wrapped model) ------------------------------------------------

def _backend_name(group: Any, device: torch.device) -> str:
    """Backend that runs collectives on ``device`` tensors ("nccl", "gloo", ...)."""
    dist = _dist()
    name = str(dist.get_backend(group))
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        parts = dict(p.split(":", 1) for p in name.split(","))
        return parts.get(device.type, next(iter(parts.values())))
    return name


@dataclass
class EPConfig:
    """Expert-parallel settings of a wrapped model (``pcg.wrap(..., ep=group)``).

    ``group``: the process group (None: the default group); ``mode``:
    ``"allreduce"``, ``"alltoall"`` or ``"alltoall_peer"``; ``placement``: ``"contiguous"``,
    ``"round_robin"`` or a list of owner ranks; ``timeout``: seconds the
    per-call token agreement may wait (None: ``$PCG_EP_TIMEOUT`` or the
    process group's timeout).
    """

    group: Any = None
    mode: str = "allreduce"
    placement: Placement = "contiguous"
    timeout: Optional[float] = None

    def __post_init__(self) -> None:
        dist = _dist()
        if self.mode not in MODES:
            raise ValueError(f"pcg EP: ep_mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.placement, str) and self.placement not in PLACEMENTS:
            raise ValueError(f"pcg EP: placement must be one of {PLACEMENTS} or a list of owner "
                             f"ranks, got {self.placement!r}")
        if not dist.is_initialized():
            raise RuntimeError("pcg EP: torch.distributed is not initialised; call "
                               "dist.init_process_group(...) before pcg.wrap(model, ep=group)")
        if self.group is None:
            self.group = dist.group.WORLD
        if self.timeout is None and os.environ.get("PCG_EP_TIMEOUT"):
            self.timeout = float(os.environ["PCG_EP_TIMEOUT"])
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("pcg EP: this process is not a member of the given process group")
        self._synced_token: Any = None
        self._peer_workspaces: list = []  # alltoall_peer; older ones stay alive for old graphs

    # ---- helpers ----------------------------------------------------------------
    def backend(self, device: torch.device) -> str:
        return _backend_name(self.group, device)

    def comm_device(self, device: torch.device) -> torch.device:
        """Where small control tensors live for this group's collectives."""
        if self.backend(device) == "nccl":
            if device.type == "cuda":
                return device
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _fail(self, what: str, exc: BaseException) -> RuntimeError:
        limit = (f"{self.timeout:g} s (EPConfig.timeout / $PCG_EP_TIMEOUT)" if self.timeout
                 else "the process group's timeout (dist.init_process_group(timeout=...))")
        return RuntimeError(
            f"pcg EP: rank {self.rank} of {self.world_size}: {what} did not complete within {limit}: "
            f"a rank died, timed out, or is not calling the wrapped model ({type(exc).__name__}: {exc})")

    def _wait(self, work: Any, what: str) -> None:
        try:
            if self.timeout:
                ok = work.wait(datetime.timedelta(seconds=self.timeout))
            else:
                ok = work.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise self._fail(what, exc) from exc
        if ok is False:
            raise self._fail(what, TimeoutError("wait returned False"))

    def peer_workspace(self, capacity: int, row_bytes: int, top_k: int,
                       device: torch.device) -> "_PeerWorkspace":
        """This group's symmetric-memory workspace, large enough for ``capacity``
        rows of ``row_bytes`` and ``2*top_k`` int32 metadata per rank (grown
        with a collective rendezvous: every rank needs the same size at the
        same layer, since the token count is agreed)."""
        cur = self._peer_workspaces[-1] if self._peer_workspaces else None
        if cur is not None and cur.fits(capacity, row_bytes, top_k):
            return cur
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"pcg EP: the alltoall_peer workspace must grow to {capacity} rows during a CUDA "
                "graph capture (its rendezvous cannot be captured); capture the largest bucket first")
        if cur is not None:
            capacity, row_bytes, top_k = (max(capacity, cur.capacity), max(row_bytes, cur.row_bytes),
                                          max(top_k, cur.top_k))
        ws = _PeerWorkspace(self, capacity, row_bytes, top_k, device)
        self._peer_workspaces.append(ws)
        return ws

    # ---- per-call agreement --------------------------------------------------------
    def agree_tokens(self, n: int, device: torch.device, embeds: bool = False) -> tuple[int, bool, bool]:
        """(the largest token count of this call over the group, whether any
        rank passes token ids, whether any passes ``inputs_embeds``): one
        all_reduce; every rank calls it. The flags say which graph sets every
        rank captures now (a capture runs the EP collectives)."""
        dist = _dist()
        t = torch.tensor([int(n), int(not embeds), int(embeds)], dtype=torch.int64,
                         device=self.comm_device(device))
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("the token-count agreement", exc) from exc
        self._wait(work, "the token-count agreement")
        n_run, any_ids, any_embeds = t.tolist()
        return int(n_run), bool(any_ids), bool(any_embeds)

    def sync_captured(self, engines: list) -> None:
        """After a capture: keep only the buckets captured on every rank and in
        every captured engine (token ids, inputs_embeds), so all ranks replay or
        run eagerly together (one all_reduce per capture)."""
        def token() -> tuple:  # changes whenever an engine captured or lost buckets
            return tuple((e.stats.capture_seconds, tuple(id(g) for g in e.graphs.values())) for e in engines)
        if not engines or self._synced_token == token():
            return
        dist = _dist()
        ladder = sorted(engines[0].ladder)
        dev = self.comm_device(engines[0].device)
        mask = torch.tensor([1 if all(n in e.graphs for e in engines) else 0 for n in ladder],
                            dtype=torch.int32, device=dev)
        work = dist.all_reduce(mask, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
        self._wait(work, "the captured-bucket agreement")
        for n, ok in zip(ladder, mask.tolist()):
            for e in engines:
                if not ok and n in e.graphs:
                    del e.graphs[n]
                    e.stats.failures.setdefault(n, "not captured on every EP rank")
        self._synced_token = token()

    def eager(self, engine: Any, ids: torch.Tensor, positions: Optional[torch.Tensor],
              cu_seqlens: list[int], n_run: int, leaf: Any = None, forward_fn: Any = None) -> Any:
        """The split path without graphs, padded to the agreed ``n_run`` tokens
        (pad rows masked by a device ``num_valid`` = this rank's real n);
        ``leaf`` and ``forward_fn`` as in :meth:`pcg.capture.CaptureEngine.eager`."""
        if n_run < int(ids.shape[0]):
            raise RuntimeError(f"pcg EP: agreed token count {n_run} < this rank's {int(ids.shape[0])}")
        return engine.eager(ids, positions, cu_seqlens, padded_to=n_run, leaf=leaf, forward_fn=forward_fn)


class _PeerWorkspace:
    """One rank's symmetric-memory workspace of the alltoall_peer mode, with
    the fixed layout of :func:`pcg.ops.ep.peer_layout` (regions never move, so
    a peer may fill my receive region while I still read my return region)."""

    def __init__(self, cfg: EPConfig, capacity: int, row_bytes: int, top_k: int,
                 device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        from .ops.ep import peer_layout
        self.capacity, self.row_bytes, self.top_k = capacity, row_bytes, top_k
        W = cfg.world_size
        self.hidden_offset, self.meta_offset, self.back_offset, nbytes = peer_layout(
            W, capacity, row_bytes, top_k)
        self.buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, cfg.group)
        self.peer_ptrs = torch.tensor([int(p) for p in self.handle.buffer_ptrs], dtype=torch.int64,
                                      device=device)
        self.timeout_ms = int((cfg.timeout or 300.0) * 1000)

    def fits(self, capacity: int, row_bytes: int, top_k: int) -> bool:
        return capacity <= self.capacity and row_bytes <= self.row_bytes and top_k <= self.top_k

    def region(self, offset: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A view of this rank's own workspace bytes [offset, ...) as ``shape``/``dtype``."""
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def barrier(self) -> None:
        self.handle.barrier(channel=0, timeout_ms=self.timeout_ms)


# ---- sharding ----------------------------------------------------------------------

def split_reason(backend: str, device_type: str, mode: str) -> str:
    """Why an EP layer of ``mode`` on ``device_type`` tensors with a ``backend``
    group must run outside the CUDA graphs ("" when it can be captured).
    CPU models never capture, so they need no split."""
    if device_type != "cuda" or backend == "nccl" or mode == "alltoall_peer":
        return ""  # alltoall_peer: kernels and in-kernel barriers only
    return (f"ep_{mode}: {backend} collectives on cuda tensors cannot be captured in CUDA graphs "
            "(they run eagerly between replays, staged through host memory; use an NCCL group "
            "to capture them)")


def shard_layer(handle: Any, cfg: EPConfig) -> Any:
    """Keep only this rank's experts in ``handle`` (a :class:`pcg.registry.MoELayer`).

    Replaces ``handle.w13/w2/b13/b2`` by the local slices (new
    ``nn.Parameter``s, ``requires_grad=False``; the caller puts them back on the
    module so the full tensors are freed), sets ``handle.expert_map`` (on the
    weights' device), ``handle.ep`` (the layer's :class:`EPContext`) and, when
    the group's collectives cannot be captured on this device,
    ``handle.split`` / ``handle.split_reason``.
    """
    num_global = int(handle.num_global_experts or handle.w13.shape[0])
    if handle.ep is not None or int(handle.w13.shape[0]) != num_global:
        raise RuntimeError(f"pcg EP: MoE layer {handle.name or handle.layer_id} is already sharded "
                           f"({handle.w13.shape[0]} of {num_global} experts)")
    device = handle.w13.device
    backend = cfg.backend(device)
    if cfg.mode == "alltoall_peer" and device.type != "cuda":
        raise ValueError(f"pcg EP: ep_mode 'alltoall_peer' maps peer GPU memory and needs a CUDA "
                         f"model; MoE layer {handle.name or handle.layer_id} is on {device} (use "
                         "'alltoall' or 'allreduce')")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"pcg EP: the process group uses NCCL but MoE layer "
                         f"{handle.name or handle.layer_id} is on {device}; move the model to its GPU "
                         "or use a gloo group")
    owner = place_experts(num_global, cfg.world_size, cfg.placement)
    mine = local_experts(owner, cfg.rank)
    idx = torch.tensor(mine, dtype=torch.long, device=device)

    def take(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
        if t is None:
            return None
        with torch.no_grad():
            return nn.Parameter(t.detach().index_select(0, idx).contiguous(), requires_grad=False)

    handle.w13, handle.w2, handle.b13, handle.b2 = (take(handle.w13), take(handle.w2),
                                                    take(handle.b13), take(handle.b2))
    handle.num_global_experts = num_global
    handle.expert_map = torch.tensor(expert_map(owner, cfg.rank), dtype=torch.int32, device=device)
    handle.ep = EPContext(cfg, owner, device, backend)
    reason = split_reason(backend, device.type, cfg.mode)
    if reason:
        handle.split = True
        handle.split_reason = reason
    return handle


class EPContext:
    """The expert-parallel runner of one MoE layer: ``run(hidden, weights, ids,
    layer, num_valid)`` -> [T, H], called by ``pcg::moe``."""

    def __init__(self, cfg: EPConfig, owner: Sequence[int], device: torch.device, backend: str) -> None:
        self.cfg = cfg
        self.owner = list(owner)
        self.rank, self.world_size = cfg.rank, cfg.world_size
        self.num_local = sum(1 for r in owner if r == cfg.rank)
        ranks, local = expert_tables(owner)
        self.expert_rank = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.expert_local = torch.tensor(local, dtype=torch.int32, device=device)
        self.backend = backend
        # Host staging for backends that cannot take this device's tensors.
        self.stage = device.type == "cuda" and backend != "nccl"

    @property
    def mode(self) -> str:
        return self.cfg.mode

    # ---- collectives (equal shapes on every rank) -----------------------------------
    def _staged(self, fn, out: torch.Tensor, inp: Optional[torch.Tensor] = None) -> None:
        if not self.stage:
            fn(out, inp)
            return
        out_h = out.cpu()
        fn(out_h, inp.cpu() if inp is not None else None)
        out.copy_(out_h)

    def all_reduce(self, t: torch.Tensor) -> None:
        dist = _dist()
        self._staged(lambda o, _i: dist.all_reduce(o, group=self.cfg.group), t)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [W*T, ...] (rank-major)."""
        dist = _dist()
        out = t.new_empty((self.world_size * t.shape[0], *t.shape[1:]))

        # torch >= 2.14 names it all_gather_single (all_gather_into_tensor is deprecated).
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

        def gather(o: torch.Tensor, i: torch.Tensor) -> None:
            fn(o, i, group=self.cfg.group)
        self._staged(gather, out, t.contiguous())
        return out

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        dist = _dist()
        self._staged(lambda o, i: dist.all_to_all_single(o, i, group=self.cfg.group), out, inp)

    # ---- experts ------------------------------------------------------------------------
    def _experts(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer: Any,
                 mapped: bool) -> torch.Tensor:
        if self.num_local == 0:
            return hidden.new_zeros(hidden.shape)
        return torch.ops.pcg.fused_moe(hidden, layer.w13, layer.w2, weights, ids,
                                       layer.expert_map if mapped else None, None, layer.b13,
                                       layer.b2, layer.activation, layer.alpha, layer.limit, None,
                                       layer.w13_block)

    def run(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer: Any,
            num_valid: Optional[torch.Tensor]) -> torch.Tensor:
        """hidden [T, H], weights [T, k] f32, ids [T, k] i32 (global) -> [T, H];
        rows >= num_valid are zeros. T must be equal on every rank."""
        T, H = hidden.shape
        if T == 0:  # every rank has T == 0 (agreed): nothing to exchange
            return hidden.new_zeros((0, H))
        if self.mode == "allreduce":
            return self._run_allreduce(hidden, weights, ids, layer, num_valid)
        if self.mode == "alltoall_peer" and self.world_size > 1:
            return self._run_alltoall_peer(hidden, weights, ids, layer, num_valid)
        return self._run_alltoall(hidden, weights, ids, layer, num_valid)

    def _run_allreduce(self, hidden, weights, ids, layer, num_valid):
        from .ops.ep import split_meta
        T, H = hidden.shape
        if num_valid is not None:
            valid = torch.arange(T, device=hidden.device, dtype=torch.int32) < num_valid.reshape(1)
            ids = torch.where(valid[:, None], ids, -1)
        if self.world_size == 1:
            out = self._experts(hidden, weights, ids, layer, mapped=True)
            return out
        meta = torch.cat([ids.to(torch.int32), weights.contiguous().view(torch.int32)], 1)
        g_hidden = self.all_gather(hidden)
        g_ids, g_w = split_meta(self.all_gather(meta))
        partial = self._experts(g_hidden, g_w, g_ids, layer, mapped=True)
        self.all_reduce(partial)
        return partial[self.rank * T:(self.rank + 1) * T]

    def _run_alltoall(self, hidden, weights, ids, layer, num_valid):
        from .ops.ep import ep_combine, ep_dispatch, split_meta
        T, H = hidden.shape
        W = self.world_size
        send_h, send_m, slot_map, _counts = ep_dispatch(hidden, weights, ids, self.expert_rank,
                                                        self.expert_local, W, num_valid)
        if W == 1:
            recv_h, recv_m = send_h, send_m
        else:
            recv_h, recv_m = torch.empty_like(send_h), torch.empty_like(send_m)
            self.all_to_all(recv_h, send_h)
            self.all_to_all(recv_m, send_m)
        r_ids, r_w = split_meta(recv_m.view(W * T, -1))
        y = self._experts(recv_h.view(W * T, H), r_w, r_ids, layer, mapped=False)
        if W == 1:
            back = y
        else:
            back = torch.empty_like(y)
            self.all_to_all(back, y)
        return ep_combine(back.view(W, T, H), slot_map)


    def _run_alltoall_peer(self, hidden, weights, ids, layer, num_valid):
        from .ops.ep import ep_combine, ep_dispatch_peer, ep_return_peer, split_meta
        T, H = hidden.shape
        W, k = self.world_size, ids.shape[1]
        row_bytes = H * hidden.element_size()
        ws = self.cfg.peer_workspace(T, row_bytes, k, hidden.device)
        # Capacity C = T (the agreed bucket / padded count): same on every rank.
        slot_map, _counts = ep_dispatch_peer(hidden, weights, ids, self.expert_rank, self.expert_local,
                                             ws.peer_ptrs, self.rank, T, ws.hidden_offset,
                                             ws.meta_offset, num_valid)
        ws.barrier()  # every rank's rows have landed in every workspace
        recv_h = ws.region(ws.hidden_offset, (W * T, H), hidden.dtype)
        recv_m = ws.region(ws.meta_offset, (W, T, 2 * k), torch.int32)
        r_ids, r_w = split_meta(recv_m.view(W * T, 2 * k))
        y = self._experts(recv_h, r_w, r_ids, layer, mapped=False)
        ep_return_peer(y, recv_m, ws.peer_ptrs, self.rank, ws.back_offset)
        ws.barrier()  # every rank's outputs are back
        back = ws.region(ws.back_offset, (W, T, H), hidden.dtype)
        return ep_combine(back, slot_map)


__all__ = ["EPConfig", "EPContext", "MODES", "PLACEMENTS", "expert_map", "expert_tables",
           "local_experts", "place_experts", "shard_layer", "split_reason"]
