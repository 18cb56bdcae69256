// Grouped GEMMs of fused_moe's CUTLASS path (CUTLASS 3.x, sm_90a: wgmma + TMA,
// ptr-array grouped kernel): one group per local expert e,
//   D_e[M_e, N] = A_e[M_e, K] . B_e[N, K]^T   (bf16/fp16 in, fp32 accumulate,
//                                              D in the input dtype)
//   GEMM1: A = sorted hidden rows, B = w13[e], N = 2I, K = H -> gate_up, or
//          with a.fused_act (w13 in the block layout, B = kFusedW13Block) the
//          gated-activation epilogue (gated_act_epilogue.cuh) -> inter [M_e, I]
//   GEMM2: A = inter,              B = w2[e],  N = H,  K = I -> d2
// Each GEMM runs one of the kernel variants of grouped_gemm_variants.h.
// A_e / D_e start at expert e's first sorted slot (moe_align with block_m,
// runs padded to block_m); M_e is e's number of valid pairs (moe_align puts
// them first in the run), so padding slots are neither read nor written.
// Problem shapes, pointers and strides are written on the device
// (grouped_gemm_sm90_setup from moe_align's outputs, or the one-kernel
// prologue grouped_gemm_sm90_prepare): no host sync, capturable.
// Torch-free. Needs H % 8 == 0, I % 8 == 0 and 16-byte aligned bases (TMA).
#pragma once

#include <cstddef>
#include <cstdint>

#include "moe/fused_moe.h"

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace pcg::moe {

// Bytes of the device argument arrays of both GEMMs for E groups (per GEMM:
// shapes, pointers, strides and the swap-AB kernels' transposed shapes and D
// strides; arrays of at most 32 bytes per group, 256-byte aligned).
constexpr size_t kGroupedArgSlotBytes = 32;
constexpr int kGroupedArgArraysPerGemm = 9;
inline size_t grouped_gemm_sm90_args_bytes(int64_t E) {
  const size_t per_array = (static_cast<size_t>(E) * kGroupedArgSlotBytes + 255) / 256 * 256;
  return 2 * kGroupedArgArraysPerGemm * per_array;
}

struct MoeGroupedGemmArgs {
  DType dtype = DType::kBFloat16;  // bf16 or fp16
  int64_t E = 0, H = 0, I = 0;
  int block_m = 16;
  // Rows of the sorted buffers a1, d1, a2 and d2 (moe_align's max_blocks *
  // block_m): what the resident kernels' whole-A descriptors span.
  int64_t slots = 0;
  // moe_align outputs (device).
  const int32_t* sorted_pairs = nullptr;  // [max_blocks * block_m]
  const int32_t* block_expert = nullptr;  // [max_blocks]
  const int32_t* num_blocks = nullptr;    // [1]
  // Operands (device, dtype, row-major, K contiguous).
  const void* a1 = nullptr;   // [slots, H] hidden rows in sorted order (unwritten when gather_a)
  // GEMM1 with a gather variant reads hidden[sorted_pairs[slot] / topk]
  // instead of a1 (grouped_gemm_variants.h GATHER_A); no permute fills a1.
  const void* hidden = nullptr;  // [T, H]
  int topk = 0;
  bool gather_a = false;
  const void* w13 = nullptr;  // [E, 2I, H]
  void* d1 = nullptr;         // [slots, 2I] gate and up (unused when fused_act)
  void* a2 = nullptr;         // [slots, I] activation (GEMM1 writes it when fused_act)
  const void* w2 = nullptr;   // [E, H, I]
  void* d2 = nullptr;         // [slots, H]
  // GEMM1 with the activation in its epilogue: w13 rows in the block layout
  // with B = kFusedW13Block (fused_moe.h); b13 [E, 2I] (plain layout) or null.
  bool fused_act = false;
  const void* b13 = nullptr;
  Activation act = Activation::kSilu;
  float alpha = 0.f, limit = 0.f;
  // Workspaces (device): grouped_gemm_sm90_args_bytes(E) and
  // grouped_gemm_sm90_workspace_bytes(dtype, E, sm_count).
  void* args = nullptr;
  void* workspace = nullptr;
  int device = 0;
  int sm_count = 0;
};

// The routing and hidden rows the one-kernel prologue reads, and the
// moe_align outputs it writes (moe_align.h's layout, block_m = a.block_m).
struct MoePrepareInputs {
  const int32_t* topk_ids = nullptr;  // [T, k]
  int64_t T = 0;
  int k = 0;
  const int32_t* expert_map = nullptr;
  int64_t num_global = 0;
  const int32_t* num_valid = nullptr;
  const void* hidden = nullptr;  // [T, H] dtype
  int32_t* sorted_pairs = nullptr;
  int32_t* block_expert = nullptr;
  int64_t max_blocks = 0;
  int32_t* num_blocks = nullptr;
  int32_t* pair_slot = nullptr;  // [T * k]
};

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)

// True when this build holds the sm_90a CUTLASS kernels (PCG_WITH_CUTLASS_SM90).
bool grouped_gemm_sm90_built();

// CUTLASS workspace bytes: the largest of every kernel variant's, for either
// GEMM (the two GEMMs share it and run one after the other).
size_t grouped_gemm_sm90_workspace_bytes(DType dtype, int64_t E, int sm_count);

// Writes both GEMMs' problem shapes, pointers and strides into a.args (read by
// every variant). Launched as a PDL dependent of the stream's previous kernel
// without waiting for it until its end: that kernel must be one that lets its
// dependents launch only after moe_align's outputs are complete (the
// permute; moe_cutlass.h), or one that does not trigger at all.
cudaError_t grouped_gemm_sm90_setup(const MoeGroupedGemmArgs& a, cudaStream_t stream);

// moe_align (with pair_slot), the permute into a.a1 and the setup in one
// kernel (moe_prepare.cuh), for moe_prepare_fits(T * k, E): a PDL dependent of
// the stream's previous kernel; the GEMMs (plain launches) follow.
cudaError_t grouped_gemm_sm90_prepare(const MoeGroupedGemmArgs& a, const MoePrepareInputs& in,
                                      cudaStream_t stream);

// Runs GEMM `which` (1 or 2; GEMM1 fused with the activation when
// a.fused_act) from the arrays the setup wrote, with kernel
// `variant` (an id of grouped_gemm_variants.h; cudaErrorInvalidValue otherwise).
cudaError_t grouped_gemm_sm90_run(const MoeGroupedGemmArgs& a, int which, int variant,
                                  cudaStream_t stream);

#endif

}  // namespace pcg::moe
