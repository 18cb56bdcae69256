// Gated activation of fused_moe's CUTLASS path (interface: moe_permute.h):
// GEMM1 writes gate|up rows (dtype; columns in w13's row layout, w13_row);
// this kernel adds b13, applies the
// activation in fp32 (moe_activation.cuh, the mma.sync kernels' math) and
// writes the intermediate rows GEMM2 reads. 8 columns per thread step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/float_convert.cuh"
#include "moe/moe_activation.cuh"
#include "moe/moe_permute.h"

namespace pcg::moe {
namespace {

constexpr int kActWarps = 8;  // one warp per slot, 8 slots per CTA

__device__ __forceinline__ void load8(const void* p, float* f, bool bf16) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  if (bf16) {
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_float(v[i]);
  } else {
    const __half* v = reinterpret_cast<const __half*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_float(v[i]);
  }
}

// One warp per slot (padding slots exit at once): a CTA per slot kept too
// few bytes in flight per SM.
template <typename T>
__global__ void __launch_bounds__(kActWarps * 32)
    gated_act_kernel(const T* __restrict__ gate_up, const int32_t* __restrict__ sorted_pairs,
                     const int32_t* __restrict__ block_expert, int block_m, int64_t slots,
                     int64_t I, int w13_block, const T* __restrict__ b13, int act, float alpha,
                     float limit, T* __restrict__ inter) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kActWarps + (threadIdx.x >> 5);
  if (slot >= slots || sorted_pairs[slot] < 0) return;
  const T* g = gate_up + slot * 2 * I;
  const T* bias = b13 != nullptr ? b13 + static_cast<int64_t>(block_expert[slot / block_m]) * 2 * I
                                 : nullptr;
  T* dst = inter + slot * I;
#pragma unroll 2
  for (int64_t n = static_cast<int64_t>(threadIdx.x & 31) * 8; n < I; n += 32 * 8) {
    float gv[8], uv[8];
    // 8 columns stay in one block of w13_block (>= 8, a power of two) columns.
    load8(g + w13_row(n, I, w13_block, false), gv, kBf16);
    load8(g + w13_row(n, I, w13_block, true), uv, kBf16);
    if (bias != nullptr) {
      float bg[8], bu[8];
      load8(bias + n, bg, kBf16);
      load8(bias + I + n, bu, kBf16);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        gv[i] += bg[i];
        uv[i] += bu[i];
      }
    }
    uint4 res;
    T* r = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int i = 0; i < 8; ++i) r[i] = from_float<T>(gated_act(gv[i], uv[i], act, alpha, limit));
    *reinterpret_cast<uint4*>(dst + n) = res;
  }
}

template <typename T>
cudaError_t act_typed(const void* gate_up, const int32_t* sorted_pairs,
                      const int32_t* block_expert, int block_m, int64_t slots, int64_t I,
                      int w13_block, const void* b13, Activation act, float alpha, float limit,
                      void* inter, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((slots + kActWarps - 1) / kActWarps);
  gated_act_kernel<T><<<grid, kActWarps * 32, 0, stream>>>(
      static_cast<const T*>(gate_up), sorted_pairs, block_expert, block_m, slots, I, w13_block,
      static_cast<const T*>(b13), static_cast<int>(act), alpha, limit, static_cast<T*>(inter));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_moe_gated_act(DType dtype, const void* gate_up, const int32_t* sorted_pairs,
                                 const int32_t* block_expert, int block_m, int64_t slots,
                                 int64_t I, int w13_block, const void* b13, Activation act,
                                 float alpha, float limit, void* inter, cudaStream_t stream) {
  if (I % 8 != 0 || !is_valid_w13_block(w13_block, I)) return cudaErrorInvalidValue;
  if (slots <= 0 || I <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return act_typed<__nv_bfloat16>(gate_up, sorted_pairs, block_expert, block_m, slots, I,
                                      w13_block, b13, act, alpha, limit, inter, stream);
    case DType::kFloat16:
      return act_typed<__half>(gate_up, sorted_pairs, block_expert, block_m, slots, I, w13_block,
                               b13, act, alpha, limit, inter, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pcg::moe
