// pcg::ep_dispatch / pcg::ep_combine CUDA kernels (contract in ep_kernels.h).
//
// dispatch: slots come out in token order exactly as in the CPU loop. The
// tokens are cut into tiles of kTile (one thread per token); (1) for more
// than one tile, one block per tile counts its tokens per destination rank
// into tile_counts; (2) one block per (tile, rank) adds up the earlier tiles'
// counts, ranks its tokens with a block-wide ballot scan, writes slot_map and
// the metadata rows, and the last tile writes the rank's count and the
// unused-slot tail; (3) one warp per token copies its row into every
// destination slot it got (16-byte vectors when the row and both buffers
// allow it; in peer mode the destination is the owner's mapped workspace, so
// the copy is the NVLink transfer). Every thread makes O(k) independent
// loads: none walks a long chain of dependent ones (one block per rank
// walking all tokens took 260 us at 8192 tokens). return (peer mode): one
// warp per received slot writes used rows back into the source's workspace.
// combine: one block per token (16-byte vectors when rows allow) sums its <= W
// returned rows in rank order in fp32 (same order as the CPU kernel).
// num_valid is read on the device; nothing synchronises with the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/float_convert.cuh"
#include "moe/ep_kernels.h"

namespace pcg::ep {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kTile = static_cast<int>(kDispatchTile);  // tokens (= threads) per block
constexpr int kTileWarps = kTile / 32;
constexpr int kCombineThreads = 256;
constexpr int kRowWarps = 8;  // warp-per-row copy kernels: warps per block
constexpr int kRowThreads = kRowWarps * 32;
constexpr int kRowUnroll = 4;      // vectors in flight per lane
constexpr int64_t kRowMaxBlocks = 2048;  // a few waves on any GPU; warps stride over the rest

unsigned row_blocks(int64_t rows) {
  const int64_t b = (rows + kRowWarps - 1) / kRowWarps;
  return static_cast<unsigned>(b < kRowMaxBlocks ? b : kRowMaxBlocks);
}

__device__ __forceinline__ int64_t valid_rows(const int32_t* num_valid, int64_t T) {
  if (num_valid == nullptr) return T;
  const int64_t v = *num_valid;
  return v < 0 ? 0 : (v > T ? T : v);
}

__device__ __forceinline__ int64_t owner(const DispatchParams& p, int32_t e) {
  if (e < 0 || e >= p.E) return -1;
  const int32_t r = p.expert_rank[e];
  return (r >= 0 && r < p.W) ? r : -1;
}

// True when one of token t's experts lives on rank r.
__device__ __forceinline__ bool sends_to(const DispatchParams& p, int64_t t, int64_t r) {
  const int32_t* ids = p.topk_ids + t * p.k;
  bool hit = false;
#pragma unroll 8
  for (int64_t j = 0; j < p.k; ++j) hit |= owner(p, ids[j]) == r;
  return hit;
}

// (1) Tokens of tile blockIdx.x per destination rank -> tile_counts[tile, r].
__global__ void __launch_bounds__(kTile) ep_count_kernel(const DispatchParams p) {
  extern __shared__ int32_t rank_counts[];  // [W]
  const int64_t W = p.W, k = p.k;
  for (int64_t r = threadIdx.x; r < W; r += kTile) rank_counts[r] = 0;
  __syncthreads();
  const int64_t t = blockIdx.x * int64_t{kTile} + threadIdx.x;
  if (t < valid_rows(p.num_valid, p.T)) {
    const int32_t* ids = p.topk_ids + t * k;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = owner(p, ids[j]);
      bool first = r >= 0;  // each destination rank once per token
      for (int64_t i = 0; i < j && first; ++i) first = owner(p, ids[i]) != r;
      if (first) atomicAdd(&rank_counts[r], 1);
    }
  }
  __syncthreads();
  for (int64_t r = threadIdx.x; r < W; r += kTile)
    p.tile_counts[blockIdx.x * W + r] = rank_counts[r];
}

