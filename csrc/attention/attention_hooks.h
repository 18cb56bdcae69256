// Optional fast paths of pcg::causal_attention_out that live in CUDA-only
// translation units. The op file calls them through a pointer a CUDA build
// registers at load time, so CPU-only builds link without them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace pcg {

// One packed batch, as read from the op's metadata (already validated).
struct AttnBatch {
  int64_t num_tokens, num_seqs, max_seqlen;
  const int64_t* cu;  // num_seqs + 1 sequence starts
};

// Computes every row of `out` (pad rows as zeros) and returns true, or
// returns false without touching anything when the batch or the tensors are
// outside what it handles; the op then takes its other paths.
using ShortAttentionFn = bool (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  at::Tensor& out, const AttnBatch& b,
                                  std::optional<double> scale, int64_t window_left);

// Called from a static initialiser (short_attention_cuda.cpp).
void register_short_attention(ShortAttentionFn fn);

// pcg::causal_attention_graph's CUDA launch: the batch is read on the device
// from `batch` (int32 [num_tokens, num_seqs, cu_seqlens...]). Throws a
// ValueError naming what does not fit the kernel (dtype, head sizes, strides).
using GraphAttentionFn = void (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  at::Tensor& out, const at::Tensor& batch,
                                  std::optional<double> scale, int64_t window_left);
void register_graph_attention(GraphAttentionFn fn);

}  // namespace pcg
