// CUDA launchers of pcg::fused_moe and pcg::moe_align: validate, make the
// inputs contiguous, allocate fixed worst-case workspaces (sizes depend only
// on the shapes, so capture and replay agree), launch on the current stream.
// No host synchronisation: num_valid and the routing are read on the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/check.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_args.h"
#include "moe/moe_align.h"
#include "moe/moe_cutlass.h"
#include "moe/moe_stream.h"

namespace pcg {
namespace {

// Shared memory one block may use on the current device (opt-in maximum).
int64_t smem_optin() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// A chosen (table) config whose tiles need more shared memory than the device
// has falls back to the default tiles of its block_m (deterministic per device).
moe::MoeConfig fit_to_device(moe::MoeConfig c, moe::DType dtype) {
  if (dtype == moe::DType::kFloat32) return c;
  const int64_t limit = smem_optin();
  if (moe::find_tile(c.tile1)->smem_total() > limit) c.tile1 = moe::default_tile(c.block_m, true);
  if (moe::find_tile(c.tile2)->smem_total() > limit) c.tile2 = moe::default_tile(c.block_m, false);
  return c;
}

// What the special paths need beyond the common checks (moe/fused_moe.h).
moe::PathSupport path_support(const FusedMoeShape& s, moe::DType dtype, const FusedMoeInputs& in) {
  moe::PathSupport ok;
  if (dtype == moe::DType::kFloat32) return ok;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const bool rows16 = aligned16(in.hidden) && aligned16(in.w13) && aligned16(in.w2);
  ok.cutlass = moe::cutlass_moe_built() && prop->major == 9 && prop->minor == 0 &&
               s.H % 8 == 0 && s.I > 0 && s.I % 8 == 0 && rows16 && aligned16(in.b13) &&
               aligned16(in.b2);
  ok.stream = moe::stream_supported(dtype, s.T, s.k, s.H, s.I) && prop->major >= 8 && rows16;
  return ok;
}

at::Tensor fused_moe_cuda(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                          const std::optional<at::Tensor>& expert_map,
                          const std::optional<at::Tensor>& num_valid,
                          const std::optional<at::Tensor>& b13,
                          const std::optional<at::Tensor>& b2, c10::string_view activation,
                          double alpha, double limit, at::OptionalIntArrayRef config,
                          int64_t w13_block) {
  const FusedMoeShape s = check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids,
                                               expert_map, num_valid, b13, b2, activation,
                                               w13_block);
  const std::optional<moe::MoeConfig> forced =
      check_fused_moe_config(config, hidden.scalar_type());
  PCG_CHECK_ARG("fused_moe", "w13", s.E <= moe::kMoeAlignMaxExperts,
                "the CUDA kernel supports at most ", moe::kMoeAlignMaxExperts,
                " local experts, got shape ", w13.sizes());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const moe::DType dtype = to_moe_dtype(hidden.scalar_type());
  const FusedMoeInputs in(hidden, w13, w2, topk_weights, topk_ids, expert_map, num_valid, b13,
                          b2);
  moe::MoeConfig cfg = forced ? *forced
                              : moe::choose_config(s.E, s.k, s.H, s.I, s.T, dtype,
                                                   path_support(s, dtype, in));
  // A forced path the call cannot take raises its launcher's error.
  if (moe::is_cutlass_config(cfg)) return fused_moe_cutlass_cuda(s, in, cfg, alpha, limit);
  if (moe::is_stream_config(cfg)) return fused_moe_stream_cuda(s, in, alpha, limit);
  if (!forced) cfg = fit_to_device(cfg, dtype);
  if (forced && dtype != moe::DType::kFloat32) {
    const int64_t limit_smem = smem_optin();
    for (const int id : {cfg.tile1, cfg.tile2}) {
      const moe::TileInfo* t = moe::find_tile(id);
      PCG_CHECK_ARG("fused_moe", "config", t->smem_total() <= limit_smem, "tile ", id, " (",
                    t->name, ") needs ", t->smem_total(), " bytes of shared memory, this device ",
                    "allows ", limit_smem, " per block, got ", *config);
    }
  }
  at::Tensor out = at::empty({s.T, s.H}, hidden.options());
  if (s.T == 0 || s.H == 0) return out;

  moe::FusedMoeParams p = in.params(s, alpha, limit);
  p.config = cfg;
  p.max_blocks = moe::moe_align_max_blocks(s.T * s.k, s.E, cfg.block_m);

  const auto i32 = hidden.options().dtype(at::kInt);
  const int64_t slots = p.max_blocks * cfg.block_m;
  at::Tensor sorted_pairs = at::empty({slots}, i32);
  at::Tensor block_expert = at::empty({p.max_blocks}, i32);
  at::Tensor num_blocks = at::empty({1}, i32);
  at::Tensor inter = at::empty({slots, s.I}, hidden.options());
  at::Tensor pair_out = at::empty({p.max_blocks > 0 ? s.T * s.k : 0, s.H},
                                  hidden.options().dtype(at::kFloat));
  p.sorted_pairs = sorted_pairs.data_ptr<int32_t>();
  p.block_expert = block_expert.data_ptr<int32_t>();
  p.num_blocks = num_blocks.data_ptr<int32_t>();
  at::Tensor align_scratch = at::empty({moe::moe_align_scratch_ints(s.T * s.k, s.E)}, i32);
  p.align_scratch = align_scratch.data_ptr<int32_t>();
  p.inter = inter.data_ptr();
  p.pair_out = pair_out.data_ptr<float>();
  p.out = out.data_ptr();

  C10_CUDA_CHECK(moe::launch_fused_moe(p, at::cuda::getCurrentCUDAStream()));
  return out;
}

void moe_align_cuda(const at::Tensor& topk_ids, const std::optional<at::Tensor>& expert_map,
                    const std::optional<at::Tensor>& num_valid, int64_t num_local_experts,
                    int64_t block_m, const at::Tensor& sorted_pairs,
                    const at::Tensor& block_expert, const at::Tensor& num_blocks) {
  const int64_t num_global = check_moe_align_args(topk_ids, expert_map, num_valid,
                                                  num_local_experts, block_m, sorted_pairs,
                                                  block_expert, num_blocks);
  PCG_CHECK_ARG("moe_align", "num_local_experts", num_local_experts <= moe::kMoeAlignMaxExperts,
                "must be at most ", moe::kMoeAlignMaxExperts, " on CUDA, got ",
                num_local_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor map = expert_map ? expert_map->contiguous() : at::Tensor();
  const at::Tensor scratch = at::empty(
      {moe::moe_align_scratch_ints(topk_ids.numel(), num_local_experts)},
      topk_ids.options().dtype(at::kInt));
  C10_CUDA_CHECK(moe::launch_moe_align(
      ids.data_ptr<int32_t>(), topk_ids.size(0), static_cast<int>(topk_ids.size(1)),
      map.defined() ? map.data_ptr<int32_t>() : nullptr, num_global,
      num_valid ? num_valid->data_ptr<int32_t>() : nullptr, static_cast<int>(num_local_experts),
      static_cast<int>(block_m), sorted_pairs.data_ptr<int32_t>(),
      block_expert.data_ptr<int32_t>(), block_expert.size(0), num_blocks.data_ptr<int32_t>(),
      /*pair_slot=*/nullptr, scratch.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pcg, CUDA, m) {
  m.impl("fused_moe", &fused_moe_cuda);
  m.impl("moe_align", &moe_align_cuda);
}

}  // namespace pcg
