// pcg::ep_dispatch / pcg::ep_combine CUDA launchers: validation shared with
// the CPU path (ep_cpu.cpp), then kernel launches on the current stream. No
// host synchronisation (num_valid is read on the device): graph-capturable.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/check.h"
#include "moe/ep_args.h"
#include "moe/ep_kernels.h"

namespace pcg {
namespace {

// Per-tile slot counts the CUDA dispatch needs when T spans several tiles
// (allocated on the current stream: inside a capture it comes from the
// graph's pool, like every other buffer of the captured call).
void attach_tile_counts(const char* op, ep::DispatchParams& p, const at::Tensor& like,
                        std::vector<at::Tensor>& keep) {
  PCG_CHECK_ARG(op, "expert_rank", p.W <= ep::kMaxRanksCuda,
                "the CUDA kernels support up to ", ep::kMaxRanksCuda, " ranks, got W = ", p.W);
  const int64_t tiles = ep::dispatch_tiles(p.T);
  if (tiles == 1) return;
  keep.push_back(at::empty({tiles * p.W}, like.options().dtype(at::kInt)));
  p.tile_counts = keep.back().data_ptr<int32_t>();
}

void ep_dispatch_cuda_op(const at::Tensor& hidden, const at::Tensor& topk_weights,
                         const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                         const at::Tensor& expert_local, const std::optional<at::Tensor>& num_valid,
                         const at::Tensor& send_hidden, const at::Tensor& send_meta,
                         const at::Tensor& slot_map, const at::Tensor& counts) {
  // A CPU hidden with CUDA buffers also dispatches here: name the misplaced one.
  check_device("ep_dispatch", "hidden", hidden, send_hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  std::vector<at::Tensor> keep;
  ep::DispatchParams p =
      ep_dispatch_prepare(hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid,
                          send_hidden, send_meta, slot_map, counts, keep);
  attach_tile_counts("ep_dispatch", p, slot_map, keep);
  ep::dispatch_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ep_dispatch_peer_cuda_op(const at::Tensor& hidden, const at::Tensor& topk_weights,
                              const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                              const at::Tensor& expert_local,
                              const std::optional<at::Tensor>& num_valid,
                              const at::Tensor& peer_ptrs, int64_t rank, int64_t capacity,
                              int64_t hidden_offset, int64_t meta_offset,
                              const at::Tensor& slot_map, const at::Tensor& counts) {
  check_device("ep_dispatch_peer", "hidden", hidden, peer_ptrs.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  std::vector<at::Tensor> keep;
  ep::DispatchParams p = ep_dispatch_peer_prepare(
      hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid, peer_ptrs, rank,
      capacity, hidden_offset, meta_offset, slot_map, counts, keep);
  attach_tile_counts("ep_dispatch_peer", p, slot_map, keep);
  ep::dispatch_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ep_return_peer_cuda_op(const at::Tensor& y, const at::Tensor& meta, const at::Tensor& peer_ptrs,
                            int64_t rank, int64_t back_offset) {
  check_device("ep_return_peer", "y", y, peer_ptrs.device());
  const c10::cuda::CUDAGuard guard(y.device());
  std::vector<at::Tensor> keep;
  const ep::ReturnParams p = ep_return_peer_prepare(y, meta, peer_ptrs, rank, back_offset, keep);
  ep::return_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ep_combine_cuda_op(const at::Tensor& recv, const at::Tensor& slot_map, const at::Tensor& out) {
  check_device("ep_combine", "recv", recv, out.device());
  const c10::cuda::CUDAGuard guard(recv.device());
  std::vector<at::Tensor> keep;
  const ep::CombineParams p = ep_combine_prepare(recv, slot_map, out, ep::kMaxRanksCuda, keep);
  if (p.T == 0 || p.H == 0) return;
  ep::combine_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(pcg, CUDA, m) {
  m.impl("ep_dispatch", &ep_dispatch_cuda_op);
  m.impl("ep_combine", &ep_combine_cuda_op);
  m.impl("ep_dispatch_peer", &ep_dispatch_peer_cuda_op);
  m.impl("ep_return_peer", &ep_return_peer_cuda_op);
}

}  // namespace pcg
