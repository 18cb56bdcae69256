// Argument validation of pcg::fused_moe and pcg::moe_align, shared by the CPU
// and CUDA launchers (defined in fused_moe.cpp). Order: device, dtype, shape.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "moe/fused_moe.h"

namespace pcg {

struct FusedMoeShape {
  int64_t T = 0, H = 0, I = 0, E = 0, k = 0;
  int64_t num_global = 0;  // expert_map size, or E without a map
  int w13_block = 0;       // w13's row layout (moe::w13_row)
  moe::Activation act = moe::Activation::kSilu;
};

// Parses the activation name; errors name the argument 'activation'.
moe::Activation parse_activation(c10::string_view activation);

FusedMoeShape check_fused_moe_args(const at::Tensor& hidden, const at::Tensor& w13,
                                   const at::Tensor& w2, const at::Tensor& topk_weights,
                                   const at::Tensor& topk_ids,
                                   const std::optional<at::Tensor>& expert_map,
                                   const std::optional<at::Tensor>& num_valid,
                                   const std::optional<at::Tensor>& b13,
                                   const std::optional<at::Tensor>& b2,
                                   c10::string_view activation, int64_t w13_block);

// Validates fused_moe's optional `config` override [block_m, tile1, tile2]
// (errors name the argument 'config'); returns the config to use for `dtype`
// (tile ids -1 resolved to block_m's default tiles; fp32: tile ids -1), or
// nullopt without an override. Every config serves either w13 layout.
std::optional<moe::MoeConfig> check_fused_moe_config(at::OptionalIntArrayRef config,
                                                     c10::ScalarType dtype);

moe::DType to_moe_dtype(c10::ScalarType t);

// An absent or 16-byte aligned tensor (the special paths' vector loads / TMA).
inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}
// Errors (naming `arg`) unless `t` is aligned16; `path` ends the message, e.g.
// "the stream path (config [-2, -1, -1])".
void check_aligned16(const char* arg, const at::Tensor& t, const char* path);

// fused_moe's tensors made contiguous (no copy when they already are) and kept
// alive while a launcher uses them; undefined tensors for absent optionals.
struct FusedMoeInputs {
  at::Tensor hidden, w13, w2, topk_weights, topk_ids, expert_map, num_valid, b13, b2;
  FusedMoeInputs(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                 const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                 const std::optional<at::Tensor>& expert_map,
                 const std::optional<at::Tensor>& num_valid, const std::optional<at::Tensor>& b13,
                 const std::optional<at::Tensor>& b2);
  // The FusedMoeParams fields every implementation shares (inputs, shapes,
  // activation); config, workspaces and out are the launcher's.
  moe::FusedMoeParams params(const FusedMoeShape& s, double alpha, double limit) const;
};

// CUDA only, called by fused_moe_cuda (device guard held) after
// check_fused_moe_args / check_fused_moe_config: fused_moe on the CUTLASS sm_90a
// path (config [-1, g1, g2], GEMM kernel variants or -1;
// fused_moe_cutlass_cuda.cpp) and on the weight-streaming path (config
// [-2, -1, -1], T*k <= moe::kStreamMaxPairs; fused_moe_stream_cuda.cpp).
at::Tensor fused_moe_cutlass_cuda(const FusedMoeShape& s, const FusedMoeInputs& in,
                                  const moe::MoeConfig& config, double alpha, double limit);
at::Tensor fused_moe_stream_cuda(const FusedMoeShape& s, const FusedMoeInputs& in, double alpha,
                                 double limit);

// Validates moe_align's arguments; returns the number of global ids (map size
// or num_local_experts).
int64_t check_moe_align_args(const at::Tensor& topk_ids, const std::optional<at::Tensor>& expert_map,
                             const std::optional<at::Tensor>& num_valid, int64_t num_local_experts,
                             int64_t block_m, const at::Tensor& sorted_pairs,
                             const at::Tensor& block_expert, const at::Tensor& num_blocks);

}  // namespace pcg
