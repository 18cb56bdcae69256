// pcg::fused_moe kernels: torch-free interface (raw pointers, plain types).
//
//   out[t] = sum_j topk_weights[t,j] * (w2[e] @ act(w13[e] @ x_t + b13[e]) + b2[e])
//   e = expert_map[topk_ids[t,j]] (identity without a map); invalid pairs and
//   rows t >= num_valid contribute nothing (rows >= num_valid are zeros).
//
// CUDA pipeline (all on one stream, no host synchronisation, fixed sizes):
//   1. moe_align (moe_align.h): pairs sorted by local expert, padded to block_m.
//   2. GEMM1 (grouped over blocks of block_m sorted slots): rows of hidden are
//      gathered while loading A; the gate and up tiles of w13[e] are computed
//      together; bias + activation in the epilogue; the intermediate
//      [slots, I] is written in the hidden dtype (rounded, like an unfused
//      implementation would).
//   3. GEMM2: intermediate @ w2[e]^T + b2, times the router weight, written in
//      fp32 to pair_out[pair, :] (the pair's original position t*k+j).
//   4. Reduce: out[t] = sum over the valid j of pair_out[t*k+j] in fixed j
//      order (deterministic, no atomics); rows >= num_valid are zeros and
//      dropped pairs are skipped (pair_out is never read for them).
// bf16/fp16 use tensor cores (mma.sync m16n8k16, fp32 accumulation, 4-stage
// cp.async pipeline; tiles per block_m in fused_moe_kernel.cu); fp32 uses a
// SIMT kernel. Any H and I are handled (16-byte loads when the row is
// a multiple of 8 elements and aligned, element loads otherwise).
#pragma once

#include <cstdint>

namespace pcg::moe {

enum class Activation : int { kSilu = 0, kGelu = 1, kSwigluOai = 2 };
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows per GEMM block (= moe_align's block_m) chosen from the average number
// of pairs per local expert; a pure function of the shapes, so a captured
// graph and its replays agree.
inline int choose_block_m(int64_t num_tokens, int64_t top_k, int64_t num_experts) {
  const int64_t pairs = num_tokens * top_k;
  const int64_t per_expert = num_experts > 0 ? pairs / num_experts : pairs;
  if (per_expert <= 16) return 16;
  if (per_expert <= 48) return 32;
  if (per_expert <= 256) return 64;
  return 128;
}

struct FusedMoeParams {
  DType dtype = DType::kBFloat16;
  // Inputs (contiguous).
  const void* hidden = nullptr;          // [T, H]
  const void* w13 = nullptr;             // [E, 2I, H]
  const void* w2 = nullptr;              // [E, H, I]
  const void* b13 = nullptr;             // [E, 2I] or null
  const void* b2 = nullptr;              // [E, H] or null
  const float* topk_weights = nullptr;   // [T, k]
  const int32_t* topk_ids = nullptr;     // [T, k]
  const int32_t* expert_map = nullptr;   // [num_global] or null
  int64_t num_global = 0;                // map size, or E without a map
  const int32_t* num_valid = nullptr;    // device scalar or null
  int64_t T = 0, H = 0, I = 0, E = 0, k = 0;
  Activation act = Activation::kSilu;
  float alpha = 1.702f, limit = 7.0f;
  // Workspaces (fixed worst-case sizes).
  int block_m = 64;
  int64_t max_blocks = 0;                // moe_align_max_blocks(T*k, E, block_m)
  int32_t* sorted_pairs = nullptr;       // [max_blocks * block_m]
  int32_t* block_expert = nullptr;       // [max_blocks]
  int32_t* num_blocks = nullptr;         // [1]
  void* inter = nullptr;                 // [max_blocks * block_m, I], dtype
  float* pair_out = nullptr;             // [T * k, H]
  // Output.
  void* out = nullptr;                   // [T, H], dtype
};

}  // namespace pcg::moe

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace pcg::moe {
// Runs the whole pipeline on `stream`; returns the first launch error.
cudaError_t launch_fused_moe(const FusedMoeParams& p, cudaStream_t stream);
}  // namespace pcg::moe
#endif
