// Causal attention for packed batches of short sequences (pcg::causal_attention_out's
// CUDA fast path). Torch-free on purpose: the .cu file includes only this header.
//
// One launch computes every real row and writes zeros to the pad rows, so a
// split call costs one kernel (flash at small T: split-KV + combine + our copy).
// Sequence starts travel by value in the kernel parameters: no host-to-device
// copy, nothing to stage, and the launch stays capturable.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace pcg {

// Longest sequence the kernel takes. Every visible key's score lives in
// registers (two per lane of a warp), so the softmax needs no online rescaling;
// above 64 tokens the split's launch overhead is a smaller share of the forward
// and flash's tiled kernel is the better tool.
constexpr int64_t kShortAttnMaxSeqlen = 64;
// Sequences per launch: the starts are a by-value array in the parameters
// (4 bytes each; kernel parameters hold 4 KiB on every target we build).
constexpr int64_t kShortAttnMaxSeqs = 128;
// Real tokens per launch. Each (row, head) is one warp doing up to 64 dot
// products of D and Dv per lane group: fine while launches dominate, wasteful
// next to flash's tensor-core tiles for big batches. Untuned: bench/attention.py covers <= 64 rows.
constexpr int64_t kShortAttnMaxTokens = 1024;
constexpr int64_t kShortAttnMaxHeadDim = 256;

enum class ShortAttnDtype : int32_t { kBFloat16 = 0, kFloat16 = 1 };

// Strides are in elements; the last dimension of q/k/v/out has unit stride and
// every row/head start is 16-byte aligned (the launcher checks both).
struct ShortAttnParams {
  const void* q = nullptr;  // [rows, Hq, D]
  const void* k = nullptr;  // [rows, Hkv, D]
  const void* v = nullptr;  // [rows, Hkv, Dv]
  void* out = nullptr;      // [rows, Hq, Dv]
  int64_t q_row = 0, q_head = 0;
  int64_t k_row = 0, k_head = 0;
  int64_t v_row = 0, v_head = 0;
  int64_t o_row = 0, o_head = 0;
  int32_t rows = 0;        // rows of q/out; rows >= num_tokens are written as zeros
  int32_t num_tokens = 0;  // == cu[num_seqs]
  int32_t hq = 0, group = 1;  // q heads; q heads per kv head
  int32_t d = 0, dv = 0;      // multiples of 8, <= kShortAttnMaxHeadDim
  int32_t window_left = -1;   // -1: every earlier key of the sequence
  float scale_log2 = 0.0f;    // softmax scale * log2(e): scores go through exp2
  ShortAttnDtype dtype = ShortAttnDtype::kBFloat16;
  int32_t num_seqs = 0;                   // <= kShortAttnMaxSeqs
  int32_t cu[kShortAttnMaxSeqs + 1] = {};  // sequence starts, cu[0] = 0
  // Device-side batch (pcg::causal_attention_graph): when set, the kernel
  // reads [num_tokens, num_seqs, cu_seqlens...] from this int32 array (room
  // for batch_capacity sequences) instead of num_tokens / num_seqs / cu above,
  // so a captured launch follows whatever batch the array holds at replay.
  // Values are clamped into range; a row whose sequence is longer than
  // kShortAttnMaxSeqlen (or whose start is out of range) is written as NaN.
  const int32_t* device_batch = nullptr;
  int32_t batch_capacity = 0;
};

// Validated params in (see short_attention_cuda.cpp), one kernel on `stream`.
// rows == 0 launches nothing.
void short_attention_cuda(const ShortAttnParams& p, CUstream_st* stream);

}  // namespace pcg
