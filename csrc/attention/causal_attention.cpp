// pcg::causal_attention_out: causal attention over a packed batch of
// variable-length sequences, written into a preallocated output. It is the
// split call a captured forward replays between its graphs, so it is C++ end
// to end: the replay loop calls it through the dispatcher without Python.
//
// The batch comes in `meta`, a CPU int64 tensor the caller rewrites before
// each call (the recorded call keeps pointing at it):
//   meta = [num_tokens, num_seqs, max_seqlen, flags, cu_seqlens[0..num_seqs]]
// flags bit 0: several sequences may share one flash varlen launch (else one
// launch per sequence); bit 1: never take the short-sequence kernel (tests and
// benchmarks compare the paths with it). Rows of q past num_tokens are
// padding; their output rows are written as zeros.
//
// Captured inside a CUDA graph, the op replays the batch it saw at capture
// (the metadata is host data, read when the call is made).
//
// CUDA builds first offer the batch to the short-sequence kernel
// (short_attention_cuda.cpp: bf16/fp16, sequences <= 64 tokens, <= 128 of
// them): one launch writes every row, pad rows included. Env
// PCG_SHORT_ATTENTION=0 (read once) turns it off for the process.
//
// Batches whose sequences are all one token long need no softmax: out = v.
// CUDA bf16/fp16 with equal q/v head sizes (multiple of 8, <= 256) runs
// torch's flash kernel: batch form for one sequence, varlen form for several.
// Everything else (CPU, fp32, other head sizes) runs scaled_dot_product_attention
// per sequence, with an explicit mask when a sliding window applies.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>
#ifdef PCG_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include "attention/attention_hooks.h"
#include "attention/short_attention.h"
#include "common/check.h"

namespace pcg {
namespace {

constexpr const char* kOp = "causal_attention_out";
constexpr int64_t kMetaHead = 4;  // num_tokens, num_seqs, max_seqlen, flags
constexpr int64_t kFlagVarlen = 1;
constexpr int64_t kFlagNoShort = 2;

struct Batch {
  int64_t num_tokens, num_seqs, max_seqlen, flags;
  const int64_t* cu;  // num_seqs + 1 sequence starts
};

Batch read_meta(const at::Tensor& meta, int64_t rows) {
  PCG_CHECK_ARG(kOp, "meta", meta.device().is_cpu() && meta.scalar_type() == at::kLong &&
                    meta.dim() == 1 && meta.is_contiguous(),
                "must be a contiguous 1-D int64 CPU tensor, got ", meta.scalar_type(), " on ",
                meta.device(), " with shape ", meta.sizes());
  PCG_CHECK_ARG(kOp, "meta", meta.numel() >= kMetaHead + 1, "must hold at least ",
                kMetaHead + 1, " values, got ", meta.numel());
  const int64_t* m = meta.data_ptr<int64_t>();
  Batch b{m[0], m[1], m[2], m[3], m + kMetaHead};
  PCG_CHECK_ARG(kOp, "meta", b.num_tokens >= 0 && b.num_tokens <= rows, "num_tokens ",
                b.num_tokens, " must be in [0, ", rows, "] (the rows of q)");
  // Compared without adding to num_seqs (a huge value must not wrap around).
  PCG_CHECK_ARG(kOp, "meta", b.num_seqs >= 0 && b.num_seqs <= meta.numel() - kMetaHead - 1,
                "num_seqs ", b.num_seqs, " needs ", kMetaHead + b.num_seqs + 1,
                " values, meta has ", meta.numel());
  PCG_CHECK_ARG(kOp, "meta", b.cu[0] == 0 && b.cu[b.num_seqs] == b.num_tokens,
                "cu_seqlens must run from 0 to num_tokens ", b.num_tokens, ", got ", b.cu[0],
                " .. ", b.cu[b.num_seqs]);
  int64_t longest = 0;
  for (int64_t i = 0; i < b.num_seqs; ++i) {
    PCG_CHECK_ARG(kOp, "meta", b.cu[i + 1] >= b.cu[i], "cu_seqlens must not decrease (at ", i,
                  ")");
    longest = std::max(longest, b.cu[i + 1] - b.cu[i]);
  }
  PCG_CHECK_ARG(kOp, "meta", b.max_seqlen == longest, "max_seqlen ", b.max_seqlen,
                " must be the longest sequence, ", longest);
  return b;
}

// A softmax scale of 0 or below is no model's (and torch's CPU causal SDPA
// returns NaN for it).
void check_scale(const char* op, std::optional<double> scale) {
  PCG_CHECK_ARG(op, "scale", !scale || (std::isfinite(*scale) && *scale > 0),
                "must be a finite positive number, or None for 1/sqrt(head size); got ",
                scale.value_or(0.0));
}

void validate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, int64_t window_left) {
  check_dim(kOp, "q", q, 3);
  PCG_CHECK_ARG(kOp, "q", q.is_floating_point(), "must be a floating-point tensor, got ",
                q.scalar_type());
  check_dim(kOp, "k", k, 3);
  check_dim(kOp, "v", v, 3);
  check_dim(kOp, "out", out, 3);
  const int64_t rows = q.size(0);
  check_size(kOp, "k", k, 0, rows, "tokens, as q");
  check_size(kOp, "v", v, 0, rows, "tokens, as q");
  check_size(kOp, "k", k, 2, q.size(2), "head size, as q");
  check_size(kOp, "v", v, 1, k.size(1), "kv heads, as k");
  PCG_CHECK_ARG(kOp, "k", k.size(1) > 0 && q.size(1) % k.size(1) == 0, "heads (", k.size(1),
                ") must divide the q heads (", q.size(1), ")");
  check_size(kOp, "out", out, 0, rows, "tokens, as q");
  check_size(kOp, "out", out, 1, q.size(1), "heads, as q");
  check_size(kOp, "out", out, 2, v.size(2), "head size, as v");
  for (auto [name, t] : {std::pair{"k", &k}, {"v", &v}, {"out", &out}}) {
    check_dtype(kOp, name, *t, q.scalar_type());
    check_device(kOp, name, *t, q.device());
  }
  PCG_CHECK_ARG(kOp, "window_left", window_left >= -1, "must be -1 (no window) or >= 0, got ",
                window_left);
}

// The CUDA build's short-sequence kernel; null in CPU-only builds. Constant-
// initialised, so registration from another file's static initialiser is safe.
std::atomic<ShortAttentionFn> short_attention{nullptr};

bool short_attention_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("PCG_SHORT_ATTENTION");
    return e == nullptr || std::string_view(e) != "0";
  }();
  return on;
}

