// CUDA kernel of pcg::stage_batch (stage_batch.h): a grid-stride copy of the
// ids (and positions) into the static buffers; block 0 also writes the batch
// values from the kernel parameters.
#include <cuda_runtime.h>

#include "graph/stage_batch.h"

namespace pcg {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 64;  // a few MB/s of ids at most: latency, not bandwidth

__global__ void stage_batch_kernel(const StageBatchParams p) {
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < p.num_values; i += blockDim.x) p.batch[i] = p.values[i];
  }
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += step) {
    p.static_ids[i] = p.ids[i * p.ids_stride];
    if (p.positions != nullptr) p.static_pos[i] = p.positions[i * p.pos_stride];
  }
}

}  // namespace

int launch_stage_batch(const StageBatchParams& p, CUstream_st* stream) {
  int64_t blocks = (p.n + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
  stage_batch_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace pcg
