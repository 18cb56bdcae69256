"""Kernel times of the alltoall_peer exchange, on every GPU of the node.

bench/ep.py times the peer exchange's halves (dispatch_peer + barrier,
return_peer + barrier + combine) against an NVLink copy floor; this says which
kernel of each half takes the time: it runs both halves eagerly under
torch.profiler on every rank (one process per GPU, NCCL) and prints rank 0's
per-kernel GPU time, with the bytes each rank sent to the others.

    python scripts/diag_ep_peer.py [--tokens 4096 16384] [--reps 5]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from ep import E, TOPK, peer_exchange, routing  # noqa: E402

from pcg.distributed import EPConfig, expert_tables, place_experts  # noqa: E402


def worker(rank: int, world: int, store_path: str, args) -> None:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, device_id=dev, timeout=datetime.timedelta(seconds=120))
    cfg = EPConfig(group=dist.group.WORLD, mode="alltoall_peer")
    ranks, local = expert_tables(place_experts(E, world, "contiguous"))
    er = torch.tensor(ranks, dtype=torch.int32, device=dev)
    el = torch.tensor(local, dtype=torch.int32, device=dev)
    with torch.inference_mode():
        for T in args.tokens:
            hidden, wts, ids = routing(T, 1000 * rank + T, dev)
            nv = torch.tensor([T], dtype=torch.int32, device=dev)
            H = hidden.shape[1]
            _, dispatch_half, combine_half = peer_exchange(cfg, rank, T, hidden, wts, ids, er, el, nv,
                                                           TOPK)

            def exchange():
                counts = dispatch_half()
                combine_half()
                return counts

            counts = exchange()
            torch.cuda.synchronize()
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.reps):
                    exchange()
                torch.cuda.synchronize()
            dist.barrier()
            if rank != 0:
                continue
            per = collections.defaultdict(float)
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    per[ev.name] += ev.device_time_total / args.reps
            sent = int(counts.sum().item() - counts[rank].item()) * H * hidden.element_size()
            print(f"T={T}: rank 0 sends {sent / 1e6:.1f} MB to the other ranks; GPU us per exchange:")
            for name, us in sorted(per.items(), key=lambda kv: -kv[1]):
                gbps = f"  ({sent / (us * 1e-6) / 1e9:.0f} GB/s of remote rows)" if us > 20 else ""
                print(f"  {us:9.1f}  {name[:90]}{gbps}")
            sys.stdout.flush()
    dist.barrier()
    os._exit(0)  # no destroy_process_group (see bench/ep.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    world = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world < 2:
        print("diag_ep_peer.py needs >= 2 CUDA devices; nothing to do here.")
        return
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(world, os.path.join(d, "store"), args), nprocs=world)


if __name__ == "__main__":
    main()