// Set once torch's flash kernel refused to run here (a GPU older than sm_80,
// or a torch built without it): every later call takes the SDPA path.
std::atomic<bool> flash_unavailable{false};

bool use_flash(const at::Tensor& q, const at::Tensor& v) {
  const int64_t d = q.size(2);
  return q.is_cuda() && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) &&
         v.size(2) == d && d % 8 == 0 && d <= 256 && at::globalContext().userEnabledFlashSDP() &&
         !flash_unavailable.load(std::memory_order_relaxed);
}

// Flash wants unit stride along the head dimension.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// One sequence [s, H, D] with SDPA ([1, H, s, D] layout), causal (+ window).
at::Tensor sdpa_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    std::optional<double> scale, int64_t window_left) {
  const int64_t s = q.size(0);
  auto qh = q.transpose(0, 1).unsqueeze(0);
  auto kh = k.transpose(0, 1).unsqueeze(0);
  auto vh = v.transpose(0, 1).unsqueeze(0);
  const bool gqa = q.size(1) != k.size(1);
  at::Tensor o;
  if (window_left >= 0 && window_left < s - 1) {
    auto i = at::arange(s, q.options().dtype(at::kLong)).unsqueeze(1);
    auto j = at::arange(s, q.options().dtype(at::kLong)).unsqueeze(0);
    auto keep = (j <= i).logical_and_((i - j) <= window_left);
    o = at::scaled_dot_product_attention(qh, kh, vh, keep, 0.0, false, scale, gqa);
  } else {
    o = at::scaled_dot_product_attention(qh, kh, vh, {}, 0.0, true, scale, gqa);
  }
  return o.squeeze(0).transpose(0, 1);  // [s, H, Dv]
}

