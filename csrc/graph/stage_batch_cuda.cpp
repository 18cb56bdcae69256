// CUDA launcher of pcg::stage_batch: validate, fill the by-value params, one
// launch on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "graph/stage_batch.h"
#include "graph/stage_batch_op.h"

namespace pcg {

void stage_batch_cuda(const at::Tensor& ids, const std::optional<at::Tensor>& positions,
                      const at::Tensor& static_ids, const at::Tensor& static_pos, const at::Tensor& batch,
                      c10::IntArrayRef values) {
  check_stage_batch(ids, positions, static_ids, static_pos, batch, values);
  const c10::cuda::CUDAGuard guard(static_ids.device());
  StageBatchParams p;
  p.n = ids.size(0);
  p.ids = ids.data_ptr<int64_t>();
  p.ids_stride = ids.stride(0);
  if (positions.has_value()) {
    p.positions = positions->data_ptr<int64_t>();
    p.pos_stride = positions->stride(0);
  }
  p.static_ids = static_ids.data_ptr<int64_t>();
  p.static_pos = static_pos.data_ptr<int64_t>();
  p.batch = batch.data_ptr<int32_t>();
  p.num_values = static_cast<int32_t>(values.size());
  for (size_t i = 0; i < values.size(); ++i) p.values[i] = static_cast<int32_t>(values[i]);
  if (p.n == 0 && p.num_values == 0) return;
  C10_CUDA_CHECK(static_cast<cudaError_t>(launch_stage_batch(p, at::cuda::getCurrentCUDAStream())));
}

TORCH_LIBRARY_IMPL(pcg, CUDA, m) { m.impl("stage_batch", &stage_batch_cuda); }

}  // namespace pcg
