// fused_moe's CUTLASS path: the pipeline of moe_cutlass.h and the dtype
// dispatch of the grouped GEMM (grouped_gemm_sm90.h). Includes no CUTLASS
// header: the kernels live in grouped_gemm_sm90_{bf16,f16}.cu, which are
// built only with PCG_WITH_CUTLASS_SM90.
#include <cuda_runtime.h>

#include <cstdlib>

#include "moe/grouped_gemm_sm90.h"
#include "moe/moe_align.h"
#include "moe/moe_cutlass.h"
#include "moe/moe_permute.h"
#include "moe/moe_prepare.h"

namespace pcg::moe {

#if defined(PCG_WITH_CUTLASS_SM90)
namespace detail {
size_t grouped_workspace_bf16(int64_t E, int sm_count);
size_t grouped_workspace_f16(int64_t E, int sm_count);
cudaError_t grouped_setup_bf16(const MoeGroupedGemmArgs& a, cudaStream_t s);
cudaError_t grouped_setup_f16(const MoeGroupedGemmArgs& a, cudaStream_t s);
cudaError_t grouped_prepare_bf16(const MoeGroupedGemmArgs& a, const MoePrepareInputs& in,
                                 cudaStream_t s);
cudaError_t grouped_prepare_f16(const MoeGroupedGemmArgs& a, const MoePrepareInputs& in,
                                cudaStream_t s);
cudaError_t grouped_run_bf16(const MoeGroupedGemmArgs& a, int which, int variant,
                             cudaStream_t s);
cudaError_t grouped_run_f16(const MoeGroupedGemmArgs& a, int which, int variant, cudaStream_t s);
}  // namespace detail

bool grouped_gemm_sm90_built() { return true; }

size_t grouped_gemm_sm90_workspace_bytes(DType dtype, int64_t E, int sm_count) {
  if (dtype == DType::kBFloat16) return detail::grouped_workspace_bf16(E, sm_count);
  if (dtype == DType::kFloat16) return detail::grouped_workspace_f16(E, sm_count);
  return 0;
}

cudaError_t grouped_gemm_sm90_setup(const MoeGroupedGemmArgs& a, cudaStream_t stream) {
  if (a.dtype == DType::kBFloat16) return detail::grouped_setup_bf16(a, stream);
  if (a.dtype == DType::kFloat16) return detail::grouped_setup_f16(a, stream);
  return cudaErrorInvalidValue;
}

cudaError_t grouped_gemm_sm90_prepare(const MoeGroupedGemmArgs& a, const MoePrepareInputs& in,
                                      cudaStream_t stream) {
  if (a.dtype == DType::kBFloat16) return detail::grouped_prepare_bf16(a, in, stream);
  if (a.dtype == DType::kFloat16) return detail::grouped_prepare_f16(a, in, stream);
  return cudaErrorInvalidValue;
}

cudaError_t grouped_gemm_sm90_run(const MoeGroupedGemmArgs& a, int which, int variant,
                                  cudaStream_t stream) {
  if (a.dtype == DType::kBFloat16) return detail::grouped_run_bf16(a, which, variant, stream);
  if (a.dtype == DType::kFloat16) return detail::grouped_run_f16(a, which, variant, stream);
  return cudaErrorInvalidValue;
}
#else
bool grouped_gemm_sm90_built() { return false; }
size_t grouped_gemm_sm90_workspace_bytes(DType, int64_t, int) { return 0; }
cudaError_t grouped_gemm_sm90_setup(const MoeGroupedGemmArgs&, cudaStream_t) {
  return cudaErrorNotSupported;
}
cudaError_t grouped_gemm_sm90_prepare(const MoeGroupedGemmArgs&, const MoePrepareInputs&,
                                      cudaStream_t) {
  return cudaErrorNotSupported;
}
cudaError_t grouped_gemm_sm90_run(const MoeGroupedGemmArgs&, int, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
#endif

bool cutlass_moe_built() { return grouped_gemm_sm90_built(); }

size_t cutlass_moe_gemm_workspace_bytes(DType dtype, int64_t E, int sm_count) {
  return grouped_gemm_sm90_workspace_bytes(dtype, E, sm_count);
}

// Whether the prologue is the one kernel of moe_prepare.cuh (up to
// kPrepareMaxPairs pairs) or align + permute + setup. PCG_MOE_PROLOGUE_MAX_PAIRS
// overrides the limit (0: always the three kernels; for A/B runs and tests),
// read at each call so that a captured graph keeps the choice of its capture.
static bool use_prepare(int64_t pairs, int64_t E) {
  const char* v = std::getenv("PCG_MOE_PROLOGUE_MAX_PAIRS");
  if (v != nullptr && *v) {
    const long long lim = std::atoll(v);
    return pairs > 0 && pairs <= lim && E > 0 && E <= kPrepareMaxExperts;
  }
  return moe_prepare_fits(pairs, E);
}

cudaError_t launch_fused_moe_cutlass(const FusedMoeParams& p, const CutlassMoeBuffers& b,
                                     cudaStream_t stream) {
  if (!cutlass_moe_built()) return cudaErrorNotSupported;
  if (p.config.block_m != kCutlassBlockM || !find_gemm_variant(p.config.tile1) ||
      !find_gemm_variant(p.config.tile2) || gemm_variant_gathers_a(p.config.tile2)) {
    return cudaErrorInvalidValue;
  }
  const int k = static_cast<int>(p.k);
  if (p.max_blocks > 0) {
    const int64_t slots = p.max_blocks * kCutlassBlockM;
    MoeGroupedGemmArgs g;
    g.dtype = p.dtype;
    g.E = p.E;
    g.H = p.H;
    g.I = p.I;
    g.block_m = kCutlassBlockM;
    g.slots = slots;
    g.sorted_pairs = p.sorted_pairs;
    g.block_expert = p.block_expert;
    g.num_blocks = p.num_blocks;
    g.a1 = b.a_sorted;
    // A gather GEMM1 reads the hidden rows itself: no permute into a_sorted.
    g.gather_a = gemm_variant_gathers_a(p.config.tile1);
    g.hidden = p.hidden;
    g.topk = k;
    g.w13 = p.w13;
    // w13 in the block layout of the fused epilogue: GEMM1 writes inter
    // directly; otherwise gate_up, and an activation kernel follows.
    g.fused_act = p.w13_block == kFusedW13Block;
    if (!g.fused_act && b.gate_up == nullptr) return cudaErrorInvalidValue;
    g.d1 = b.gate_up;
    g.a2 = p.inter;
    g.b13 = p.b13;
    g.act = p.act;
    g.alpha = p.alpha;
    g.limit = p.limit;
    g.w2 = p.w2;
    g.d2 = b.a_sorted;  // a_sorted is dead after GEMM1
    g.args = b.gemm_args;
    g.workspace = b.gemm_workspace;
    g.device = b.device;
    g.sm_count = b.sm_count;
    cudaError_t err;
    if (use_prepare(p.T * p.k, p.E)) {
      MoePrepareInputs in;
      in.topk_ids = p.topk_ids;
      in.T = p.T;
      in.k = k;
      in.expert_map = p.expert_map;
      in.num_global = p.num_global;
      in.num_valid = p.num_valid;
      in.hidden = p.hidden;
      in.sorted_pairs = p.sorted_pairs;
      in.block_expert = p.block_expert;
      in.max_blocks = p.max_blocks;
      in.num_blocks = p.num_blocks;
      in.pair_slot = b.pair_slot;
      if ((err = grouped_gemm_sm90_prepare(g, in, stream)) != cudaSuccess) return err;
    } else {
      // The align also writes pair_slot (-1 for pairs without a slot): the
      // permute walks tokens, the reduce reads it for the valid pairs.
      err = launch_moe_align(p.topk_ids, p.T, k, p.expert_map, p.num_global, p.num_valid,
                             static_cast<int>(p.E), kCutlassBlockM, p.sorted_pairs,
                             p.block_expert, p.max_blocks, p.num_blocks, b.pair_slot,
                             p.align_scratch, stream, /*as_dependent=*/true);
      if (err != cudaSuccess) return err;
      if (!g.gather_a) {
        err = launch_moe_permute(p.dtype, p.hidden, p.H, k, b.pair_slot, p.T, b.a_sorted, stream);
        if (err != cudaSuccess) return err;
      }
      if ((err = grouped_gemm_sm90_setup(g, stream)) != cudaSuccess) return err;
    }
    if ((err = grouped_gemm_sm90_run(g, 1, p.config.tile1, stream)) != cudaSuccess) return err;
    if (!g.fused_act) {
      err = launch_moe_gated_act(p.dtype, b.gate_up, p.sorted_pairs, p.block_expert,
                                 kCutlassBlockM, slots, p.I, p.w13_block, p.b13, p.act, p.alpha,
                                 p.limit, p.inter, stream);
      if (err != cudaSuccess) return err;
    }
    if ((err = grouped_gemm_sm90_run(g, 2, p.config.tile2, stream)) != cudaSuccess) return err;
  }
  // Every row of out is written (zeros for rows without valid pairs).
  return launch_moe_unpermute_reduce(p.dtype, b.a_sorted, b.pair_slot, p.topk_weights,
                                     p.topk_ids, p.expert_map, p.num_global, p.E, p.num_valid,
                                     p.T, k, p.H, p.b2, p.out, stream);
}

}  // namespace pcg::moe