// (2) Slots of tile blockIdx.x on rank blockIdx.y.
__global__ void __launch_bounds__(kTile) ep_slot_kernel(const DispatchParams p) {
  __shared__ int warp_sums[kTileWarps];
  __shared__ int base_s;
  const int64_t tile = blockIdx.x, r = blockIdx.y;
  const int64_t T = p.T, W = p.W, C = p.C, k = p.k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp == 0) {  // slots taken by the earlier tiles
    int sum = 0;
    for (int64_t b = lane; b < tile; b += 32) sum += p.tile_counts[b * W + r];
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
    if (lane == 0) base_s = sum;
  }
  const int64_t t = tile * kTile + threadIdx.x;
  const bool hit = t < valid_rows(p.num_valid, T) && sends_to(p, t, r);
  const unsigned ballot = __ballot_sync(kFull, hit);
  if (lane == 0) warp_sums[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {  // inclusive scan of the warp totals
    int v = lane < kTileWarps ? warp_sums[lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(kFull, v, off);
      if (lane >= off) v += y;
    }
    if (lane < kTileWarps) warp_sums[lane] = v;
  }
  __syncthreads();
  const int base = base_s;
  if (t < T) {
    if (!hit) {
      p.slot_map[t * W + r] = -1;
    } else {
      const int s = base + (warp > 0 ? warp_sums[warp - 1] : 0) +
                    __popc(ballot & ((1u << lane) - 1u));
      p.slot_map[t * W + r] = s;
      int32_t* meta = dispatch_meta(p, r, s);
      const int32_t* ids = p.topk_ids + t * k;
      const float* w = p.topk_weights + t * k;
      // Word j of the row: local id (j < k) or weight bits of pair j - k.
      auto word = [&](int64_t j) -> int32_t {
        const int64_t i = j < k ? j : j - k;
        const bool here = owner(p, ids[i]) == r;
        if (j < k) return here ? p.expert_local[ids[i]] : -1;
        return here ? __float_as_int(w[i]) : 0;
      };
      // 16-byte stores when the row allows: in peer mode the row is in the
      // owner's memory, and scalar stores over NVLink cost the slot kernel
      // ~45 us at 4096-16384 tokens on two H200s.
      if ((2 * k) % 4 == 0 && reinterpret_cast<uintptr_t>(meta) % 16 == 0) {
        for (int64_t j = 0; j < 2 * k; j += 4)
          *reinterpret_cast<int4*>(meta + j) = make_int4(word(j), word(j + 1), word(j + 2), word(j + 3));
      } else {
        for (int64_t j = 0; j < 2 * k; ++j) meta[j] = word(j);
      }
    }
  }
  if (tile != gridDim.x - 1) return;
  // The last tile knows the rank's total: its count, and the unused slots.
  const int64_t total = base + warp_sums[kTileWarps - 1];
  if (threadIdx.x == 0) p.counts[r] = static_cast<int32_t>(total);
  int32_t* meta = dispatch_meta(p, r, 0);  // slots of this source are consecutive
  for (int64_t i = total * 2 * k + threadIdx.x; i < C * 2 * k; i += kTile)
    meta[i] = (i % (2 * k)) < k ? -1 : 0;
}

// Warp-per-row copies: a warp loads kRowUnroll vectors per lane of its row
// (one row read, several loads in flight) and stores them to every
// destination; warps stride over the rows, so the grid stays a few waves.
// (With a block per row and one load per thread, the peer combine half ran
// at 224 GB/s at 16384 tokens on two H200s; with this, 257.)
template <typename V>
__global__ void __launch_bounds__(kRowThreads) ep_copy_rows_kernel(const DispatchParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t W = p.W;
  const int64_t nvec = p.row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); t < p.T;
       t += warps) {
    const V* src = reinterpret_cast<const V*>(static_cast<const char*>(p.hidden) + t * p.row_bytes);
    const int32_t* slots = p.slot_map + t * W;
    for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kRowUnroll) {
      V r[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u)
        if (v0 + 32 * u < nvec) r[u] = src[v0 + 32 * u];
      for (int64_t d = 0; d < W; ++d) {
        const int32_t s = slots[d];  // one address for the warp: a broadcast load
        if (s < 0) continue;
        V* dst = reinterpret_cast<V*>(dispatch_row(p, d, s));
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u)
          if (v0 + 32 * u < nvec) dst[v0 + 32 * u] = r[u];
      }
    }
  }
}

// One warp per received slot (src, s): a slot the source really used (one
// local id >= 0) goes back to rank src's workspace (see ep_copy_rows_kernel).
template <typename V>
__global__ void __launch_bounds__(kRowThreads) ep_return_rows_kernel(const ReturnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t k = p.k, slots = p.W * p.C;
  const int64_t nvec = p.row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); i < slots;
       i += warps) {
    const int32_t* meta = p.meta + i * 2 * k;
    bool used = false;
    for (int64_t j = lane; j < k; j += 32) used |= meta[j] >= 0;
    if (!__any_sync(kFull, used)) continue;
    const int64_t src = i / p.C, s = i % p.C;
    const V* from = reinterpret_cast<const V*>(static_cast<const char*>(p.y) + i * p.row_bytes);
    V* to = reinterpret_cast<V*>(reinterpret_cast<char*>(p.peer_base[src]) + p.back_offset +
                                 (p.rank * p.C + s) * p.row_bytes);
    for (int64_t v0 = lane; v0 < nvec; v0 += 32 * kRowUnroll) {
      V r[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u)
        if (v0 + 32 * u < nvec) r[u] = from[v0 + 32 * u];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u)
        if (v0 + 32 * u < nvec) to[v0 + 32 * u] = r[u];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) ep_combine_kernel(const CombineParams p) {
  extern __shared__ int32_t slots[];
  const int64_t t = blockIdx.x;
  const int64_t W = p.W, C = p.C, H = p.H;
  for (int64_t r = threadIdx.x; r < W; r += kCombineThreads) {
    const int32_t s = p.slot_map[t * W + r];
    slots[r] = (s >= 0 && s < C) ? s : -1;
  }
  __syncthreads();
  const T* recv = static_cast<const T*>(p.recv);
  T* out = static_cast<T*>(p.out) + t * H;
  for (int64_t h = threadIdx.x; h < H; h += kCombineThreads) {
    float acc = 0.0f;
    for (int64_t r = 0; r < W; ++r) {
      const int32_t s = slots[r];
      if (s >= 0) acc = __fadd_rn(acc, to_float(recv[(r * C + s) * H + h]));
    }
    out[h] = from_float<T>(acc);
  }
}

