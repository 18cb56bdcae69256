// Device code of pcg::fused_moe's grouped GEMMs (interface and pipeline:
// fused_moe.h), shared by fused_moe_kernel.cu (fp32 SIMT, reduce, dispatch)
// and fused_moe_tc_{bf16,f16}.cu (the tensor-core kernels of one dtype each).
//
// Grouped GEMMs over blocks of BM sorted slots (BM = moe_align's block_m).
// The grid is 1-D over max_blocks x ceil(N / BN) tiles, ordered in groups of
// 8 row blocks (all N tiles of 8 consecutive blocks run together, so their A
// rows and weight tiles are reused from L2). A CTA whose row block is >=
// num_blocks (read on the device) exits at once: the grid size depends only
// on the shapes, so the kernels capture in CUDA graphs.
//   GEMM1 (GATED): inter[slot, n] = act(x . w13[e, n] + b, x . w13[e, I+n] + b)
//   (w13 rows as a.w13_block says: w13_row),
//                  x = hidden[pair / k] gathered while loading A
//   GEMM2        : pair_out[pair, n] = w[pair] * (inter[slot] . w2[e, n] + b2[e, n])
// Both are "A row-major [M,K] times B row-major [N,K]^T" with K contiguous.
//
// bf16/fp16: mma.sync m16n8k16 (fp32 accumulators), ldmatrix from padded
// shared tiles (row stride BK+8 elements: conflict-free), a STAGES-deep
// cp.async pipeline; tile shapes from the list in fused_moe_tiles.h (TileCfg
// below is instantiated from it). Rows whose K is not a multiple of 8 (or
// whose base is not 16-byte aligned) use element loads; K/N/M tails are
// zero-filled on load and masked on store.
// fp32: a SIMT kernel (fused_moe_kernel.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/float_convert.cuh"
#include "moe/fused_moe.h"
#include "moe/moe_activation.cuh"
#include "moe/fused_moe_tiles.h"
#include "moe/moe_align.h"

