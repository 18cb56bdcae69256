// pcg::stage_batch's argument checks and its per-backend kernels (the torch
// side; the CUDA kernel's own header is stage_batch.h). SegmentChain calls
// the CUDA one directly, without a trip through the dispatcher.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pcg {

// Validates the arguments (every error names the argument).
void check_stage_batch(const at::Tensor& ids, const std::optional<at::Tensor>& positions,
                       const at::Tensor& static_ids, const at::Tensor& static_pos,
                       const at::Tensor& batch, c10::IntArrayRef values);

void stage_batch_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& positions,
                     const at::Tensor& static_ids, const at::Tensor& static_pos, const at::Tensor& batch,
                     c10::IntArrayRef values);

void stage_batch_cuda(const at::Tensor& ids, const std::optional<at::Tensor>& positions,
                      const at::Tensor& static_ids, const at::Tensor& static_pos, const at::Tensor& batch,
                      c10::IntArrayRef values);

}  // namespace pcg
