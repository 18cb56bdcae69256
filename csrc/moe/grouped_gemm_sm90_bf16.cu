// bf16 instantiation of the sm_90a grouped GEMM (grouped_gemm_sm90.cuh); one
// translation unit per dtype so the two build in parallel.
#include "moe/grouped_gemm_sm90.cuh"

PCG_DEFINE_GROUPED_GEMM_SM90(bf16, cutlass::bfloat16_t)
