// Permute (hidden rows -> expert-sorted rows) and unpermute-reduce (sorted
// GEMM2 rows -> per-token weighted sums) of fused_moe's CUTLASS path
// (interface: moe_permute.h). 16-byte vector copies: rows are multiples of 8.
// Both are launched as programmatic dependents (PDL) of the stream's previous
// kernel and wait for it before touching global memory: the permute's launch
// hides under moe_align's, the reduce's under GEMM2's tail. The permute lets
// its dependent (the GEMMs' setup, which reads only moe_align's outputs)
// launch once every permute CTA has waited.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/float_convert.cuh"
#include "common/pdl.cuh"
#include "moe/moe_align.h"
#include "moe/moe_align_device.cuh"
#include "moe/moe_permute.h"

namespace pcg::moe {
namespace {

constexpr int kThreads = 128;
constexpr int kPermuteWarps = 8;   // warps per CTA
constexpr int kPermuteUnroll = 8;  // 16-byte loads in flight per lane
// Aim for this many warps (about 32 per SM on an H200): below it the rows are
// split into smaller chunks so that small T still spreads over every SM.
constexpr int64_t kPermuteMinWarps = 4096;

// One warp per (token, chunk of its row; chunk = a power-of-two multiple of 32
// uint4 up to 32 * kPermuteUnroll, i.e. up to 4 KiB): the chunk is loaded once
// (up to kPermuteUnroll 16-byte loads in flight per lane) and stored to each of
// the token's slots (pair_slot >= 0; moe_align wrote -1 for the other pairs:
// rows >= num_valid, remote experts). A warp per slot read each row top_k
// times (240 us at T = 16384, k = 8, H = 2048 on an H200). Slots are distinct
// per pair, so no two warps write the same bytes; padding rows stay untouched.
__global__ void __launch_bounds__(kPermuteWarps * 32)
    permute_kernel(const uint4* __restrict__ hidden, int64_t row_vecs, int64_t chunk,
                   int64_t chunks, int top_k, const int32_t* __restrict__ pair_slot,
                   int64_t num_tokens, uint4* __restrict__ a_sorted) {
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kPermuteWarps + (threadIdx.x >> 5);
  const int64_t t = w / chunks;
  if (t >= num_tokens) return;
  pdl_wait();  // pair_slot (moe_align)
  pdl_launch_dependents();
  const int64_t v0 = (w - t * chunks) * chunk + lane;
  const int32_t* slots = pair_slot + t * top_k;
  const uint4* src = hidden + t * row_vecs;
  uint4 r[kPermuteUnroll];
  bool loaded = false;
  for (int j0 = 0; j0 < top_k; j0 += 32) {  // one pass unless top_k > 32
    const int mine = j0 + lane < top_k ? slots[j0 + lane] : -1;
    unsigned todo = __ballot_sync(0xffffffffu, mine >= 0);
    if (todo != 0 && !loaded) {  // warp-uniform; tokens without a slot read nothing
#pragma unroll
      for (int u = 0; u < kPermuteUnroll; ++u) {
        const int64_t v = v0 + 32 * u;
        if (32 * u < chunk && v < row_vecs) r[u] = src[v];
      }
      loaded = true;
    }
    while (todo != 0) {
      const int b = __ffs(todo) - 1;
      todo &= todo - 1;
      const int64_t slot = __shfl_sync(0xffffffffu, mine, b);
      uint4* dst = a_sorted + slot * row_vecs;
#pragma unroll
      for (int u = 0; u < kPermuteUnroll; ++u) {
        const int64_t v = v0 + 32 * u;
        if (32 * u < chunk && v < row_vecs) dst[v] = r[u];
      }
    }
  }
}

// CTA (token, slab y): 8 columns a thread, the token's slabs of kReduceSlab
// columns y, y + gridDim.y, ...; fp32 sums in j order. The token's pairs are
// taken Batch at a time: their rows are loaded before any is summed. Many
// tokens: one CTA a token, Batch 2 (two 16-byte loads in flight a thread;
// against one, 0-1% faster at T >= 4096, 4 or 8 no better:
// ab_pdl_reduce_s23.log). Few tokens, where the few CTAs wait on load latency
// (8.4 us at T = 64 on Qwen3-30B-A3B: batches of 2 and slabs one after
// another): one CTA a slab, Batch 8.
constexpr int64_t kReduceSlab = kThreads * 8;
constexpr int64_t kReduceFewTokens = 512;  // T <= this: Batch 8

template <typename T, int Batch>
__global__ void __launch_bounds__(kThreads)
    unpermute_reduce_kernel(const T* __restrict__ d2, const int32_t* __restrict__ pair_slot,
                            const float* __restrict__ topk_weights,
                            const int32_t* __restrict__ topk_ids,
                            const int32_t* __restrict__ expert_map, int64_t num_global, int64_t E,
                            const int32_t* __restrict__ num_valid, int64_t num_tokens, int top_k,
                            int64_t H, const T* __restrict__ b2, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  T* o = out + t * H;
  pdl_wait();  // d2 (GEMM2)
  const bool live = t < read_num_valid(num_valid, num_tokens);
  const int64_t step = static_cast<int64_t>(gridDim.y) * kReduceSlab;
  for (int64_t n = blockIdx.y * kReduceSlab + static_cast<int64_t>(threadIdx.x) * 8; n < H;
       n += step) {
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j0 = 0; live && j0 < top_k; j0 += Batch) {
      uint4 raw[Batch], braw[Batch];
      float w[Batch];
      bool valid[Batch];
#pragma unroll
      for (int u = 0; u < Batch; ++u) {
        const int64_t p = t * top_k + j0 + u;
        const int e = j0 + u < top_k ? local_expert(topk_ids[p], expert_map, num_global, E) : -1;
        valid[u] = e >= 0;
        w[u] = 0.f;
        raw[u] = braw[u] = make_uint4(0, 0, 0, 0);
        if (!valid[u]) continue;
        w[u] = topk_weights[p];
        raw[u] = *reinterpret_cast<const uint4*>(d2 + pair_slot[p] * H + n);
        if (b2 != nullptr) braw[u] = *reinterpret_cast<const uint4*>(b2 + e * H + n);
      }
#pragma unroll
      for (int u = 0; u < Batch; ++u) {
        if (!valid[u]) continue;
        const T* v = reinterpret_cast<const T*>(&raw[u]);
        const T* bb = reinterpret_cast<const T*>(&braw[u]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float bias = b2 != nullptr ? to_float(bb[i]) : 0.f;
          s[i] += w[u] * (to_float(v[i]) + bias);
        }
      }
    }
    uint4 res;
    T* r = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int i = 0; i < 8; ++i) r[i] = from_float<T>(s[i]);
    *reinterpret_cast<uint4*>(o + n) = res;
  }
}

