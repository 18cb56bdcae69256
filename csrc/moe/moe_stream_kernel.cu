// Kernels of fused_moe's weight-streaming path (design: moe_stream.h).
//
// Both kernels multiply 16 weight rows by 8 activation rows (pairs; NB such
// tiles per pass) with mma.sync m16n8k16 straight from global memory, no
// shared-memory staging: every weight byte is used once. Lane (g, q) (g =
// lane / 4, q = lane % 4) loads 16 bytes (8 elements) at K offset 32s + 8q of
// weight rows g and g + 8 and of pair g's activation row; the two halves of
// those 8 elements are its A / B fragment elements of two mmas. The mma sums
// over K in a permuted order that is the same for A and B, so the products
// are the plain dot products, and every load is a full 16-byte vector.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/float_convert.cuh"
#include "common/pdl.cuh"
#include "moe/moe_activation.cuh"
#include "moe/moe_align.h"
#include "moe/moe_stream.h"

namespace pcg::moe {
namespace {

constexpr int kMaxPairs = static_cast<int>(kStreamMaxPairs);
constexpr int kUpWarps = 4;      // warps of an up CTA (they split K)
// Down: W warps a CTA (stream_down_warps: 16, 12 or 11, 8, 4, with 1, 2 or 4 CTAs
// an SM: <= 128 registers, all resident at once), each with many loads in
// flight.
constexpr int kDownRows = static_cast<int>(kStreamDownRows);
// Register budgets (65536 / (threads * blocks)): without them ptxas keeps few
// registers and issues each batch's loads one step at a time.
constexpr int kUpMinBlocks = kStreamUpCtasPerSm;  // <= 85 registers
// The down kernel's partial sums (kStreamDownPartBytes, moe_stream.h) + [P][16]
// fp32 of y after them, with the static tables: under 48 KB of shared memory.
static_assert(kMaxPairs % 32 == 0 && kUpWarps * 32 >= kMaxPairs,
              "build_routing gives every pair a thread");

// K steps (32 elements each) whose loads one warp issues before its mmas:
// 16-byte loads in flight per lane ~ 2U (weights) + U*NB (activations). The
// down kernel's: 8 or 6 at NB = 1 (stream_down_unroll), 4 at NB = 2.
template <int NB>
constexpr int up_unroll() { return NB == 1 ? 4 : 2; }

// The down kernel's thread bound: W warps, or 16 for 12 and 11 (one CTA an SM
// within 128 registers, so that it fits beside one or two up CTAs of <= 80
// and enters an SM before the up kernel has left it).
constexpr int down_bound_threads(int W) { return (stream_down_beside_up(W) ? 16 : W) * 32; }

struct StreamArgs {
  const void* hidden;           // [T, H]
  const void* w13;              // [E, 2I, H], rows as w13_block says (w13_row)
  const void* w2;               // [E, H, I]
  const void* b13;              // [E, 2I] or null
  const void* b2;               // [E, H] or null
  const float* topk_weights;    // [T, k]
  const int32_t* topk_ids;      // [T, k]
  const int32_t* expert_map;    // [num_global] or null
  int64_t num_global;
  const int32_t* num_valid;     // device scalar or null
  void* inter;                  // [T*k, I]
  void* out;                    // [T, H]
  int64_t T, H, I, E;
  int k, P;                     // P = T*k <= kMaxPairs
  int w13_block;
  int act;
  float alpha, limit;
  int down_ks_max;              // K slices the down kernel's partial sums hold
  int zero;                     // 0, opaque to the compiler (see fence_batch)
};

// The routing of one call in shared memory. Valid pairs are grouped by local
// expert; groups are numbered in order of their first pair, and a group's
// pairs are ascending. Every CTA builds the same tables from the same inputs.
struct Routing {
  int32_t e[kMaxPairs];         // local expert of pair p, -1: contributes nothing
  int32_t slot[kMaxPairs];      // position of valid pair p in `pairs`
  int32_t pairs[kMaxPairs];     // valid pairs, group by group
  int32_t rank[kMaxPairs];      // group of a group's first pair (scratch)
  int32_t gcount[kMaxPairs];    // pairs of group d
  int32_t gexp[kMaxPairs];      // local expert of group d
  int32_t goff[kMaxPairs + 1];  // group d: pairs[goff[d], goff[d + 1])
  int32_t wcount[kMaxPairs / 32];
  int32_t num_groups;
  int32_t nv;                   // num_valid clamped to [0, T]
};

// num_valid clamped to [0, T] (T without it).
__device__ __forceinline__ int64_t clamp_valid(const StreamArgs& a) {
  int64_t nv = a.T;
  if (a.num_valid != nullptr) {
    nv = *a.num_valid;
    nv = nv < 0 ? 0 : (nv > a.T ? a.T : nv);
  }
  return nv;
}

// The up kernel's routing at P <= 32, computed by every warp on its own from
// the ids (no shared memory, no barrier): group y's expert and its pairs as a
// bit mask (ascending pairs; groups in order of their first pair, as Routing).
struct WarpGroup {
  int num_groups;
  int e;             // local expert of group y (valid when y < num_groups)
  unsigned members;  // pair p of group y <=> bit p
};

__device__ __forceinline__ WarpGroup warp_group(const StreamArgs& a, int y) {
  const int lane = threadIdx.x & 31;
  const int32_t id = lane < a.P ? a.topk_ids[lane] : -1;
  const int64_t nv = clamp_valid(a);
  int e = -1;
  if (lane < a.P && lane / a.k < nv) e = local_expert(id, a.expert_map, a.num_global, a.E);
  const unsigned same = __match_any_sync(0xffffffffu, e);  // lanes of this lane's expert
  const unsigned firsts = __ballot_sync(0xffffffffu, e >= 0 && __ffs(same) - 1 == lane);
  WarpGroup w{__popc(firsts), -1, 0u};
  if (y < w.num_groups) {
    const int f = static_cast<int>(__fns(firsts, 0, y + 1));  // group y's first pair
    w.e = __shfl_sync(0xffffffffu, e, f);
    w.members = __shfl_sync(0xffffffffu, same, f);
  }
  return w;
}

// All threads of the CTA (blockDim >= kMaxPairs) call this.
__device__ __forceinline__ void build_routing(Routing& R, const StreamArgs& a) {
  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  // The ids' load does not wait for num_valid's (one round trip, not two).
  const int32_t id = tid < a.P ? a.topk_ids[tid] : -1;
  const int64_t nv = clamp_valid(a);
  int e = -1;
  if (tid < a.P && tid / a.k < nv) e = local_expert(id, a.expert_map, a.num_global, a.E);
  if (tid < a.P) R.e[tid] = e;
  if (tid == 0) R.nv = static_cast<int32_t>(nv);
  __syncthreads();
  // Position among the earlier pairs of the same expert, and the group size.
  int before = 0, total = 0, first = tid;
  if (e >= 0) {
    for (int q = 0; q < a.P; ++q) {
      const bool m = R.e[q] == e;
      if (m && q < tid) {
        if (before == 0) first = q;
        ++before;
      }
      total += m;
    }
  }
  const bool is_first = e >= 0 && before == 0;
  unsigned bal = 0;
  if (warp < kMaxPairs / 32) {  // warp-uniform
    bal = __ballot_sync(0xffffffffu, is_first);
    if (lane == 0) R.wcount[warp] = __popc(bal);
  }
  __syncthreads();
  int rank = __popc(bal & ((1u << lane) - 1u));
  int groups = 0;
#pragma unroll
  for (int w = 0; w < kMaxPairs / 32; ++w) {
    if (w < warp) rank += R.wcount[w];
    groups += R.wcount[w];
  }
  if (is_first) {
    R.rank[tid] = rank;
    R.gexp[rank] = e;
    R.gcount[rank] = total;
  }
  if (tid == 0) R.num_groups = groups;
  __syncthreads();
  // Exclusive scan of the group sizes (warp 0, kMaxPairs / 32 groups a lane).
  if (warp == 0) {
    constexpr int kPer = kMaxPairs / 32;
    int c[kPer];
    int sum = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane * kPer + i;
      c[i] = d < groups ? R.gcount[d] : 0;
      sum += c[i];
    }
    int incl = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += v;
    }
    int run = incl - sum;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      R.goff[lane * kPer + i] = run;
      run += c[i];
    }
    if (lane == 31) R.goff[kMaxPairs] = run;
  }
  __syncthreads();
  if (e >= 0) {
    const int pos = R.goff[R.rank[first]] + before;
    R.pairs[pos] = tid;
    R.slot[tid] = pos;
  }
  __syncthreads();
}

