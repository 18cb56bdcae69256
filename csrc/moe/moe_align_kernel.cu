// CUDA kernels of pcg::moe_align (layout: moe_align.h). Up to two tiles of
// pairs, one CTA of 1024 threads: counts in shared memory, a block-wide scan
// of the padded counts, then a scatter with shared-memory cursors. Above, one
// CTA per tile of kMoeAlignTile pairs: per-tile counts into scratch, then each
// CTA derives its cursors from all tiles' counts and scatters its tile.
// The scatter also writes the inverse map pair_slot when asked (the CUTLASS
// path). Everything (including num_valid) is read on the device: capturable.
// Every kernel waits for the stream's previous grid before touching global
// memory and lets its own dependents launch at once (they wait for it in
// turn), so it may be launched as a programmatic dependent (PDL; the wait is
// a no-op otherwise).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/pdl.cuh"
#include "moe/moe_align.h"
#include "moe/moe_align_device.cuh"

namespace pcg::moe {
namespace {

constexpr int kThreads = 1024;

// Calls f(p, e) for every valid pair p < P with its local expert e. Ids are
// read 4 at a time (16-byte loads, 2 in flight per thread) when aligned: one
// CTA does all the work, so it is bound by load latency, not bandwidth.
template <typename F>
__device__ __forceinline__ void for_each_pair(const int32_t* __restrict__ topk_ids, int64_t P,
                                              const int32_t* __restrict__ expert_map,
                                              int64_t num_global, int num_experts, F&& f) {
  const int tid = threadIdx.x;
  int64_t done = 0;
  if ((reinterpret_cast<uintptr_t>(topk_ids) & 15u) == 0) {
    constexpr int64_t kStep = 2 * 4 * kThreads;
    const int4* v = reinterpret_cast<const int4*>(topk_ids);
    for (int64_t base = 0; base + kStep <= P; base += kStep) {
      const int64_t q0 = base / 4 + tid, q1 = q0 + kThreads;
      const int4 a = v[q0], b = v[q1];
      const int ids[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t p = (i < 4 ? q0 : q1) * 4 + (i & 3);
        const int e = local_expert(ids[i], expert_map, num_global, num_experts);
        if (e >= 0) f(p, e);
      }
      done = base + kStep;
    }
  }
  for (int64_t p = done + tid; p < P; p += kThreads) {
    const int e = local_expert(topk_ids[p], expert_map, num_global, num_experts);
    if (e >= 0) f(p, e);
  }
}

// -1 into n int32 (grid-stride over all CTAs of the launch).
__device__ __forceinline__ void fill_minus_one(int32_t* __restrict__ a, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if ((reinterpret_cast<uintptr_t>(a) & 15u) == 0) {
    int4* v = reinterpret_cast<int4*>(a);
    for (int64_t q = first; q < n / 4; q += stride) v[q] = make_int4(-1, -1, -1, -1);
    for (int64_t s = n / 4 * 4 + first; s < n; s += stride) a[s] = -1;
  } else {
    for (int64_t s = first; s < n; s += stride) a[s] = -1;
  }
}

// Every slot and (when asked) every pair starts at -1; the scatter overwrites
// the used ones. pair_slot covers all T*k pairs, so pairs of rows >= num_valid
// and pairs of remote experts read -1.
__device__ __forceinline__ void fill_unused(int32_t* __restrict__ sorted_pairs, int64_t slots,
                                            int32_t* __restrict__ pair_slot, int64_t pairs) {
  fill_minus_one(sorted_pairs, slots);
  if (pair_slot != nullptr) fill_minus_one(pair_slot, pairs);
}

// Scatter of pair p into slot s (the inverse map too, when asked).
__device__ __forceinline__ void place(int32_t* __restrict__ sorted_pairs,
                                      int32_t* __restrict__ pair_slot, int s, int64_t p) {
  sorted_pairs[s] = static_cast<int32_t>(p);
  if (pair_slot != nullptr) pair_slot[p] = s;
}

// Block-wide: turns count[e] (pairs of expert e) into the first slot of e's
// run (runs padded to block_m, in expert order) and writes blk_end[e] (the
// inclusive prefix of blocks). Returns the total number of blocks.
__device__ __forceinline__ int scan_runs(int* count, int* blk_end, int num_experts, int block_m) {
  return scan_padded_runs<kThreads>(count, count, blk_end, num_experts, block_m);
}

// block_expert[b]: the expert whose block range holds b (-1 past the end).
__device__ __forceinline__ void write_block_experts(const int* blk_end, int num_experts,
                                                    int total_blocks, int32_t* block_expert,
                                                    int64_t max_blocks, int32_t* num_blocks) {
  if (threadIdx.x == 0) *num_blocks = total_blocks;
  for (int64_t b = threadIdx.x; b < max_blocks; b += kThreads) {
    block_expert[b] = b < total_blocks ? expert_of_block(blk_end, num_experts, b) : -1;
  }
}

// One CTA does everything (small T).
__global__ void __launch_bounds__(kThreads)
    moe_align_kernel(const int32_t* __restrict__ topk_ids, int64_t num_tokens, int top_k,
                     const int32_t* __restrict__ expert_map, int64_t num_global,
                     const int32_t* __restrict__ num_valid, int num_experts, int block_m,
                     int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ block_expert,
                     int64_t max_blocks, int32_t* __restrict__ num_blocks,
                     int32_t* __restrict__ pair_slot) {
  extern __shared__ int smem[];
  int* count = smem;                  // [E], later the scatter cursor
  int* blk_end = smem + num_experts;  // [E] inclusive prefix of blocks per expert
  pdl_wait();
  pdl_launch_dependents();

  const int tid = threadIdx.x;
  const int64_t P = read_num_valid(num_valid, num_tokens) * top_k;
  for (int e = tid; e < num_experts; e += kThreads) count[e] = 0;
  fill_unused(sorted_pairs, max_blocks * block_m, pair_slot, num_tokens * top_k);
  __syncthreads();

  for_each_pair(topk_ids, P, expert_map, num_global, num_experts,
                [&](int64_t, int e) { atomicAdd(&count[e], 1); });
  __syncthreads();
  const int total_blocks = scan_runs(count, blk_end, num_experts, block_m);
  write_block_experts(blk_end, num_experts, total_blocks, block_expert, max_blocks, num_blocks);

  // Scatter (the -1 fills above are ordered before by the barriers).
  for_each_pair(topk_ids, P, expert_map, num_global, num_experts, [&](int64_t p, int e) {
    place(sorted_pairs, pair_slot, atomicAdd(&count[e], 1), p);
  });
}

// Calls f(p, e) for the valid pairs of tile blockIdx.x.
template <typename F>
__device__ __forceinline__ void for_each_tile_pair(const int32_t* __restrict__ topk_ids,
                                                   int64_t P, const int32_t* __restrict__ map,
                                                   int64_t num_global, int num_experts, F&& f) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kMoeAlignTile;
  const int64_t end = min(base + kMoeAlignTile, P);
#pragma unroll 4
  for (int64_t p = base + threadIdx.x; p < end; p += kThreads) {
    const int e = local_expert(topk_ids[p], map, num_global, num_experts);
    if (e >= 0) f(p, e);
  }
}

// Multi-CTA, step 1 (one CTA per tile): scratch[tile * E + e] = the tile's
// pairs of expert e; every CTA also fills a share of sorted_pairs (and
// pair_slot) with -1, ordered before step 2's scatter by the launch order.
__global__ void __launch_bounds__(kThreads)
    moe_align_count_kernel(const int32_t* __restrict__ topk_ids, int64_t num_tokens, int top_k,
                           const int32_t* __restrict__ expert_map, int64_t num_global,
                           const int32_t* __restrict__ num_valid, int num_experts,
                           int32_t* __restrict__ sorted_pairs, int64_t slots,
                           int32_t* __restrict__ pair_slot, int32_t* __restrict__ scratch) {
  extern __shared__ int count[];  // [E]
  pdl_wait();
  pdl_launch_dependents();
  for (int e = threadIdx.x; e < num_experts; e += kThreads) count[e] = 0;
  fill_unused(sorted_pairs, slots, pair_slot, num_tokens * top_k);
  __syncthreads();
  const int64_t P = read_num_valid(num_valid, num_tokens) * top_k;
  for_each_tile_pair(topk_ids, P, expert_map, num_global, num_experts,
                     [&](int64_t, int e) { atomicAdd(&count[e], 1); });
  __syncthreads();
  int32_t* mine = scratch + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += kThreads) mine[e] = count[e];
}

