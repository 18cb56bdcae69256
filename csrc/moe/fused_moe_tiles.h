// Tile configurations of pcg::fused_moe's tensor-core GEMMs (bf16 and fp16
// share them). Torch-free, host and device. THE one list: the kernels
// (fused_moe_kernel.cu), the launchers' validation, the ops that show the list
// to Python (pcg::fused_moe_tiles) and the tuning table all read it.
//
// A tile computes a BM x BN block of one GEMM with WARPS_M x WARPS_N warps
// (each warp BM/WARPS_M x BN/WARPS_N outputs), K in steps of BK through a
// STAGES-deep cp.async pipeline in shared memory. GATED tiles are GEMM1's
// (they compute BN gate + BN up columns and apply the activation); the others
// are GEMM2's. A tile is valid only for block_m == BM (moe_align's block).
//
// Ids are stable: never renumber or reuse one (the checked-in tuning table
// names tiles by id); append new tiles with the next id. Ids 0-7 are the
// defaults (the tiles used before the table existed; heuristic_config).
//
// Shared memory: STAGES * (BM + B rows) * (BK + 8) * 2 bytes dynamic (B rows =
// 2*BN when GATED) plus 12*BM bytes static; at most 227 KB on sm_90, 163 KB on
// sm_80, 99 KB on sm_86/89 (a table choice that does not fit the device falls
// back to the default tiles of its block_m; an explicit override is an error).
// Accumulators: (BM/WARPS_M/16) * (BN/WARPS_N/8) * 4 floats per thread, twice
// that when GATED (at most 128 here).
#pragma once

#include <cstdint>

// X(id, name, BM, BN, BK, WARPS_M, WARPS_N, STAGES, GATED)
// name: g = GEMM1 (gate/up, GATED), d = GEMM2 (down); BMxBNxBK, warps, stages.
#define PCG_MOE_TILES(X)                                       \
  /* defaults (heuristic_config) */                            \
  X(0, g16x64x64_w1x4_s4, 16, 64, 64, 1, 4, 4, true)           \
  X(1, g32x64x64_w2x2_s4, 32, 64, 64, 2, 2, 4, true)           \
  X(2, g64x64x32_w2x2_s4, 64, 64, 32, 2, 2, 4, true)           \
  X(3, g128x64x32_w4x2_s4, 128, 64, 32, 4, 2, 4, true)         \
  X(4, d16x64x64_w1x4_s4, 16, 64, 64, 1, 4, 4, false)          \
  X(5, d32x64x64_w2x2_s4, 32, 64, 64, 2, 2, 4, false)          \
  X(6, d64x128x32_w2x4_s4, 64, 128, 32, 2, 4, 4, false)        \
  X(7, d128x128x32_w4x2_s4, 128, 128, 32, 4, 2, 4, false)      \
  /* small T: more CTAs / deeper K steps for weight streaming */ \
  X(8, g16x32x64_w1x2_s4, 16, 32, 64, 1, 2, 4, true)           \
  X(9, g16x32x128_w1x2_s4, 16, 32, 128, 1, 2, 4, true)         \
  X(10, g16x64x128_w1x4_s3, 16, 64, 128, 1, 4, 3, true)        \
  X(11, d16x32x64_w1x2_s4, 16, 32, 64, 1, 2, 4, false)         \
  X(12, d16x32x128_w1x2_s4, 16, 32, 128, 1, 2, 4, false)       \
  X(13, d16x64x128_w1x4_s4, 16, 64, 128, 1, 4, 4, false)       \
  /* medium T */                                               \
  X(14, g64x128x32_w2x4_s4, 64, 128, 32, 2, 4, 4, true)        \
  X(15, d64x128x64_w2x4_s3, 64, 128, 64, 2, 4, 3, false)       \
  /* large T: 8 warps, 128-row blocks */                       \
  X(16, g128x64x64_w4x2_s3, 128, 64, 64, 4, 2, 3, true)        \
  X(17, g128x128x32_w2x4_s4, 128, 128, 32, 2, 4, 4, true)      \
  X(18, g128x128x64_w2x4_s3, 128, 128, 64, 2, 4, 3, true)      \
  X(19, d128x128x64_w2x4_s3, 128, 128, 64, 2, 4, 3, false)     \
  X(20, d128x256x32_w2x4_s3, 128, 256, 32, 2, 4, 3, false)

