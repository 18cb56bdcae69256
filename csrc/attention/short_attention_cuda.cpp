// Launcher of the short-sequence attention kernel: decides whether the batch
// and the tensors fit it (declining leaves everything to the op's other
// paths), fills the params (sequence starts by value), then one launch on the
// current stream. Registered into causal_attention.cpp at load time.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include "attention/attention_hooks.h"
#include "attention/short_attention.h"
#include "common/check.h"

namespace pcg {
namespace {

constexpr int64_t kAlign = 8;  // elements of 2 bytes per 16-byte access

// Unit stride along the head dim, row/head strides and the start on 16 bytes.
bool vector_friendly(const at::Tensor& t) {
  return t.stride(2) == 1 && t.stride(0) % kAlign == 0 && t.stride(1) % kAlign == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Bytes [begin, end) a strided tensor can touch (strides are non-negative).
std::pair<uintptr_t, uintptr_t> extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// Rows are read after others were written, so out must not share bytes with
// an input (conservative: overlapping extents count, interleaving or not).
bool disjoint(const at::Tensor& a, const at::Tensor& b) {
  const auto [a0, a1] = extent(a);
  const auto [b0, b1] = extent(b);
  return a1 <= b0 || b1 <= a0;
}

// Every (row, head) of out owns its own Dv elements: with unit stride along
// Dv, the smaller of the other two strides must step past a whole row of Dv
// and the larger past the smaller's whole range (dims of size 1 do not count).
bool no_internal_overlap(const at::Tensor& out) {
  constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  int64_t s[2] = {out.stride(0), out.stride(1)}, n[2] = {out.size(0), out.size(1)};
  if (n[0] <= 1) s[0] = kNever;  // never steps: put it last
  if (n[1] <= 1) s[1] = kNever;
  if (s[0] > s[1]) std::swap(s[0], s[1]), std::swap(n[0], n[1]);
  const int64_t dv = out.size(2);
  if (s[0] != kNever && s[0] < dv) return false;
  return s[1] == kNever || s[1] >= s[0] * n[0];
}

// Why the tensors do not fit the kernel, or null (the batch aside).
const char* misfit(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out) {
  const auto dt = q.scalar_type();
  const int64_t d = q.size(2), dv = v.size(2);
  if (!q.is_cuda() || (dt != at::kBFloat16 && dt != at::kHalf)) return "CUDA bf16/fp16 tensors";
  if (d < kAlign || d % kAlign != 0 || d > kShortAttnMaxHeadDim || dv < kAlign ||
      dv % kAlign != 0 || dv > kShortAttnMaxHeadDim)
    return "q/v head sizes that are multiples of 8 up to 256";
  if (q.size(0) == 0 || q.size(0) > std::numeric_limits<int32_t>::max() / 2 || q.size(1) == 0)
    return "at least one row and head (and < 2^30 rows)";
  for (const at::Tensor* t : {&q, &k, &v, &out})
    if (!vector_friendly(*t))
      return "unit stride along the head size, row/head strides multiples of 8, 16-byte aligned starts";
  if (!no_internal_overlap(out)) return "an out whose (row, head) vectors do not overlap";
  for (const at::Tensor* t : {&q, &k, &v})
    if (!disjoint(out, *t)) return "an out sharing no memory with q, k or v";
  return nullptr;
}

bool fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
          const AttnBatch& b) {
  if (b.max_seqlen > kShortAttnMaxSeqlen || b.num_seqs > kShortAttnMaxSeqs ||
      b.num_tokens > kShortAttnMaxTokens)
    return false;
  return misfit(q, k, v, out) == nullptr;
}

// Everything but the batch.
ShortAttnParams tensor_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor& out, std::optional<double> scale, int64_t window_left) {
  ShortAttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.q_row = q.stride(0), p.q_head = q.stride(1);
  p.k_row = k.stride(0), p.k_head = k.stride(1);
  p.v_row = v.stride(0), p.v_head = v.stride(1);
  p.o_row = out.stride(0), p.o_head = out.stride(1);
  p.rows = static_cast<int32_t>(q.size(0));
  p.hq = static_cast<int32_t>(q.size(1));
  p.group = static_cast<int32_t>(q.size(1) / k.size(1));
  p.d = static_cast<int32_t>(q.size(2));
  p.dv = static_cast<int32_t>(v.size(2));
  // Wider than any sequence the kernel takes is the same as no window.
  p.window_left = static_cast<int32_t>(window_left < 0 ? -1 : std::min<int64_t>(window_left, 1 << 30));
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.d));
  p.scale_log2 = static_cast<float>(s * 1.4426950408889634);  // log2(e)
  p.dtype = q.scalar_type() == at::kBFloat16 ? ShortAttnDtype::kBFloat16 : ShortAttnDtype::kFloat16;
  return p;
}

bool short_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         at::Tensor& out, const AttnBatch& b, std::optional<double> scale,
                         int64_t window_left) {
  if (!fits(q, k, v, out, b)) return false;
  ShortAttnParams p = tensor_params(q, k, v, out, scale, window_left);
  p.num_tokens = static_cast<int32_t>(b.num_tokens);
  // A batch without tokens still zeroes every row: num_seqs 0 keeps cu = {0}.
  p.num_seqs = static_cast<int32_t>(b.num_seqs);
  for (int64_t i = 0; i <= b.num_seqs; ++i) p.cu[i] = static_cast<int32_t>(b.cu[i]);

  const c10::cuda::CUDAGuard guard(q.device());
  short_attention_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

void graph_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         at::Tensor& out, const at::Tensor& batch, std::optional<double> scale,
                         int64_t window_left) {
  if (const char* need = misfit(q, k, v, out))
    PCG_CHECK_ARG("causal_attention_graph", "q", false, "the CUDA kernel needs ", need);
  ShortAttnParams p = tensor_params(q, k, v, out, scale, window_left);
  p.device_batch = batch.data_ptr<int32_t>();
  p.batch_capacity = static_cast<int32_t>(std::min<int64_t>(batch.numel() - 3, 1 << 30));
  const c10::cuda::CUDAGuard guard(q.device());
  short_attention_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const bool registered = (register_short_attention(&short_attention_out),
                         register_graph_attention(&graph_attention_out), true);

}  // namespace
}  // namespace pcg
