// pcg::fused_moe kernels: torch-free interface (raw pointers, plain types).
//
//   out[t] = sum_j topk_weights[t,j] * (w2[e] @ act(w13[e] @ x_t + b13[e]) + b2[e])
//   (gate / up rows of w13[e] as w13_block says: w13_row below)
//   e = expert_map[topk_ids[t,j]] (identity without a map); invalid pairs and
//   rows t >= num_valid contribute nothing (rows >= num_valid are zeros).
//
// CUDA pipeline (all on one stream, no host synchronisation, fixed sizes):
//   1. moe_align (moe_align.h): pairs sorted by local expert, padded to block_m.
//   2. GEMM1 (grouped over blocks of block_m sorted slots): rows of hidden are
//      gathered while loading A; the gate and up tiles of w13[e] are computed
//      together; bias + activation in the epilogue; the intermediate
//      [slots, I] is written in the hidden dtype (rounded, like an unfused
//      implementation would).
//   3. GEMM2: intermediate @ w2[e]^T + b2, times the router weight, written in
//      fp32 to pair_out[pair, :] (the pair's original position t*k+j).
//   4. Reduce: out[t] = sum over the valid j of pair_out[t*k+j] in fixed j
//      order (deterministic, no atomics); rows >= num_valid are zeros and
//      dropped pairs are skipped (pair_out is never read for them).
// bf16/fp16 use tensor cores (mma.sync m16n8k16, fp32 accumulation, a
// multi-stage cp.async pipeline); fp32 uses a SIMT kernel. Any H and I are
// handled (16-byte loads when the row is a multiple of 8 elements and aligned,
// element loads otherwise).
//
// Configuration (MoeConfig): block_m (rows per GEMM block, 16/32/64/128) and
// one tile per GEMM (ids of the list in fused_moe_tiles.h; a tile's BM must be
// block_m). choose_config picks it as a pure function of the shapes (a
// captured graph and its replays agree): the tuning table (fused_moe_tuning.h,
// generated on a GPU by bench/tune_moe.py, keyed by (E_local, top_k, H, I) and
// ranges of T); for shapes it does not hold, the CUTLASS path from 16 rows
// per expert, the stream path up to 128 (token, k) pairs, CUTLASS for large
// experts from one row per expert, else heuristic_config (block_m from the
// average pairs per expert, default tiles); each path only where the call can
// take it. fp32 uses only block_m
// (tile ids -1). Callers may
// force a config (the op's `config` argument); the CUDA launcher checks that
// the tiles' shared memory fits the device (a table choice that does not fit
// falls back to the default tiles of its block_m).
#pragma once

#include <cstdint>

#include "common/host_device.h"

#include "moe/fused_moe_tiles.h"
#include "moe/fused_moe_tuning.h"
#include "moe/grouped_gemm_variants.h"

