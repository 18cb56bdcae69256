// pcg::fused_moe's tensor-core GEMMs in bfloat16: one kernel per tile of
// fused_moe_tiles.h (a translation unit per dtype, so they build in parallel).
#include "moe/fused_moe_gemm.cuh"

namespace pcg::moe::detail {

cudaError_t launch_tc_gemm_bf16(int tile, GemmArgs a, int64_t max_blocks, cudaStream_t stream) {
  return launch_tc_tile<__nv_bfloat16>(tile, a, max_blocks, stream);
}

}  // namespace pcg::moe::detail
