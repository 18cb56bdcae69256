// CUDA kernels of pcg::fused_moe (interface and pipeline: fused_moe.h).
//
// Grouped GEMMs over blocks of BM sorted slots (BM = moe_align's block_m).
// The grid is 1-D over max_blocks x ceil(N / BN) tiles, ordered in groups of
// 8 row blocks (all N tiles of 8 consecutive blocks run together, so their A
// rows and weight tiles are reused from L2). A CTA whose row block is >=
// num_blocks (read on the device) exits at once: the grid size depends only
// on the shapes, so the kernels capture in CUDA graphs.
//   GEMM1 (GATED): inter[slot, n] = act(x . w13[e, n] + b, x . w13[e, I+n] + b),
//                  x = hidden[pair / k] gathered while loading A
//   GEMM2        : pair_out[pair, n] = w[pair] * (inter[slot] . w2[e, n] + b2[e, n])
// Both are "A row-major [M,K] times B row-major [N,K]^T" with K contiguous.
//
// bf16/fp16: mma.sync m16n8k16 (fp32 accumulators), ldmatrix from padded
// shared tiles (row stride BK+8 elements: conflict-free), a 4-stage cp.async
// pipeline; tile shapes per block_m in TileCfg below. Rows whose K is not a
// multiple of 8 (or whose base is not 16-byte aligned) use element loads;
// K/N/M tails are zero-filled on load and masked on store.
// fp32: a SIMT kernel (16x16 threads, BM/16 x 4 outputs per thread).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "moe/fused_moe.h"
#include "moe/moe_align.h"