// A host->device copy captured in a CUDA graph reads its source again at
// every replay, for the graph's whole life: the staging block must never go
// back to the host allocator. Captures are rare and the blocks tiny (one int
// per sequence), so they are kept for the process's life.
void keep_if_captured(const at::Tensor& host) {
#ifdef PCG_WITH_CUDA
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) return;
  static std::mutex mu;
  static std::vector<at::Tensor>* kept = new std::vector<at::Tensor>();  // never destroyed
  const std::lock_guard<std::mutex> lock(mu);
  kept->push_back(host);
#else
  (void)host;
#endif
}

void flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
           const Batch& b, std::optional<double> scale, int64_t window_left) {
  const int64_t n = b.num_tokens;
  auto qn = unit_last(q.narrow(0, 0, n));
  auto kn = unit_last(k.narrow(0, 0, n));
  auto vn = unit_last(v.narrow(0, 0, n));
  std::optional<int64_t> left, right;
  if (window_left >= 0) {
    left = window_left;
    right = 0;
  }
  if (b.num_seqs == 1) {
    auto res = at::_flash_attention_forward(qn.unsqueeze(0), kn.unsqueeze(0), vn.unsqueeze(0),
                                            std::nullopt, std::nullopt, n, n, 0.0, true, false,
                                            scale, left, right);
    out.narrow(0, 0, n).copy_(std::get<0>(res).squeeze(0));
    return;
  }
  // Pinned staging: the copy is asynchronous and the staging block is not
  // reused before it ran (the caching host allocator records the stream);
  // a captured copy re-reads it at every replay (keep_if_captured).
  auto host = at::empty({b.num_seqs + 1}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* h = host.data_ptr<int32_t>();
  for (int64_t i = 0; i <= b.num_seqs; ++i) h[i] = static_cast<int32_t>(b.cu[i]);
  auto cu = host.to(q.device(), /*non_blocking=*/true);
  keep_if_captured(host);
  auto res = at::_flash_attention_forward(qn, kn, vn, cu, cu, b.max_seqlen, b.max_seqlen, 0.0,
                                          true, false, scale, left, right);
  out.narrow(0, 0, n).copy_(std::get<0>(res));
}

}  // namespace

void causal_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, const at::Tensor& meta, std::optional<double> scale,
                          int64_t window_left) {
  validate(q, k, v, out, window_left);
  check_scale(kOp, scale);
  const int64_t rows = q.size(0);
  const Batch b = read_meta(meta, rows);
  // The kernel writes every row (pad rows too); all-one-token batches go there
  // as well: one launch instead of the copy plus the pad-row fill below.
  const ShortAttentionFn fast = short_attention.load(std::memory_order_relaxed);
  if (fast != nullptr && !(b.flags & kFlagNoShort) && short_attention_enabled() &&
      fast(q, k, v, out, AttnBatch{b.num_tokens, b.num_seqs, b.max_seqlen, b.cu}, scale,
           window_left))
    return;
  if (b.num_tokens > 0 && b.max_seqlen == 1) {
    // Every sequence is one token: softmax over its single key is exactly 1,
    // so each query head's output is its kv head's v row (one copy; flash
    // would take its split-KV decode path: several kernels per call).
    const int64_t n = b.num_tokens, hkv = k.size(1), group = q.size(1) / hkv;
    out.narrow(0, 0, n).unflatten(1, {hkv, group}).copy_(v.narrow(0, 0, n).unsqueeze(2));
  } else if (b.num_tokens > 0) {
    bool flashed = false;
    if (use_flash(q, v) && (b.num_seqs == 1 || (b.flags & kFlagVarlen))) {
      try {
        flash(q, k, v, out, b, scale, window_left);
        flashed = true;
      } catch (const c10::OutOfMemoryError&) {
        throw;
      } catch (const c10::Error&) {
        flash_unavailable.store(true, std::memory_order_relaxed);  // SDPA below computes it
      }
    }
    if (!flashed) {
      for (int64_t i = 0; i < b.num_seqs; ++i) {
        const int64_t a = b.cu[i], len = b.cu[i + 1] - b.cu[i];
        if (len == 0) continue;
        out.narrow(0, a, len).copy_(sdpa_one(q.narrow(0, a, len), k.narrow(0, a, len),
                                             v.narrow(0, a, len), scale, window_left));
      }
    }
  }
  if (b.num_tokens < rows) out.narrow(0, b.num_tokens, rows - b.num_tokens).zero_();
}

void register_short_attention(ShortAttentionFn fn) {
  short_attention.store(fn, std::memory_order_relaxed);
}

