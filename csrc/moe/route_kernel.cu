// pcg::route CUDA kernel: one warp per token. Lane l owns experts l, l+32,
// ... (at most 32 of them, so E <= 1024) and keeps their "still selectable"
// flags in one 32-bit mask; scores live in shared memory. Candidates are
// ordered by route_math::better, a strict total order, turned into unsigned
// keys so that a warp arg-max is two redux.sync reductions; each lane first
// lists its own best min(count, k) entries, so a top-k round costs the two
// reductions and the winner's step to its next entry (H200, E = 128, k = 8:
// 8.8 -> 5.2 us a call in a graph against a shuffle butterfly and a rescan
// per round; bench/RESULTS.md). All lanes agree and the result equals the
// CPU loop.
// No host synchronisation: the launch is capturable in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/pdl.cuh"
#include "moe/route.h"

namespace pcg {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float load(const void* base, RouteDtype dt, int64_t i) {
  switch (dt) {
    case RouteDtype::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case RouteDtype::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// An unsigned key that orders candidates as route_math::better: numbers by
// value (-0 and +0 equal) above NaN (1) above "no candidate" (0); ties are
// broken by the lower index separately.
__device__ __forceinline__ uint32_t order_key(float v, int i) {
  if (i < 0) return 0u;
  if (route_math::is_nan(v)) return 1u;
  const uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // >= 0x007fffff (-inf) > 1
}

// The warp's best candidate by key, then lowest index among equal keys;
// every lane gets the winner's index, -1 when no lane has a candidate. Two
// warp reductions (redux.sync, sm_80+) instead of a shuffle butterfly.
__device__ __forceinline__ int warp_best_key(uint32_t key, int i) {
  const uint32_t best = __reduce_max_sync(kFull, key);
  if (best == 0u) return -1;
  return __reduce_min_sync(kFull, key == best ? i : 0x7fffffff);
}

__device__ __forceinline__ int warp_best(float v, int i) { return warp_best_key(order_key(v, i), i); }

// Best selectable slot of this lane: slot j holds entry lane + 32*j of vals.
__device__ __forceinline__ void lane_best(const float* vals, uint32_t avail, int lane, float& bv,
                                          int& bi) {
  bv = 0.0f;
  bi = -1;
  for (uint32_t m = avail; m != 0; m &= m - 1) {
    const int i = lane + kRouteWarp * (__ffs(m) - 1);  // ascending index order
    if (route_math::better(vals[i], i, bv, bi)) {
      bv = vals[i];
      bi = i;
    }
  }
}

template <RouteDtype kLogits>
__global__ void __launch_bounds__(kWarpsPerBlock * kRouteWarp)
    route_kernel(const RouteParams p) {
  namespace m = route_math;
  // fused_moe's kernels launch as programmatic dependents and wait for this
  // grid before reading the ids: let them launch (and take free SMs) now.
  pdl_launch_dependents();
  // Launched as a programmatic dependent of the kernel before it (the router's
  // GEMM): the logits may be its output, so nothing is read before this.
  pdl_wait();
  extern __shared__ float smem[];
  const int lane = threadIdx.x % kRouteWarp, warp = threadIdx.x / kRouteWarp;
  const int E = static_cast<int>(p.E), G = static_cast<int>(p.num_groups);
  const int K = static_cast<int>(p.top_k);
  float* score = smem + static_cast<size_t>(warp) * (2 * E + G);
  float* sel = score + E;
  float* gsel = sel + E;

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t < p.T;
       t += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t row = t * E;
    float mx = -m::inf();
    for (int i = lane; i < E; i += kRouteWarp) {
      score[i] = load(p.logits, kLogits, row + i);
      mx = fmaxf(mx, score[i]);
    }
    if (p.scoring == RouteScoring::kSoftmax) {
      for (int off = kRouteWarp / 2; off > 0; off >>= 1)
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
      float acc = 0.0f;  // the CPU kernel repeats this exact summation order
      for (int i = lane; i < E; i += kRouteWarp) {
        score[i] = m::exp(m::sub(score[i], mx));
        acc = m::add(acc, score[i]);
      }
      for (int off = kRouteWarp / 2; off > 0; off >>= 1)
        acc = m::add(acc, __shfl_xor_sync(kFull, acc, off));
      for (int i = lane; i < E; i += kRouteWarp) score[i] = m::div(score[i], acc);
    } else {
      for (int i = lane; i < E; i += kRouteWarp) score[i] = m::sigmoid(score[i]);
    }
    uint32_t avail = 0;
    for (int i = lane, j = 0; i < E; i += kRouteWarp, ++j) {
      sel[i] = p.bias ? m::add(score[i], load(p.bias, p.bias_dtype, i)) : score[i];
      avail |= 1u << j;
    }
    __syncwarp();  // groups and weights read other lanes' entries

    if (G > 1) {
      const int S = E / G;
      uint32_t gavail = 0;
      for (int g = lane, j = 0; g < G; g += kRouteWarp, ++j) {
        gsel[g] = m::group_score(sel + g * S, S);
        gavail |= 1u << j;
      }
      for (int r = 0; r < p.topk_groups; ++r) {
        float bv;
        int bi;
        lane_best(gsel, gavail, lane, bv, bi);
        bi = warp_best(bv, bi);
        if (bi % kRouteWarp == lane) gavail &= ~(1u << (bi / kRouteWarp));
      }
      __syncwarp();  // everyone is done reading gsel before it becomes flags
      for (int g = lane, j = 0; g < G; g += kRouteWarp, ++j)
        gsel[g] = ((gavail >> j) & 1u) ? 0.0f : 1.0f;  // 1 = kept group
      __syncwarp();
      for (int i = lane, j = 0; i < E; i += kRouteWarp, ++j)
        if (gsel[i / S] == 0.0f) avail &= ~(1u << j);
    }

    // Round r is written by lane r % 32, which later rescales its own writes.
    float* w = p.weights + t * K;
    int32_t* ids = p.ids + t * K;
    float sum = 0.0f;
    // Each lane's selectable entries in candidate order, the first
    // min(count, K) of them (a lane-local selection, every lane at once); a
    // round is then two warp reductions, and its winner steps to its next.
    int lidx[kRouteWarp];
    uint32_t lkey[kRouteWarp];
    int nl = 0;
    {
      const int want = min(__popc(avail), K);
      for (uint32_t rem = avail; nl < want; ++nl) {
        float bv;
        int bi;
        lane_best(sel, rem, lane, bv, bi);
        lkey[nl] = order_key(bv, bi);
        lidx[nl] = bi;
        rem &= ~(1u << (bi / kRouteWarp));
      }
    }
    int next = 0;
    uint32_t key = nl > 0 ? lkey[0] : 0u;
    int idx = nl > 0 ? lidx[0] : -1;
    for (int r = 0; r < K; ++r) {
      const int win = warp_best_key(key, idx);
      if (win % kRouteWarp == lane) {
        ++next;
        key = next < nl ? lkey[next] : 0u;
        idx = next < nl ? lidx[next] : -1;
      }
      const float wt = score[win];
      sum = m::add(sum, wt);
      if (r % kRouteWarp == lane) {
        ids[r] = win;
        w[r] = wt;
      }
    }
    const float denom = p.renormalize ? m::add(sum, 1e-20f) : 1.0f;
    for (int r = lane; r < K; r += kRouteWarp)
      w[r] = m::mul(p.renormalize ? m::div(w[r], denom) : w[r], p.scale);
    __syncwarp();  // the next token reuses this warp's shared memory
  }
}

}  // namespace

template <RouteDtype kLogits>
void launch_route(const RouteParams& p, unsigned blocks, size_t smem, cudaStream_t stream) {
  constexpr auto kernel = route_kernel<kLogits>;
  const dim3 threads(kWarpsPerBlock * kRouteWarp);
  // A programmatic dependent: its CTAs start as the previous kernel drains and
  // wait before reading anything. H200, router step (cuBLAS linear + route) in
  // a graph: gpt-oss / Mixtral shapes 0.90x the time, Qwen3 / DeepSeek-V2-Lite
  // 1.005-1.012x (bench/results/ab_route_pdl_s19.log). Launch errors surface
  // through the caller's check.
  if (pdl_supported<kernel>())
    (void)launch_pdl(kernel, dim3(blocks), threads, smem, stream, p);
  else
    kernel<<<blocks, threads, smem, stream>>>(p);
}

void route_cuda(const RouteParams& p, CUstream_st* stream) {
  if (p.T == 0) return;
  const size_t smem = sizeof(float) * kWarpsPerBlock * (2 * p.E + p.num_groups);
  const int64_t want = (p.T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned blocks = static_cast<unsigned>(want < (1 << 20) ? want : (1 << 20));
  switch (p.logits_dtype) {
    case RouteDtype::kBFloat16: launch_route<RouteDtype::kBFloat16>(p, blocks, smem, stream); break;
    case RouteDtype::kFloat16: launch_route<RouteDtype::kFloat16>(p, blocks, smem, stream); break;
    default: launch_route<RouteDtype::kFloat32>(p, blocks, smem, stream); break;
  }
}

}  // namespace pcg