namespace pcg::moe {
namespace {

// ---------------------------------------------------------------------------
// Scalar helpers

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

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

__device__ __forceinline__ float apply_act(float g, float u, int act, float alpha, float limit) {
  if (act == static_cast<int>(Activation::kSilu)) {
    return g / (1.f + expf(-g)) * u;
  } else if (act == static_cast<int>(Activation::kGelu)) {
    return 0.5f * g * (1.f + erff(g * 0.70710678118654752440f)) * u;
  } else {  // swigluoai (gpt-oss)
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return (u + 1.f) * g / (1.f + expf(-alpha * g));
  }
}

__device__ __forceinline__ int64_t read_num_valid(const int32_t* num_valid, int64_t T) {
  if (num_valid == nullptr) return T;
  const int64_t nv = *num_valid;
  return nv < 0 ? 0 : (nv > T ? T : nv);
}

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
};

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

// Epilogue of one element (column n < N) or two adjacent ones (n, n+1).
template <typename T, bool GATED>
__device__ __forceinline__ void store_out(const GemmArgs& a, int e, int64_t slot, int pair,
                                          int64_t n, float g, float u) {
  const T* bias = static_cast<const T*>(a.bias);
  if constexpr (GATED) {
    if (bias) {
      g += to_f(bias[static_cast<int64_t>(e) * 2 * a.N + n]);
      u += to_f(bias[static_cast<int64_t>(e) * 2 * a.N + a.N + n]);
    }
    static_cast<T*>(a.C)[slot * a.N + n] = from_f<T>(apply_act(g, u, a.act, a.alpha, a.limit));
  } else {
    if (bias) g += to_f(bias[static_cast<int64_t>(e) * a.N + n]);
    static_cast<float*>(a.C)[static_cast<int64_t>(pair) * a.N + n] = g * a.topk_weights[pair];
  }
}

// n is even here; stores both columns with one vector store when possible.
template <typename T, bool GATED>
__device__ __forceinline__ void store_out2(const GemmArgs& a, int e, int64_t slot, int pair,
                                           int64_t n, float g0, float g1, float u0, float u1) {
  if (n + 1 >= a.N || (a.N & 1)) {
    store_out<T, GATED>(a, e, slot, pair, n, g0, u0);
    if (n + 1 < a.N) store_out<T, GATED>(a, e, slot, pair, n + 1, g1, u1);
    return;
  }
  const T* bias = static_cast<const T*>(a.bias);
  if constexpr (GATED) {
    if (bias) {
      const T* bg = bias + static_cast<int64_t>(e) * 2 * a.N + n;
      g0 += to_f(bg[0]);
      g1 += to_f(bg[1]);
      u0 += to_f(bg[a.N]);
      u1 += to_f(bg[a.N + 1]);
    }
    using V = Vec2<T>;
    *reinterpret_cast<typename V::type*>(static_cast<T*>(a.C) + slot * a.N + n) =
        V::make(apply_act(g0, u0, a.act, a.alpha, a.limit),
                apply_act(g1, u1, a.act, a.alpha, a.limit));
  } else {
    if (bias) {
      const T* b = bias + static_cast<int64_t>(e) * a.N + n;
      g0 += to_f(b[0]);
      g1 += to_f(b[1]);
    }
    const float w = a.topk_weights[pair];
    *reinterpret_cast<float2*>(static_cast<float*>(a.C) + static_cast<int64_t>(pair) * a.N + n) =
        make_float2(g0 * w, g1 * w);
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

// Loads 8 consecutive 16-bit elements row[kk .. kk+8) into dst (16-byte
// aligned shared memory), zero-filling past K or for a null row.
__device__ __forceinline__ void load_chunk16(uint16_t* dst, const uint16_t* row, int64_t kk,
                                             int64_t K, int vec) {
  if (row != nullptr && vec && kk + 8 <= K) {
    cp_async16(dst, row + kk);
  } else if (row == nullptr || kk >= K) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  } else {
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

  for (int r = tid; r < BM; r += THREADS) {
    const int64_t slot = blk * BM + r;
    const int pair = args.sorted_pairs[slot];
    s_pair[r] = pair;
    a_off[r] = pair < 0 ? -1 : (GATED ? static_cast<int64_t>(pair / args.top_k) * K : slot * K);
  }
  __syncthreads();

  const uint16_t* A = static_cast<const uint16_t*>(args.A);
  const uint16_t* B =
      static_cast<const uint16_t*>(args.B) + static_cast<int64_t>(e) * (GATED ? 2 * N : N) * K;

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
        const uint16_t* row = n < N ? B + (up ? N + n : n) * K : nullptr;
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
      uint32_t bf[NT][2];
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, bs + (wn * WTN + j * 8 + (lane & 7) + ((lane >> 4) << 3)) * LDS + ks * 16 +
                           ((lane >> 3) & 1) * 8);
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816<T>(accg[i][j], af[i], bf[j]);
      if constexpr (GATED) {
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          uint32_t r[4];
          ldmatrix_x4(r, bs + (BN + wn * WTN + j * 8 + (lane & 7) + ((lane >> 4) << 3)) * LDS +
                             ks * 16 + ((lane >> 3) & 1) * 8);
          bf[j][0] = r[0];
          bf[j][1] = r[1];
          bf[j + 1][0] = r[2];
          bf[j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j) mma16816<T>(accu[i][j], af[i], bf[j]);
      }
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
// SIMT kernel (fp32)

template <typename T, int BM, bool GATED>
__global__ void __launch_bounds__(256) moe_gemm_simt(const GemmArgs args) {
  constexpr int BN = 64, BK = 16, TM = BM / 16, TN = BN / 16;
  constexpr int NB = GATED ? 2 : 1;
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[NB][BK][BN + 1];
  __shared__ int64_t a_off[BM];
  __shared__ int32_t s_pair[BM];

  int64_t blk, ntile;
  tile_coords(args, blockIdx.x, blk, ntile);
  if (blk >= *args.num_blocks) return;
  const int e = args.block_expert[blk];
  if (e < 0) return;
  const int64_t N = args.N, K = args.K;
  const int64_t n0 = ntile * BN;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

  for (int r = tid; r < BM; r += 256) {
    const int64_t slot = blk * BM + r;
    const int pair = args.sorted_pairs[slot];
    s_pair[r] = pair;
    a_off[r] = pair < 0 ? -1 : (GATED ? static_cast<int64_t>(pair / args.top_k) * K : slot * K);
  }
  __syncthreads();

  const T* A = static_cast<const T*>(args.A);
  const T* B = static_cast<const T*>(args.B) + static_cast<int64_t>(e) * (GATED ? 2 * N : N) * K;
  float acc[NB][TM][TN] = {};

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int idx = tid; idx < BM * BK; idx += 256) {
      const int r = idx / BK, kk = idx % BK;
      const int64_t off = a_off[r];
      As[kk][r] = (off >= 0 && k0 + kk < K) ? to_f(A[off + k0 + kk]) : 0.f;
    }
    for (int idx = tid; idx < NB * BN * BK; idx += 256) {
      const int r = idx / BK, kk = idx % BK;
      const int half = r / BN, nn = r % BN;
      const int64_t n = n0 + nn;
      Bs[half][kk][nn] =
          (n < N && k0 + kk < K) ? to_f(B[(half * N + n) * K + k0 + kk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int h = 0; h < NB; ++h)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const float b = Bs[h][kk][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < TM; ++i) acc[h][i][j] = fmaf(a[i], b, acc[h][i][j]);
        }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int row = ty + 16 * i;
    const int pair = s_pair[row];
    if (pair < 0) continue;
    const int64_t slot = blk * BM + row;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= N) continue;
      store_out<T, GATED>(args, e, slot, pair, n, acc[0][i][j], acc[NB - 1][i][j]);
    }
  }
}

