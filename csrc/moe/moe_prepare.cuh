// The CUTLASS path's prologue in one kernel for few (token, k) pairs:
// moe_align (block_m runs, pair_slot), the permute and the GEMMs' setup,
// which otherwise take three kernels one after the other (~9 us before GEMM1
// at Qwen3-30B-A3B T = 16-64 on an H200, ~27 us at T = 1024 where the
// one-CTA align alone takes 15).
//
// Every CTA counts all pairs per expert in shared memory (and those before its
// own first pair), scans the padded runs, and gives its own pairs their slots
// in pair order: slot(p) = run start of e + pairs of e before p. The order is
// the stable one of moe_align_host (ascending pair index within an expert), so
// every CTA that holds a piece of a token's row computes the same slots with
// no exchange. Then its warps copy their (token, chunk) pieces of the hidden
// rows to the slots (as the permute: each piece read once; not when GEMM1
// gathers its rows itself, a_sorted null), and all CTAs
// together fill the padding slots, block_expert, num_blocks and, through
// ArgsWriter (e, M_e, first slot), the GEMMs' per-expert arguments.
// Torch-free, CUTLASS-free; layout of the outputs: moe_align.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/pdl.cuh"
#include "moe/moe_align.h"
#include "moe/moe_align_device.cuh"
#include "moe/moe_prepare.h"

