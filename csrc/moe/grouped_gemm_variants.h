// Kernel variants of the CUTLASS path's grouped GEMMs (fused_moe config
// [-1, g1, g2]: g1 runs GEMM1, g2 GEMM2; -1 = kDefaultGemmVariant). Torch-free
// and CUTLASS-free, host and device. THE one list: grouped_gemm_sm90.cuh
// instantiates every entry for bf16 and fp16, the config validation, the
// tuning table and pcg::fused_moe_cutlass_variants (Python) read it.
//
// A variant is one CUTLASS 3.x sm_90a ptr-array grouped kernel (TMA + wgmma):
// a schedule (Cooperative: both consumer warpgroups on one tile; Pingpong: one
// tile per warpgroup, one's epilogue under the other's mainloop), a tile
// M x N x K (M: the expert's token rows, N: output columns, i.e. weight rows)
// and a cluster of CLUSTER_M CTAs along M (> 1: the pair's B tile, the
// expert's weights, is loaded once and multicast by TMA).
//
// SWAP_AB = 1: the kernel computes D^T = W . A^T (weights as wgmma's A
// operand, its 64-row granule; tokens as B, whose tile can be 8-256 rows), so
// a tile of TILE_M tokens can be as small as the few rows an expert gets at
// small T, and the smem a stage spends on token rows goes to more weight
// stages in flight. CUTLASS's tile is then N x M x K; D^T is stored
// column-major, i.e. D row-major as usual. As GEMM1 with the activation fused
// (w13 in the block layout) their epilogue pairs a thread's gate and up rows
// (gated_act_epilogue.cuh).
//
// DIRECT_STORE = 1: the plain epilogue stores D from registers
// (direct_store_epilogue.cuh) instead of CUTLASS's TMA store, which rewrites
// and fences a per-expert D descriptor at every tile; GEMM1 with the fused
// activation is unchanged (its epilogue stores directly already).
//
// GATHER_A = 1 (GEMM1 only): A's rows are read from the hidden states by
// token while loading (gather_a_mainloop.cuh: cp.async in both producer
// warps, B by TMA), so the pipeline skips the permute and
// its [slots, H] copy of the hidden rows. Not a GEMM2 kernel (GEMM2's A, the
// activation, is written in expert order already).
//
// RESIDENT = 1: the mainloop's TMA descriptors span the whole sorted rows and
// the whole weights (resident_tma_mainloop.cuh), so an expert switch rewrites
// and fences none (CUTLASS's ptr-array mainloop does at every tile). Every
// gather kernel is one (its B).
//
// Ids are stable (the checked-in tuning table names them): never renumber or
// reuse one; append new variants with the next id. Every variant costs ~40 s
// of nvcc per dtype, so keep the list short.
#pragma once

#include <cstdint>

// X(id, name, SCHEDULE, TILE_M, TILE_N, TILE_K, CLUSTER_M, SWAP_AB, DIRECT_STORE, GATHER_A,
//   RESIDENT)
#define PCG_MOE_GEMM_VARIANTS(X)                                                    \
  X(0, coop_128x256x64, Cooperative, 128, 256, 64, 1, 0, 0, 0, 0) /* the default */  \
  X(1, pingpong_64x256x64, Pingpong, 64, 256, 64, 1, 0, 0, 0, 0)                    \
  X(2, coop_256x128x64, Cooperative, 256, 128, 64, 1, 0, 0, 0, 0)                   \
  X(3, coop_128x256x64_c2x1, Cooperative, 128, 256, 64, 2, 0, 0, 0, 0)              \
  X(4, swap_coop_16x256x64, Cooperative, 16, 256, 64, 1, 1, 0, 0, 0)                \
  X(5, swap_coop_32x256x64, Cooperative, 32, 256, 64, 1, 1, 0, 0, 0)                \
  X(6, swap_coop_16x256x64_direct, Cooperative, 16, 256, 64, 1, 1, 1, 0, 0)         \
  X(7, pingpong_64x256x64_direct, Pingpong, 64, 256, 64, 1, 0, 1, 0, 0)             \
  X(8, pingpong_64x256x64_gather, Pingpong, 64, 256, 64, 1, 0, 0, 1, 1)             \
  X(9, coop_128x256x64_gather, Cooperative, 128, 256, 64, 1, 0, 0, 1, 1)            \
  X(10, pingpong_64x256x64_resident, Pingpong, 64, 256, 64, 1, 0, 0, 0, 1)          \
  X(11, coop_128x256x64_resident, Cooperative, 128, 256, 64, 1, 0, 0, 0, 1)