// Multi-CTA, step 2 (one CTA per tile): every CTA sums the counts of all tiles
// (totals per expert) and of the tiles before its own (its offset inside each
// run), scans the runs like the one-CTA kernel, then scatters its tile's pairs
// from cursors run start + offset. CTA 0 writes block_expert and num_blocks.
// Each expert's valid pairs fill the start of its run, as the layout requires.
__global__ void __launch_bounds__(kThreads)
    moe_align_scatter_kernel(const int32_t* __restrict__ topk_ids, int64_t num_tokens, int top_k,
                             const int32_t* __restrict__ expert_map, int64_t num_global,
                             const int32_t* __restrict__ num_valid, int num_experts, int block_m,
                             int32_t* __restrict__ sorted_pairs,
                             int32_t* __restrict__ block_expert, int64_t max_blocks,
                             int32_t* __restrict__ num_blocks,
                             const int32_t* __restrict__ scratch,
                             int32_t* __restrict__ pair_slot) {
  extern __shared__ int smem[];
  int* count = smem;                  // [E] totals, then the run starts
  int* before = smem + num_experts;   // [E] pairs of e in earlier tiles; later blk_end
  const int tiles = gridDim.x, me = blockIdx.x;
  pdl_wait();  // the count kernel's scratch
  pdl_launch_dependents();
  for (int e = threadIdx.x; e < num_experts; e += kThreads) {
    int total = 0, prior = 0;
#pragma unroll 8
    for (int t = 0; t < tiles; ++t) {
      const int c = scratch[static_cast<int64_t>(t) * num_experts + e];
      total += c;
      prior += t < me ? c : 0;
    }
    count[e] = total;
    before[e] = prior;
  }
  __syncthreads();
  // scan_runs overwrites blk_end (= before): keep each thread's offsets first
  // (thread tid owns experts tid, tid + kThreads, ... in the scatter below).
  constexpr int kMaxOwned = static_cast<int>(kMoeAlignMaxExperts / kThreads);
  int offset[kMaxOwned];
#pragma unroll
  for (int i = 0; i < kMaxOwned; ++i) {
    const int e = threadIdx.x + i * kThreads;
    offset[i] = e < num_experts ? before[e] : 0;
  }
  __syncthreads();
  const int total_blocks = scan_runs(count, before, num_experts, block_m);
  if (me == 0) {
    write_block_experts(before, num_experts, total_blocks, block_expert, max_blocks, num_blocks);
  }
#pragma unroll
  for (int i = 0; i < kMaxOwned; ++i) {
    const int e = threadIdx.x + i * kThreads;
    if (e < num_experts) count[e] += offset[i];  // this tile's cursor
  }
  __syncthreads();
  const int64_t P = read_num_valid(num_valid, num_tokens) * top_k;
  for_each_tile_pair(topk_ids, P, expert_map, num_global, num_experts, [&](int64_t p, int e) {
    place(sorted_pairs, pair_slot, atomicAdd(&count[e], 1), p);
  });
}

}  // namespace