namespace pcg::moe {

namespace detail {

struct GemmArgs {
  const void* A;          // GEMM1: hidden [T, K]; GEMM2: inter [slots, K]
  const void* B;          // GEMM1: w13 [E, 2N, K]; GEMM2: w2 [E, N, K]
  const void* bias;       // [E, 2N] / [E, N] or null
  void* C;                // GEMM1: inter [slots, N] (dtype); GEMM2: pair_out [T*k, N] f32
  const int32_t* sorted_pairs;
  const int32_t* block_expert;
  const int32_t* num_blocks;
  const float* topk_weights;  // GEMM2 only
  int64_t N, K;
  int64_t m_tiles, n_tiles;   // max_blocks, ceil(N / BN)
  int top_k;
  int act;
  float alpha, limit;
  int vec;  // 16-byte loads allowed (K % 8 == 0 and 16-byte aligned bases)
  int w13_block;  // GEMM1: w13's row layout (w13_row in fused_moe.h)
};

// Tensor-core GEMM with tile `tile` (fused_moe_tiles.h) over a.m_tiles =
// max_blocks row blocks; defined per dtype in fused_moe_tc_bf16.cu and
// fused_moe_tc_f16.cu (one translation unit each: they build in parallel).
cudaError_t launch_tc_gemm_bf16(int tile, GemmArgs a, int64_t max_blocks, cudaStream_t stream);
cudaError_t launch_tc_gemm_f16(int tile, GemmArgs a, int64_t max_blocks, cudaStream_t stream);

}  // namespace detail

namespace {

// ---------------------------------------------------------------------------
// Scalar helpers

// Two adjacent elements, stored with one instruction.
template <typename T>
struct Vec2;
template <>
struct Vec2<float> {
  using type = float2;
  static __device__ __forceinline__ type make(float a, float b) { return make_float2(a, b); }
};
template <>
struct Vec2<__half> {
  using type = __half2;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Vec2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

// Not inlined: the epilogues call it once per output element of a fully
// unrolled loop, and inlined copies of expf/erff there dominated the build time
// of the tensor-core kernels (the call is negligible next to the K loop).
__device__ __noinline__ float apply_act(float g, float u, int act, float alpha, float limit) {
  return gated_act(g, u, act, alpha, limit);
}

__device__ __forceinline__ int64_t read_num_valid(const int32_t* num_valid, int64_t T) {
  if (num_valid == nullptr) return T;
  const int64_t nv = *num_valid;
  return nv < 0 ? 0 : (nv > T ? T : nv);
}

using detail::GemmArgs;

// Grouped tile order: tile id -> (row block, column tile), 8 row blocks per group.
__device__ __forceinline__ void tile_coords(const GemmArgs& a, int64_t id, int64_t& m,
                                            int64_t& n) {
  constexpr int64_t GM = 8;
  const int64_t per_group = GM * a.n_tiles;
  const int64_t group = id / per_group;
  const int64_t first = group * GM;
  const int64_t gm = a.m_tiles - first < GM ? a.m_tiles - first : GM;
  const int64_t r = id - group * per_group;
  m = first + r % gm;
  n = r / gm;
}

// The row table of row block `blk`: each row's (token, k) pair (-1: pad row)
// and the element offset of its A row (-1: zero row). GEMM1 gathers hidden
// rows by token; GEMM2 reads its own activation rows by slot.
template <int BM, bool GATED>
__device__ __forceinline__ void load_row_table(const GemmArgs& a, int64_t blk, int64_t K, int tid,
                                               int threads, int32_t* s_pair, int64_t* a_off) {
  for (int r = tid; r < BM; r += threads) {
    const int64_t slot = blk * BM + r;
    const int pair = a.sorted_pairs[slot];
    s_pair[r] = pair;
    a_off[r] = pair < 0 ? -1 : (GATED ? static_cast<int64_t>(pair / a.top_k) * K : slot * K);
  }
}

// Epilogue of one element (column n < N) or two adjacent ones (n, n+1).
template <typename T, bool GATED>
__device__ __forceinline__ void store_out(const GemmArgs& a, int e, int64_t slot, int pair,
                                          int64_t n, float g, float u) {
  const T* bias = static_cast<const T*>(a.bias);
  if constexpr (GATED) {
    if (bias) {
      g += to_float(bias[static_cast<int64_t>(e) * 2 * a.N + n]);
      u += to_float(bias[static_cast<int64_t>(e) * 2 * a.N + a.N + n]);
    }
    static_cast<T*>(a.C)[slot * a.N + n] = from_float<T>(apply_act(g, u, a.act, a.alpha, a.limit));
  } else {
    if (bias) g += to_float(bias[static_cast<int64_t>(e) * a.N + n]);
    static_cast<float*>(a.C)[static_cast<int64_t>(pair) * a.N + n] = g * a.topk_weights[pair];
  }
}

// n is even here; stores both columns (n + 1 only when < N), with one vector
// store when possible. The activation is applied once per element.
template <typename T, bool GATED>
__device__ __forceinline__ void store_out2(const GemmArgs& a, int e, int64_t slot, int pair,
                                           int64_t n, float g0, float g1, float u0, float u1) {
  const bool two = n + 1 < a.N;
  const T* bias = static_cast<const T*>(a.bias);
  if constexpr (GATED) {
    if (bias) {
      const T* bg = bias + static_cast<int64_t>(e) * 2 * a.N + n;
      g0 += to_float(bg[0]);
      u0 += to_float(bg[a.N]);
      if (two) {
        g1 += to_float(bg[1]);
        u1 += to_float(bg[a.N + 1]);
      }
    }
    const float v0 = apply_act(g0, u0, a.act, a.alpha, a.limit);
    const float v1 = two ? apply_act(g1, u1, a.act, a.alpha, a.limit) : 0.f;
    T* dst = static_cast<T*>(a.C) + slot * a.N + n;
    if (two && !(a.N & 1)) {
      using V = Vec2<T>;
      *reinterpret_cast<typename V::type*>(dst) = V::make(v0, v1);
    } else {
      dst[0] = from_float<T>(v0);
      if (two) dst[1] = from_float<T>(v1);
    }
  } else {
    if (bias) {
      const T* b = bias + static_cast<int64_t>(e) * a.N + n;
      g0 += to_float(b[0]);
      if (two) g1 += to_float(b[1]);
    }
    const float w = a.topk_weights[pair];
    float* dst = static_cast<float*>(a.C) + static_cast<int64_t>(pair) * a.N + n;
    if (two && !(a.N & 1)) {
      *reinterpret_cast<float2*>(dst) = make_float2(g0 * w, g1 * w);
    } else {
      dst[0] = g0 * w;
      if (two) dst[1] = g1 * w;
    }
  }
}

// ---------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                        const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4],
                                                 const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Element loads of row[kk .. kk+8) (kk < K), zero past K: the path of rows that
// are not 16-byte loadable (K % 8 != 0 or a misaligned base). Kept inline and
// unrolled as before (a rolled loop or a call builds faster but left small
// spills or more registers in the default tiles).
__device__ __forceinline__ void load_chunk16_elementwise(uint16_t* dst, const uint16_t* row,
                                                         int64_t kk, int64_t K) {
  uint16_t v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = (kk + j < K) ? row[kk + j] : uint16_t{0};
  uint4 packed;
  packed.x = v[0] | (static_cast<uint32_t>(v[1]) << 16);
  packed.y = v[2] | (static_cast<uint32_t>(v[3]) << 16);
  packed.z = v[4] | (static_cast<uint32_t>(v[5]) << 16);
  packed.w = v[6] | (static_cast<uint32_t>(v[7]) << 16);
  *reinterpret_cast<uint4*>(dst) = packed;
}

// Loads 8 consecutive 16-bit elements row[kk .. kk+8) into dst (16-byte
// aligned shared memory), zero-filling past K or for a null row.
__device__ __forceinline__ void load_chunk16(uint16_t* dst, const uint16_t* row, int64_t kk,
                                             int64_t K, int vec) {
  if (row != nullptr && vec && kk + 8 <= K) {
    cp_async16(dst, row + kk);
  } else if (row == nullptr || kk >= K) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  } else {
    load_chunk16_elementwise(dst, row, kk, K);
  }
}

// Tile configuration of the tensor-core kernel.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, bool GATED_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr bool GATED = GATED_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int LDS = BK + 8;  // padded shared row (elements)
  static constexpr int BROWS = GATED ? 2 * BN : BN;
  static constexpr int SMEM = STAGES * (BM + BROWS) * LDS * 2;
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS) moe_gemm_tc(const GemmArgs args) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  constexpr int WARPS_N = Cfg::WARPS_N, THREADS = Cfg::THREADS, LDS = Cfg::LDS;
  constexpr int BROWS = Cfg::BROWS;
  constexpr bool GATED = Cfg::GATED;
  constexpr int WTM = BM / Cfg::WARPS_M, WTN = BN / WARPS_N;
  constexpr int MT = WTM / 16, NT = WTN / 8;
  constexpr int CPR = BK / 8;  // 16-byte chunks per row
  constexpr int A_CHUNKS = BM * CPR, B_CHUNKS = BROWS * CPR;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BK % 16 == 0, "tile shape");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* As = reinterpret_cast<uint16_t*>(smem_raw);  // [STAGES][BM][LDS]
  uint16_t* Bs = As + STAGES * BM * LDS;                  // [STAGES][BROWS][LDS]
  __shared__ int64_t a_off[BM];  // element offset of the A row, -1: zero row
  __shared__ int32_t s_pair[BM];

  int64_t blk, ntile;
  tile_coords(args, blockIdx.x, blk, ntile);
  if (blk >= *args.num_blocks) return;
  const int e = args.block_expert[blk];
  if (e < 0) return;
  const int64_t N = args.N, K = args.K;
  const int64_t n0 = ntile * BN;
  const int tid = threadIdx.x;

  load_row_table<BM, GATED>(args, blk, K, tid, THREADS, s_pair, a_off);
  __syncthreads();

  const uint16_t* A = static_cast<const uint16_t*>(args.A);
  const uint16_t* B =
      static_cast<const uint16_t*>(args.B) + static_cast<int64_t>(e) * (GATED ? 2 * N : N) * K;
  // w13's row layout (w13_row): the row of column n is n + (n & mask) (+ up_off for up).
  const int64_t row_mask = GATED ? w13_row_mask(args.w13_block) : 0;
  const int64_t up_off = GATED ? w13_up_offset(args.w13_block, N) : 0;

  auto load_stage = [&](int stage, int64_t k0) {
    uint16_t* as = As + stage * BM * LDS;
    uint16_t* bs = Bs + stage * BROWS * LDS;
#pragma unroll
    for (int it = 0; it < (A_CHUNKS + THREADS - 1) / THREADS; ++it) {
      const int c = tid + it * THREADS;
      if (A_CHUNKS % THREADS == 0 || c < A_CHUNKS) {
        const int r = c / CPR, cc = c % CPR;
        const int64_t off = a_off[r];
        load_chunk16(as + r * LDS + cc * 8, off < 0 ? nullptr : A + off, k0 + cc * 8, K,
                     args.vec);
      }
    }
#pragma unroll
    for (int it = 0; it < (B_CHUNKS + THREADS - 1) / THREADS; ++it) {
      const int c = tid + it * THREADS;
      if (B_CHUNKS % THREADS == 0 || c < B_CHUNKS) {
        const int r = c / CPR, cc = c % CPR;
        const bool up = GATED && r >= BN;
        const int64_t n = n0 + (up ? r - BN : r);
        const uint16_t* row = n < N ? B + (n + (n & row_mask) + (up ? up_off : 0)) * K : nullptr;
        load_chunk16(bs + r * LDS + cc * 8, row, k0 + cc * 8, K, args.vec);
      }
    }
  };

  const int warp = tid >> 5, lane = tid & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  float accg[MT][NT][4];
  float accu[GATED ? MT : 1][GATED ? NT : 1][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) accg[i][j][r] = 0.f;
  if constexpr (GATED) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) accu[i][j][r] = 0.f;
  }

  const int KT = static_cast<int>((K + BK - 1) / BK);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, static_cast<int64_t>(s) * BK);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nk = kt + STAGES - 1;
    if (nk < KT) load_stage(nk % STAGES, static_cast<int64_t>(nk) * BK);
    cp_async_commit();

    const uint16_t* as = As + (kt % STAGES) * BM * LDS;
    const uint16_t* bs = Bs + (kt % STAGES) * BROWS * LDS;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
        ldmatrix_x4(af[i], as + (wm * WTM + i * 16 + (lane & 15)) * LDS + ks * 16 + (lane >> 4) * 8);
      // B fragments of the tile rows [row0 + wn * WTN, + WTN) times af, into acc.
      auto mma_rows = [&](int row0, float (&acc)[MT][NT][4]) {
        uint32_t bf[NT][2];
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          uint32_t r[4];
          ldmatrix_x4(r, bs + (row0 + wn * WTN + j * 8 + (lane & 7) + ((lane >> 4) << 3)) * LDS +
                             ks * 16 + ((lane >> 3) & 1) * 8);
          bf[j][0] = r[0];
          bf[j][1] = r[1];
          bf[j + 1][0] = r[2];
          bf[j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j) mma16816<T>(acc[i][j], af[i], bf[j]);
      };
      mma_rows(0, accg);
      if constexpr (GATED) mma_rows(BN, accu);  // the up half of the w13 tile
    }
  }
  cp_async_wait<0>();

  // Epilogue: accumulator (i, j, r) holds row g (+8 for r >= 2), column 2q + (r & 1).
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wm * WTM + i * 16 + g + h * 8;
      const int pair = s_pair[row];
      if (pair < 0) continue;
      const int64_t slot = blk * BM + row;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t n = n0 + wn * WTN + j * 8 + q * 2;
        if (n >= N) continue;
        float u0 = 0.f, u1 = 0.f;
        if constexpr (GATED) {
          u0 = accu[i][j][h * 2];
          u1 = accu[i][j][h * 2 + 1];
        }
        store_out2<T, GATED>(args, e, slot, pair, n, accg[i][j][h * 2], accg[i][j][h * 2 + 1],
                             u0, u1);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Tensor-core launch