// 16-byte loads, zero when !pred. Weights are read once: keep them out of L1.
// A warp's load covers 64 bytes of each of 8 rows (the mma layout); the
// .L2::128B prefetch size makes the L2 fetch each row's whole 128-byte line
// at once, so the next load of that row hits L2 (bench/read_pattern.cu:
// 50 MB read this way at 3.25 -> 3.65 TB/s, against 3.71 for whole 512-byte
// warp loads; the op 5-7% faster at T = 1-8, 7-12% on gpt-oss / Mixtral).
__device__ __forceinline__ uint4 ld_weight(const uint4* p, bool pred) {
  uint4 r;
  asm("{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  mov.b32 %0, 0;\n"
      "  mov.b32 %1, 0;\n"
      "  mov.b32 %2, 0;\n"
      "  mov.b32 %3, 0;\n"
      "  @p ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p), "r"(static_cast<int>(pred)));
  return r;
}

// Activation rows (hidden, inter): plain (weak) loads, so that the compiler
// keeps them after the down kernel's griddepcontrol.wait; reused from L1/L2.
__device__ __forceinline__ uint4 ld_act(const uint4* p, bool pred) {
  return pred ? *p : make_uint4(0u, 0u, 0u, 0u);
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1,
                                                        uint32_t a2, uint32_t a3, uint32_t b0,
                                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], uint32_t a0, uint32_t a1,
                                                 uint32_t a2, uint32_t a3, uint32_t b0,
                                                 uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One batch of U K steps starting at step s (steps >= s_end or vectors >=
// nvec are zeros), in two halves so that a batch's weight loads can be issued
// early (the down kernel issues its first before griddepcontrol.wait).
// WBatch: this lane's 16-byte vectors of weight rows g (a) and g + 8 (b).
template <int U>
struct WBatch {
  uint4 a[U], b[U];
};

template <int U>
__device__ __forceinline__ void load_wbatch(WBatch<U>& w, const uint4* wa, bool ok_a,
                                            const uint4* wb, bool ok_b, int q, int64_t nvec,
                                            int64_t s, int64_t s_end) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t v = (s + u) * 4 + q;
    const bool in = s + u < s_end && v < nvec;
    w.a[u] = ld_weight(wa + v, in && ok_a);
    w.b[u] = ld_weight(wb + v, in && ok_b);
  }
}

