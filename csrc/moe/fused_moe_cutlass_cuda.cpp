// CUDA launcher of fused_moe's CUTLASS sm_90a path (config [-1, g1, g2];
// pipeline: moe_cutlass.h): checks what this path needs beyond the common
// argument checks, resolves the GEMM kernel variants (-1: the default),
// allocates fixed worst-case workspaces from the shapes only (capturable),
// launches on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_args.h"
#include "moe/grouped_gemm_sm90.h"
#include "moe/moe_cutlass.h"

namespace pcg {
namespace {

constexpr const char* kOp = "fused_moe";
constexpr const char* kPath = "the CUTLASS path (config [-1, g1, g2])";

}  // namespace

at::Tensor fused_moe_cutlass_cuda(const FusedMoeShape& s, const FusedMoeInputs& in,
                                  const moe::MoeConfig& config, double alpha, double limit) {
  PCG_CHECK_ARG(kOp, "config", moe::cutlass_moe_built(),
                "[-1, g1, g2] selects the CUTLASS sm_90a path, which this build lacks (it needs "
                "CUTLASS headers and 9.0a in PCG_CUDA_ARCHS; see docs/fused_moe_paths.md)");
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  PCG_CHECK_ARG(kOp, "config", prop->major == 9 && prop->minor == 0,
                "[-1, g1, g2] (the CUTLASS path) needs an sm_90 GPU (H100/H200), this one is sm_",
                prop->major, prop->minor);
  PCG_CHECK_ARG(kOp, "hidden", s.H % 8 == 0,
                "hidden size must be a multiple of 8 for the CUTLASS path, got shape ",
                in.hidden.sizes());
  PCG_CHECK_ARG(kOp, "w13", s.I > 0 && s.I % 8 == 0,
                "intermediate size (w13.size(1) / 2) must be a positive multiple of 8 for the "
                "CUTLASS path, got shape ", in.w13.sizes());
  const moe::DType dtype = to_moe_dtype(in.hidden.scalar_type());

  at::Tensor out = at::empty({s.T, s.H}, in.hidden.options());
  if (s.T == 0 || s.H == 0) return out;

  check_aligned16("hidden", in.hidden, kPath);
  check_aligned16("w13", in.w13, kPath);
  check_aligned16("w2", in.w2, kPath);
  check_aligned16("b13", in.b13, kPath);  // absent biases pass
  check_aligned16("b2", in.b2, kPath);
  check_aligned16("out", out, kPath);

  moe::FusedMoeParams p = in.params(s, alpha, limit);
  // Variant ids are valid here: a forced config passed check_fused_moe_config,
  // the table's rows are checked at compile time.
  p.config = moe::MoeConfig{moe::kCutlassBlockM, moe::resolve_gemm_variant(config.tile1),
                           moe::resolve_gemm_variant(config.tile2)};
  p.max_blocks = moe::cutlass_moe_max_blocks(s.T, s.k, s.E);

  // Workspaces: sizes from the shapes and the device only.
  const auto i32 = in.hidden.options().dtype(at::kInt);
  const auto u8 = in.hidden.options().dtype(at::kByte);
  const int64_t slots = p.max_blocks * moe::kCutlassBlockM;
  at::Tensor sorted_pairs = at::empty({slots}, i32);
  at::Tensor block_expert = at::empty({p.max_blocks}, i32);
  at::Tensor num_blocks = at::empty({1}, i32);
  at::Tensor align_scratch = at::empty({moe::moe_align_scratch_ints(s.T * s.k, s.E)}, i32);
  at::Tensor inter = at::empty({slots, s.I}, in.hidden.options());
  at::Tensor a_sorted = at::empty({slots, s.H}, in.hidden.options());
  // GEMM1's output before the activation; none when its epilogue applies the
  // activation (w13 in the block layout of moe::kFusedW13Block).
  const bool fused_act = s.w13_block == moe::kFusedW13Block;
  at::Tensor gate_up = at::empty({fused_act ? 0 : slots, 2 * s.I}, in.hidden.options());
  at::Tensor pair_slot = at::empty({s.T * s.k}, i32);
  at::Tensor gemm_args =
      at::empty({static_cast<int64_t>(moe::grouped_gemm_sm90_args_bytes(s.E))}, u8);
  moe::CutlassMoeBuffers b;
  b.device = in.hidden.get_device();
  b.sm_count = prop->multiProcessorCount;
  const size_t ws_bytes =
      p.max_blocks > 0 ? moe::cutlass_moe_gemm_workspace_bytes(dtype, s.E, b.sm_count) : 0;
  at::Tensor gemm_ws = at::empty({static_cast<int64_t>(ws_bytes)}, u8);
  p.sorted_pairs = sorted_pairs.data_ptr<int32_t>();
  p.block_expert = block_expert.data_ptr<int32_t>();
  p.num_blocks = num_blocks.data_ptr<int32_t>();
  p.align_scratch = align_scratch.data_ptr<int32_t>();
  p.inter = inter.data_ptr();
  p.out = out.data_ptr();
  b.a_sorted = a_sorted.data_ptr();
  b.gate_up = fused_act ? nullptr : gate_up.data_ptr();
  b.pair_slot = pair_slot.data_ptr<int32_t>();
  b.gemm_args = gemm_args.data_ptr();
  b.gemm_workspace = gemm_ws.numel() > 0 ? gemm_ws.data_ptr() : nullptr;

  C10_CUDA_CHECK(moe::launch_fused_moe_cutlass(p, b, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace pcg
