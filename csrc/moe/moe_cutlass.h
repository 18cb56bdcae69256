// fused_moe's CUTLASS sm_90a path (selected by the tuning table or forced with
// config = [-1, g1, g2], g1 / g2 the GEMM1 / GEMM2 kernel variants of
// grouped_gemm_variants.h, -1 the default; see docs/fused_moe_paths.md).
// Torch-free. Pipeline on one stream, fixed sizes, no host synchronisation
// (capturable):
//   1. moe_align with block_m = kCutlassBlockM (small padding per expert),
//      and its inverse map pair_slot[pair] (-1 for pairs without a slot)
//   2. permute: each hidden row read once, stored to its expert-sorted slots
//      (skipped when g1 gathers A: GEMM1 reads the hidden rows by token)
//   3. setup: per-expert problem shapes / pointers / strides on the device
//   4. GEMM1 (CUTLASS grouped, variant g1): gate_up = a_sorted . w13[e]^T  (dtype)
//   5. activation: inter = act(gate + b13, up + b13)                 (dtype)
//   (4 + 5 in one kernel when w13_block == kFusedW13Block: the activation in
//   GEMM1's epilogue, gated_act_epilogue.cuh; same rounding, bitwise equal)
//   6. GEMM2 (CUTLASS grouped, variant g2): d2 = inter . w2[e]^T  (dtype, into a_sorted)
//   7. unpermute-reduce: out[t] = sum_j w[t,j] * (d2[slot(t,j)] + b2[e])
// Up to kPrepareMaxPairs pairs (moe_prepare_fits), 1-3 are one kernel (moe_prepare.cuh; the environment's
// PCG_MOE_PROLOGUE_MAX_PAIRS overrides the limit, 0 = always three kernels).
// Kernel boundaries: 1, 2, 3 (or the one kernel) and 7 are PDL dependents
// (common/pdl.cuh) of the kernel before them, so their launches overlap its
// tail; the setup (3) runs beside the permute (2), which triggers only after it
// has waited for the align. The CUTLASS GEMMs are plain launches (its ptr-array
// kernels have no PDL wait).
// Rounding differs from the mma.sync path in two places: gate/up are rounded
// to dtype before the activation, and d2 before the weighted sum.
// Requirements (checked by the launcher): bf16/fp16, H % 8 == 0, I % 8 == 0,
// 16-byte aligned tensors, an sm_90 device, a build with PCG_WITH_CUTLASS_SM90.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moe/fused_moe.h"
#include "moe/moe_align.h"

namespace pcg::moe {

// moe_align's block for this path: each expert's run pads to 16 rows; the
// GEMMs' per-expert M excludes the padding (it only spaces the runs).
constexpr int kCutlassBlockM = 16;
inline int64_t cutlass_moe_max_blocks(int64_t T, int64_t k, int64_t E) {
  return moe_align_max_blocks(T * k, E, kCutlassBlockM);
}

// Workspaces beyond FusedMoeParams' (whose sorted_pairs / block_expert /
// num_blocks / inter are sized with kCutlassBlockM; pair_out is unused).
struct CutlassMoeBuffers {
  void* a_sorted = nullptr;        // [slots, H] dtype; GEMM2 writes d2 here too
  void* gate_up = nullptr;         // [slots, 2I] dtype; null when GEMM1 fuses the activation
  int32_t* pair_slot = nullptr;    // [T * k], written by moe_align
  void* gemm_args = nullptr;       // grouped_gemm_sm90_args_bytes(E)
  void* gemm_workspace = nullptr;  // cutlass_moe_gemm_workspace_bytes(...)
  int device = 0;
  int sm_count = 0;
};

}  // namespace pcg::moe

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace pcg::moe {

// Whether this build has the sm_90a kernels.
bool cutlass_moe_built();
// CUTLASS's workspace for E groups (0 when not built).
size_t cutlass_moe_gemm_workspace_bytes(DType dtype, int64_t E, int sm_count);
// Runs the pipeline above; p.config must be {kCutlassBlockM, g1, g2} with listed
// variant ids (no -1) and p.max_blocks = cutlass_moe_max_blocks(T, k, E).
// cudaErrorNotSupported when not built.
cudaError_t launch_fused_moe_cutlass(const FusedMoeParams& p, const CutlassMoeBuffers& b,
                                     cudaStream_t stream);

}  // namespace pcg::moe
#endif
