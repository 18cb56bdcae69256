// pcg::moe_align: sort the routed (token, k) pairs by local expert and pad each
// expert's run to a multiple of block_m, so a grouped GEMM can give every block
// of block_m rows to exactly one expert. Torch-free: raw pointers, plain types.
//
// Inputs
//   topk_ids    [T, k] int32, global expert id of pair p = t*k + j
//   expert_map  [E_global] int32 or null: global id -> local expert (-1: remote)
//   num_valid   one int32 (device memory on CUDA) or null: rows t >= num_valid
//               are skipped (clamped to [0, T]; null means T)
//   E           number of local experts
// A pair is valid when t < num_valid, 0 <= id < E_global (E_global = map size,
// or E without a map) and the local expert e = map[id] (or id) is in [0, E).
//
// Outputs (max_blocks = size of block_expert, see moe_align_max_blocks)
//   sorted_pairs [max_blocks * block_m] int32: expert 0's valid pairs, padded
//                with -1 to a multiple of block_m, then expert 1's, ...; every
//                slot after the last used block is -1 too. The order of pairs
//                inside one expert's run is unspecified on CUDA (ascending on
//                CPU); the GEMMs' per-row results do not depend on it.
//   block_expert [max_blocks] int32: local expert of block b (slots
//                [b*block_m, (b+1)*block_m)), -1 for b >= num_blocks
//   num_blocks   [1] int32: number of used blocks
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace pcg::moe {

// Worst-case number of blocks: each of the at most min(E, P) experts that get
// a pair wastes at most block_m - 1 padding slots.
inline int64_t moe_align_max_blocks(int64_t num_pairs, int64_t num_experts, int64_t block_m) {
  if (num_pairs <= 0 || num_experts <= 0 || block_m <= 0) return 0;
  const int64_t nz = num_experts < num_pairs ? num_experts : num_pairs;
  return (num_pairs + nz * (block_m - 1)) / block_m;
}

// Local expert of a global id, or -1 when the pair contributes nothing.
PCG_HD int local_expert(int32_t id, const int32_t* expert_map, int64_t num_global,
                        int64_t num_experts) {
  if (id < 0 || id >= num_global) return -1;
  const int32_t e = expert_map ? expert_map[id] : id;
  return (e >= 0 && e < num_experts) ? e : -1;
}

// Host implementation (the CPU kernel and the reference for tests). Stable:
// pairs of one expert appear in ascending pair index.
inline void moe_align_host(const int32_t* topk_ids, int64_t num_tokens, int64_t top_k,
                           const int32_t* expert_map, int64_t num_global, int64_t num_valid,
                           int64_t num_experts, int64_t block_m, int32_t* sorted_pairs,
                           int32_t* block_expert, int64_t max_blocks, int32_t* num_blocks) {
  if (num_valid < 0) num_valid = 0;
  if (num_valid > num_tokens) num_valid = num_tokens;
  const int64_t slots = max_blocks * block_m;
  for (int64_t s = 0; s < slots; ++s) sorted_pairs[s] = -1;
  for (int64_t b = 0; b < max_blocks; ++b) block_expert[b] = -1;
  // Counting sort.
  int64_t* count = new int64_t[num_experts + 1]();
  const int64_t P = num_valid * top_k;
  for (int64_t p = 0; p < P; ++p) {
    const int e = local_expert(topk_ids[p], expert_map, num_global, num_experts);
    if (e >= 0) ++count[e];
  }
  int64_t* cursor = new int64_t[num_experts + 1];
  int64_t off = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    cursor[e] = off;
    const int64_t nb = (count[e] + block_m - 1) / block_m;
    for (int64_t b = 0; b < nb; ++b) block_expert[off / block_m + b] = static_cast<int32_t>(e);
    off += nb * block_m;
  }
  for (int64_t p = 0; p < P; ++p) {
    const int e = local_expert(topk_ids[p], expert_map, num_global, num_experts);
    if (e >= 0) sorted_pairs[cursor[e]++] = static_cast<int32_t>(p);
  }
  *num_blocks = static_cast<int32_t>(off / block_m);
  delete[] count;
  delete[] cursor;
}

}  // namespace pcg::moe

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace pcg::moe {

// Largest E the CUDA kernel handles (two int32 per expert in shared memory:
// 128 KiB, within sm_80's and sm_90's opt-in limit).
constexpr int64_t kMoeAlignMaxExperts = 16384;

// Pairs per CTA of the multi-CTA align (count, then scatter, one tile per CTA).
// Up to two tiles one CTA does everything; above, a single CTA would be bound
// by its load latency (146 us at 131072 pairs on an H200).
constexpr int64_t kMoeAlignTile = 4096;
inline int64_t moe_align_tiles(int64_t num_pairs) {
  return num_pairs > 2 * kMoeAlignTile ? (num_pairs + kMoeAlignTile - 1) / kMoeAlignTile : 1;
}
// int32 scratch the launch needs for T*k pairs and E local experts (0: none):
// per tile and expert, the count and then the tile's first slot.
inline int64_t moe_align_scratch_ints(int64_t num_pairs, int64_t num_experts) {
  const int64_t tiles = moe_align_tiles(num_pairs);
  return tiles > 1 && num_experts > 0 ? tiles * num_experts : 0;
}

// Launches the align on `stream`; num_valid is a device pointer or null.
// Fills all of sorted_pairs[0, max_blocks*block_m), block_expert[0, max_blocks)
// and num_blocks[0]. `scratch` holds moe_align_scratch_ints(T*k, E) int32
// (may be null when that is 0). Returns the launch error.
// pair_slot (optional, [T*k] int32, CUDA only; the CUTLASS path's permute and
// reduce use it): the inverse of sorted_pairs, written where the scatter
// places each pair: pair_slot[p] = s for every valid pair p (sorted_pairs[s]
// == p), -1 for every other pair (rows >= num_valid, remote or out-of-range
// experts). Null: not written (moe_align's op, the mma.sync path).
// as_dependent: launch as a PDL dependent of the stream's previous kernel
// (the kernels wait for it before touching memory, and let their own
// dependents launch at once; the CUTLASS path). The mma.sync path measured
// slower with PDL launches (bench/results/ab_pdl_reduce_s23.log) and passes false.
cudaError_t launch_moe_align(const int32_t* topk_ids, int64_t num_tokens, int top_k,
                             const int32_t* expert_map, int64_t num_global,
                             const int32_t* num_valid, int num_experts, int block_m,
                             int32_t* sorted_pairs, int32_t* block_expert, int64_t max_blocks,
                             int32_t* num_blocks, int32_t* pair_slot, int32_t* scratch,
                             cudaStream_t stream, bool as_dependent = false);

}  // namespace pcg::moe
#endif
