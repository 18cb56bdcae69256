// pcg::fused_moe's tensor-core GEMMs in float16: one kernel per tile of
// fused_moe_tiles.h (a translation unit per dtype, so they build in parallel).
#include "moe/fused_moe_gemm.cuh"

namespace pcg::moe::detail {

cudaError_t launch_tc_gemm_f16(int tile, GemmArgs a, int64_t max_blocks, cudaStream_t stream) {
  return launch_tc_tile<__half>(tile, a, max_blocks, stream);
}

}  // namespace pcg::moe::detail