namespace pcg::moe {

enum class Activation : int { kSilu = 0, kGelu = 1, kSwigluOai = 2, kGeluTanh = 3 };
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// w13's row layout (the op's `w13_block` argument). 0: the I gate rows, then
// the I up rows. B > 0 (a power of two >= 8 dividing I): blocks of B gate rows and
// B up rows alternate, [g_0..g_B-1, u_0..u_B-1, g_B..g_2B-1, u_B.., ...], so a
// tile of GEMM1's output holds gate and up of the same columns. With
// B == kFusedW13Block the CUTLASS path applies the activation in GEMM1's
// epilogue (gate and up in one thread's registers: no gate_up buffer, no
// activation kernel). b13 keeps the plain layout either way.
constexpr int kFusedW13Block = 8;
constexpr bool is_valid_w13_block(int64_t block, int64_t I) {
  return block == 0 || (block >= 8 && (block & (block - 1)) == 0 && I % block == 0);
}
// Row of w13[e] (and column of GEMM1's [M, 2I] output) holding gate (up:
// up) column n of [0, I): n + (n & w13_row_mask(B)) + (up ? w13_up_offset(B, I) : 0),
// since with B a power of two (n / B) * 2B + n % B = n + (n & ~(B - 1)). A GEMM
// computes the mask and the offset once and pays an AND and an add per row.
PCG_HD constexpr int64_t w13_row_mask(int block) {
  return block > 0 ? ~static_cast<int64_t>(block - 1) : 0;
}
PCG_HD constexpr int64_t w13_up_offset(int block, int64_t I) { return block > 0 ? block : I; }
PCG_HD constexpr int64_t w13_row(int64_t n, int64_t I, int block, bool up) {
  return n + (n & w13_row_mask(block)) + (up ? w13_up_offset(block, I) : 0);
}

// Rows per GEMM block (= moe_align's block_m) chosen from the average number
// of pairs per local expert; a pure function of the shapes, so a captured
// graph and its replays agree.
inline int choose_block_m(int64_t num_tokens, int64_t top_k, int64_t num_experts) {
  const int64_t pairs = num_tokens * top_k;
  const int64_t per_expert = num_experts > 0 ? pairs / num_experts : pairs;
  if (per_expert <= 16) return 16;
  if (per_expert <= 48) return 32;
  if (per_expert <= 256) return 64;
  return 128;
}

// Rows per GEMM block and the tiles of the two GEMMs (ids in fused_moe_tiles.h;
// -1: the default tile of block_m, and always -1 for fp32).
struct MoeConfig {
  int block_m = 64;
  int tile1 = -1;  // GEMM1 (GATED tile)
  int tile2 = -1;  // GEMM2
};

constexpr bool operator==(const MoeConfig& a, const MoeConfig& b) {
  return a.block_m == b.block_m && a.tile1 == b.tile1 && a.tile2 == b.tile2;
}

// config[0] values that select another implementation of the same op: the
// CUTLASS sm_90a grouped-GEMM path (moe_cutlass.h; large T), whose tile1 /
// tile2 name the GEMM1 / GEMM2 kernel variants (grouped_gemm_variants.h; -1:
// kDefaultGemmVariant), and the weight-streaming path (moe_stream.h; a few
// tokens; tiles -1). Both bf16/fp16 only.
constexpr int kCutlassConfig = -1;
constexpr int kStreamConfig = -2;
constexpr bool is_cutlass_config(const MoeConfig& c) { return c.block_m == kCutlassConfig; }
constexpr bool is_stream_config(const MoeConfig& c) { return c.block_m == kStreamConfig; }
constexpr bool is_path_config(const MoeConfig& c) {
  if (is_cutlass_config(c)) return is_gemm_variant_id(c.tile1) && is_gemm_variant_id(c.tile2);
  return is_stream_config(c) && c.tile1 == -1 && c.tile2 == -1;
}

// Which special paths the launcher can run for this call (build, device,
// dtype, shapes, alignment); the table's choice of an unavailable path falls
// back to heuristic_config.
struct PathSupport {
  bool cutlass = false;
  bool stream = false;
};

// Untuned shapes use the CUTLASS path once experts average this many rows
// (H200, bench/moe.py: equal at 16 rows per expert on Mixtral, faster above).
constexpr int64_t kCutlassMinRowsPerExpert = 16;

// Below that, untuned shapes stream the weights (the stream path) up to this
// many (token, k) pairs, the stream path's limit. H200 (bench/untuned.py, four
// public shapes the table does not hold): 1.13-1.50x faster than the default
// tiles at 8-64 pairs, 1.03-1.17x at 128; the tuned bench shapes stream up to
// 78-128 pairs (Qwen3-30B-A3B's tiles win at 128 by 3%).
constexpr int64_t kStreamGuessMaxPairs = 128;

// Above the stream path's pairs, untuned shapes with large experts (H * I at
// least this) take the CUTLASS path from one row per expert. H200
// (bench/untuned.py, chain, CUTLASS vs the default tiles at 1-8 rows per
// expert): DeepSeek-V3 (H * I = 14 Mi) 2.4-4.6% faster, Qwen2-57B-A14B (8.75 Mi)
// 4.5%, Qwen3-235B-A22B (6 Mi) 0-4%; OLMoE-1B-7B (2 Mi) 4-6% slower.
constexpr int64_t kCutlassLargeExpertElems = int64_t{6} << 20;

// The behaviour before tuning: choose_block_m and the default tiles.
inline MoeConfig heuristic_config(int64_t num_tokens, int64_t top_k, int64_t num_experts,
                                  DType dtype) {
  MoeConfig c;
  c.block_m = choose_block_m(num_tokens, top_k, num_experts);
  if (dtype != DType::kFloat32) {
    c.tile1 = default_tile(c.block_m, true);
    c.tile2 = default_tile(c.block_m, false);
  }
  return c;
}

// A config the kernels can run (any device; shared memory is checked at launch).
// tile ids must be concrete here (no -1) except for fp32, where they must be -1,
// and for the paths (CUTLASS: -1 or listed variant ids; stream: -1).
constexpr bool config_is_valid(const MoeConfig& c, DType dtype) {
  if (is_path_config(c)) return dtype != DType::kFloat32;
  if (!is_supported_block_m(c.block_m)) return false;
  if (dtype == DType::kFloat32) return c.tile1 == -1 && c.tile2 == -1;
  const TileInfo* t1 = find_tile(c.tile1);
  const TileInfo* t2 = find_tile(c.tile2);
  return t1 != nullptr && t2 != nullptr && t1->gated && !t2->gated && t1->bm == c.block_m &&
         t2->bm == c.block_m;
}

// Every row of the generated table names a valid bf16/fp16 config, rows of a shape are sorted by
// t_max, and no shape appears twice.
constexpr bool tuning_table_is_valid() {
  constexpr int n = static_cast<int>(sizeof(tuning::kShapes) / sizeof(tuning::kShapes[0]));
  for (int s = 0; s < n; ++s) {
    const TuningShape& sh = tuning::kShapes[s];
    for (int r = 0; r < sh.num_entries; ++r) {
      const TuningEntry& e = sh.entries[r];
      const MoeConfig c{e.block_m, e.tile1, e.tile2};
      if (!config_is_valid(c, DType::kBFloat16)) return false;
      if (r > 0 && e.t_max <= sh.entries[r - 1].t_max) return false;
    }
    for (int o = 0; o < s; ++o) {
      const TuningShape& p = tuning::kShapes[o];
      if (p.num_entries > 0 && p.E == sh.E && p.k == sh.k && p.H == sh.H && p.I == sh.I) {
        return false;
      }
    }
  }
  return true;
}
static_assert(tuning_table_is_valid(), "fused_moe_tuning.h: invalid table (regenerate it)");

// The config pcg::fused_moe uses for these shapes (E_local = w13.size(0)):
// the tuning table's row for (E_local, top_k, H, I) and T (the first row with
// T <= t_max, the last row above every t_max) unless it names a path `ok`
// lacks; else the CUTLASS path when it is available and experts average
// kCutlassMinRowsPerExpert rows ([-1, -1, -1]: default variants); else the
// stream path up to kStreamGuessMaxPairs pairs; else the CUTLASS path for
// large experts (kCutlassLargeExpertElems) from one row per expert; else
// heuristic_config (also fp32). A pure function of its arguments.
inline MoeConfig choose_config(int64_t E_local, int64_t top_k, int64_t H, int64_t I,
                               int64_t num_tokens, DType dtype, PathSupport ok = {}) {
  const auto usable = [&](const MoeConfig& c) {
    return !(is_cutlass_config(c) && !ok.cutlass) && !(is_stream_config(c) && !ok.stream);
  };
  if (dtype != DType::kFloat32) {
    for (const TuningShape& sh : tuning::kShapes) {
      if (sh.num_entries <= 0 || sh.E != E_local || sh.k != top_k || sh.H != H || sh.I != I) {
        continue;
      }
      const TuningEntry* e = &sh.entries[sh.num_entries - 1];
      for (int r = 0; r < sh.num_entries; ++r) {
        if (num_tokens <= sh.entries[r].t_max) {
          e = &sh.entries[r];
          break;
        }
      }
      const MoeConfig c{e->block_m, e->tile1, e->tile2};
      if (usable(c)) return c;
      break;
    }
    if (ok.cutlass && num_tokens * top_k >= kCutlassMinRowsPerExpert * E_local) {
      return MoeConfig{kCutlassConfig, -1, -1};
    }
    if (ok.stream && num_tokens > 0 && num_tokens * top_k <= kStreamGuessMaxPairs) {
      return MoeConfig{kStreamConfig, -1, -1};
    }
    if (ok.cutlass && H * I >= kCutlassLargeExpertElems && num_tokens * top_k >= E_local) {
      return MoeConfig{kCutlassConfig, -1, -1};
    }
  }
  return heuristic_config(num_tokens, top_k, E_local, dtype);
}

struct FusedMoeParams {
  DType dtype = DType::kBFloat16;
  // Inputs (contiguous).
  const void* hidden = nullptr;          // [T, H]
  const void* w13 = nullptr;             // [E, 2I, H], rows as w13_block says
  const void* w2 = nullptr;              // [E, H, I]
  const void* b13 = nullptr;             // [E, 2I] or null
  const void* b2 = nullptr;              // [E, H] or null
  const float* topk_weights = nullptr;   // [T, k]
  const int32_t* topk_ids = nullptr;     // [T, k]
  const int32_t* expert_map = nullptr;   // [num_global] or null
  int64_t num_global = 0;                // map size, or E without a map
  const int32_t* num_valid = nullptr;    // device scalar or null
  int64_t T = 0, H = 0, I = 0, E = 0, k = 0;
  int w13_block = 0;                     // w13's row layout (w13_row)
  Activation act = Activation::kSilu;
  float alpha = 1.702f, limit = 7.0f;
  // Configuration: block_m and concrete tile ids (fp32: tile ids unused). The
  // CUTLASS path: {kCutlassBlockM, GEMM1 variant, GEMM2 variant} (listed ids).
  MoeConfig config;
  // Workspaces (fixed worst-case sizes).
  int64_t max_blocks = 0;                // moe_align_max_blocks(T*k, E, config.block_m)
  int32_t* sorted_pairs = nullptr;       // [max_blocks * config.block_m]
  int32_t* block_expert = nullptr;       // [max_blocks]
  int32_t* align_scratch = nullptr;      // [moe_align_scratch_ints(T*k, E)] (may be null when 0)
  int32_t* num_blocks = nullptr;         // [1]
  void* inter = nullptr;                 // [max_blocks * config.block_m, I], dtype
  float* pair_out = nullptr;             // [T * k, H]
  // Output.
  void* out = nullptr;                   // [T, H], dtype
};

}  // namespace pcg::moe

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace pcg::moe {
// Runs the whole pipeline on `stream`; returns the first launch error.
cudaError_t launch_fused_moe(const FusedMoeParams& p, cudaStream_t stream);
}  // namespace pcg::moe
#endif
