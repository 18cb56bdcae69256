// weak_ref_tensor and stage_batch through the dispatcher, and (with CUDA) a
// SegmentChain captured and replayed from C++: graph, recorded split call,
// graph; and a replay staged by stage_batch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <optional>
#include <vector>

#ifdef PCG_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "graph/segment_chain.h"
#endif

namespace {

at::Tensor weak_ref(const at::Tensor& t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pcg::weak_ref_tensor", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(t);
}

TEST(WeakRef, AliasesWithoutOwning) {
  at::Tensor base = at::randn({6, 5});
  at::Tensor t = base.slice(1, 1, 4);
  at::Tensor w = weak_ref(t);
  EXPECT_EQ(w.data_ptr(), t.data_ptr());
  EXPECT_EQ(w.sizes(), t.sizes());
  EXPECT_EQ(w.strides(), t.strides());
  EXPECT_TRUE(at::equal(w, t));
  // The weak tensor holds its own storage object: the owner's use count is unchanged.
  auto uses = base.storage().use_count();
  at::Tensor w2 = weak_ref(base);
  EXPECT_EQ(base.storage().use_count(), uses);
  EXPECT_NE(w2.storage().unsafeGetStorageImpl(), base.storage().unsafeGetStorageImpl());
}

void stage_batch(const at::Tensor& ids, const std::optional<at::Tensor>& pos, const at::Tensor& static_ids,
                 const at::Tensor& static_pos, const at::Tensor& batch, std::vector<int64_t> values) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pcg::stage_batch", "")
                       .typed<void(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, c10::IntArrayRef)>();
  op.call(ids, pos, static_ids, static_pos, batch, values);
}

TEST(StageBatch, WritesIdsPositionsAndValues) {
  at::Tensor src = at::arange(14, at::kLong);
  at::Tensor ids = src.slice(0, 0, 14, 2);  // 7 ids, stride 2
  at::Tensor pos = at::arange(7, at::kLong) + 40;
  at::Tensor static_ids = at::full({11}, -1, at::kLong);
  at::Tensor static_pos = at::full({11}, -2, at::kLong);
  at::Tensor batch = at::full({5}, -3, at::kInt);
  stage_batch(ids, pos, static_ids, static_pos, batch, {7, 1, 0, 7});
  EXPECT_TRUE(at::equal(static_ids.slice(0, 0, 7), ids));
  EXPECT_EQ(static_ids[7].item<int64_t>(), -1);
  EXPECT_TRUE(at::equal(static_pos.slice(0, 0, 7), pos));
  EXPECT_TRUE(at::equal(batch, at::tensor({7, 1, 0, 7, -3}, at::kInt)));
  stage_batch(ids.slice(0, 0, 3), std::nullopt, static_ids, static_pos, batch, {3});
  EXPECT_EQ(static_pos[0].item<int64_t>(), 40);  // positions left as they were
  EXPECT_EQ(batch[0].item<int32_t>(), 3);
  EXPECT_THROW(stage_batch(at::zeros({12}, at::kLong), std::nullopt, static_ids, static_pos, batch, {}),
               c10::ValueError);
}

#ifdef PCG_WITH_CUDA
TEST(SegmentChain, ReplayStagedReadsTheNewInputs) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::Tensor static_ids = at::zeros({16}, at::dtype(at::kLong).device(at::kCUDA));
  at::Tensor static_pos = at::arange(16, at::dtype(at::kLong).device(at::kCUDA));
  at::Tensor batch = at::zeros({4}, at::dtype(at::kInt).device(at::kCUDA));
  auto chain = c10::make_intrusive<pcg::SegmentChain>();
  auto side = c10::cuda::getStreamFromPool();
  at::Tensor y;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    chain->capture_begin(0, 0);
    // rows >= num_valid (batch[0]) masked to zero, as the graphs of a bucket do
    at::Tensor keep = at::arange(16, static_ids.options()) < batch.slice(0, 0, 1).to(at::kLong);
    y = (static_ids * 2 + static_pos) * keep;
    chain->capture_end();
  }
  at::cuda::getCurrentCUDAStream().synchronize();
  for (int64_t n : {5, 16, 1}) {
    at::Tensor ids = at::randint(0, 1000, {n}, static_ids.options());
    chain->replay_staged(ids, std::nullopt, static_ids, static_pos, batch, {n});
    at::cuda::getCurrentCUDAStream().synchronize();
    at::Tensor expect = at::zeros({16}, static_ids.options());
    expect.slice(0, 0, n).copy_(ids * 2 + at::arange(n, static_ids.options()));
    EXPECT_TRUE(at::equal(y, expect)) << "n = " << n;
  }
}

TEST(SegmentChain, CapturesAndReplaysAroundARecordedCall) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::Tensor x = at::randn({1000}, at::kCUDA);
  at::Tensor b = at::randn({1000}, at::kCUDA);
  auto pcg_chain = c10::make_intrusive<pcg::SegmentChain>();
  auto side = c10::cuda::getStreamFromPool();
  at::Tensor y;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    pcg_chain->capture_begin(0, 0);  // {0,0}: a new private pool
    at::Tensor a = x * 2;            // segment 0
    pcg_chain->capture_end();
    // split call between the segments: a += b, eagerly at replay
    pcg_chain->record_call("aten::add_.Tensor", {weak_ref(a), weak_ref(b), c10::IValue(1.0)});
    a.add_(b);
    pcg_chain->capture_begin(0, 0);
    y = a * 3;                       // segment 1
    pcg_chain->capture_end();
  }
  at::cuda::getCurrentCUDAStream().synchronize();
  EXPECT_EQ(pcg_chain->num_graphs(), 2);
  EXPECT_EQ(pcg_chain->num_calls(), 1);
  for (int i = 0; i < 3; ++i) {
    x.copy_(at::randn({1000}, at::kCUDA));
    pcg_chain->replay();
    at::cuda::getCurrentCUDAStream().synchronize();
    EXPECT_TRUE(at::allclose(y, (x * 2 + b) * 3));
  }
}
#endif

}  // namespace
