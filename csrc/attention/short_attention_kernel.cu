// Short-sequence causal attention: one warp per (row, q head), 4 warps a block.
//
//   1. find the row's sequence start (binary search over the by-value starts);
//   2. q row -> shared memory as fp32;
//   3. scores: lane l takes keys l and l + 32 of the visible range (<= 64
//      keys), a whole D-dot product each, so every score is in a register;
//   4. softmax: warp max, exp2, warp sum (no online rescaling needed);
//   5. P.V: lanes split Dv into 16-byte chunks; lanes left over take every
//      s-th key (s "slices"), then the slices are summed with shuffles.
// Pad rows (>= num_tokens) only store zeros. No shared state between warps, no
// block barrier, no host synchronisation: the launch is graph-capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/short_attention.h"
#include "common/float_convert.cuh"

namespace pcg {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kVec = 8;  // 2-byte elements per 16-byte access
constexpr int kKeysPerLane = static_cast<int>(kShortAttnMaxSeqlen) / kWarp;
constexpr int kMaxD = static_cast<int>(kShortAttnMaxHeadDim);
static_assert(kShortAttnMaxSeqlen % kWarp == 0, "keys are spread evenly over the lanes");
static_assert(kMaxD % kVec == 0 && kMaxD / kVec <= kWarp, "one 16-byte chunk per lane covers a row");

template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&f)[kVec]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) f[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&f)[kVec]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) e[i] = from_float<T>(f[i]);
  *reinterpret_cast<uint4*>(dst) = raw;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
}

