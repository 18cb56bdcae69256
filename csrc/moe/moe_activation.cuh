// The gated activations of fused_moe (act(gate, up) in fp32), shared by the
// mma.sync kernels' epilogue (fused_moe_gemm.cuh) and the CUTLASS path's
// activation kernel (moe_act_kernel.cu), so both compute the same math.
#pragma once

#include "moe/fused_moe.h"

namespace pcg::moe {

__device__ __forceinline__ float gated_act(float g, float u, int act, float alpha, float limit) {
  if (act == static_cast<int>(Activation::kSilu)) {
    return g / (1.f + expf(-g)) * u;
  } else if (act == static_cast<int>(Activation::kGelu)) {
    return 0.5f * g * (1.f + erff(g * 0.70710678118654752440f)) * u;
  } else if (act == static_cast<int>(Activation::kGeluTanh)) {  // Gemma's gelu_pytorch_tanh
    return 0.5f * g * (1.f + tanhf(0.79788456080286535588f * (g + 0.044715f * g * g * g))) * u;
  } else {  // swigluoai (gpt-oss)
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return (u + 1.f) * g / (1.f + expf(-alpha * g));
  }
}

}  // namespace pcg::moe
