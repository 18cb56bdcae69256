// CUDA launcher of fused_moe's weight-streaming path (config [-2, -1, -1];
// design: moe_stream.h): checks what this path needs beyond the common
// argument checks, allocates its one workspace from the shapes only
// (capturable), launches on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "common/check.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_args.h"
#include "moe/moe_stream.h"

namespace pcg {
namespace {

constexpr const char* kOp = "fused_moe";
constexpr const char* kPath = "the stream path (config [-2, -1, -1])";

}  // namespace

at::Tensor fused_moe_stream_cuda(const FusedMoeShape& s, const FusedMoeInputs& in, double alpha,
                                 double limit) {
  const moe::DType dtype = to_moe_dtype(in.hidden.scalar_type());
  PCG_CHECK_ARG(kOp, "hidden", dtype != moe::DType::kFloat32,
                "must be bfloat16 or float16 for the stream path (config [-2, -1, -1]), got ",
                dtype_name(in.hidden.scalar_type()));
  PCG_CHECK_ARG(kOp, "topk_ids", s.T * s.k <= moe::kStreamMaxPairs,
                "the stream path (config [-2, -1, -1]) takes at most ", moe::kStreamMaxPairs,
                " (token, k) pairs (T * k), got shape ", in.topk_ids.sizes());
  PCG_CHECK_ARG(kOp, "hidden", s.H % 8 == 0,
                "hidden size must be a multiple of 8 for the stream path (config [-2, -1, -1]), "
                "got shape ", in.hidden.sizes());
  PCG_CHECK_ARG(kOp, "w13", s.I % 8 == 0,
                "intermediate size (w13.size(1) / 2) must be a multiple of 8 for the stream "
                "path (config [-2, -1, -1]), got shape ", in.w13.sizes());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  PCG_CHECK_ARG(kOp, "config", prop->major >= 8,
                "[-2, -1, -1] (the stream path) needs an sm_80+ GPU, this one is sm_",
                prop->major, prop->minor);

  at::Tensor out = at::empty({s.T, s.H}, in.hidden.options());
  if (s.T == 0 || s.H == 0) return out;

  // 16-byte loads of rows; the biases are read element by element.
  check_aligned16("hidden", in.hidden, kPath);
  if (in.w13.numel() > 0) check_aligned16("w13", in.w13, kPath);
  if (in.w2.numel() > 0) check_aligned16("w2", in.w2, kPath);

  at::Tensor inter =
      at::empty({moe::stream_inter_elems(s.T, s.k, s.I)}, in.hidden.options());

  moe::FusedMoeParams p = in.params(s, alpha, limit);
  p.config = moe::MoeConfig{moe::kStreamConfig, -1, -1};
  p.inter = inter.data_ptr();
  p.out = out.data_ptr();

  moe::StreamMoeOptions o;
  const int sms = prop->multiProcessorCount;
  const int64_t up_ctas = moe::stream_up_ctas(s.T, s.k, s.E, s.I);
  o.up_ctas_per_sm = moe::stream_pairs_by_8(s.T) ? moe::stream_up_ctas_per_sm(up_ctas, sms)
                                                 : moe::kStreamUpCtasPerSm;
  o.up_rotate = moe::stream_up_rotate(s.T);
  o.up_early_args = moe::stream_up_early_args(up_ctas, o.up_ctas_per_sm, sms);
  o.down_warps = moe::stream_down_warps_beside_up(moe::stream_down_warps(s.H, sms, s.T), s.T, s.k,
                                                  s.E, s.I, o.up_ctas_per_sm, sms);
  o.down_unroll = moe::stream_down_unroll(s.T, s.k, s.E, s.I, o.down_warps);
  C10_CUDA_CHECK(moe::launch_fused_moe_stream(p, o, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace pcg