// x[nb]: the activation row of pair g + 8nb of the chunk. acc[nb] is the
// m16n8 accumulator: [0], [1] row g, pairs 2q, 2q+1; [2], [3] row g+8.
template <typename T, int NB, int U>
__device__ __forceinline__ void mma_wbatch(const WBatch<U>& w, const uint4* const (&x)[NB],
                                           const bool (&ok_x)[NB], int q, int64_t nvec, int64_t s,
                                           int64_t s_end, float (&acc)[NB][4]) {
  uint4 rx[NB][U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t v = (s + u) * 4 + q;
    const bool in = s + u < s_end && v < nvec;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) rx[nb][u] = ld_act(x[nb] + v, in && ok_x[nb]);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      mma16816<T>(acc[nb], w.a[u].x, w.b[u].x, w.a[u].y, w.b[u].y, rx[nb][u].x, rx[nb][u].y);
      mma16816<T>(acc[nb], w.a[u].z, w.b[u].z, w.a[u].w, w.b[u].w, rx[nb][u].z, rx[nb][u].w);
    }
  }
}

// Makes the batch's first mma operand depend on its last weight loads (x ^
// (y & 0), with the 0 a kernel argument the compiler cannot fold). Without it
// ptxas issues the up kernel's last step of loads after the batch's first mma,
// a load round trip after the rest of the batch (H200, chain us per call:
// Qwen3-30B-A3B T = 1 23.8 -> 23.1, DeepSeek-V2-Lite 32.6 -> 30.8, 1-5% at
// T = 2-16 on every shape; bench/results/ab_fence_s20.log). The down kernel's
// batches are issued whole already (its 128 registers leave room); the same
// dependency on its activation loads gained nothing and cost 3-7% at T = 16.
template <int U>
__device__ __forceinline__ void fence_batch(WBatch<U>& w, int zero) {
  w.a[0].x ^= (w.a[U - 1].w ^ w.b[U - 1].w) & static_cast<uint32_t>(zero);
}

