// pcg::causal_attention_out through the dispatcher, as a C++ runtime would call
// it between graph replays: the metadata tensor is rewritten between calls.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

using AttnFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                    const at::Tensor&, std::optional<double>, int64_t);

void causal_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, const at::Tensor& meta, int64_t window_left = -1) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pcg::causal_attention_out", "")
                       .typed<AttnFn>();
  op.call(q, k, v, out, meta, std::nullopt, window_left);
}

// [num_tokens, num_seqs, max_seqlen, flags, cu...] for the sequence starts `cu`.
void write_meta(at::Tensor& meta, const std::vector<int64_t>& cu, int64_t flags = 1) {
  auto* m = meta.data_ptr<int64_t>();
  int64_t longest = 0;
  for (size_t i = 1; i < cu.size(); ++i) longest = std::max(longest, cu[i] - cu[i - 1]);
  m[0] = cu.back();
  m[1] = static_cast<int64_t>(cu.size()) - 1;
  m[2] = longest;
  m[3] = flags;
  for (size_t i = 0; i < cu.size(); ++i) m[4 + i] = cu[i];
}

// Softmax attention per sequence with explicit loops (double), GQA by head group.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<int64_t>& cu, int64_t rows, int64_t window_left) {
  const int64_t hq = q.size(1), group = hq / k.size(1), d = q.size(2), dv = v.size(2);
  auto qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  auto out = at::zeros({rows, hq, dv}, at::kDouble);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    for (int64_t i = cu[s]; i < cu[s + 1]; ++i) {
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t lo = window_left < 0 ? cu[s] : std::max(cu[s], i - window_left);
        auto keys = kd.narrow(0, lo, i - lo + 1).select(1, h / group);  // [n, d]
        auto vals = vd.narrow(0, lo, i - lo + 1).select(1, h / group);
        auto p = at::softmax(at::mv(keys, qd[i][h]) * scale, 0);
        out[i][h] = at::mv(vals.t(), p);
      }
    }
  }
  return out;
}

TEST(CausalAttention, MatchesReferenceAcrossRewrittenMetadata) {
  at::manual_seed(0);
  const int64_t rows = 19;
  auto q = at::randn({rows, 6, 16});
  auto k = at::randn({rows, 2, 16});
  auto v = at::randn({rows, 2, 12});
  auto out = at::full({rows, 6, 12}, NAN);
  auto meta = at::zeros({4 + rows + 1}, at::kLong);
  const std::vector<std::vector<int64_t>> batches = {{0, 19}, {0, 4, 5, 16}, {0, 1, 2, 3}, {0, 0, 7}};
  for (const auto& cu : batches) {
    for (int64_t window : {-1, 2}) {
      write_meta(meta, cu);
      causal_attention_out(q, k, v, out, meta, window);
      auto expect = reference(q, k, v, cu, rows, window);
      EXPECT_TRUE(at::allclose(out.to(at::kDouble), expect, 1e-5, 1e-5))
          << "cu ends at " << cu.back() << ", window " << window;
    }
  }
}

TEST(CausalAttention, RejectsBadMetadata) {
  auto q = at::randn({4, 2, 8});
  auto kv = at::randn({4, 1, 8});
  auto out = at::empty({4, 2, 8});
  auto meta = at::zeros({4 + 5}, at::kLong);
  write_meta(meta, {0, 5});  // more tokens than rows
  EXPECT_THROW(causal_attention_out(q, kv, kv, out, meta), c10::ValueError);
  auto wrong_dtype = meta.to(at::kInt);
  EXPECT_THROW(causal_attention_out(q, kv, kv, out, wrong_dtype), c10::ValueError);
}

// pcg::causal_attention_graph reads its batch from an int32 tensor
// [num_tokens, num_seqs, cu...] (on q's device): rewritten between calls here.
TEST(CausalAttention, GraphOpReadsTheBatchTensor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pcg::causal_attention_graph", "")
                       .typed<AttnFn>();
  at::manual_seed(1);
  const int64_t rows = 21;
  auto q = at::randn({rows, 4, 16});
  auto k = at::randn({rows, 2, 16});
  auto v = at::randn({rows, 2, 16});
  auto out = at::full({rows, 4, 16}, NAN);
  auto batch = at::zeros({3 + 8}, at::kInt);
  for (const auto& cu : std::vector<std::vector<int64_t>>{{0, 21}, {0, 3, 9, 20}, {0}}) {
    auto* b = batch.data_ptr<int32_t>();
    b[0] = static_cast<int32_t>(cu.back());
    b[1] = static_cast<int32_t>(cu.size()) - 1;
    for (size_t i = 0; i < cu.size(); ++i) b[2 + i] = static_cast<int32_t>(cu[i]);
    op.call(q, k, v, out, batch, std::nullopt, -1);
    EXPECT_TRUE(at::allclose(out.to(at::kDouble), reference(q, k, v, cu, rows, -1), 1e-5, 1e-5))
        << "cu ends at " << cu.back();
  }
  batch.data_ptr<int32_t>()[2] = 1;  // cu_seqlens must start at 0
  EXPECT_THROW(op.call(q, k, v, out, batch, std::nullopt, -1), c10::ValueError);
}

#ifdef PCG_WITH_CUDA
// bf16 batches of short sequences take the one-launch kernel (flags 1); flags
// 3 (bit 1) keeps them on flash. Both against the double reference, pad rows
// exact zeros (the C++ CUDA cases run only where ctest runs on a GPU).
TEST(CausalAttention, ShortKernelMatchesReferenceAndFlashOnCuda) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(0);
  const int64_t rows = 48;
  auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  auto q = at::randn({rows, 16, 128}).to(opts);
  auto k = at::randn({rows, 4, 128}).to(opts);
  auto v = at::randn({rows, 4, 128}).to(opts);
  auto meta = at::zeros({4 + rows + 1}, at::kLong);
  const std::vector<std::vector<int64_t>> batches = {
      {0, 48}, {0, 0, 1, 30, 31}, {0, 1, 2, 3}, {0, 17}, {0, 0}};
  for (const auto& cu : batches) {
    for (int64_t window : {-1, 5}) {
      at::Tensor outs[2];
      for (int64_t flags : {1, 3}) {
        auto out = at::full({rows, 16, 128}, NAN, opts);
        write_meta(meta, cu, flags);
        causal_attention_out(q, k, v, out, meta, window);
        auto expect = reference(q.cpu(), k.cpu(), v.cpu(), cu, rows, window);
        EXPECT_TRUE(at::allclose(out.cpu().to(at::kDouble), expect, 2e-2, 2e-2))
            << "cu ends at " << cu.back() << ", window " << window << ", flags " << flags;
        EXPECT_TRUE(out.narrow(0, cu.back(), rows - cu.back()).eq(0).all().item<bool>());
        outs[flags == 3] = out;
      }
      EXPECT_TRUE(at::allclose(outs[0].to(at::kFloat), outs[1].to(at::kFloat), 2e-2, 2e-2));
    }
  }
}
#endif

}  // namespace