// ---- pcg::causal_attention_graph: the batch in device memory ------------------
// The same attention for batches whose sequences are at most
// kShortAttnMaxSeqlen tokens, reading [num_tokens, num_seqs, cu_seqlens...]
// (int32, on q's device) when it runs, so a CUDA graph that captured it
// follows the batch its owner writes there before each replay: attention stays
// inside the graph. CUDA: the short-sequence kernel (it cannot check the batch
// without a synchronisation: rows of a longer sequence come out NaN); CPU: the
// batch is checked, then computed as causal_attention_out.
namespace {

constexpr const char* kGraphOp = "causal_attention_graph";
std::atomic<GraphAttentionFn> graph_attention{nullptr};

void check_graph_batch(const at::Tensor& q, const at::Tensor& batch) {
  PCG_CHECK_ARG(kGraphOp, "batch", batch.scalar_type() == at::kInt && batch.dim() == 1 &&
                    batch.is_contiguous() && batch.numel() >= 3,
                "must be a contiguous 1-D int32 tensor [num_tokens, num_seqs, cu_seqlens...] "
                "of at least 3 values, got ", batch.scalar_type(), " with shape ", batch.sizes());
  check_device(kGraphOp, "batch", batch, q.device());
}

}  // namespace

void causal_attention_graph(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& out, const at::Tensor& batch,
                            std::optional<double> scale, int64_t window_left) {
  validate(q, k, v, out, window_left);
  check_scale(kGraphOp, scale);
  check_graph_batch(q, batch);
  if (q.is_cuda()) {
    const GraphAttentionFn fn = graph_attention.load(std::memory_order_relaxed);
    PCG_CHECK_ARG(kGraphOp, "q", fn != nullptr, "CUDA tensors need pcg's CUDA build");
    fn(q, k, v, out, batch, scale, window_left);
    return;
  }
  // CPU: check the batch as the kernel assumes it, then the reference path.
  const int32_t* b = batch.data_ptr<int32_t>();
  const int64_t num_tokens = b[0], num_seqs = b[1];
  const int32_t* cu = b + 2;
  PCG_CHECK_ARG(kGraphOp, "batch", num_tokens >= 0 && num_tokens <= q.size(0), "num_tokens ",
                num_tokens, " must be in [0, ", q.size(0), "] (the rows of q)");
  PCG_CHECK_ARG(kGraphOp, "batch", num_seqs >= 0 && num_seqs <= batch.numel() - 3,
                "num_seqs ", num_seqs, " must be in [0, ", batch.numel() - 3, "]");
  PCG_CHECK_ARG(kGraphOp, "batch", cu[0] == 0 && cu[num_seqs] == num_tokens,
                "cu_seqlens must run from 0 to num_tokens ", num_tokens, ", got ", cu[0], " .. ",
                cu[num_seqs]);
  auto meta = at::empty({kMetaHead + num_seqs + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* m = meta.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t i = 0; i <= num_seqs; ++i) {
    m[kMetaHead + i] = cu[i];
    if (i == 0) continue;
    PCG_CHECK_ARG(kGraphOp, "batch", cu[i] >= cu[i - 1], "cu_seqlens must not decrease (at ",
                  i - 1, ")");
    longest = std::max<int64_t>(longest, cu[i] - cu[i - 1]);
  }
  PCG_CHECK_ARG(kGraphOp, "batch", longest <= kShortAttnMaxSeqlen, "sequences must be at most ",
                kShortAttnMaxSeqlen, " tokens, got one of ", longest);
  m[0] = num_tokens, m[1] = num_seqs, m[2] = longest, m[3] = 0;
  causal_attention_out(q, k, v, out, meta, scale, window_left);
}

void register_graph_attention(GraphAttentionFn fn) {
  graph_attention.store(fn, std::memory_order_relaxed);
}

TORCH_LIBRARY_IMPL(pcg, CPU, m) {
  m.impl("causal_attention_out", &causal_attention_out);
  m.impl("causal_attention_graph", &causal_attention_graph);
}
TORCH_LIBRARY_IMPL(pcg, CUDA, m) {
  m.impl("causal_attention_out", &causal_attention_out);
  m.impl("causal_attention_graph", &causal_attention_graph);
}

}  // namespace pcg
