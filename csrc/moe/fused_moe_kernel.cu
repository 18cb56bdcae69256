// CUDA kernels of pcg::fused_moe (interface and pipeline: fused_moe.h): the
// fp32 SIMT GEMM, the per-token reduce and the dispatch of one call. The
// tensor-core GEMMs (bf16/fp16) are in fused_moe_gemm.cuh, instantiated per
// dtype in fused_moe_tc_bf16.cu / fused_moe_tc_f16.cu.
#include "moe/fused_moe_gemm.cuh"

namespace pcg::moe {
namespace {

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
  __shared__ int32_t b_row[NB][BN];  // w13 / w2 row of each tile column, -1: past N

  int64_t blk, ntile;
  tile_coords(args, blockIdx.x, blk, ntile);
  if (blk >= *args.num_blocks) return;
  const int e = args.block_expert[blk];
  if (e < 0) return;
  const int64_t N = args.N, K = args.K;
  const int64_t n0 = ntile * BN;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

  load_row_table<BM, GATED>(args, blk, K, tid, 256, s_pair, a_off);
  for (int r = tid; r < NB * BN; r += 256) {
    const int half = r / BN;
    const int64_t n = n0 + r % BN;
    b_row[half][r % BN] =
        n < N ? static_cast<int32_t>(GATED ? w13_row(n, N, args.w13_block, half != 0) : n) : -1;
  }
  __syncthreads();

  const T* A = static_cast<const T*>(args.A);
  const T* B = static_cast<const T*>(args.B) + static_cast<int64_t>(e) * (GATED ? 2 * N : N) * K;
  float acc[NB][TM][TN] = {};

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int idx = tid; idx < BM * BK; idx += 256) {
      const int r = idx / BK, kk = idx % BK;
      const int64_t off = a_off[r];
      As[kk][r] = (off >= 0 && k0 + kk < K) ? to_float(A[off + k0 + kk]) : 0.f;
    }
    for (int idx = tid; idx < NB * BN * BK; idx += 256) {
      const int r = idx / BK, kk = idx % BK;
      const int half = r / BN, nn = r % BN;
      const int32_t row = b_row[half][nn];
      Bs[half][kk][nn] =
          (row >= 0 && k0 + kk < K) ? to_float(B[static_cast<int64_t>(row) * K + k0 + kk]) : 0.f;
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
    for (int64_t n = threadIdx.x; n < H; n += blockDim.x) o[n] = from_float<T>(0.f);
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
      o[n] = from_float<T>(s);
    }
  }
}

// ---------------------------------------------------------------------------
// Launch

template <typename T, int BM, bool GATED>
cudaError_t launch_simt(GemmArgs a, int64_t max_blocks, cudaStream_t stream) {
  constexpr int BN = 64;
  a.m_tiles = max_blocks;
  a.n_tiles = (a.N + BN - 1) / BN;
  const int64_t tiles = a.m_tiles * a.n_tiles;
  moe_gemm_simt<T, BM, GATED><<<static_cast<unsigned>(tiles), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

// One GEMM: fp32 by block_m on the SIMT kernel, bf16/fp16 by tile id (-1: the
// default tile of block_m).
template <typename T, bool GATED>
cudaError_t launch_gemm(const GemmArgs& a, const MoeConfig& c, int64_t max_blocks,
                        cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    switch (c.block_m) {
      case 16: return launch_simt<T, 16, GATED>(a, max_blocks, stream);
      case 32: return launch_simt<T, 32, GATED>(a, max_blocks, stream);
      case 64: return launch_simt<T, 64, GATED>(a, max_blocks, stream);
      case 128: return launch_simt<T, 128, GATED>(a, max_blocks, stream);
      default: return cudaErrorInvalidValue;
    }
  } else {
    const int tile = (GATED ? c.tile1 : c.tile2) < 0 ? default_tile(c.block_m, GATED)
                                                      : (GATED ? c.tile1 : c.tile2);
    const TileInfo* info = find_tile(tile);
    if (info == nullptr || info->bm != c.block_m || info->gated != GATED) {
      return cudaErrorInvalidValue;
    }
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return detail::launch_tc_gemm_bf16(tile, a, max_blocks, stream);
    } else {
      return detail::launch_tc_gemm_f16(tile, a, max_blocks, stream);
    }
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t run_gemms(const FusedMoeParams& p, cudaStream_t stream) {
  cudaError_t err = launch_moe_align(p.topk_ids, p.T, static_cast<int>(p.k), p.expert_map,
                                     p.num_global, p.num_valid, static_cast<int>(p.E),
                                     p.config.block_m, p.sorted_pairs, p.block_expert,
                                     p.max_blocks, p.num_blocks, /*pair_slot=*/nullptr,
                                     p.align_scratch, stream);
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
  g1.w13_block = p.w13_block;
  err = launch_gemm<T, true>(g1, p.config, p.max_blocks, stream);
  if (err != cudaSuccess) return err;

  GemmArgs g2 = g1;
  g2.A = p.inter;
  g2.B = p.w2;
  g2.bias = p.b2;
  g2.C = p.pair_out;
  g2.N = p.H;
  g2.K = p.I;
  g2.vec = (p.I % 8 == 0) && aligned16(p.inter) && aligned16(p.w2);
  g2.w13_block = 0;
  return launch_gemm<T, false>(g2, p.config, p.max_blocks, stream);
}

template <typename T>
cudaError_t run(const FusedMoeParams& p, cudaStream_t stream) {
  if (p.max_blocks > 0) {
    const cudaError_t err = run_gemms<T>(p, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.T > 0 && p.H > 0) {
    const unsigned threads = p.H >= 1024 ? 256 : 128;
    // 4 spare ints: the compiler may read valid[j..j+3] in one shared load
    // while j < k (compute-sanitizer memcheck flagged the 12-byte over-read).
    const size_t smem = sizeof(int) * (static_cast<size_t>(p.k) + 4);
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
