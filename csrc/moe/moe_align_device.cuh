// Device pieces of moe_align's layout (moe_align.h) shared by its kernels,
// the CUTLASS path's permute / reduce and its one-kernel prologue
// (moe_prepare.cuh). Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pcg::moe {

// Rows t < this are valid: *num_valid clamped to [0, T]; null means T.
__device__ __forceinline__ int64_t read_num_valid(const int32_t* num_valid, int64_t T) {
  if (num_valid == nullptr) return T;
  const int64_t nv = *num_valid;
  return nv < 0 ? 0 : (nv > T ? T : nv);
}

// Block-wide (kThreads threads, all of them calling): from count[e] (pairs of
// expert e), start[e] = the first slot of e's run (runs padded to block_m, in
// expert order) and blk_end[e] = the inclusive prefix of blocks. start may be
// count (each thread reads its experts' counts before writing their starts).
// Returns the total number of blocks; ends with a barrier.
template <int kThreads>
__device__ int scan_padded_runs(const int* count, int* start, int* blk_end, int num_experts,
                                int block_m) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 32");
  constexpr int kWarps = kThreads / 32;
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Thread tid owns experts [lo, hi).
  const int per = (num_experts + kThreads - 1) / kThreads;
  const int lo = min(tid * per, num_experts), hi = min(lo + per, num_experts);
  int local = 0;
  for (int e = lo; e < hi; ++e) local += (count[e] + block_m - 1) / block_m;
  int incl = local;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += v;
    }
    if (lane < kWarps) warp_sums[lane] = w;  // inclusive
  }
  __syncthreads();
  int run = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - local;  // exclusive, in blocks
  for (int e = lo; e < hi; ++e) {
    const int nb = (count[e] + block_m - 1) / block_m;
    start[e] = run * block_m;
    run += nb;
    blk_end[e] = run;
  }
  const int total_blocks = warp_sums[kWarps - 1];
  __syncthreads();
  return total_blocks;
}

// The expert whose run holds block b: the first e with blk_end[e] > b
// (b < the total number of blocks).
__device__ __forceinline__ int expert_of_block(const int* blk_end, int num_experts, int64_t b) {
  int l = 0, r = num_experts - 1;
  while (l < r) {
    const int m = (l + r) >> 1;
    if (blk_end[m] > b) r = m; else l = m + 1;
  }
  return l;
}

// Raises kernel's dynamic shared memory limit when its dynamic plus static
// shared memory exceed the default 48 KiB.
template <typename K>
cudaError_t allow_dynamic_smem(K kernel, size_t dynamic_bytes, size_t static_bytes) {
  if (dynamic_bytes + static_bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(dynamic_bytes));
}

}  // namespace pcg::moe
