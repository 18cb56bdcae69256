// pcg::route on CPU, plus the argument validation shared with the CUDA
// launcher (route_cuda.cpp declares route_prepare and calls it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "moe/route.h"

namespace pcg {
namespace {

constexpr const char* kOp = "route";

RouteDtype route_dtype(const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return RouteDtype::kFloat32;
    case at::kBFloat16: return RouteDtype::kBFloat16;
    case at::kHalf: return RouteDtype::kFloat16;
    default:
      PCG_CHECK_ARG(kOp, arg, false, "must have dtype float32, bfloat16 or float16, got ",
                    dtype_name(t.scalar_type()));
  }
  return RouteDtype::kFloat32;  // unreachable
}

float load(const void* base, RouteDtype dt, int64_t i) {
  switch (dt) {
    case RouteDtype::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    case RouteDtype::kFloat16:
      return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// One token. `score`, `sel`, `avail` are scratch of size E; `gsel`,
// `gavail` of size num_groups. Mirrors route_kernel.cu step by step.
void route_token(const RouteParams& p, int64_t t, std::vector<float>& score,
                 std::vector<float>& sel, std::vector<char>& avail, std::vector<float>& gsel,
                 std::vector<char>& gavail) {
  namespace m = route_math;
  const int64_t E = p.E;
  for (int64_t i = 0; i < E; ++i) score[i] = load(p.logits, p.logits_dtype, t * E + i);

  if (p.scoring == RouteScoring::kSoftmax) {
    float mx = -m::inf();
    for (int64_t i = 0; i < E; ++i) mx = std::fmax(mx, score[i]);
    // The CUDA warp sums lane-strided partials, then a xor butterfly; do
    // the same additions in the same order so the denominators match.
    std::array<float, kRouteWarp> part{};
    for (int64_t i = 0; i < E; ++i) {
      score[i] = m::exp(m::sub(score[i], mx));
      part[i % kRouteWarp] = m::add(part[i % kRouteWarp], score[i]);
    }
    for (int off = kRouteWarp / 2; off > 0; off /= 2) {
      std::array<float, kRouteWarp> next;
      for (int l = 0; l < kRouteWarp; ++l) next[l] = m::add(part[l], part[l ^ off]);
      part = next;
    }
    for (int64_t i = 0; i < E; ++i) score[i] = m::div(score[i], part[0]);
  } else {
    for (int64_t i = 0; i < E; ++i) score[i] = m::sigmoid(score[i]);
  }
  for (int64_t i = 0; i < E; ++i) {
    sel[i] = p.bias ? m::add(score[i], load(p.bias, p.bias_dtype, i)) : score[i];
    avail[i] = 1;
  }

  if (p.num_groups > 1) {
    const int64_t G = p.num_groups, S = E / G;
    for (int64_t g = 0; g < G; ++g) {
      gsel[g] = m::group_score(sel.data() + g * S, static_cast<int>(S));
      gavail[g] = 1;
    }
    for (int64_t r = 0; r < p.topk_groups; ++r) {
      int best = -1;
      float bv = 0.0f;
      for (int64_t g = 0; g < G; ++g)
        if (gavail[g] && m::better(gsel[g], static_cast<int>(g), bv, best)) {
          best = static_cast<int>(g);
          bv = gsel[g];
        }
      gavail[best] = 0;  // taken: this group is kept
    }
    for (int64_t i = 0; i < E; ++i) avail[i] = !gavail[i / S];
  }

  float* w = p.weights + t * p.top_k;
  int32_t* ids = p.ids + t * p.top_k;
  float sum = 0.0f;
  for (int64_t j = 0; j < p.top_k; ++j) {
    int best = -1;
    float bv = 0.0f;
    for (int64_t i = 0; i < E; ++i)
      if (avail[i] && m::better(sel[i], static_cast<int>(i), bv, best)) {
        best = static_cast<int>(i);
        bv = sel[i];
      }
    avail[best] = 0;
    ids[j] = best;
    w[j] = score[best];
    sum = m::add(sum, w[j]);
  }
  const float denom = p.renormalize ? m::add(sum, 1e-20f) : 1.0f;
  for (int64_t j = 0; j < p.top_k; ++j)
    w[j] = m::mul(p.renormalize ? m::div(w[j], denom) : w[j], p.scale);
}

}  // namespace

void route_cpu(const RouteParams& p) {
  if (p.T == 0) return;
  // ~E*k work per token; aim for chunks of a few hundred thousand operations.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.E * p.top_k));
  at::parallel_for(0, p.T, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> score(p.E), sel(p.E), gsel(p.num_groups);
    std::vector<char> avail(p.E), gavail(p.num_groups);
    for (int64_t t = begin; t < end; ++t) route_token(p, t, score, sel, avail, gsel, gavail);
  });
}

// Shared by the CPU and CUDA launchers: validates every argument (device,
// dtype, shape, then the scalar arguments), allocates the outputs and fills
// a RouteParams. `keep` holds contiguous copies the params point into.
std::tuple<at::Tensor, at::Tensor, RouteParams> route_prepare(
    const at::Tensor& logits, int64_t top_k, std::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups,
    double scale, int64_t max_experts, const char* backend, std::vector<at::Tensor>& keep) {
  const bool has_bias = bias.has_value() && bias->defined();
  // device
  if (has_bias)
    PCG_CHECK_ARG(kOp, "correction_bias", bias->device() == logits.device(),
                  "must be on the same device as router_logits (", logits.device(), "), got ",
                  bias->device());
  // dtype
  RouteParams p;
  p.logits_dtype = route_dtype("router_logits", logits);
  if (has_bias) p.bias_dtype = route_dtype("correction_bias", *bias);
  // shape
  PCG_CHECK_ARG(kOp, "router_logits", logits.dim() == 2,
                "must be 2-D [num_tokens, num_experts], got shape ", logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  if (has_bias)
    PCG_CHECK_ARG(kOp, "correction_bias", bias->dim() == 1 && bias->size(0) == E,
                  "must have shape [num_experts] = [", E, "], got shape ", bias->sizes());
  // scalar arguments
  PCG_CHECK_ARG(kOp, "top_k", top_k >= 1 && top_k <= E,
                "must be in [1, num_experts] = [1, ", E, "], got ", top_k);
  PCG_CHECK_ARG(kOp, "scoring", scoring == "softmax" || scoring == "sigmoid",
                "must be \"softmax\" or \"sigmoid\", got \"", scoring, "\"");
  PCG_CHECK_ARG(kOp, "num_groups", num_groups >= 1 && E % num_groups == 0,
                "must be >= 1 and divide num_experts (", E, "), got ", num_groups);
  PCG_CHECK_ARG(kOp, "topk_groups", topk_groups >= 1 && topk_groups <= num_groups,
                "must be in [1, num_groups] = [1, ", num_groups, "], got ", topk_groups);
  PCG_CHECK_ARG(kOp, "top_k", top_k <= topk_groups * (E / num_groups),
                "must be <= topk_groups * experts per group = ", topk_groups * (E / num_groups),
                ", got ", top_k);
  PCG_CHECK_ARG(kOp, "router_logits", E <= max_experts, "has ", E, " experts (dim 1); the ",
                backend, " kernel supports at most ", max_experts);
  // contiguity: kernels read plain row-major buffers
  const at::Tensor lc = logits.contiguous();
  keep.push_back(lc);
  p.logits = lc.data_ptr();
  if (has_bias) {
    const at::Tensor bc = bias->contiguous();
    keep.push_back(bc);
    p.bias = bc.data_ptr();
  }
  p.T = T;
  p.E = E;
  p.top_k = top_k;
  p.scoring = scoring == "softmax" ? RouteScoring::kSoftmax : RouteScoring::kSigmoid;
  p.renormalize = renormalize;
  p.num_groups = num_groups;
  p.topk_groups = topk_groups;
  p.scale = static_cast<float>(scale);
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  return {weights, ids, p};
}

namespace {

std::tuple<at::Tensor, at::Tensor> route_cpu_op(const at::Tensor& logits, int64_t top_k,
                                                c10::string_view scoring, bool renormalize,
                                                const std::optional<at::Tensor>& bias,
                                                int64_t num_groups, int64_t topk_groups,
                                                double scale) {
  std::vector<at::Tensor> keep;
  auto [weights, ids, p] = route_prepare(logits, top_k, scoring, renormalize, bias, num_groups,
                                         topk_groups, scale, INT32_MAX, "CPU", keep);
  route_cpu(p);
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(pcg, CPU, m) { m.impl("route", &route_cpu_op); }

}  // namespace pcg
