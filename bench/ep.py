"""Expert-parallel benchmark, run under torchrun on one node's GPUs:

    torchrun --nproc-per-node 8 bench/ep.py                  # both parts
    torchrun --nproc-per-node 4 bench/ep.py --part comm --tokens 128 1024 8192
    torchrun --nproc-per-node 8 bench/ep.py --part e2e --layers 4 --tokens 512 2048

Parts:

  comm  token exchange of one MoE layer (Qwen3-30B-A3B shape: E=128, top-8,
        H=2048, bf16, uniform routing, contiguous placement) for every EP size
        2, 4, ..., W (sub-groups of the first ranks) and every T (tokens per
        rank), each path captured in a CUDA graph and replayed:
          dispatch   pcg::ep_dispatch alone
          combine    pcg::ep_combine alone
          a2a        one plain all_to_all_single of the [W, T, H] hidden buffer
                     (the floor of the fixed-buffer design, one direction)
          pcg        dispatch + all_to_all_single(hidden) + (meta) + the return
                     all_to_all_single + combine: the whole exchange, no experts
          peer       the alltoall_peer exchange (kernels writing into the
                     peers' mapped memory, symmetric-memory barriers), whole
                     and in halves (dispatch_peer + barrier; return_peer +
                     barrier + combine), the barrier alone, and two floors
                     moving the same remote bytes (copy_ / an elementwise
                     kernel into the peer's buffer, + barrier)
        Bandwidth columns: useful GB/s (rows that really left the rank, both
        directions, over pcg's time), buffer GB/s (bytes all_to_all_single
        moved over its time) and, for the peer pieces and floors, one
        direction's remote bytes per GPU over the piece's time.
  e2e   prefill of the default model (pcg.models.qwen3_moe_model, --layers
        layers, bf16) wrapped without EP (every rank holds every expert) and
        with EP over all ranks (ep_mode allreduce and alltoall), T tokens per
        rank, captured graphs; also the relative error of EP vs no EP and the
        expert memory per rank.

Timings are medians of CUDA-event timings (pcg.timing.cuda_time_ms), the
maximum over ranks. Rank 0 prints a table and writes JSON to --out.

Without CUDA devices (or with fewer than two ranks) it says that it needs
GPUs and exits 0. ``--cpu-smoke`` runs the comm part eagerly on gloo/CPU with
tiny sizes, to check the code paths on a machine without GPUs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import pcg
from pcg.distributed import expert_tables, place_experts
from pcg.ops.ep import ep_combine
from pcg.timing import rel_err

E, TOPK, H = 128, 8, 2048
DEFAULT_T = [1, 16, 128, 512, 2048, 8192]


def log(rank: int, *a) -> None:
    if rank == 0:
        print(*a, flush=True)


def routing(T: int, seed: int, device: torch.device, e: int = E, k: int = TOPK):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H if device.type == "cuda" else 64, generator=g)
    w, ids = torch.softmax(torch.randn(T, e, generator=g), -1).topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return hidden.to(device, dtype), w.to(device), ids.to(device, torch.int32)


def timed(fn, device: torch.device, group, reps: int = 20) -> float:
    """Median ms of fn (a graph replay on CUDA), max over the group's ranks."""
    if device.type == "cuda":
        from pcg.timing import cuda_time_ms
        ms = cuda_time_ms(fn, warmup=3, reps=reps)
    else:
        fn()
        ts = []
        for _ in range(max(3, reps // 4)):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ms = sorted(ts)[len(ts) // 2]
    t = torch.tensor([ms], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def graphed(fn, device: torch.device):
    """fn captured in a CUDA graph (replay callable); fn itself on CPU."""
    if device.type != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up (NCCL communicators, kernel selection) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_comm(args, rank: int, world: int, device: torch.device) -> list[dict]:
    rows = []
    sizes = [w for w in (2, 4, 8, 16, 32, 64) if w <= world]
    groups = {w: dist.new_group(list(range(w))) for w in sizes}
    e = E if device.type == "cuda" else 16
    k = TOPK if device.type == "cuda" else 2
    for w in sizes:
        grp = groups[w]
        member = rank < w
        for T in args.tokens:
            if member:
                ranks, local = expert_tables(place_experts(e, w, "contiguous"))
                er = torch.tensor(ranks, dtype=torch.int32, device=device)
                el = torch.tensor(local, dtype=torch.int32, device=device)
                hidden, wts, ids = routing(T, 1000 * rank + T, device, e, k)
                nv = torch.tensor([T], dtype=torch.int32, device=device)
                Hh = hidden.shape[1]
                send_h = torch.empty((w, T, Hh), dtype=hidden.dtype, device=device)
                send_m = torch.empty((w, T, 2 * k), dtype=torch.int32, device=device)
                slot_map = torch.empty((T, w), dtype=torch.int32, device=device)
                counts = torch.empty((w,), dtype=torch.int32, device=device)
                recv_h, recv_m = torch.empty_like(send_h), torch.empty_like(send_m)
                back = torch.empty_like(send_h)
                out = torch.empty_like(hidden)

                def dispatch():
                    torch.ops.pcg.ep_dispatch(hidden, wts, ids, er, el, nv, send_h, send_m,
                                              slot_map, counts)

                def combine():
                    torch.ops.pcg.ep_combine(back, slot_map, out)

                def a2a():
                    dist.all_to_all_single(recv_h, send_h, group=grp)

                def full():
                    dispatch()
                    dist.all_to_all_single(recv_h, send_h, group=grp)
                    dist.all_to_all_single(recv_m, send_m, group=grp)
                    dist.all_to_all_single(back, recv_h, group=grp)  # identity "experts"
                    combine()

                res = {"ep": w, "T": T}
                for name, fn in (("dispatch", dispatch), ("combine", combine), ("a2a", a2a),
                                 ("pcg", full)):
                    res[name + "_ms"] = timed(graphed(fn, device), device, grp)
                # correctness of the exchange: combine(identity experts) = hidden * #dest ranks
                full()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dests = (slot_map >= 0).sum(1, keepdim=True).to(torch.float32)
                res["max_rel_err"] = rel_err(out, hidden.float() * dests)
                elem = hidden.element_size()
                sent = int(counts.sum().item() - counts[rank].item())  # rows that left this rank
                sent_t = torch.tensor([sent], dtype=torch.float64, device=device)
                dist.all_reduce(sent_t, op=dist.ReduceOp.MIN, group=grp)  # bytes of the slowest rank
                sent_bytes = float(sent_t.item()) * Hh * elem
                res["sent_MB"] = sent_bytes / 1e6
                res["useful_GBps"] = 2 * sent_bytes / (res["pcg_ms"] * 1e-3) / 1e9
                res["buffer_GBps"] = (w - 1) * T * Hh * elem / (res["a2a_ms"] * 1e-3) / 1e9
                if device.type == "cuda" and args.peer:
                    res.update(bench_peer(grp, w, rank, T, hidden, wts, ids, er, el, nv, k, counts))
                    # One direction's remote bytes over each timed piece (GB/s per GPU).
                    for key in ("peer", "peer_dispatch", "peer_combine", "floor_copy", "floor_kernel"):
                        if isinstance(res.get(key + "_ms"), float):
                            res[key + "_GBps"] = sent_bytes / (res[key + "_ms"] * 1e-3) / 1e9
                    if isinstance(res.get("peer_ms"), float):
                        res["peer_GBps"] *= 2  # both directions, as useful_GBps
                rows.append(res)
                peer = ""
                if isinstance(res.get("peer_ms"), float):
                    peer = (f"  peer {res['peer_ms']:.3f} ms (dispatch {res['peer_dispatch_ms']:.3f} "
                            f"{res['peer_dispatch_GBps']:.0f} GB/s, combine {res['peer_combine_ms']:.3f} "
                            f"{res['peer_combine_GBps']:.0f} GB/s, barrier {res['barrier_ms']:.3f}, floor "
                            f"copy_ {res['floor_copy_GBps']:.0f} / kernel {res['floor_kernel_GBps']:.0f} GB/s)")
                elif "peer_ms" in res:
                    peer = f"  peer {res['peer_ms']}"
                log(rank, f"  ep={w:2d} T={T:6d}  dispatch {res['dispatch_ms']:.3f} ms  combine "
                          f"{res['combine_ms']:.3f} ms  a2a {res['a2a_ms']:.3f} ms  pcg "
                          f"{res['pcg_ms']:.3f} ms{peer}  useful {res['useful_GBps']:.1f} GB/s  "
                          f"a2a buffer {res['buffer_GBps']:.1f} GB/s  err {res['max_rel_err']:.2g}")
            dist.barrier()
    return rows


_PEER_CFG: dict = {}


def peer_exchange(cfg, rank: int, T: int, hidden, wts, ids, er, el, nv, k: int):
    """The alltoall_peer exchange with identity experts, in its two halves:
    (workspace, dispatch_half, combine_half). dispatch_half = dispatch_peer +
    barrier (returns the send counts); combine_half = return_peer + barrier +
    combine (returns the combined rows; it reads the last dispatch's slot map).
    Also used by scripts/diag_ep_peer.py."""
    from pcg.ops.ep import ep_dispatch_peer, ep_return_peer
    w, Hh = cfg.world_size, hidden.shape[1]
    ws = cfg.peer_workspace(T, Hh * hidden.element_size(), k, hidden.device)
    recv_h = ws.region(ws.hidden_offset, (w * T, Hh), hidden.dtype)
    recv_m = ws.region(ws.meta_offset, (w, T, 2 * k), torch.int32)
    back = ws.region(ws.back_offset, (w, T, Hh), hidden.dtype)
    state = {}

    def dispatch_half():
        state["slot_map"], counts = ep_dispatch_peer(hidden, wts, ids, er, el, ws.peer_ptrs, rank, T,
                                                     ws.hidden_offset, ws.meta_offset, nv)
        ws.barrier()
        return counts

    def combine_half():
        ep_return_peer(recv_h, recv_m, ws.peer_ptrs, rank, ws.back_offset)
        ws.barrier()
        return ep_combine(back, state["slot_map"])

    return ws, dispatch_half, combine_half


def bench_peer(grp, w: int, rank: int, T: int, hidden, wts, ids, er, el, nv, k: int,
               counts) -> dict:
    """The alltoall_peer exchange: the whole of it (dispatch_peer + barrier +
    return_peer (identity experts) + barrier + combine), its two halves, and
    the floor of its NVLink traffic, each captured. Returns ms per key
    (peer_ms, peer_dispatch_ms, peer_combine_ms, barrier_ms, floor_copy_ms,
    floor_kernel_ms), or {"peer_ms": reason} when it could not run.

    The floors move the same bytes as the exchange's remote rows, one direction
    (this rank's rows to every other rank, contiguous), then a barrier:
    copy_ = torch's copy into the peer's mapped buffer (cudaMemcpyAsync), kernel
    = an elementwise kernel writing it (SM stores, like pcg's kernels)."""
    from pcg.distributed import EPConfig
    try:
        cfg = _PEER_CFG.get(w)
        if cfg is None:
            cfg = _PEER_CFG[w] = EPConfig(group=grp, mode="alltoall_peer")
        Hh = hidden.shape[1]
        row_bytes = Hh * hidden.element_size()
        ws, dispatch_half, combine_half = peer_exchange(cfg, rank, T, hidden, wts, ids, er, el, nv, k)
        recv_h = ws.region(ws.hidden_offset, (w * T, Hh), hidden.dtype)

        def whole():
            dispatch_half()
            return combine_half()

        dev = hidden.device
        res = {"peer_ms": timed(graphed(whole, dev), dev, grp)}
        dispatch_half()  # slot_map for the combine half alone
        res["peer_dispatch_ms"] = timed(graphed(dispatch_half, dev), dev, grp)
        res["peer_combine_ms"] = timed(graphed(combine_half, dev), dev, grp)
        res["barrier_ms"] = timed(graphed(ws.barrier, dev), dev, grp)
        # Floors: this rank's remote rows, contiguous, into each peer's return region.
        handle = ws.handle
        srcs, dsts = [], []
        for r in range(w):
            n = int(counts[r].item()) if r != rank else 0
            if n == 0:
                continue
            srcs.append(recv_h[:n])
            dsts.append(handle.get_buffer(r, (n, Hh), hidden.dtype,
                                          (ws.back_offset + rank * T * row_bytes) // hidden.element_size()))

        def floor_copy():
            for s_, d_ in zip(srcs, dsts):
                d_.copy_(s_)
            ws.barrier()

        def floor_kernel():
            for s_, d_ in zip(srcs, dsts):
                torch.mul(s_, 1, out=d_)
            ws.barrier()

        res["floor_copy_ms"] = timed(graphed(floor_copy, dev), dev, grp)
        res["floor_kernel_ms"] = timed(graphed(floor_kernel, dev), dev, grp)
        return res
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"peer_ms": f"unavailable: {type(exc).__name__}: {exc}"}


def bench_e2e(args, rank: int, world: int, device: torch.device) -> list[dict]:
    from pcg.models import qwen3_moe_model
    rows = []
    tiny = {} if device.type == "cuda" else dict(  # --cpu-smoke: a tiny model of the same family
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base_model = qwen3_moe_model(args.layers, dtype=dtype, device=device, seed=0, **tiny)
    vocab = base_model.config.vocab_size
    expert_bytes = sum(p.numel() * p.element_size() for n, p in base_model.named_parameters()
                       if "experts" in n)
    base = pcg.wrap(copy.deepcopy(base_model), max_tokens=max(args.tokens), progress=False)
    wrapped = {}
    for mode in args.modes:
        wrapped[mode] = pcg.wrap(copy.deepcopy(base_model), ep=dist.group.WORLD, ep_mode=mode,
                                 max_tokens=max(args.tokens), progress=False)
    del base_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base.capture()
        for mode in args.modes:
            wrapped[mode].capture()  # collective: every rank captures the same buckets
    for T in args.tokens:
        g = torch.Generator().manual_seed(rank * 7919 + T)
        ids = torch.randint(0, vocab, (1, T), generator=g).to(device)
        res = {"T_per_rank": T, "ep": world, "expert_MiB_no_ep": expert_bytes / 2**20}
        res["no_ep_ms"] = timed(lambda: base(ids), device, dist.group.WORLD, reps=10)
        ref = base(ids).logits
        for mode, m in wrapped.items():
            res[f"{mode}_ms"] = timed(lambda: m(ids), device, dist.group.WORLD, reps=10)
            res[f"{mode}_rel_err"] = rel_err(m(ids).logits, ref)
            res[f"{mode}_expert_MiB"] = sum(
                h.w13.numel() * h.w13.element_size() + h.w2.numel() * h.w2.element_size()
                for h in m.registry.moe_layers) / 2**20
            res[f"{mode}_report"] = str(m.report()) if T == args.tokens[0] else None
        rows.append(res)
        log(rank, f"  T/rank={T:6d}  no EP {res['no_ep_ms']:.2f} ms  " + "  ".join(
            f"{mode} {res[f'{mode}_ms']:.2f} ms (x{res['no_ep_ms'] / res[f'{mode}_ms']:.2f}, err "
            f"{res[f'{mode}_rel_err']:.2g})" for mode in wrapped))
    for mode, m in wrapped.items():
        log(rank, f"{mode}:\n{m.report()}")
    return rows


def plot(result: dict, path: str) -> None:
    """Exchange latency per EP size and end-to-end prefill vs T (one PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    comm = result.get("comm", [])
    for w in sorted({r["ep"] for r in comm}):
        rs = [r for r in comm if r["ep"] == w]
        for key, style in (("pcg_ms", "-o"), ("a2a_ms", "--s"), ("peer_ms", ":^")):
            pts = [(r["T"], r[key] * 1e3) for r in rs if isinstance(r.get(key), float)]
            if pts:
                axes[0].plot(*zip(*pts), style, label=f"EP={w} {key[:-3]}")
    axes[0].set_title("token exchange (us)")
    e2e = result.get("e2e", [])
    if e2e:
        ts = [r["T_per_rank"] for r in e2e]
        axes[1].plot(ts, [r["no_ep_ms"] for r in e2e], "-o", label="no EP")
        for key in [k for k in e2e[0] if k.endswith("_ms") and k != "no_ep_ms"]:
            axes[1].plot(ts, [r[key] for r in e2e], "-s", label=key[:-3])
    axes[1].set_title("prefill per rank (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a --part run leaves the other panel empty)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not run (--part)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["comm", "e2e", "all"], default="all")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per rank")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["allreduce", "alltoall"],
                    help="e2e EP modes (add alltoall_peer for the peer-mapped path)")
    ap.add_argument("--no-peer", dest="peer", action="store_false",
                    help="skip the peer-mapped exchange in the comm part")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo/CPU, tiny sizes and model, eager")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.cpu_smoke:
        if world < 2:
            print("bench/ep.py --cpu-smoke: run under torchrun with >= 2 processes")
            return
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        device = torch.device("cpu")
        args.tokens = args.tokens or [1, 7, 64]
        args.layers = min(args.layers, 2)
    else:
        if not torch.cuda.is_available() or world < 2 or torch.cuda.device_count() < 1:
            print("bench/ep.py needs GPUs: run it under torchrun with >= 2 processes on a node with "
                  ">= 2 CUDA devices (e.g. torchrun --nproc-per-node 8 bench/ep.py); nothing to do here.")
            return
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=300))
        args.tokens = args.tokens or DEFAULT_T
    rank = dist.get_rank()
    world = dist.get_world_size()
    result = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "shape": {"E": E, "top_k": TOPK, "H": H}}
    with torch.inference_mode():
        if args.part in ("comm", "all"):
            log(rank, f"comm: EP sizes up to {world}, tokens per rank {args.tokens}")
            result["comm"] = bench_comm(args, rank, world, device)
        if args.part in ("e2e", "all"):
            log(rank, f"e2e: default model, {args.layers} layers, EP over {world} ranks")
            result["e2e"] = bench_e2e(args, rank, world, device)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "ep.json" if device.type == "cuda" else "ep_cpu_smoke.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
        plot(result, path[:-len(".json")] + ".png")
    dist.barrier()
    sys.stdout.flush()
    # No destroy_process_group: after graphs captured NCCL calls it has hung
    # in teardown on the H200s (the launcher then killed the job at its limit).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
