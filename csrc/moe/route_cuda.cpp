// pcg::route CUDA launcher: validation shared with the CPU path, then one
// kernel launch on the current stream (no synchronisation: graph-capturable).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "moe/route.h"

namespace pcg {

// Defined in route_cpu.cpp: checks device, dtype, shape and scalar
// arguments (in that order), makes contiguous copies, allocates outputs.
std::tuple<at::Tensor, at::Tensor, RouteParams> route_prepare(
    const at::Tensor& logits, int64_t top_k, std::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups,
    double scale, int64_t max_experts, const char* backend, std::vector<at::Tensor>& keep);

namespace {

std::tuple<at::Tensor, at::Tensor> route_cuda_op(const at::Tensor& logits, int64_t top_k,
                                                 c10::string_view scoring, bool renormalize,
                                                 const std::optional<at::Tensor>& bias,
                                                 int64_t num_groups, int64_t topk_groups,
                                                 double scale) {
  // CPU logits with a CUDA bias also dispatch here: the bias is misplaced.
  PCG_CHECK_ARG("route", "correction_bias", logits.is_cuda(),
                "must be on the same device as router_logits (", logits.device(), "), got ",
                bias.has_value() ? bias->device() : logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  std::vector<at::Tensor> keep;
  auto [weights, ids, p] = route_prepare(logits, top_k, scoring, renormalize, bias, num_groups,
                                         topk_groups, scale, kRouteMaxExpertsCuda, "CUDA", keep);
  if (p.T > 0) {
    route_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(pcg, CUDA, m) { m.impl("route", &route_cuda_op); }

}  // namespace pcg