// Start of the sequence holding `row` (< num_tokens): the largest start <= row.
// Empty sequences repeat a start, which changes nothing. __grid_constant__
// lets us index the parameter array without a local-memory copy.
__device__ __forceinline__ int sequence_start(const int32_t* cu, int num_seqs, int row) {
  int lo = 0, hi = num_seqs;  // cu[lo] <= row < cu[hi] == num_tokens
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu[mid] <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return cu[lo];
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
    short_attention_kernel(const __grid_constant__ ShortAttnParams p) {
  __shared__ __align__(16) float q_smem[kWarpsPerBlock][kMaxD];
  __shared__ float p_smem[kWarpsPerBlock][kShortAttnMaxSeqlen];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (task >= static_cast<int64_t>(p.rows) * p.hq) return;  // whole warp: no barrier below
  const int row = static_cast<int>(task / p.hq), head = static_cast<int>(task % p.hq);
  T* out = static_cast<T*>(p.out) + row * p.o_row + head * p.o_head;
  const int chunks = p.dv / kVec;  // 16-byte chunks of an output row, <= 32

  // The batch: by value, or (captured launches) read from device memory.
  int num_tokens = p.num_tokens, num_seqs = p.num_seqs;
  const int32_t* cu = p.cu;
  if (p.device_batch != nullptr) {
    num_tokens = min(max(p.device_batch[0], 0), p.rows);
    num_seqs = min(max(p.device_batch[1], 0), p.batch_capacity);
    cu = p.device_batch + 2;
  }

  if (row >= num_tokens) {  // pad row
    float zero[kVec] = {};
    if (lane < chunks) store8(out + lane * kVec, zero);
    return;
  }

  const int start = num_seqs > 0 ? sequence_start(cu, num_seqs, row) : row + 1;
  const int first = p.window_left < 0 ? start : max(start, row - p.window_left);
  const int n = row - first + 1;  // visible keys: first..row, 1..64
  if (start < 0 || n < 1 || n > kShortAttnMaxSeqlen) {
    // Only a device batch breaking its contract gets here: visible, not silent.
    float nan[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) nan[i] = __int_as_float(0x7fc00000);
    if (lane < chunks) store8(out + lane * kVec, nan);
    return;
  }
  const int kvh = head / p.group;
  const T* k = static_cast<const T*>(p.k) + first * p.k_row + kvh * p.k_head;
  const T* v = static_cast<const T*>(p.v) + first * p.v_row + kvh * p.v_head;
  float* p_row = p_smem[warp];

  float denom = 1.0f;
  if (n == 1) {
    // One key: its weight is exactly 1 (all-one-token batches are a copy of v).
    if (lane == 0) p_row[0] = 1.0f;
  } else {
    float* qs = q_smem[warp];
    const T* q = static_cast<const T*>(p.q) + row * p.q_row + head * p.q_head;
    if (lane < p.d / kVec) {
      float f[kVec];
      load8(q + lane * kVec, f);
#pragma unroll
      for (int i = 0; i < kVec; ++i) qs[lane * kVec + i] = f[i];
    }
    __syncwarp();

    float s[kKeysPerLane];
#pragma unroll
    for (int r = 0; r < kKeysPerLane; ++r) {
      const int j = lane + r * kWarp;
      s[r] = -__int_as_float(0x7f800000);  // -inf: not visible
      if (j < n) {
        const T* kj = k + j * p.k_row;
        float acc[kVec] = {};  // independent chains: the FMAs overlap
#pragma unroll 4
        for (int c = 0; c < p.d; c += kVec) {
          float f[kVec];
          load8(kj + c, f);
          const float4 a = *reinterpret_cast<const float4*>(qs + c);
          const float4 b = *reinterpret_cast<const float4*>(qs + c + 4);
          acc[0] = fmaf(a.x, f[0], acc[0]);
          acc[1] = fmaf(a.y, f[1], acc[1]);
          acc[2] = fmaf(a.z, f[2], acc[2]);
          acc[3] = fmaf(a.w, f[3], acc[3]);
          acc[4] = fmaf(b.x, f[4], acc[4]);
          acc[5] = fmaf(b.y, f[5], acc[5]);
          acc[6] = fmaf(b.z, f[6], acc[6]);
          acc[7] = fmaf(b.w, f[7], acc[7]);
        }
        const float dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                          ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        s[r] = dot * p.scale_log2;  // log2 domain: exp2 below
      }
    }
    float mx = s[0];
#pragma unroll
    for (int r = 1; r < kKeysPerLane; ++r) mx = fmaxf(mx, s[r]);
    mx = warp_max(mx);  // finite: key 0 (lane 0) is always visible
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kKeysPerLane; ++r) {
      const int j = lane + r * kWarp;
      const float e = j < n ? exp2f(s[r] - mx) : 0.0f;
      if (j < n) p_row[j] = e;
      sum += e;
    }
    denom = warp_sum(sum);  // >= 1: the max key contributes exp2(0)
  }
  __syncwarp();

  // P.V: lane = slice * chunks + chunk; slice s takes keys s, s + slices, ...
  int slices = 1;
  while (slices * 2 * chunks <= kWarp) slices *= 2;
  const int chunk = lane % chunks, slice = lane / chunks;
  float acc[kVec] = {};
  if (slice < slices) {
#pragma unroll 4
    for (int j = slice; j < n; j += slices) {
      const float w = p_row[j];
      float f[kVec];
      load8(v + j * p.v_row + chunk * kVec, f);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = fmaf(w, f[i], acc[i]);
    }
  }
  // Fold slice s + h into slice s; the source lane of every slice < h is active.
  for (int h = slices / 2; h >= 1; h /= 2) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] += __shfl_down_sync(kFull, acc[i], h * chunks);
  }
  if (slice == 0) {
    const float inv = 1.0f / denom;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] *= inv;
    store8(out + chunk * kVec, acc);
  }
}

}  // namespace

void short_attention_cuda(const ShortAttnParams& p, CUstream_st* stream) {
  const int64_t tasks = static_cast<int64_t>(p.rows) * p.hq;
  if (tasks == 0) return;
  const dim3 grid(static_cast<unsigned>((tasks + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * kWarp);
  switch (p.dtype) {
    case ShortAttnDtype::kBFloat16:
      short_attention_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(p);
      break;
    case ShortAttnDtype::kFloat16:
      short_attention_kernel<__half><<<grid, block, 0, stream>>>(p);
      break;
  }
}

}  // namespace pcg
