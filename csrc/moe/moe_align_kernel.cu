// CUDA kernel of pcg::moe_align (layout: moe_align.h). One CTA of 1024
// threads: counts in shared memory, a block-wide scan of the padded counts,
// then a scatter with shared-memory cursors. Loops cover any number of pairs
// (vector loads of the ids: the single CTA is latency-bound at large T).
// Everything (including num_valid) is read on the device: capturable.
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/moe_align.h"

namespace pcg::moe {
namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ int64_t read_num_valid(const int32_t* num_valid, int64_t T) {
  if (num_valid == nullptr) return T;
  int64_t nv = *num_valid;
  return nv < 0 ? 0 : (nv > T ? T : nv);
}

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

__global__ void __launch_bounds__(kThreads)
    moe_align_kernel(const int32_t* __restrict__ topk_ids, int64_t num_tokens, int top_k,
                     const int32_t* __restrict__ expert_map, int64_t num_global,
                     const int32_t* __restrict__ num_valid, int num_experts, int block_m,
                     int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ block_expert,
                     int64_t max_blocks, int32_t* __restrict__ num_blocks) {
  extern __shared__ int smem[];
  int* count = smem;                  // [E], later the scatter cursor
  int* blk_end = smem + num_experts;  // [E] inclusive prefix of blocks per expert
  __shared__ int warp_sums[kThreads / 32];

  const int tid = threadIdx.x;
  const int64_t nv = read_num_valid(num_valid, num_tokens);
  const int64_t P = nv * top_k;
  const int64_t slots = max_blocks * block_m;

  for (int e = tid; e < num_experts; e += kThreads) count[e] = 0;
  if ((reinterpret_cast<uintptr_t>(sorted_pairs) & 15u) == 0) {
    int4* v = reinterpret_cast<int4*>(sorted_pairs);
    for (int64_t q = tid; q < slots / 4; q += kThreads) v[q] = make_int4(-1, -1, -1, -1);
    for (int64_t s = slots / 4 * 4 + tid; s < slots; s += kThreads) sorted_pairs[s] = -1;
  } else {
    for (int64_t s = tid; s < slots; s += kThreads) sorted_pairs[s] = -1;
  }
  __syncthreads();

  for_each_pair(topk_ids, P, expert_map, num_global, num_experts,
                [&](int64_t, int e) { atomicAdd(&count[e], 1); });
  __syncthreads();

  // Scan of blocks per expert: thread tid owns experts [lo, hi).
  const int per = (num_experts + kThreads - 1) / kThreads;
  const int lo = min(tid * per, num_experts), hi = min(lo + per, num_experts);
  int local = 0;
  for (int e = lo; e < hi; ++e) local += (count[e] + block_m - 1) / block_m;
  const int lane = tid & 31, warp = tid >> 5;
  int incl = local;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = warp_sums[lane];
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += v;
    }
    warp_sums[lane] = w;  // inclusive
  }
  __syncthreads();
  int run = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - local;  // exclusive, in blocks
  for (int e = lo; e < hi; ++e) {
    const int nb = (count[e] + block_m - 1) / block_m;
    count[e] = run * block_m;  // becomes the scatter cursor (slot)
    run += nb;
    blk_end[e] = run;
  }
  const int total_blocks = warp_sums[31];
  __syncthreads();

  if (tid == 0) *num_blocks = total_blocks;
  // block_expert: binary search of the expert whose block range holds b.
  for (int64_t b = tid; b < max_blocks; b += kThreads) {
    int out = -1;
    if (b < total_blocks) {
      int l = 0, r = num_experts - 1;  // first e with blk_end[e] > b
      while (l < r) {
        const int m = (l + r) >> 1;
        if (blk_end[m] > b) r = m; else l = m + 1;
      }
      out = l;
    }
    block_expert[b] = out;
  }

  // Scatter (sorted_pairs' -1 fill above is ordered before by the barriers).
  for_each_pair(topk_ids, P, expert_map, num_global, num_experts, [&](int64_t p, int e) {
    sorted_pairs[atomicAdd(&count[e], 1)] = static_cast<int32_t>(p);
  });
}

}  // namespace

cudaError_t launch_moe_align(const int32_t* topk_ids, int64_t num_tokens, int top_k,
                             const int32_t* expert_map, int64_t num_global,
                             const int32_t* num_valid, int num_experts, int block_m,
                             int32_t* sorted_pairs, int32_t* block_expert, int64_t max_blocks,
                             int32_t* num_blocks, cudaStream_t stream) {
  if (num_experts <= 0) {
    // No local expert: nothing is valid. Keep the outputs' invariants anyway.
    if (max_blocks > 0) {
      cudaMemsetAsync(sorted_pairs, 0xff, sizeof(int32_t) * max_blocks * block_m, stream);
      cudaMemsetAsync(block_expert, 0xff, sizeof(int32_t) * max_blocks, stream);
    }
    return cudaMemsetAsync(num_blocks, 0, sizeof(int32_t), stream);
  }
  const size_t smem = sizeof(int) * 2 * static_cast<size_t>(num_experts);
  if (smem + sizeof(int) * (kThreads / 32) > 48 * 1024) {  // dynamic + static > default
    cudaError_t err = cudaFuncSetAttribute(moe_align_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  moe_align_kernel<<<1, kThreads, smem, stream>>>(topk_ids, num_tokens, top_k, expert_map,
                                                  num_global, num_valid, num_experts, block_m,
                                                  sorted_pairs, block_expert, max_blocks,
                                                  num_blocks);
  return cudaGetLastError();
}

}  // namespace pcg::moe