namespace pcg::moe {

struct MoePrepareParams {
  const int32_t* topk_ids;  // [T, k]
  int64_t T;
  int k;
  const int32_t* expert_map;  // or null
  int64_t num_global;
  const int32_t* num_valid;  // device, or null
  int E;
  int block_m;
  int32_t* sorted_pairs;  // [max_blocks * block_m]
  int32_t* block_expert;  // [max_blocks]
  int64_t max_blocks;
  int32_t* num_blocks;       // [1]
  int32_t* pair_slot;        // [T * k]
  const uint4* hidden;       // [T, row_vecs]
  uint4* a_sorted;           // [slots, row_vecs]; null: no permute (GEMM1 gathers A)
  int64_t row_vecs;          // 16-byte vectors per row
  int64_t chunk;             // vectors per (token, chunk) piece, <= 32 * kPrepareUnroll
  int64_t chunks;            // pieces per row
  int64_t pieces_per_cta;    // a multiple of kPrepareWarps
};

// Shared memory of the kernel: 4 ints per expert and one per own pair
// (tokens_per_cta of moe_prepare_split, times k).
inline size_t moe_prepare_smem_bytes(int E, int64_t tokens_per_cta, int k) {
  return sizeof(int) * (4 * static_cast<size_t>(E) + static_cast<size_t>(tokens_per_cta) * k);
}

// Lane `lane`'s vectors of piece `piece` (token piece / chunks) of the hidden rows.
__device__ __forceinline__ void load_piece(const MoePrepareParams& p, int64_t piece, int lane,
                                           uint4 (&r)[kPrepareUnroll]) {
  const int64_t t = piece / p.chunks;
  const int64_t v0 = (piece - t * p.chunks) * p.chunk + lane;
  const uint4* src = p.hidden + t * p.row_vecs;
#pragma unroll
  for (int u = 0; u < kPrepareUnroll; ++u) {
    const int64_t v = v0 + 32 * u;
    if (32 * u < p.chunk && v < p.row_vecs) r[u] = src[v];
  }
}

template <typename ArgsWriter>
__global__ void __launch_bounds__(kPrepareWarps * 32)
    moe_prepare_kernel(MoePrepareParams p, ArgsWriter write_args) {
  constexpr int NT = kPrepareWarps * 32;
  extern __shared__ int smem[];
  int* count = smem;             // [E] valid pairs of e
  int* before = count + p.E;     // [E] pairs of e before this CTA's first pair (then a cursor)
  int* start = before + p.E;     // [E] first slot of e's run
  int* blk_end = start + p.E;    // [E] inclusive prefix of blocks
  int* own = blk_end + p.E;      // [tokens_per_cta * k] slot of each own pair, -1: none

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int k = p.k;
  const int64_t piece0 = static_cast<int64_t>(blockIdx.x) * p.pieces_per_cta;
  const int64_t all_pieces = p.T * p.chunks;
  const int64_t piece_end = min(piece0 + p.pieces_per_cta, all_pieces);
  const int64_t t0 = piece0 / p.chunks;             // this CTA's tokens [t0, t1)
  const int64_t t1 = (piece_end - 1) / p.chunks + 1;
  const int64_t first = t0 * k;                     // its first pair

  pdl_wait();  // topk_ids, hidden (the previous kernel)

  // Loads that do not depend on the routing go first, so that they are in
  // flight while the pairs are counted: each warp's first piece of a hidden
  // row, and warp 0's first 32 own expert ids.
  const int64_t own_pairs = (t1 - t0) * k;
  const int64_t my_piece = piece0 + warp;
  uint4 r[kPrepareUnroll];
  const bool permute = p.a_sorted != nullptr;
  if (permute && my_piece < piece_end) load_piece(p, my_piece, lane, r);
  const int id0 = warp == 0 && lane < own_pairs ? p.topk_ids[first + lane] : -1;

  for (int e = tid; e < p.E; e += NT) count[e] = before[e] = 0;
  __syncthreads();
  const int64_t nv = read_num_valid(p.num_valid, p.T);
  const int64_t P = nv * k;
  auto count_pair = [&](int id, int64_t q) {
    const int e = local_expert(id, p.expert_map, p.num_global, p.E);
    if (e >= 0) {
      atomicAdd(&count[e], 1);
      if (q < first) atomicAdd(&before[e], 1);
    }
  };
  // kPrepareIdsInFlight ids a thread are loaded before any is counted (one
  // load latency per 8192 pairs): 16-byte loads when aligned.
  int64_t counted = 0;
  if ((reinterpret_cast<uintptr_t>(p.topk_ids) & 15u) == 0) {
    constexpr int kVecs = kPrepareIdsInFlight / 4;
    const int4* vec = reinterpret_cast<const int4*>(p.topk_ids);
    const int64_t nvec = P / 4;
    for (int64_t base = 0; base < nvec; base += kVecs * NT) {
      int4 v[kVecs];
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int64_t q = base + tid + i * NT;
        if (q < nvec) v[i] = vec[q];
      }
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int64_t q = base + tid + i * NT;
        if (q < nvec) {
          count_pair(v[i].x, 4 * q);
          count_pair(v[i].y, 4 * q + 1);
          count_pair(v[i].z, 4 * q + 2);
          count_pair(v[i].w, 4 * q + 3);
        }
      }
    }
    counted = nvec * 4;
  }
  for (int64_t q = counted + tid; q < P; q += NT) count_pair(p.topk_ids[q], q);
  __syncthreads();

  const int bm = p.block_m;
  const int total_blocks = scan_padded_runs<NT>(count, start, blk_end, p.E, bm);

  // Own pairs in pair order (warp 0, 32 at a time): equal experts within a
  // step rank by lane, and the step's last such lane advances the cursor.
  if (warp == 0) {
    for (int64_t i0 = 0; i0 < own_pairs; i0 += 32) {
      const int64_t q = first + i0 + lane;
      const bool in = i0 + lane < own_pairs;
      const int id = i0 == 0 ? id0 : (in ? p.topk_ids[q] : -1);
      const int e = in && q < P ? local_expert(id, p.expert_map, p.num_global, p.E) : -1;
      const unsigned same = __match_any_sync(0xffffffffu, e);
      int slot = -1;
      if (e >= 0) slot = start[e] + before[e] + __popc(same & ((1u << lane) - 1u));
      __syncwarp();
      if (e >= 0 && (same >> lane) == 1u) before[e] += __popc(same);
      __syncwarp();
      if (in) own[i0 + lane] = slot;
    }
  }
  __syncthreads();

  // pair_slot and the valid slots of sorted_pairs: written by the CTA that
  // holds the token's first piece (others compute the same values).
  for (int64_t i = tid; i < own_pairs; i += NT) {
    const int64_t q = first + i;
    if ((q / k) * p.chunks < piece0) continue;
    const int s = own[i];
    p.pair_slot[q] = s;
    if (s >= 0) p.sorted_pairs[s] = static_cast<int32_t>(q);
  }

  // The permute: a warp per (token, chunk) piece, loaded once (the first
  // piece above), stored to each of the token's slots.
  for (int64_t piece = my_piece; permute && piece < piece_end; piece += kPrepareWarps) {
    const int64_t t = piece / p.chunks;
    if (piece != my_piece) load_piece(p, piece, lane, r);
    const int* slots = own + (t - t0) * k;
    const int64_t v0 = (piece - t * p.chunks) * p.chunk + lane;
    for (int j0 = 0; j0 < k; j0 += 32) {
      const int mine = j0 + lane < k ? slots[j0 + lane] : -1;
      unsigned todo = __ballot_sync(0xffffffffu, mine >= 0);
      while (todo != 0) {
        const int b = __ffs(todo) - 1;
        todo &= todo - 1;
        const int64_t slot = __shfl_sync(0xffffffffu, mine, b);
        uint4* dst = p.a_sorted + slot * p.row_vecs;
#pragma unroll
        for (int u = 0; u < kPrepareUnroll; ++u) {
          const int64_t v = v0 + 32 * u;
          if (32 * u < p.chunk && v < p.row_vecs) dst[v] = r[u];
        }
      }
    }
  }

  // Shared by all CTAs: padding slots, block_expert, num_blocks, GEMM arguments.
  const int64_t gstride = static_cast<int64_t>(gridDim.x) * NT;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * NT + tid;
  const int64_t slots = p.max_blocks * bm;
  for (int64_t s = g; s < slots; s += gstride) {
    const int64_t b = s / bm;
    bool pad = true;
    if (b < total_blocks) {
      const int e = expert_of_block(blk_end, p.E, b);
      pad = s - start[e] >= count[e];
    }
    if (pad) p.sorted_pairs[s] = -1;
  }
  for (int64_t b = g; b < p.max_blocks; b += gstride) {
    p.block_expert[b] = b < total_blocks ? expert_of_block(blk_end, p.E, b) : -1;
  }
  if (g == 0) *p.num_blocks = total_blocks;
  for (int64_t e = g; e < p.E; e += gstride) {
    write_args(e, count[e], count[e] > 0 ? static_cast<int64_t>(start[e]) : 0);
  }
}

}  // namespace pcg::moe
