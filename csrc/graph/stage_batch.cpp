// pcg::stage_batch: argument checks (shared with the CUDA launcher) and the
// CPU kernel (same contract, plain loops).
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <limits>

#include "common/check.h"
#include "graph/stage_batch.h"
#include "graph/stage_batch_op.h"

namespace pcg {
namespace {
constexpr const char* kOp = "stage_batch";

// The kernel reads and writes in parallel: a source may be its own
// destination (the same view: a harmless self-copy) but must otherwise not
// share memory with it, nor with another destination; strided views whose
// overlap cannot be decided are refused too.
void check_copy(const char* arg, const at::Tensor& src, const char* dst_name, const at::Tensor& dst) {
  if (src.numel() == 0 || at::get_overlap_status(src, dst) == at::MemOverlapStatus::Full) return;
  PCG_CHECK_ARG(kOp, arg, !may_overlap(src, dst), "must be ", dst_name,
                " itself or share no memory with it");
}

void check_apart(const char* arg, const at::Tensor& a, const char* other, const at::Tensor& b) {
  PCG_CHECK_ARG(kOp, arg, !may_overlap(a, b), "must share no memory with ", other);
}

void check_static(const char* arg, const at::Tensor& t, c10::ScalarType dt, const c10::Device& dev) {
  check_dim(kOp, arg, t, 1);
  check_dtype(kOp, arg, t, dt);
  check_device(kOp, arg, t, dev);
  PCG_CHECK_ARG(kOp, arg, t.is_contiguous(), "must be contiguous (the graphs read it in place)");
}
}  // namespace

void check_stage_batch(const at::Tensor& ids, const std::optional<at::Tensor>& positions,
                       const at::Tensor& static_ids, const at::Tensor& static_pos,
                       const at::Tensor& batch, c10::IntArrayRef values) {
  const c10::Device dev = static_ids.device();
  check_dim(kOp, "ids", ids, 1);
  check_dtype(kOp, "ids", ids, at::kLong);
  check_device(kOp, "ids", ids, dev);
  check_static("static_ids", static_ids, at::kLong, dev);
  check_static("static_pos", static_pos, at::kLong, dev);
  check_static("batch", batch, at::kInt, dev);
  const int64_t n = ids.size(0);
  PCG_CHECK_ARG(kOp, "ids", n <= static_ids.size(0), "has ", n, " tokens; static_ids holds ",
                static_ids.size(0));
  check_apart("static_pos", static_pos, "static_ids", static_ids);
  check_apart("batch", batch, "static_ids", static_ids);
  check_apart("batch", batch, "static_pos", static_pos);
  check_copy("ids", ids, "static_ids", static_ids.narrow(0, 0, n));
  check_apart("ids", ids, "static_pos", static_pos);
  check_apart("ids", ids, "batch", batch);
  if (positions.has_value()) {
    check_dim(kOp, "positions", *positions, 1);
    check_dtype(kOp, "positions", *positions, at::kLong);
    check_device(kOp, "positions", *positions, dev);
    PCG_CHECK_ARG(kOp, "positions", positions->size(0) == n, "must have one position per id (", n,
                  "), got shape ", positions->sizes());
    PCG_CHECK_ARG(kOp, "positions", n <= static_pos.size(0), "has ", n,
                  " tokens; static_pos holds ", static_pos.size(0));
    check_copy("positions", *positions, "static_pos", static_pos.narrow(0, 0, n));
    check_apart("positions", *positions, "static_ids", static_ids);
    check_apart("positions", *positions, "batch", batch);
  }
  const auto nv = static_cast<int64_t>(values.size());
  PCG_CHECK_ARG(kOp, "values", nv <= kStageMaxValues, "takes at most ", kStageMaxValues,
                " values, got ", nv);
  PCG_CHECK_ARG(kOp, "values", nv <= batch.size(0), "has ", nv, " values; batch holds ",
                batch.size(0));
  for (int64_t v : values) {
    PCG_CHECK_ARG(kOp, "values", v >= std::numeric_limits<int32_t>::min() &&
                                     v <= std::numeric_limits<int32_t>::max(),
                  "must fit in int32, got ", v);
  }
}

void stage_batch_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& positions,
                     const at::Tensor& static_ids, const at::Tensor& static_pos, const at::Tensor& batch,
                     c10::IntArrayRef values) {
  check_stage_batch(ids, positions, static_ids, static_pos, batch, values);
  const int64_t n = ids.size(0);
  auto src = ids.accessor<int64_t, 1>();
  int64_t* dst = static_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  if (positions.has_value()) {
    auto ps = positions->accessor<int64_t, 1>();
    int64_t* pd = static_pos.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) pd[i] = ps[i];
  }
  int32_t* b = batch.data_ptr<int32_t>();
  for (size_t i = 0; i < values.size(); ++i) b[i] = static_cast<int32_t>(values[i]);
}

TORCH_LIBRARY_IMPL(pcg, CPU, m) { m.impl("stage_batch", &stage_batch_cpu); }

}  // namespace pcg