namespace pcg::moe {

enum class GemmSchedule : int { kCooperative = 0, kPingpong = 1 };

struct GemmVariantInfo {
  int id;
  const char* name;
  GemmSchedule schedule;
  int tile_m, tile_n, tile_k, cluster_m;
  bool swap_ab;
  bool direct_store;
  bool gather_a;
  bool resident;
};

inline constexpr GemmVariantInfo kGemmVariants[] = {
#define PCG_MOE_GEMM_VARIANT_INFO(id, name, sched, tm, tn, tk, cm, swap, direct, gather, \
                                  resident)                                               \
  {id, #name, GemmSchedule::k##sched, tm, tn, tk, cm, swap != 0, direct != 0, gather != 0, \
   resident != 0},
    PCG_MOE_GEMM_VARIANTS(PCG_MOE_GEMM_VARIANT_INFO)
#undef PCG_MOE_GEMM_VARIANT_INFO
};
inline constexpr int kNumGemmVariants =
    static_cast<int>(sizeof(kGemmVariants) / sizeof(kGemmVariants[0]));

// The variant of config id -1 (the kernel both GEMMs used before variants).
constexpr int kDefaultGemmVariant = 0;

// Variant of an id, or null for an unknown id (-1 included).
constexpr const GemmVariantInfo* find_gemm_variant(int64_t id) {
  return (id >= 0 && id < kNumGemmVariants) ? &kGemmVariants[id] : nullptr;
}

// A GEMM's entry of a CUTLASS config: -1 (the default) or a listed id.
constexpr bool is_gemm_variant_id(int64_t id) { return id == -1 || find_gemm_variant(id) != nullptr; }

// -1 -> kDefaultGemmVariant; listed ids unchanged.
constexpr int resolve_gemm_variant(int id) { return id == -1 ? kDefaultGemmVariant : id; }

// Whether GEMM `id` (-1: the default) gathers its A rows (a GEMM1-only kernel).
constexpr bool gemm_variant_gathers_a(int64_t id) {
  const GemmVariantInfo* v = find_gemm_variant(id == -1 ? kDefaultGemmVariant : id);
  return v != nullptr && v->gather_a;
}

// Ids are the positions; shapes are what the sm_90 kernels take. wgmma's A
// operand (tokens, or weights when swapped) comes in 64-row granules, its B
// operand in multiples of 8: cooperative splits A's tile over two warpgroups
// (>= 128 rows), pingpong gives each one a tile (a multiple of 64); clusters of
// 1 or 2 along M, and none for swapped kernels. The default fuses the activation.
constexpr bool gemm_variants_are_consistent() {
  for (int i = 0; i < kNumGemmVariants; ++i) {
    const GemmVariantInfo& v = kGemmVariants[i];
    const int a_rows = v.swap_ab ? v.tile_n : v.tile_m;  // wgmma's A operand
    const int b_rows = v.swap_ab ? v.tile_m : v.tile_n;
    if (v.id != i || a_rows % 64 != 0 || b_rows % 8 != 0 || b_rows > 256 || v.tile_k % 64 != 0) {
      return false;
    }
    if (v.schedule == GemmSchedule::kCooperative && a_rows < 128) return false;
    if (v.cluster_m != 1 && v.cluster_m != 2) return false;
    if (v.swap_ab && v.cluster_m != 1) return false;
    // The gather: token rows K-major as wgmma's A, one CTA's own (no multicast
    // along N), each tile's rows spread over a warp's lanes.
    if (v.gather_a && (v.swap_ab || v.tile_m % 32 != 0 || v.direct_store || !v.resident)) {
      return false;
    }
    // Whole-buffer descriptors: tokens and weights in their own roles.
    if (v.resident && v.swap_ab) return false;
  }
  return find_gemm_variant(kDefaultGemmVariant) != nullptr;
}
static_assert(gemm_variants_are_consistent(), "PCG_MOE_GEMM_VARIANTS: inconsistent list");

}  // namespace pcg::moe
