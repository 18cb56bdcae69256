// weak_ref_tensor through the dispatcher, and (with CUDA) a SegmentChain
// captured and replayed from C++: graph, recorded split call, graph.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

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

#ifdef PCG_WITH_CUDA
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