namespace pcg::moe {

struct TileInfo {
  int id;
  const char* name;
  int bm, bn, bk, warps_m, warps_n, stages;
  bool gated;

  constexpr int threads() const { return warps_m * warps_n * 32; }
  // Dynamic shared memory of the kernel (the cp.async stages).
  constexpr int64_t smem_dynamic() const {
    return static_cast<int64_t>(stages) * (bm + (gated ? 2 * bn : bn)) * (bk + 8) * 2;
  }
  // Dynamic plus the static per-row tables (a_off int64, s_pair int32).
  constexpr int64_t smem_total() const { return smem_dynamic() + 12 * static_cast<int64_t>(bm); }
  // fp32 accumulators per thread.
  constexpr int accumulators() const {
    return (bm / warps_m / 16) * (bn / warps_n / 8) * 4 * (gated ? 2 : 1);
  }
};

inline constexpr TileInfo kTiles[] = {
#define PCG_MOE_TILE_INFO(id, name, bm, bn, bk, wm, wn, st, g) \
  {id, #name, bm, bn, bk, wm, wn, st, g},
    PCG_MOE_TILES(PCG_MOE_TILE_INFO)
#undef PCG_MOE_TILE_INFO
};
inline constexpr int kNumTiles = static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0]));

// Tile of an id, or null for an unknown id.
constexpr const TileInfo* find_tile(int64_t id) {
  return (id >= 0 && id < kNumTiles) ? &kTiles[id] : nullptr;
}

// The default tiles (ids 0-7) of a block_m; -1 for an unsupported block_m.
constexpr int default_tile(int block_m, bool gated) {
  const int base = gated ? 0 : 4;
  switch (block_m) {
    case 16: return base + 0;
    case 32: return base + 1;
    case 64: return base + 2;
    case 128: return base + 3;
    default: return -1;
  }
}

constexpr bool is_supported_block_m(int64_t block_m) {
  return block_m == 16 || block_m == 32 || block_m == 64 || block_m == 128;
}

// Compile-time checks of the list: ids are the positions, shapes are what the
// kernel handles (warp tiles of whole 16x16 fragments), shared memory fits sm_90.
constexpr bool tiles_are_consistent() {
  for (int i = 0; i < kNumTiles; ++i) {
    const TileInfo& t = kTiles[i];
    if (t.id != i || !is_supported_block_m(t.bm)) return false;
    if (t.bm % (16 * t.warps_m) != 0 || t.bn % (16 * t.warps_n) != 0 || t.bk % 16 != 0) {
      return false;
    }
    if (t.stages < 2 || t.threads() > 1024 || t.smem_total() > 227 * 1024) return false;
    if (t.accumulators() > 160) return false;
  }
  for (int bm = 16; bm <= 128; bm *= 2) {
    for (int g = 0; g < 2; ++g) {
      const TileInfo* t = find_tile(default_tile(bm, g == 1));
      if (t == nullptr || t->bm != bm || t->gated != (g == 1)) return false;
    }
  }
  return true;
}
static_assert(tiles_are_consistent(), "PCG_MOE_TILES: inconsistent tile list");

// One row of the tuning table (fused_moe_tuning.h): for T <= t_max (the first
// such row of the shape), use block_m and the tiles tile1 (GEMM1), tile2 (GEMM2);
// block_m -1 / -2 name a path (fused_moe.h: CUTLASS with GEMM kernel variants
// tile1 / tile2, or weight streaming).
struct TuningEntry {
  int64_t t_max;
  int block_m, tile1, tile2;
};

// The rows of one shape (E_local, top_k, H, I), sorted by t_max.
struct TuningShape {
  int64_t E, k, H, I;
  const TuningEntry* entries;
  int num_entries;
};

}  // namespace pcg::moe