template <typename T, int NB, int U>
__device__ __forceinline__ void mma_batch(const uint4* wa, bool ok_a, const uint4* wb, bool ok_b,
                                          const uint4* const (&x)[NB], const bool (&ok_x)[NB],
                                          int q, int64_t nvec, int64_t s, int64_t s_end,
                                          float (&acc)[NB][4], int zero) {
  WBatch<U> w;
  load_wbatch<U>(w, wa, ok_a, wb, ok_b, q, nvec, s, s_end);
  fence_batch<U>(w, zero);
  mma_wbatch<T, NB, U>(w, x, ok_x, q, nvec, s, s_end, acc);
}

// Reads every kernel argument (the constant bank) before the PDL wait, so the
// constant-cache misses fall before it (stream_up_early_args). The values are
// only folded into a test that a never-read shared word would record; the
// compiler must load them here.
__device__ __forceinline__ void read_args_early(const StreamArgs& a) {
  auto u = [](const void* p) { return reinterpret_cast<uint64_t>(p); };
  uint64_t x = u(a.hidden) ^ u(a.w13) ^ u(a.w2) ^ u(a.b13) ^ u(a.b2) ^ u(a.topk_weights) ^
               u(a.topk_ids) ^ u(a.expert_map) ^ u(a.num_valid) ^ u(a.inter) ^ u(a.out);
  x ^= static_cast<uint64_t>(a.num_global ^ a.T ^ a.H ^ a.I ^ a.E);
  x ^= static_cast<uint64_t>(a.k ^ a.P ^ a.w13_block ^ a.act ^ a.down_ks_max ^ a.zero ^
                             __float_as_int(a.alpha) ^ __float_as_int(a.limit));
  __shared__ volatile int sink;
  if (x == 0x9e3779b97f4a7c15ull) sink = 1;
}