// ---------------------------------------------------------------------------
// Reduce: out[t] = sum over valid j of pair_out[t*k + j] (fixed order).
// V = 4: float4 loads (H % 4 == 0); V = 1 otherwise.

template <typename T, int V>
__global__ void __launch_bounds__(256)
    moe_reduce_kernel(const float* __restrict__ pair_out, const int32_t* __restrict__ topk_ids,
                      const int32_t* __restrict__ expert_map, int64_t num_global, int64_t E,
                      const int32_t* __restrict__ num_valid, int64_t num_tokens, int top_k,
                      int64_t H, T* __restrict__ out) {
  extern __shared__ int valid[];  // [top_k]
  const int64_t t = blockIdx.x;
  T* o = out + t * H;
  if (t >= read_num_valid(num_valid, num_tokens)) {
    for (int64_t n = threadIdx.x; n < H; n += blockDim.x) o[n] = from_f<T>(0.f);
    return;
  }
  for (int j = threadIdx.x; j < top_k; j += blockDim.x)
    valid[j] = local_expert(topk_ids[t * top_k + j], expert_map, num_global, E) >= 0;
  __syncthreads();
  const float* src = pair_out + t * top_k * H;
  for (int64_t n = static_cast<int64_t>(threadIdx.x) * V; n < H;
       n += static_cast<int64_t>(blockDim.x) * V) {
    if constexpr (V == 4) {
      float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int j = 0; j < top_k; ++j) {
        if (!valid[j]) continue;
        const float4 v = *reinterpret_cast<const float4*>(src + j * H + n);
        s.x += v.x;
        s.y += v.y;
        s.z += v.z;
        s.w += v.w;
      }
      using P = Vec2<T>;
      auto* dst = reinterpret_cast<typename P::type*>(o + n);
      dst[0] = P::make(s.x, s.y);
      dst[1] = P::make(s.z, s.w);
    } else {
      float s = 0.f;
      for (int j = 0; j < top_k; ++j)
        if (valid[j]) s += src[j * H + n];
      o[n] = from_f<T>(s);
    }
  }
}

// ---------------------------------------------------------------------------
// Launch

// Tensor-core tile shapes per block_m (GEMM1 computes BN gate + BN up columns).
template <int BM, bool GATED>
struct TcCfgFor;
template <> struct TcCfgFor<16, true> { using type = TileCfg<16, 64, 64, 1, 4, 4, true>; };
template <> struct TcCfgFor<32, true> { using type = TileCfg<32, 64, 64, 2, 2, 4, true>; };
template <> struct TcCfgFor<64, true> { using type = TileCfg<64, 64, 32, 2, 2, 4, true>; };
template <> struct TcCfgFor<128, true> { using type = TileCfg<128, 64, 32, 4, 2, 4, true>; };
template <> struct TcCfgFor<16, false> { using type = TileCfg<16, 64, 64, 1, 4, 4, false>; };
template <> struct TcCfgFor<32, false> { using type = TileCfg<32, 64, 64, 2, 2, 4, false>; };
template <> struct TcCfgFor<64, false> { using type = TileCfg<64, 128, 32, 2, 4, 4, false>; };
template <> struct TcCfgFor<128, false> { using type = TileCfg<128, 128, 32, 4, 2, 4, false>; };

