// CUDA launcher of fused_moe's weight-streaming path (config [-2, -1, -1];
// design: moe_stream.h): checks what this path needs beyond the common
// argument checks, allocates its one workspace from the shapes only
// (capturable), launches on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/check.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_args.h"
#include "moe/moe_stream.h"

namespace pcg {
namespace {

constexpr const char* kOp = "fused_moe";

void check_aligned(const char* arg, const at::Tensor& t) {
  PCG_CHECK_ARG(kOp, arg, reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                "must be 16-byte aligned for the stream path (config [-2, -1, -1])");
}

}  // namespace

at::Tensor fused_moe_stream_cuda(const FusedMoeShape& s, const at::Tensor& hidden,
                                 const at::Tensor& w13, const at::Tensor& w2,
                                 const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                 const std::optional<at::Tensor>& expert_map,
                                 const std::optional<at::Tensor>& num_valid,
                                 const std::optional<at::Tensor>& b13,
                                 const std::optional<at::Tensor>& b2, double alpha,
                                 double limit) {
  const moe::DType dtype = to_moe_dtype(hidden.scalar_type());
  PCG_CHECK_ARG(kOp, "hidden", dtype != moe::DType::kFloat32,
                "must be bfloat16 or float16 for the stream path (config [-2, -1, -1]), got ",
                dtype_name(hidden.scalar_type()));
  PCG_CHECK_ARG(kOp, "topk_ids", s.T * s.k <= moe::kStreamMaxPairs,
                "the stream path (config [-2, -1, -1]) takes at most ", moe::kStreamMaxPairs,
                " (token, k) pairs (T * k), got shape ", topk_ids.sizes());
  PCG_CHECK_ARG(kOp, "hidden", s.H % 8 == 0,
                "hidden size must be a multiple of 8 for the stream path (config [-2, -1, -1]), "
                "got shape ", hidden.sizes());
  PCG_CHECK_ARG(kOp, "w13", s.I % 8 == 0,
                "intermediate size (w13.size(1) / 2) must be a multiple of 8 for the stream "
                "path (config [-2, -1, -1]), got shape ", w13.sizes());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  PCG_CHECK_ARG(kOp, "config", prop->major >= 8,
                "[-2, -1, -1] (the stream path) needs an sm_80+ GPU, this one is sm_",
                prop->major, prop->minor);

  at::Tensor out = at::empty({s.T, s.H}, hidden.options());
  if (s.T == 0 || s.H == 0) return out;

  const at::Tensor x = hidden.contiguous();
  const at::Tensor w13c = w13.contiguous();
  const at::Tensor w2c = w2.contiguous();
  const at::Tensor wts = topk_weights.contiguous();
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor map = expert_map ? expert_map->contiguous() : at::Tensor();
  const at::Tensor b13c = b13 ? b13->contiguous() : at::Tensor();
  const at::Tensor b2c = b2 ? b2->contiguous() : at::Tensor();
  // 16-byte loads of rows; the biases are read element by element.
  check_aligned("hidden", x);
  if (w13c.numel() > 0) check_aligned("w13", w13c);
  if (w2c.numel() > 0) check_aligned("w2", w2c);

  at::Tensor inter =
      at::empty({moe::stream_inter_elems(s.T, s.k, s.I)}, hidden.options());

  moe::FusedMoeParams p;
  p.dtype = dtype;
  p.hidden = x.data_ptr();
  p.w13 = w13c.data_ptr();
  p.w2 = w2c.data_ptr();
  p.b13 = b13c.defined() ? b13c.data_ptr() : nullptr;
  p.b2 = b2c.defined() ? b2c.data_ptr() : nullptr;
  p.topk_weights = wts.data_ptr<float>();
  p.topk_ids = ids.data_ptr<int32_t>();
  p.expert_map = map.defined() ? map.data_ptr<int32_t>() : nullptr;
  p.num_global = s.num_global;
  p.num_valid = num_valid ? num_valid->data_ptr<int32_t>() : nullptr;
  p.T = s.T;
  p.H = s.H;
  p.I = s.I;
  p.E = s.E;
  p.k = s.k;
  p.act = s.act;
  p.alpha = static_cast<float>(alpha);
  p.limit = static_cast<float>(limit);
  p.config = moe::MoeConfig{moe::kStreamConfig, -1, -1};
  p.inter = inter.data_ptr();
  p.out = out.data_ptr();

  C10_CUDA_CHECK(
      moe::launch_fused_moe_stream(p, moe::StreamMoeOptions{}, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace pcg
