// pcg::stage_batch: one launch that writes a replay's inputs into the static
// buffers its graphs read (token ids, optional positions, and a few int32 batch
// values such as num_valid and the sequence starts). Torch-free on purpose:
// the .cu file includes only this header.
//
// Why a kernel: a replay used to stage with a copy, a fill and (for attention
// inside the graph) a pinned host-to-device copy, three ops on the host's
// critical path before the first graph can start. The values travel by value
// in the kernel parameters, so nothing is allocated or pinned per call and the
// launch is capturable.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace pcg {

// int32 values per launch (kernel parameters hold 4 KiB on every target).
constexpr int64_t kStageMaxValues = 256;

struct StageBatchParams {
  const int64_t* ids = nullptr;        // [n], stride ids_stride (elements)
  const int64_t* positions = nullptr;  // [n], stride pos_stride; nullptr: leave static_pos
  int64_t* static_ids = nullptr;       // [>= n], contiguous
  int64_t* static_pos = nullptr;       // [>= n], contiguous
  int32_t* batch = nullptr;            // [>= num_values], contiguous
  int64_t n = 0;
  int64_t ids_stride = 1;
  int64_t pos_stride = 1;
  int32_t num_values = 0;  // <= kStageMaxValues
  int32_t values[kStageMaxValues] = {};
};

// Launches the staging kernel on `stream` (returns the launch's cudaError_t as int).
int launch_stage_batch(const StageBatchParams& p, CUstream_st* stream);

}  // namespace pcg