template <typename T, typename Cfg>
cudaError_t launch_tc(GemmArgs a, int64_t max_blocks, cudaStream_t stream) {
  a.m_tiles = max_blocks;
  a.n_tiles = (a.N + Cfg::BN - 1) / Cfg::BN;
  const int64_t tiles = a.m_tiles * a.n_tiles;
  auto kernel = moe_gemm_tc<T, Cfg>;
  if (Cfg::SMEM > 48 * 1024) {
    // Per device; cheap, and not a stream operation (legal during capture).
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(tiles), Cfg::THREADS, Cfg::SMEM, stream>>>(a);
  return cudaGetLastError();
}

// One instantiation per entry of PCG_MOE_TILES; ids outside the list are an error.
template <typename T>
cudaError_t launch_tc_tile(int tile, const GemmArgs& a, int64_t max_blocks, cudaStream_t stream) {
  switch (tile) {
#define PCG_MOE_TILE_CASE(id, name, bm, bn, bk, wm, wn, st, g)                           \
  case id: {                                                                             \
    using Cfg = TileCfg<bm, bn, bk, wm, wn, st, g>;                                      \
    static_assert(Cfg::SMEM == kTiles[id].smem_dynamic(), "TileCfg / TileInfo mismatch"); \
    return launch_tc<T, Cfg>(a, max_blocks, stream);                                     \
  }
    PCG_MOE_TILES(PCG_MOE_TILE_CASE)
#undef PCG_MOE_TILE_CASE
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace pcg::moe