// Beside the dynamic shared memory: scan_padded_runs' warp sums.
template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  return allow_dynamic_smem(kernel, smem, sizeof(int) * (kThreads / 32));
}

cudaError_t launch_moe_align(const int32_t* topk_ids, int64_t num_tokens, int top_k,
                             const int32_t* expert_map, int64_t num_global,
                             const int32_t* num_valid, int num_experts, int block_m,
                             int32_t* sorted_pairs, int32_t* block_expert, int64_t max_blocks,
                             int32_t* num_blocks, int32_t* pair_slot, int32_t* scratch,
                             cudaStream_t stream, bool as_dependent) {
  if (num_experts <= 0) {
    // No local expert: nothing is valid. Keep the outputs' invariants anyway.
    if (max_blocks > 0) {
      cudaMemsetAsync(sorted_pairs, 0xff, sizeof(int32_t) * max_blocks * block_m, stream);
      cudaMemsetAsync(block_expert, 0xff, sizeof(int32_t) * max_blocks, stream);
    }
    if (pair_slot != nullptr && num_tokens * top_k > 0) {
      cudaMemsetAsync(pair_slot, 0xff, sizeof(int32_t) * num_tokens * top_k, stream);
    }
    return cudaMemsetAsync(num_blocks, 0, sizeof(int32_t), stream);
  }
  const size_t smem = sizeof(int) * 2 * static_cast<size_t>(num_experts);
  const int64_t tiles = moe_align_tiles(num_tokens * top_k);
  cudaError_t err;
  if (tiles <= 1) {
    if ((err = allow_smem(moe_align_kernel, smem)) != cudaSuccess) return err;
    return launch_maybe_pdl<moe_align_kernel>(as_dependent, dim3(1), dim3(kThreads), smem,
                                              stream, topk_ids, num_tokens, top_k, expert_map,
                                              num_global, num_valid, num_experts, block_m,
                                              sorted_pairs, block_expert, max_blocks,
                                              num_blocks, pair_slot);
  }
  if (scratch == nullptr) return cudaErrorInvalidValue;  // moe_align_scratch_ints > 0
  const unsigned grid = static_cast<unsigned>(tiles);
  if ((err = allow_smem(moe_align_count_kernel, smem / 2)) != cudaSuccess) return err;
  if ((err = allow_smem(moe_align_scatter_kernel, smem)) != cudaSuccess) return err;
  err = launch_maybe_pdl<moe_align_count_kernel>(
      as_dependent, dim3(grid), dim3(kThreads), smem / 2, stream, topk_ids, num_tokens, top_k,
      expert_map, num_global, num_valid, num_experts, sorted_pairs, max_blocks * block_m,
      pair_slot, scratch);
  if (err != cudaSuccess) return err;
  return launch_maybe_pdl<moe_align_scatter_kernel>(
      as_dependent, dim3(grid), dim3(kThreads), smem, stream, topk_ids, num_tokens, top_k,
      expert_map, num_global, num_valid, num_experts, block_m, sorted_pairs, block_expert,
      max_blocks, num_blocks, static_cast<const int32_t*>(scratch), pair_slot);
}

}  // namespace pcg::moe