// ---------------------------------------------------------------------------
// up: CTA (column group c of 8, group y). Rows g of the mma are gate columns
// 8c + g, rows g + 8 the matching up columns; the 4 warps take interleaved
// batches of K and their sums are added in warp order (deterministic).
// ROT: stream_up_rotate; EARLY_ARGS: stream_up_early_args.
template <typename T, int NB, int U, int MINB, bool ROT, bool EARLY_ARGS>
__global__ void __launch_bounds__(kUpWarps * 32, MINB)
    stream_up_kernel(const StreamArgs a) {
  if constexpr (EARLY_ARGS) read_args_early(a);
  // A programmatic dependent of the stream's previous kernel (o.pdl): any
  // input may be its output, so no input is read before this.
  pdl_wait();
  // The down kernel's CTAs may start (routing, first loads) once every up CTA
  // is past its wait: they read the inputs before their own wait.
  pdl_launch_dependents();
  __shared__ Routing R;
  __shared__ float red[kUpWarps][NB][4][32];
  const int d = blockIdx.y;
  // Up to 32 pairs (T <= 4 at k = 8): each warp routes on its own, no barrier
  // between the ids' load and the first weight loads.
  const bool by_warp = a.P <= 32;  // CTA-uniform
  int e = 0, first = 0, n = 0;
  unsigned members = 0u;
  if (by_warp) {
    const WarpGroup wg = warp_group(a, d);
    if (d >= wg.num_groups) return;  // the same in every warp: no barrier follows for it
    e = wg.e;
    members = wg.members;
    n = __popc(members);
  } else {
    build_routing(R, a);
    if (d >= R.num_groups) return;  // CTA-uniform: no barrier follows for it
    e = R.gexp[d];
    first = R.goff[d];
    n = R.goff[d + 1] - first;
  }
  // Pair i of the group (i < n).
  auto pair_of = [&](int i) {
    return by_warp ? static_cast<int>(__fns(members, 0, i + 1)) : R.pairs[first + i];
  };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int64_t H = a.H, I = a.I;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 8 + g;  // < I: gridDim.x = I / 8
  const T* w = static_cast<const T*>(a.w13) + static_cast<int64_t>(e) * 2 * I * H;
  const uint4* wa = reinterpret_cast<const uint4*>(w + w13_row(col, I, a.w13_block, false) * H);
  const uint4* wb = reinterpret_cast<const uint4*>(w + w13_row(col, I, a.w13_block, true) * H);
  const T* hidden = static_cast<const T*>(a.hidden);
  const int64_t nvec = H / 8, steps = stream_steps(H);
  // Chunks of 8*NB pairs; a larger group streams the rows again (from L2).
  for (int c0 = 0; c0 < n; c0 += 8 * NB) {
    const uint4* x[NB];
    bool ok_x[NB];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int i = c0 + nb * 8 + g;
      ok_x[nb] = i < n;
      const int p = pair_of(ok_x[nb] ? i : 0);
      x[nb] = reinterpret_cast<const uint4*>(hidden + static_cast<int64_t>(p / a.k) * H);
    }
    float acc[NB][4] = {};
    if constexpr (ROT) {
      const int64_t per = kUpWarps * U, rounds = (steps + per - 1) / per;
      const int64_t r0 = static_cast<int64_t>(blockIdx.x) % rounds;
      for (int64_t r = 0; r < rounds; ++r) {
        const int64_t rr = r0 + r < rounds ? r0 + r : r0 + r - rounds;
        const int64_t s = rr * per + static_cast<int64_t>(warp) * U;
        if (s < steps)
          mma_batch<T, NB, U>(wa, true, wb, true, x, ok_x, q, nvec, s, steps, acc, a.zero);
      }
    } else {
      for (int64_t s = static_cast<int64_t>(warp) * U; s < steps; s += kUpWarps * U) {
        mma_batch<T, NB, U>(wa, true, wb, true, x, ok_x, q, nvec, s, steps, acc, a.zero);
      }
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[warp][nb][r][lane] = acc[nb][r];
    __syncthreads();
    if (warp == 0) {
      const T* b13 = static_cast<const T*>(a.b13);
      float bg = 0.f, bu = 0.f;
      if (b13 != nullptr) {
        bg = to_float(b13[static_cast<int64_t>(e) * 2 * I + col]);
        bu = to_float(b13[static_cast<int64_t>(e) * 2 * I + I + col]);
      }
      T* inter = static_cast<T*>(a.inter);
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int ci = c0 + nb * 8 + 2 * q + i;
          if (ci >= n) continue;
          float gs = red[0][nb][i][lane], us = red[0][nb][2 + i][lane];
#pragma unroll
          for (int w2 = 1; w2 < kUpWarps; ++w2) {
            gs += red[w2][nb][i][lane];
            us += red[w2][nb][2 + i][lane];
          }
          const int p = pair_of(ci);
          inter[static_cast<int64_t>(p) * I + col] =
              from_float<T>(gated_act(gs + bg, us + bu, a.act, a.alpha, a.limit));
        }
    }
    __syncthreads();  // red is reused by the next chunk
  }
}

