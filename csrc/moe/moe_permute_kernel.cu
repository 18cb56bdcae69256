// Permute (hidden rows -> expert-sorted rows) and unpermute-reduce (sorted
// GEMM2 rows -> per-token weighted sums) of fused_moe's CUTLASS path
// (interface: moe_permute.h). 16-byte vector copies: rows are multiples of 8.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/float_convert.cuh"
#include "moe/moe_align.h"
#include "moe/moe_permute.h"

namespace pcg::moe {
namespace {

constexpr int kThreads = 128;
constexpr int kPermuteWarps = 8;  // one warp per slot, 8 slots per CTA
constexpr int kPermuteUnroll = 4;  // 16-byte loads in flight per lane

// One warp per slot: copy the token's row (uint4 = 8 elements of 2 bytes),
// kPermuteUnroll loads in flight per lane (a row per CTA left most of each
// SM's bandwidth idle: 258 us for 1 GiB of copies at 131072 slots).
__global__ void __launch_bounds__(kPermuteWarps * 32)
    permute_kernel(const uint4* __restrict__ hidden, int64_t row_vecs, int top_k,
                   const int32_t* __restrict__ sorted_pairs, int64_t slots,
                   uint4* __restrict__ a_sorted, int32_t* __restrict__ pair_slot) {
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kPermuteWarps + (threadIdx.x >> 5);
  if (slot >= slots) return;
  const int pair = sorted_pairs[slot];
  if (pair < 0) return;
  if (lane == 0) pair_slot[pair] = static_cast<int32_t>(slot);
  const uint4* src = hidden + static_cast<int64_t>(pair / top_k) * row_vecs;
  uint4* dst = a_sorted + slot * row_vecs;
  int64_t v = lane;
  for (; v + 32 * (kPermuteUnroll - 1) < row_vecs; v += 32 * kPermuteUnroll) {
    uint4 r[kPermuteUnroll];
#pragma unroll
    for (int u = 0; u < kPermuteUnroll; ++u) r[u] = src[v + 32 * u];
#pragma unroll
    for (int u = 0; u < kPermuteUnroll; ++u) dst[v + 32 * u] = r[u];
  }
  for (; v < row_vecs; v += 32) dst[v] = src[v];
}

__device__ __forceinline__ int64_t clamp_valid(const int32_t* num_valid, int64_t T) {
  if (num_valid == nullptr) return T;
  const int64_t nv = *num_valid;
  return nv < 0 ? 0 : (nv > T ? T : nv);
}

// One CTA per token; 8 columns per thread step, fp32 sums in j order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    unpermute_reduce_kernel(const T* __restrict__ d2, const int32_t* __restrict__ pair_slot,
                            const float* __restrict__ topk_weights,
                            const int32_t* __restrict__ topk_ids,
                            const int32_t* __restrict__ expert_map, int64_t num_global, int64_t E,
                            const int32_t* __restrict__ num_valid, int64_t num_tokens, int top_k,
                            int64_t H, const T* __restrict__ b2, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  T* o = out + t * H;
  const bool live = t < clamp_valid(num_valid, num_tokens);
  for (int64_t n = static_cast<int64_t>(threadIdx.x) * 8; n < H; n += kThreads * 8) {
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; live && j < top_k; ++j) {
      const int64_t p = t * top_k + j;
      const int e = local_expert(topk_ids[p], expert_map, num_global, E);
      if (e < 0) continue;
      const float w = topk_weights[p];
      const uint4 raw = *reinterpret_cast<const uint4*>(d2 + pair_slot[p] * H + n);
      const T* v = reinterpret_cast<const T*>(&raw);
      uint4 braw = make_uint4(0, 0, 0, 0);
      if (b2 != nullptr) braw = *reinterpret_cast<const uint4*>(b2 + e * H + n);
      const T* b = reinterpret_cast<const T*>(&braw);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float bias = b2 != nullptr ? to_float(b[i]) : 0.f;
        s[i] += w * (to_float(v[i]) + bias);
      }
    }
    uint4 res;
    T* r = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int i = 0; i < 8; ++i) r[i] = from_float<T>(s[i]);
    *reinterpret_cast<uint4*>(o + n) = res;
  }
}

template <typename T>
cudaError_t reduce_typed(const void* d2, const int32_t* pair_slot, const float* topk_weights,
                         const int32_t* topk_ids, const int32_t* expert_map, int64_t num_global,
                         int64_t E, const int32_t* num_valid, int64_t T_, int top_k, int64_t H,
                         const void* b2, void* out, cudaStream_t stream) {
  unpermute_reduce_kernel<T><<<static_cast<unsigned>(T_), kThreads, 0, stream>>>(
      static_cast<const T*>(d2), pair_slot, topk_weights, topk_ids, expert_map, num_global, E,
      num_valid, T_, top_k, H, static_cast<const T*>(b2), static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_moe_permute(DType dtype, const void* hidden, int64_t H, int top_k,
                               const int32_t* sorted_pairs, int64_t slots, void* a_sorted,
                               int32_t* pair_slot, cudaStream_t stream) {
  if (dtype == DType::kFloat32 || H % 8 != 0) return cudaErrorInvalidValue;
  if (slots <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((slots + kPermuteWarps - 1) / kPermuteWarps);
  permute_kernel<<<grid, kPermuteWarps * 32, 0, stream>>>(
      static_cast<const uint4*>(hidden), H / 8, top_k, sorted_pairs, slots,
      static_cast<uint4*>(a_sorted), pair_slot);
  return cudaGetLastError();
}

cudaError_t launch_moe_unpermute_reduce(DType dtype, const void* d2, const int32_t* pair_slot,
                                        const float* topk_weights, const int32_t* topk_ids,
                                        const int32_t* expert_map, int64_t num_global,
                                        int64_t E, const int32_t* num_valid, int64_t T, int top_k,
                                        int64_t H, const void* b2, void* out,
                                        cudaStream_t stream) {
  if (H % 8 != 0) return cudaErrorInvalidValue;
  if (T <= 0 || H <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return reduce_typed<__nv_bfloat16>(d2, pair_slot, topk_weights, topk_ids, expert_map,
                                         num_global, E, num_valid, T, top_k, H, b2, out, stream);
    case DType::kFloat16:
      return reduce_typed<__half>(d2, pair_slot, topk_weights, topk_ids, expert_map, num_global,
                                  E, num_valid, T, top_k, H, b2, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pcg::moe
