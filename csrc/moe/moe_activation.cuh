// The gated activations of fused_moe (act(gate, up) in fp32), shared by the
// mma.sync kernels' epilogue (fused_moe_gemm.cuh), the stream kernels and the
// CUTLASS path's activation kernel (moe_act_kernel.cu) and GEMM1 epilogue
// (gated_act_epilogue.cuh), so all compute the
// same math. The sigmoid comes from the approximate ex2 / rcp units (relative
// error ~1e-7, far below the bf16 / fp16 rounding of the result): expf and an
// IEEE division made the activation kernel compute-bound (84 -> 74.5 us on
// Qwen3-30B-A3B at 8192 tokens, now at DRAM bandwidth).
#pragma once

#include "moe/fused_moe.h"

namespace pcg::moe {

__device__ __forceinline__ float fast_sigmoid(float x) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * -1.4426950408889634f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));  // e = inf -> 0
  return r;
}

struct ActSilu {
  static __device__ __forceinline__ float apply(float g, float u, float, float) {
    return g * fast_sigmoid(g) * u;
  }
};
struct ActGelu {
  static __device__ __forceinline__ float apply(float g, float u, float, float) {
    return 0.5f * g * (1.f + erff(g * 0.70710678118654752440f)) * u;
  }
};
struct ActGeluTanh {  // Gemma's gelu_pytorch_tanh
  static __device__ __forceinline__ float apply(float g, float u, float, float) {
    return 0.5f * g * (1.f + tanhf(0.79788456080286535588f * (g + 0.044715f * g * g * g))) * u;
  }
};
struct ActSwigluOai {  // gpt-oss: clamped, (up + 1) * gate * sigmoid(alpha * gate)
  static __device__ __forceinline__ float apply(float g, float u, float alpha, float limit) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return (u + 1.f) * g * fast_sigmoid(alpha * g);
  }
};

// f(ActX{}) for the functor of `act` (swigluoai for any other value): a
// caller with many elements switches once, outside its loop.
template <typename F>
__device__ __forceinline__ void with_activation(int act, F&& f) {
  if (act == static_cast<int>(Activation::kSilu)) f(ActSilu{});
  else if (act == static_cast<int>(Activation::kGelu)) f(ActGelu{});
  else if (act == static_cast<int>(Activation::kGeluTanh)) f(ActGeluTanh{});
  else f(ActSwigluOai{});
}

// One element: act(g, u) for a runtime `act`.
__device__ __forceinline__ float gated_act(float g, float u, int act, float alpha, float limit) {
  float r = 0.f;
  with_activation(act, [&](auto a) { r = decltype(a)::apply(g, u, alpha, limit); });
  return r;
}

}  // namespace pcg::moe
