// Expert-parallel dispatch / combine kernels: torch-free interface (raw
// pointers, plain types); the .cu file includes only this header.
//
// Layout (W ranks, send capacity C >= T rows per destination rank):
//
//   ep_dispatch: token t (t < num_valid) whose top-k experts live on ranks
//     {r} is written ONCE per destination rank r (not once per pair), at
//     slot s = number of tokens t' < t that also go to r (stable order):
//       send_hidden[r, s, :]   = hidden[t, :]
//       send_meta[r, s, j]     = local id of expert topk_ids[t, j] on r, or -1
//                                when that expert lives elsewhere (j < k)
//       send_meta[r, s, k + j] = bits of topk_weights[t, j] (float32), 0.0f
//                                when the expert lives elsewhere
//       slot_map[t, r]         = s (-1: t sends nothing to r)
//       counts[r]              = number of slots used on r
//     Unused slots s >= counts[r] get ids -1 and weights 0 (their hidden rows
//     are left as they are), so a receiver may run the experts over all W*C
//     received rows and no host-side count is ever needed.
//   ep_combine: out[t, :] = sum over r (ascending) of recv[r, slot_map[t, r], :]
//     for slot_map[t, r] >= 0, accumulated in float32; zero rows otherwise.
//     The router weights were applied by the expert kernel on the owning
//     rank, so each returned row is already that rank's weighted partial sum.
//
// Both kernels read num_valid on the device and do no host synchronisation:
// they capture in CUDA graphs. CPU and CUDA produce identical buffers.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace pcg::ep {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Peer-mapped variant (ep_dispatch_peer / ep_return_peer): instead of local
// send buffers [W, C, ...], rank `rank` writes straight into every rank r's
// workspace, mapped into this process (symmetric memory): the row for slot s
// goes to peer_base[r] + hidden_offset + (rank*C + s) * row_bytes and its
// metadata to peer_base[r] + meta_offset + (rank*C + s) * 2k * 4, i.e. the
// receiver's [W, C, ...] receive buffers indexed by source rank, exactly what
// all_to_all_single would have delivered. Peer bases must be 16-byte aligned.
struct DispatchParams {
  const void* hidden = nullptr;         // [T, H] contiguous
  int64_t row_bytes = 0;                // H * element size
  const float* topk_weights = nullptr;  // [T, k] contiguous
  const int32_t* topk_ids = nullptr;    // [T, k] contiguous, global expert ids
  const int32_t* expert_rank = nullptr;   // [E] owner rank of each global expert
  const int32_t* expert_local = nullptr;  // [E] local id on the owner
  const int32_t* num_valid = nullptr;     // one element, or null (= T)
  int64_t T = 0, k = 0, E = 0, W = 0, C = 0;
  void* send_hidden = nullptr;  // [W, C, H] contiguous
  int32_t* send_meta = nullptr; // [W, C, 2k] contiguous
  int32_t* slot_map = nullptr;  // [T, W] contiguous
  int32_t* counts = nullptr;    // [W]
  // Peer mode when peer_base != null (send_hidden / send_meta unused).
  const int64_t* peer_base = nullptr;  // [W] workspace base addresses (device array on CUDA)
  int64_t rank = 0;
  int64_t hidden_offset = 0, meta_offset = 0;  // bytes into each workspace
  // CUDA scratch [dispatch_tiles(T), W]: slots each tile of tokens takes per rank.
  int32_t* tile_counts = nullptr;
};

// The CUDA dispatch assigns slots in tiles of kDispatchTile tokens.
constexpr int64_t kDispatchTile = 256;  // 1024 left the slot kernel on 32 SMs at 16384 tokens (47 us)
inline int64_t dispatch_tiles(int64_t T) {
  return T <= kDispatchTile ? 1 : (T + kDispatchTile - 1) / kDispatchTile;
}

// Destination of slot s of rank r (send buffers, or rank r's workspace).
#ifdef __CUDACC__
#define PCG_EP_HD __host__ __device__ __forceinline__
#else
#define PCG_EP_HD inline
#endif
PCG_EP_HD char* dispatch_row(const DispatchParams& p, int64_t r, int64_t s) {
  if (p.peer_base == nullptr)
    return static_cast<char*>(p.send_hidden) + (r * p.C + s) * p.row_bytes;
  return reinterpret_cast<char*>(p.peer_base[r]) + p.hidden_offset +
         (p.rank * p.C + s) * p.row_bytes;
}
PCG_EP_HD int32_t* dispatch_meta(const DispatchParams& p, int64_t r, int64_t s) {
  if (p.peer_base == nullptr) return p.send_meta + (r * p.C + s) * 2 * p.k;
  return reinterpret_cast<int32_t*>(reinterpret_cast<char*>(p.peer_base[r]) + p.meta_offset) +
         (p.rank * p.C + s) * 2 * p.k;
}

// ep_return_peer: row (src, s) of the expert output y [W*C, H] goes back to
// rank src's workspace at back_offset + (rank*C + s) * row_bytes, for every
// slot whose received metadata holds at least one local expert id >= 0 (the
// slots rank src really used; the others are skipped).
struct ReturnParams {
  const void* y = nullptr;           // [W*C, H] contiguous
  const int32_t* meta = nullptr;     // [W, C, 2k] contiguous (this rank's received metadata)
  const int64_t* peer_base = nullptr;  // [W]
  int64_t rank = 0, W = 0, C = 0, k = 0, row_bytes = 0, back_offset = 0;
};

struct CombineParams {
  DType dtype = DType::kFloat32;
  const void* recv = nullptr;         // [W, C, H] contiguous
  const int32_t* slot_map = nullptr;  // [T, W] contiguous
  void* out = nullptr;                // [T, H] contiguous, recv's dtype
  int64_t T = 0, H = 0, W = 0, C = 0;
};

// Largest W the CUDA dispatch / combine kernels keep in shared memory.
constexpr int64_t kMaxRanksCuda = 4096;

// Validated params in, outputs written.
void dispatch_cpu(const DispatchParams& p);
void combine_cpu(const CombineParams& p);
void dispatch_cuda(const DispatchParams& p, CUstream_st* stream);
void combine_cuda(const CombineParams& p, CUstream_st* stream);
void return_cpu(const ReturnParams& p);
void return_cuda(const ReturnParams& p, CUstream_st* stream);

}  // namespace pcg::ep
