// Data-movement and elementwise kernels of fused_moe's CUTLASS path (pipeline:
// moe_cutlass.h). Torch-free. Rows are "slots" of moe_align's output
// (sorted_pairs[slot] = pair t*k+j, or -1 for padding; pair_slot[pair] = slot,
// or -1 for pairs without one); all kernels take fixed sizes (max slots, T)
// and read the routing on the device: capturable.
// Row lengths (H, I) must be multiples of 8 and bases 16-byte aligned.
// The permute and the reduce are launched as PDL dependents of the stream's
// previous kernel (they wait for it before touching memory; moe_cutlass.h).
#pragma once

#include <cstdint>

#include "moe/fused_moe.h"

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace pcg::moe {

// a_sorted[pair_slot[t*k + j]] = hidden[t] for every t < T and every j with
// pair_slot[t*k + j] >= 0 (moe_align's inverse map: -1 for pairs without a
// slot). Token-major: each row is read once and written to its slots; padding
// rows are left untouched.
cudaError_t launch_moe_permute(DType dtype, const void* hidden, int64_t H, int top_k,
                               const int32_t* pair_slot, int64_t T, void* a_sorted,
                               cudaStream_t stream);

// inter[slot, n] = act(gate_up[slot, g(n)] + b13[e, n], gate_up[slot, u(n)] + b13[e, I + n])
// for every valid slot (e = block_expert[slot / block_m]; b13 may be null;
// g(n) / u(n) = w13_row(n, I, w13_block, false / true)), in fp32, rounded to
// dtype (as the mma.sync kernels' GEMM1 epilogue). I % 8 == 0.
cudaError_t launch_moe_gated_act(DType dtype, const void* gate_up, const int32_t* sorted_pairs,
                                 const int32_t* block_expert, int block_m, int64_t slots,
                                 int64_t I, int w13_block, const void* b13, Activation act,
                                 float alpha, float limit, void* inter, cudaStream_t stream);

// out[t] = sum over the valid j (fixed order) of w[t,j] * (d2[pair_slot[t*k+j]] + b2[e]),
// fp32 accumulation, rounded to dtype; rows t >= num_valid are zeros. Same
// contract as fused_moe's reduce of the weighted pair rows (fused_moe.h).
cudaError_t launch_moe_unpermute_reduce(DType dtype, const void* d2, const int32_t* pair_slot,
                                        const float* topk_weights, const int32_t* topk_ids,
                                        const int32_t* expert_map, int64_t num_global,
                                        int64_t E, const int32_t* num_valid, int64_t T, int top_k,
                                        int64_t H, const void* b2, void* out,
                                        cudaStream_t stream);

}  // namespace pcg::moe
#endif
