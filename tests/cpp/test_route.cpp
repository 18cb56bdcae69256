// pcg::route through the dispatcher, as a C++ caller would use it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace {

using RouteFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view,
                                                   bool, const std::optional<at::Tensor>&,
                                                   int64_t, int64_t, double);

std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t k,
                                         c10::string_view scoring = "softmax",
                                         bool renormalize = true,
                                         const std::optional<at::Tensor>& bias = std::nullopt,
                                         int64_t groups = 1, int64_t topk_groups = 1,
                                         double scale = 1.0) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pcg::route", "").typed<RouteFn>();
  return op.call(logits, k, scoring, renormalize, bias, groups, topk_groups, scale);
}

void expect_ids(const at::Tensor& ids, std::initializer_list<int> want) {
  ASSERT_EQ(ids.scalar_type(), at::kInt);
  ASSERT_EQ(ids.numel(), static_cast<int64_t>(want.size()));
  int n = 0;
  for (int v : want) EXPECT_EQ(ids.flatten()[n++].item<int>(), v) << "position " << n - 1;
}

void expect_weights(const at::Tensor& w, std::initializer_list<float> want) {
  ASSERT_EQ(w.scalar_type(), at::kFloat);
  ASSERT_EQ(w.numel(), static_cast<int64_t>(want.size()));
  int n = 0;
  for (float v : want) EXPECT_NEAR(w.flatten()[n++].item<float>(), v, 1e-6) << "position " << n - 1;
}

TEST(Route, SoftmaxByHand) {
  // exp(logits) = 1, 3, 2, 3: scores 1/9, 3/9, 2/9, 3/9; experts 1 and 3 tie -> 1 first.
  auto logits = at::tensor({0.0f, std::log(3.0f), std::log(2.0f), std::log(3.0f)}).view({1, 4});
  auto [w, ids] = route(logits, 2);
  expect_ids(ids, {1, 3});
  expect_weights(w, {0.5f, 0.5f});
  auto [w2, ids2] = route(logits, 3, "softmax", /*renormalize=*/false, std::nullopt, 1, 1, 2.0);
  expect_ids(ids2, {1, 3, 2});
  expect_weights(w2, {2.0f / 3, 2.0f / 3, 4.0f / 9});
}

TEST(Route, GroupedSigmoidByHand) {
  // Scores all 0.5; sel = 0.6 0.5 | 0.8 0.7. Groups score 1.1 and 1.5: keep group 1.
  auto logits = at::zeros({2, 4});
  auto bias = at::tensor({0.1f, 0.0f, 0.3f, 0.2f});
  auto [w, ids] = route(logits, 2, "sigmoid", true, bias, 2, 1, 1.0);
  EXPECT_EQ(w.sizes(), (at::IntArrayRef{2, 2}));
  expect_ids(ids, {2, 3, 2, 3});
  expect_weights(w, {0.5f, 0.5f, 0.5f, 0.5f});
}

TEST(Route, BadTopKThrows) {
  auto logits = at::zeros({2, 4});
  EXPECT_THROW(route(logits, 0), c10::Error);
  try {
    route(logits, 5);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("argument 'top_k'"), std::string::npos) << e.what();
  }
}

#ifdef PCG_WITH_CUDA
TEST(Route, CudaMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(0);
  auto logits = at::randn({300, 256}).to(at::kBFloat16);
  auto bias = 0.1 * at::randn({256});
  auto cpu = route(logits, 8, "sigmoid", true, bias, 8, 4, 2.5);
  auto cuda = route(logits.cuda(), 8, "sigmoid", true, bias.cuda(), 8, 4, 2.5);
  EXPECT_TRUE(at::equal(std::get<1>(cuda).cpu(), std::get<1>(cpu)));
  EXPECT_TRUE(at::allclose(std::get<0>(cuda).cpu(), std::get<0>(cpu), 0.0, 1e-6));
}
#endif

}  // namespace