// ---------------------------------------------------------------------------
// down: CTA of rows [h0, h0 + 16) of every hit expert's w2, W warps. Units
// (group d, K slice) go round-robin to the warps; a unit's sums land in
// part[slice][slot] (each written once). Each warp's first batch of weights is
// loaded into registers before griddepcontrol.wait (weights do not depend on
// the up kernel). Then every (pair, row) at once: its slices in order, + b2,
// x router weight; and out[t, h] sums the pairs of t in j order.
template <typename T, int NB, int W, int MINB, int U>
__global__ void __launch_bounds__(down_bound_threads(W), MINB)
    stream_down_kernel(const StreamArgs a) {
  static_assert(W * 32 >= kMaxPairs, "build_routing gives every pair a thread");
  __shared__ Routing R;
  __shared__ float wsm[kMaxPairs];  // router weights
  extern __shared__ float part[];   // [down_ks_max][P][kDownRows], then y: [P][kDownRows]
  // A programmatic dependent (a PDL-launched kernel after this op, e.g. the
  // next fused_moe call's up kernel) may launch now: it waits for this grid's
  // completion before reading anything, and its CTAs take SMs only as ours
  // leave (0.1-0.3 us; bench/results/ab_pdl_trigger_s18.log).
  pdl_launch_dependents();
  build_routing(R, a);              // inputs only: may overlap the up kernel
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int64_t H = a.H, I = a.I;
  const int64_t h0 = static_cast<int64_t>(blockIdx.x) * kDownRows;
  const int64_t nvec = I / 8, steps = stream_steps(I);
  const int groups = R.num_groups;
  const StreamDownSlicing cut = stream_down_slicing(groups, I, U, a.down_ks_max);
  const int ks = cut.ks;
  const int64_t slice = cut.slice;
  const int units = groups * ks;
  const T* w2 = static_cast<const T*>(a.w2);
  const bool ok_b = h0 + 8 + g < H;  // rows h0 + g < H always (H % 8 == 0)
  if (threadIdx.x < a.P) wsm[threadIdx.x] = a.topk_weights[threadIdx.x];
  WBatch<U> wcur;  // the next batch's weights
  bool have = false;
  if (warp < units) {
    const int e = R.gexp[warp / ks];
    const T* w = w2 + static_cast<int64_t>(e) * H * I;
    const uint4* wa = reinterpret_cast<const uint4*>(w + (h0 + g) * I);
    const uint4* wb = ok_b ? reinterpret_cast<const uint4*>(w + (h0 + 8 + g) * I) : wa;
    const int64_t s0 = (warp % ks) * slice;
    load_wbatch<U>(wcur, wa, true, wb, ok_b, q, nvec, s0, s0 + slice < steps ? s0 + slice : steps);
    have = true;
  }
  pdl_wait();  // inter is complete and visible from here on

  const T* inter = static_cast<const T*>(a.inter);
  for (int u = warp; u < units; u += W) {
    const int d = u / ks, sl = u % ks;
    const int e = R.gexp[d];
    const int first = R.goff[d], n = R.goff[d + 1] - first;
    const T* w = w2 + static_cast<int64_t>(e) * H * I;
    const uint4* wa = reinterpret_cast<const uint4*>(w + (h0 + g) * I);
    const uint4* wb = ok_b ? reinterpret_cast<const uint4*>(w + (h0 + 8 + g) * I) : wa;
    const int64_t s_begin = sl * slice;
    const int64_t s_end = s_begin + slice < steps ? s_begin + slice : steps;
    for (int c0 = 0; c0 < n; c0 += 8 * NB) {
      const uint4* x[NB];
      bool ok_x[NB];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const int i = c0 + nb * 8 + g;
        ok_x[nb] = i < n;
        const int p = R.pairs[first + (ok_x[nb] ? i : 0)];
        x[nb] = reinterpret_cast<const uint4*>(inter + static_cast<int64_t>(p) * I);
      }
      float acc[NB][4] = {};
      for (int64_t s = s_begin; s < s_end; s += U) {
        // The preloaded batch is (first unit, first chunk, s_begin): the first one met.
        if (!have) load_wbatch<U>(wcur, wa, true, wb, ok_b, q, nvec, s, s_end);
        have = false;
        mma_wbatch<T, NB, U>(wcur, x, ok_x, q, nvec, s, s_end, acc);
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int ci = c0 + nb * 8 + 2 * q + i;
          if (ci >= n) continue;
          float* dst = part + (static_cast<int64_t>(sl) * a.P + first + ci) * kDownRows;
          dst[g] = acc[nb][i];
          dst[8 + g] = acc[nb][2 + i];
        }
    }
  }
  __syncthreads();

  // Per (pair, row): its slices in order, + b2, x router weight (0: invalid pair).
  const int items = a.P * kDownRows;
  float* y = part + static_cast<int64_t>(a.down_ks_max) * items;  // [P][kDownRows]
  const T* b2 = static_cast<const T*>(a.b2);
  for (int idx = threadIdx.x; idx < items; idx += W * 32) {
    const int p = idx / kDownRows, r = idx % kDownRows;
    const int e = R.e[p];
    float v = 0.f;
    if (e >= 0 && h0 + r < H) {
      const int slot = R.slot[p];
      for (int sl = 0; sl < ks; ++sl) v += part[(static_cast<int64_t>(sl) * a.P + slot) * kDownRows + r];
      if (b2 != nullptr) v += to_float(b2[static_cast<int64_t>(e) * H + h0 + r]);
      v *= wsm[p];
    }
    y[idx] = v;
  }
  __syncthreads();
  // out[t, h]: the pairs of t in j order.
  T* out = static_cast<T*>(a.out);
  for (int64_t idx = threadIdx.x; idx < a.T * kDownRows; idx += W * 32) {
    const int64_t t = idx / kDownRows;
    const int r = static_cast<int>(idx % kDownRows);
    const int64_t h = h0 + r;
    if (h >= H) continue;
    float sum = 0.f;
    if (t < R.nv) {
      const float* src = y + t * a.k * kDownRows + r;
      for (int j = 0; j < a.k; ++j) sum += src[j * kDownRows];
    }
    out[t * H + h] = from_float<T>(sum);
  }
}