template <typename T, int Batch>
cudaError_t reduce_typed(const void* d2, const int32_t* pair_slot, const float* topk_weights,
                         const int32_t* topk_ids, const int32_t* expert_map, int64_t num_global,
                         int64_t E, const int32_t* num_valid, int64_t T_, int top_k, int64_t H,
                         const void* b2, void* out, unsigned slab_ctas, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(T_), slab_ctas);
  return launch_maybe_pdl<unpermute_reduce_kernel<T, Batch>>(
      /*as_dependent=*/true, grid, dim3(kThreads), 0, stream, static_cast<const T*>(d2),
      pair_slot, topk_weights, topk_ids, expert_map, num_global, E, num_valid, T_, top_k, H,
      static_cast<const T*>(b2), static_cast<T*>(out));
}

// The batch and the slab CTAs for T tokens (see unpermute_reduce_kernel).
template <typename T>
cudaError_t reduce_dispatch(const void* d2, const int32_t* pair_slot, const float* topk_weights,
                            const int32_t* topk_ids, const int32_t* expert_map,
                            int64_t num_global, int64_t E, const int32_t* num_valid, int64_t T_,
                            int top_k, int64_t H, const void* b2, void* out,
                            cudaStream_t stream) {
  if (T_ <= kReduceFewTokens) {
    const auto slabs = static_cast<unsigned>((H + kReduceSlab - 1) / kReduceSlab);
    return reduce_typed<T, 8>(d2, pair_slot, topk_weights, topk_ids, expert_map, num_global, E,
                              num_valid, T_, top_k, H, b2, out, slabs, stream);
  }
  return reduce_typed<T, 2>(d2, pair_slot, topk_weights, topk_ids, expert_map, num_global, E,
                            num_valid, T_, top_k, H, b2, out, 1u, stream);
}

}  // namespace

cudaError_t launch_moe_permute(DType dtype, const void* hidden, int64_t H, int top_k,
                               const int32_t* pair_slot, int64_t T, void* a_sorted,
                               cudaStream_t stream) {
  if (dtype == DType::kFloat32 || H % 8 != 0 || top_k < 0) return cudaErrorInvalidValue;
  if (T <= 0 || H <= 0 || top_k == 0) return cudaSuccess;
  const int64_t row_vecs = H / 8;
  int64_t chunk = 32 * kPermuteUnroll;
  auto chunks_of = [&](int64_t c) { return (row_vecs + c - 1) / c; };
  while (chunk > 32 && T * chunks_of(chunk) < kPermuteMinWarps) chunk /= 2;
  const int64_t chunks = chunks_of(chunk);
  const int64_t warps = T * chunks;
  const unsigned grid = static_cast<unsigned>((warps + kPermuteWarps - 1) / kPermuteWarps);
  return launch_maybe_pdl<permute_kernel>(/*as_dependent=*/true, dim3(grid),
                                          dim3(kPermuteWarps * 32), 0, stream,
                                          static_cast<const uint4*>(hidden), row_vecs, chunk,
                                          chunks, top_k, pair_slot, T,
                                          static_cast<uint4*>(a_sorted));
}

cudaError_t launch_moe_unpermute_reduce(DType dtype, const void* d2, const int32_t* pair_slot,
                                        const float* topk_weights, const int32_t* topk_ids,
                                        const int32_t* expert_map, int64_t num_global,
                                        int64_t E, const int32_t* num_valid, int64_t T, int top_k,
                                        int64_t H, const void* b2, void* out,
                                        cudaStream_t stream) {
  if (H % 8 != 0) return cudaErrorInvalidValue;
  if (T <= 0 || H <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return reduce_dispatch<__nv_bfloat16>(d2, pair_slot, topk_weights, topk_ids, expert_map,
                                         num_global, E, num_valid, T, top_k, H, b2, out, stream);
    case DType::kFloat16:
      return reduce_dispatch<__half>(d2, pair_slot, topk_weights, topk_ids, expert_map, num_global,
                                  E, num_valid, T, top_k, H, b2, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pcg::moe