template <typename T, int BM, bool GATED>
cudaError_t launch_gemm(GemmArgs a, int64_t max_blocks, cudaStream_t stream) {
  a.m_tiles = max_blocks;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int BN = 64;
    a.n_tiles = (a.N + BN - 1) / BN;
    const int64_t tiles = a.m_tiles * a.n_tiles;
    moe_gemm_simt<T, BM, GATED><<<static_cast<unsigned>(tiles), 256, 0, stream>>>(a);
  } else {
    using Cfg = typename TcCfgFor<BM, GATED>::type;
    a.n_tiles = (a.N + Cfg::BN - 1) / Cfg::BN;
    const int64_t tiles = a.m_tiles * a.n_tiles;
    auto kernel = moe_gemm_tc<T, Cfg>;
    if (Cfg::SMEM > 48 * 1024) {
      // Per device; cheap, and not a stream operation (legal during capture).
      const cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM);
      if (err != cudaSuccess) return err;
    }
    kernel<<<static_cast<unsigned>(tiles), Cfg::THREADS, Cfg::SMEM, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T, bool GATED>
cudaError_t launch_gemm_bm(const GemmArgs& a, int block_m, int64_t max_blocks,
                           cudaStream_t stream) {
  switch (block_m) {
    case 16: return launch_gemm<T, 16, GATED>(a, max_blocks, stream);
    case 32: return launch_gemm<T, 32, GATED>(a, max_blocks, stream);
    case 64: return launch_gemm<T, 64, GATED>(a, max_blocks, stream);
    case 128: return launch_gemm<T, 128, GATED>(a, max_blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t run_gemms(const FusedMoeParams& p, cudaStream_t stream) {
  cudaError_t err = launch_moe_align(p.topk_ids, p.T, static_cast<int>(p.k), p.expert_map,
                                     p.num_global, p.num_valid, static_cast<int>(p.E), p.block_m,
                                     p.sorted_pairs, p.block_expert, p.max_blocks, p.num_blocks,
                                     stream);
  if (err != cudaSuccess) return err;

  GemmArgs g1{};
  g1.A = p.hidden;
  g1.B = p.w13;
  g1.bias = p.b13;
  g1.C = p.inter;
  g1.sorted_pairs = p.sorted_pairs;
  g1.block_expert = p.block_expert;
  g1.num_blocks = p.num_blocks;
  g1.topk_weights = p.topk_weights;
  g1.N = p.I;
  g1.K = p.H;
  g1.top_k = static_cast<int>(p.k);
  g1.act = static_cast<int>(p.act);
  g1.alpha = p.alpha;
  g1.limit = p.limit;
  g1.vec = (p.H % 8 == 0) && aligned16(p.hidden) && aligned16(p.w13);
  err = launch_gemm_bm<T, true>(g1, p.block_m, p.max_blocks, stream);
  if (err != cudaSuccess) return err;

  GemmArgs g2 = g1;
  g2.A = p.inter;
  g2.B = p.w2;
  g2.bias = p.b2;
  g2.C = p.pair_out;
  g2.N = p.H;
  g2.K = p.I;
  g2.vec = (p.I % 8 == 0) && aligned16(p.inter) && aligned16(p.w2);
  return launch_gemm_bm<T, false>(g2, p.block_m, p.max_blocks, stream);
}

template <typename T>
cudaError_t run(const FusedMoeParams& p, cudaStream_t stream) {
  if (p.max_blocks > 0) {
    const cudaError_t err = run_gemms<T>(p, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.T > 0 && p.H > 0) {
    const unsigned threads = p.H >= 1024 ? 256 : 128;
    const size_t smem = sizeof(int) * static_cast<size_t>(p.k);
    const bool vec4 = p.H % 4 == 0 && aligned16(p.pair_out) &&
                      (reinterpret_cast<uintptr_t>(p.out) % (4 * sizeof(T))) == 0;
    if (vec4) {
      moe_reduce_kernel<T, 4><<<static_cast<unsigned>(p.T), threads, smem, stream>>>(
          p.pair_out, p.topk_ids, p.expert_map, p.num_global, p.E, p.num_valid, p.T,
          static_cast<int>(p.k), p.H, static_cast<T*>(p.out));
    } else {
      moe_reduce_kernel<T, 1><<<static_cast<unsigned>(p.T), threads, smem, stream>>>(
          p.pair_out, p.topk_ids, p.expert_map, p.num_global, p.E, p.num_valid, p.T,
          static_cast<int>(p.k), p.H, static_cast<T*>(p.out));
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fused_moe(const FusedMoeParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return run<float>(p, stream);
    case DType::kFloat16: return run<__half>(p, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pcg::moe