template <typename T, int NB, int U, int MINB, bool ROT, bool EARLY_ARGS>
cudaError_t launch_up_variant(const StreamArgs& a, bool pdl, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.I / 8), static_cast<unsigned>(a.P < a.E ? a.P : a.E));
  return launch_maybe_pdl<stream_up_kernel<T, NB, U, MINB, ROT, EARLY_ARGS>>(
      pdl, grid, dim3(kUpWarps * 32), 0, stream, a);
}

template <typename T, int NB, int U, int MINB>
cudaError_t launch_up_kernel(const StreamArgs& a, const StreamMoeOptions& o, cudaStream_t stream) {
  if constexpr (NB == 1) {  // rotation only at T <= 8 (stream_up_rotate)
    if (o.up_rotate) {
      return o.up_early_args ? launch_up_variant<T, NB, U, MINB, true, true>(a, o.pdl, stream)
                             : launch_up_variant<T, NB, U, MINB, true, false>(a, o.pdl, stream);
    }
  }
  return o.up_early_args ? launch_up_variant<T, NB, U, MINB, false, true>(a, o.pdl, stream)
                         : launch_up_variant<T, NB, U, MINB, false, false>(a, o.pdl, stream);
}

// 8 CTAs an SM (unroll 2) only at NB = 1: at NB = 2 its registers would spill.
template <typename T, int NB>
cudaError_t launch_up(const StreamArgs& a, const StreamMoeOptions& o, cudaStream_t stream) {
  if constexpr (NB == 1) {
    if (o.up_ctas_per_sm == 8) return launch_up_kernel<T, NB, 2, 8>(a, o, stream);
  }
  return launch_up_kernel<T, NB, up_unroll<NB>(), kUpMinBlocks>(a, o, stream);
}

