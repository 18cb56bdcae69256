// Kernel variants of the CUTLASS path's grouped GEMMs (fused_moe config
// [-1, g1, g2]: g1 runs GEMM1, g2 GEMM2; -1 = kDefaultGemmVariant). Torch-free
// and CUTLASS-free, host and device. THE one list: grouped_gemm_sm90.cuh
// instantiates every entry for bf16 and fp16, the config validation, the
// tuning table and pcg::fused_moe_cutlass_variants (Python) read it.
//
// A variant is one CUTLASS 3.x sm_90a ptr-array grouped kernel (TMA + wgmma):
// a schedule (Cooperative: both consumer warpgroups on one tile; Pingpong: one
// tile per warpgroup, one's epilogue under the other's mainloop), a tile
// M x N x K and a cluster of CLUSTER_M CTAs along M (> 1: the pair's B tile,
// the expert's weights, is loaded once and multicast by TMA).
//
// Ids are stable (the checked-in tuning table names them): never renumber or
// reuse one; append new variants with the next id. Every variant costs ~40 s
// of nvcc per dtype, so keep the list short.
#pragma once

#include <cstdint>

// X(id, name, SCHEDULE, TILE_M, TILE_N, TILE_K, CLUSTER_M)
#define PCG_MOE_GEMM_VARIANTS(X)                                       \
  X(0, coop_128x256x64, Cooperative, 128, 256, 64, 1) /* the default */ \
  X(1, pingpong_64x256x64, Pingpong, 64, 256, 64, 1)                   \
  X(2, coop_256x128x64, Cooperative, 256, 128, 64, 1)                  \
  X(3, coop_128x256x64_c2x1, Cooperative, 128, 256, 64, 2)

namespace pcg::moe {

enum class GemmSchedule : int { kCooperative = 0, kPingpong = 1 };

struct GemmVariantInfo {
  int id;
  const char* name;
  GemmSchedule schedule;
  int tile_m, tile_n, tile_k, cluster_m;
};

inline constexpr GemmVariantInfo kGemmVariants[] = {
#define PCG_MOE_GEMM_VARIANT_INFO(id, name, sched, tm, tn, tk, cm) \
  {id, #name, GemmSchedule::k##sched, tm, tn, tk, cm},
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

// Ids are the positions; shapes are what the sm_90 kernels take (cooperative:
// M >= 128 split over two warpgroups; pingpong: M a multiple of 64; clusters
// of 1 or 2 along M).
constexpr bool gemm_variants_are_consistent() {
  for (int i = 0; i < kNumGemmVariants; ++i) {
    const GemmVariantInfo& v = kGemmVariants[i];
    if (v.id != i || v.tile_m % 64 != 0 || v.tile_n % 64 != 0 || v.tile_k % 64 != 0) return false;
    if (v.schedule == GemmSchedule::kCooperative && v.tile_m < 128) return false;
    if (v.cluster_m != 1 && v.cluster_m != 2) return false;
  }
  return find_gemm_variant(kDefaultGemmVariant) != nullptr;
}
static_assert(gemm_variants_are_consistent(), "PCG_MOE_GEMM_VARIANTS: inconsistent list");

}  // namespace pcg::moe
