// Argument validation of pcg::ep_dispatch / pcg::ep_combine, shared by the
// CPU and CUDA launchers (defined in ep_cpu.cpp). Order: device, dtype,
// shape, contiguity of the outputs. Inputs are made contiguous into `keep`.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "moe/ep_kernels.h"

namespace pcg {

ep::DispatchParams ep_dispatch_prepare(const at::Tensor& hidden, const at::Tensor& topk_weights,
                                       const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                                       const at::Tensor& expert_local,
                                       const std::optional<at::Tensor>& num_valid,
                                       const at::Tensor& send_hidden, const at::Tensor& send_meta,
                                       const at::Tensor& slot_map, const at::Tensor& counts,
                                       std::vector<at::Tensor>& keep);

// Peer-mapped variant: W = peer_ptrs.size(0); no send buffers.
ep::DispatchParams ep_dispatch_peer_prepare(
    const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
    const at::Tensor& expert_rank, const at::Tensor& expert_local,
    const std::optional<at::Tensor>& num_valid, const at::Tensor& peer_ptrs, int64_t rank,
    int64_t capacity, int64_t hidden_offset, int64_t meta_offset, const at::Tensor& slot_map,
    const at::Tensor& counts, std::vector<at::Tensor>& keep);

ep::ReturnParams ep_return_peer_prepare(const at::Tensor& y, const at::Tensor& meta,
                                        const at::Tensor& peer_ptrs, int64_t rank,
                                        int64_t back_offset, std::vector<at::Tensor>& keep);

ep::CombineParams ep_combine_prepare(const at::Tensor& recv, const at::Tensor& slot_map,
                                     const at::Tensor& out, int64_t max_ranks,
                                     std::vector<at::Tensor>& keep);

}  // namespace pcg