template <typename T, int NB, int W, int MINB, int U>
cudaError_t launch_down(const StreamArgs& args, bool up, bool pdl, cudaStream_t stream) {
  // Partial sums: [ks][P][16] fp32 within kStreamDownPartBytes (>= 4 slices at
  // 128 pairs), and no more slices than batches of K.
  StreamArgs a = args;
  a.down_ks_max = stream_down_ks_max(a.P, a.I, U);
  const dim3 grid(static_cast<unsigned>((a.H + kDownRows - 1) / kDownRows));
  const size_t smem = static_cast<size_t>(a.down_ks_max + 1) * static_cast<size_t>(a.P) *
                      kDownRows * sizeof(float);
  // Only behind our own up kernel: the inputs it reads before its wait are
  // complete once every up CTA is past the up kernel's wait.
  return launch_maybe_pdl<stream_down_kernel<T, NB, W, MINB, U>>(up && pdl, grid, dim3(W * 32),
                                                                  smem, stream, a);
}

template <typename T, int NB, int U>
cudaError_t launch_down_warps(const StreamArgs& a, int down_warps, bool up, bool pdl,
                              cudaStream_t stream) {
  if constexpr (NB == 1) {  // 12 and 11 only where pairs go 8 at a time (stream_down_warps)
    if (down_warps == 12) return launch_down<T, NB, 12, 1, U>(a, up, pdl, stream);
    if (down_warps == 11) return launch_down<T, NB, 11, 1, U>(a, up, pdl, stream);
  }
  switch (down_warps) {
    case 4: return launch_down<T, NB, 4, 4, U>(a, up, pdl, stream);
    case 8: return launch_down<T, NB, 8, 2, U>(a, up, pdl, stream);
    default: return launch_down<T, NB, 16, 1, U>(a, up, pdl, stream);
  }
}

template <typename T, int NB>
cudaError_t launch_typed(const StreamArgs& a, const StreamMoeOptions& o, cudaStream_t stream) {
  const bool up = a.P > 0 && a.E > 0 && a.I > 0;
  if (up) {
    const cudaError_t err = launch_up<T, NB>(a, o, stream);
    if (err != cudaSuccess) return err;
  }
  if constexpr (NB == 1) {
    if (o.down_unroll == 6) return launch_down_warps<T, NB, 6>(a, o.down_warps, up, o.pdl, stream);
    return launch_down_warps<T, NB, 8>(a, o.down_warps, up, o.pdl, stream);
  } else {
    return launch_down_warps<T, NB, 4>(a, o.down_warps, up, o.pdl, stream);
  }
}

template <typename T>
cudaError_t launch_dtype(const StreamArgs& a, const StreamMoeOptions& o, cudaStream_t stream) {
  // Groups of up to 8 pairs a pass, or 16 (stream_pairs_by_8).
  return stream_pairs_by_8(a.T) ? launch_typed<T, 1>(a, o, stream)
                                : launch_typed<T, 2>(a, o, stream);
}

}  // namespace

cudaError_t launch_fused_moe_stream(const FusedMoeParams& p, const StreamMoeOptions& o,
                                    cudaStream_t stream) {
  if (!stream_supported(p.dtype, p.T, p.k, p.H, p.I)) return cudaErrorInvalidValue;
  if (p.T <= 0 || p.H <= 0) return cudaSuccess;
  StreamArgs a{};
  a.hidden = p.hidden;
  a.w13 = p.w13;
  a.w13_block = p.w13_block;
  a.w2 = p.w2;
  a.b13 = p.b13;
  a.b2 = p.b2;
  a.topk_weights = p.topk_weights;
  a.topk_ids = p.topk_ids;
  a.expert_map = p.expert_map;
  a.num_global = p.num_global;
  a.num_valid = p.num_valid;
  a.inter = p.inter;
  a.out = p.out;
  a.T = p.T;
  a.H = p.H;
  a.I = p.I;
  a.E = p.E;
  a.k = static_cast<int>(p.k);
  a.P = static_cast<int>(p.T * p.k);
  a.act = static_cast<int>(p.act);
  a.alpha = p.alpha;
  a.limit = p.limit;
  switch (p.dtype) {
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(a, o, stream);
    case DType::kFloat16: return launch_dtype<__half>(a, o, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pcg::moe
