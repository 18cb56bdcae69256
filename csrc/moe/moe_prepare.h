// Host-side sizes of the CUTLASS path's one-kernel prologue (moe_prepare.cuh:
// moe_align + permute + GEMM setup). Torch-free, CUDA-free.
#pragma once

#include <cstdint>

namespace pcg::moe {

constexpr int kPrepareWarps = 8;   // warps per CTA
constexpr int kPrepareUnroll = 8;  // 16-byte loads in flight per lane (pieces of <= 4 KiB)
// Every CTA counts all pairs in shared memory: above this many, the three-kernel
// prologue (at 16384 pairs the one kernel still gained 0.5-1.6% on Qwen3-30B-A3B,
// DeepSeek-V2-Lite and gpt-oss-20b and was within the spread of identical
// graphs on Mixtral-8x7B, bench/results/ab_prologue_limit_s24.log).
constexpr int64_t kPrepareMaxPairs = 16384;
// Ids a thread loads (16 bytes at a time) before counting them.
constexpr int kPrepareIdsInFlight = 32;
// Four ints per expert in shared memory.
constexpr int64_t kPrepareMaxExperts = 2048;
// At most this many CTAs per SM (each counts every pair).
constexpr int64_t kPrepareCtasPerSm = 1;

// Whether the one-kernel prologue takes T*k pairs over E local experts.
inline bool moe_prepare_fits(int64_t num_pairs, int64_t num_experts) {
  return num_pairs > 0 && num_pairs <= kPrepareMaxPairs && num_experts > 0 &&
         num_experts <= kPrepareMaxExperts;
}

// Work split: rows of row_vecs 16-byte vectors cut into `chunks` pieces of
// `chunk` vectors; `ctas` CTAs of pieces_per_cta pieces each (a multiple of
// kPrepareWarps); tokens_per_cta bounds the tokens one CTA's pieces touch.
struct MoePrepareSplit {
  int64_t chunk = 0, chunks = 0, pieces_per_cta = 0, tokens_per_cta = 0, ctas = 0;
};

// Pieces as large as one warp's loads in flight allow (32 * kPrepareUnroll
// vectors) but small enough that every warp of the most CTAs gets one (each
// warp loads its first piece before counting; later ones wait for a load):
// the smallest power of two >= T * row_vecs / warps, in [32, 32 * kPrepareUnroll].
inline MoePrepareSplit moe_prepare_split(int64_t T, int64_t row_vecs, int sm_count) {
  MoePrepareSplit s;
  auto chunks_of = [&](int64_t c) { return (row_vecs + c - 1) / c; };
  const int64_t max_ctas = (sm_count > 0 ? sm_count : 1) * kPrepareCtasPerSm;
  const int64_t warps = max_ctas * kPrepareWarps;
  s.chunk = 32;
  while (s.chunk < 32 * kPrepareUnroll && s.chunk * warps < T * row_vecs) s.chunk *= 2;
  s.chunks = chunks_of(s.chunk);
  const int64_t pieces = T * s.chunks;
  int64_t ctas = (pieces + kPrepareWarps - 1) / kPrepareWarps;
  if (ctas > max_ctas) ctas = max_ctas;
  int64_t per = (pieces + ctas - 1) / ctas;
  per = (per + kPrepareWarps - 1) / kPrepareWarps * kPrepareWarps;
  s.pieces_per_cta = per;
  s.ctas = (pieces + per - 1) / per;
  s.tokens_per_cta = (per + s.chunks - 1) / s.chunks + 1;
  return s;
}

}  // namespace pcg::moe