// Same sums, 16-byte vectors: kVec elements of T per load (rows 16-byte aligned).
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) ep_combine_vec_kernel(const CombineParams p) {
  constexpr int kVec = 16 / sizeof(T);
  extern __shared__ int32_t slots[];
  const int64_t t = blockIdx.x;
  const int64_t W = p.W, C = p.C, H = p.H;
  for (int64_t r = threadIdx.x; r < W; r += kCombineThreads) {
    const int32_t s = p.slot_map[t * W + r];
    slots[r] = (s >= 0 && s < C) ? s : -1;
  }
  __syncthreads();
  const T* recv = static_cast<const T*>(p.recv);
  T* out = static_cast<T*>(p.out) + t * H;
  for (int64_t v = threadIdx.x; v < H / kVec; v += kCombineThreads) {
    float acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
    for (int64_t r = 0; r < W; ++r) {
      const int32_t s = slots[r];
      if (s < 0) continue;
      const uint4 raw = *reinterpret_cast<const uint4*>(recv + (r * C + s) * H + v * kVec);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = __fadd_rn(acc[i], to_float(e[i]));
    }
    uint4 packed;
    T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = from_float<T>(acc[i]);
    *reinterpret_cast<uint4*>(out + v * kVec) = packed;
  }
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Calls launch(W{}) with the widest copy word W (16, 8, 4, 2 or 1 bytes) for
// which fits(sizeof(W)) holds.
template <typename Fits, typename Launch>
void with_copy_width(const Fits& fits, const Launch& launch) {
  if (fits(16))
    launch(uint4{});
  else if (fits(8))
    launch(uint2{});
  else if (fits(4))
    launch(uint32_t{});
  else if (fits(2))
    launch(uint16_t{});
  else
    launch(uint8_t{});
}

}  // namespace

void dispatch_cuda(const DispatchParams& p, CUstream_st* stream) {
  if (p.W == 0) return;
  const int64_t tiles = dispatch_tiles(p.T);
  if (tiles > 1)
    ep_count_kernel<<<static_cast<unsigned>(tiles), kTile, p.W * sizeof(int32_t), stream>>>(p);
  ep_slot_kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.W)), kTile, 0,
                   stream>>>(p);
  if (p.T == 0 || p.row_bytes == 0) return;
  // Peer workspaces are 16-byte aligned by contract; their offset must fit too.
  auto fits = [&](int64_t v) {
    return p.row_bytes % v == 0 && aligned(p.hidden, v) &&
           (p.peer_base ? p.hidden_offset % v == 0 : aligned(p.send_hidden, v));
  };
  with_copy_width(fits, [&](auto word) {
    ep_copy_rows_kernel<decltype(word)><<<row_blocks(p.T), kRowThreads, 0, stream>>>(p);
  });
}

void return_cuda(const ReturnParams& p, CUstream_st* stream) {
  if (p.W == 0 || p.C == 0 || p.row_bytes == 0) return;
  auto fits = [&](int64_t v) {
    return p.row_bytes % v == 0 && aligned(p.y, v) && p.back_offset % v == 0;
  };
  with_copy_width(fits, [&](auto word) {
    ep_return_rows_kernel<decltype(word)><<<row_blocks(p.W * p.C), kRowThreads, 0, stream>>>(p);
  });
}

void combine_cuda(const CombineParams& p, CUstream_st* stream) {
  if (p.T == 0 || p.H == 0) return;
  const dim3 grid(static_cast<unsigned>(p.T));
  // 4 spare entries: the compiler may read slots[r..r+3] in one shared load.
  const size_t smem = (static_cast<size_t>(p.W) + 4) * sizeof(int32_t);
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  if ((p.H * elem) % 16 == 0 && aligned(p.recv, 16) && aligned(p.out, 16)) {
    switch (p.dtype) {
      case DType::kFloat16:
        ep_combine_vec_kernel<__half><<<grid, kCombineThreads, smem, stream>>>(p);
        return;
      case DType::kBFloat16:
        ep_combine_vec_kernel<__nv_bfloat16><<<grid, kCombineThreads, smem, stream>>>(p);
        return;
      default:
        ep_combine_vec_kernel<float><<<grid, kCombineThreads, smem, stream>>>(p);
        return;
    }
  }
  switch (p.dtype) {
    case DType::kFloat16:
      ep_combine_kernel<__half><<<grid, kCombineThreads, smem, stream>>>(p);
      break;
    case DType::kBFloat16:
      ep_combine_kernel<__nv_bfloat16><<<grid, kCombineThreads, smem, stream>>>(p);
      break;
    default:
      ep_combine_kernel<float><<<grid, kCombineThreads, smem, stream>>>(p);
      break;
  }
}

}  // namespace pcg::ep
