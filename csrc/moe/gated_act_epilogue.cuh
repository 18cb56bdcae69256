// GEMM1 epilogue of fused_moe's CUTLASS path with the gated activation fused
// in, for w13 in the block layout with B = kFusedW13Block rows (fused_moe.h):
// GEMM1 computes [M_e, 2I] = A_e . w13[e]^T as usual, and in its output the
// gate and up values of intermediate column n sit at columns w13_row(n, .., B,
// false / true). With B a multiple of 8 dividing tile_n / 2, every tile holds
// whole (gate block, up block) pairs, and the GMMA accumulator gives each
// thread both halves of its columns (a thread owns columns 8j + 2q, 8j + 2q + 1
// of every 8-column block j): the activation runs in registers, with no
// exchange between threads or CTAs, and writes inter[M_e, I] (GEMM2's A).
//
// Math as the separate pipeline (GEMM1 -> gate_up in the dtype -> activation
// kernel): the accumulators are rounded to the dtype first, then b13 is added
// and the activation applied in fp32 (moe_activation.cuh), so the two agree
// bitwise.
//
// SwapAB = true (the swap-AB kernels, D^T = W . A^T): the accumulator's rows
// are w13 rows and its columns tokens. A thread holds rows r and r + 8 of each
// 16-row slice, i.e. with B = 8 the gate and the up row of one intermediate
// column, for its tokens: the activation again runs in registers, and each
// result is one 2-byte store into inter[token, column].
//
// Direct 16-byte stores from registers (no shared memory, no TMA store): wrapped
// in CUTLASS's Sm90TmaWarpSpecializedAdapter like its DefaultEpilogueArray, for
// the ptr-array grouped kernels (cooperative and pingpong).
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "moe/fused_moe.h"
#include "moe/moe_activation.cuh"
#include "moe/register_epilogue.cuh"

namespace pcg::moe::sm90 {

// What the epilogue reads beyond D.
template <typename Element>
struct GatedActParams {
  const Element* b13 = nullptr;  // [E, 2I] (plain layout: gate biases, then up biases) or null
  int I = 0;
  int act = 0;
  float alpha = 0.f, limit = 0.f;
};

namespace detail {

template <typename Element>
__device__ __forceinline__ uint32_t pack2(Element a, Element b) {
  return static_cast<uint32_t>(a.raw()) | (static_cast<uint32_t>(b.raw()) << 16);
}
template <typename Element>
__device__ __forceinline__ Element unpack(uint32_t v, int half) {
  return Element::bitcast(static_cast<uint16_t>(half ? v >> 16 : v & 0xffffu));
}

}  // namespace detail

// Per group: the expert's first inter row and inter's row stride (I); the activation.
template <typename Element, typename StrideD>
struct GatedActArguments {
  Element** ptr_D = nullptr;
  StrideD dD{};
  GatedActParams<Element> act{};
};

template <typename Element, typename StrideD_, bool SwapAB = false>
class GatedActEpilogue
    : public RegisterEpilogueBase<Element, StrideD_, GatedActArguments<Element, StrideD_>> {
  using Base = RegisterEpilogueBase<Element, StrideD_, GatedActArguments<Element, StrideD_>>;

 public:
  using typename Base::Arguments;
  using typename Base::Params;
  static_assert(sizeof(Element) == 2, "bf16 / fp16 only");
  static constexpr int kBlock = kFusedW13Block;
  static_assert(kBlock % 8 == 0, "gate / up blocks must be whole 8-column fragment blocks");

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.act.I > 0 && args.act.I % kBlock == 0;
  }

  CUTLASS_HOST_DEVICE GatedActEpilogue(Params const& params) : params(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    using FrgShape = decltype(shape(accumulators));
    if constexpr (SwapAB) {
      store_swapped<FrgShape>(problem_shape_mnkl, blk_shape_MNK, blk_coord_mnkl, accumulators,
                              tiled_mma, thread_idx);
    } else {
      store_plain<FrgShape>(problem_shape_mnkl, blk_shape_MNK, blk_coord_mnkl, accumulators,
                            tiled_mma, thread_idx);
    }
  }

 private:
  // The plain tile: rows tokens, columns w13 rows (gate/up blocks of kBlock).
  template <class FrgShape, class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL,
            class Acc, class TiledMma>
  CUTLASS_DEVICE void store_plain(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                  BlockCoordMNKL blk_coord_mnkl, Acc const& accumulators,
                                  TiledMma tiled_mma, int thread_idx) {
    using namespace cute;
    constexpr int kTileN = decltype(size<1>(blk_shape_MNK))::value;
    // The GMMA accumulator fragment: ((2 columns, 2 row halves, NB 8-column
    // blocks), MMA_M, MMA_N) per thread; a quad of lanes holds 8 adjacent columns.
    constexpr int kNB = decltype(size<0, 2>(FrgShape{}))::value;
    constexpr int kMM = decltype(size<1>(FrgShape{}))::value;
    constexpr int kNN = decltype(size<2>(FrgShape{}))::value;
    static_assert(decltype(size<0, 0>(FrgShape{}))::value == 2 &&
                      decltype(size<0, 1>(FrgShape{}))::value == 2,
                  "unexpected GMMA accumulator layout");
    static_assert(kNN == 1 && kNB * 8 == kTileN, "one GMMA atom spans the tile's columns");
    static_assert(kTileN % (2 * kBlock) == 0 && (kTileN / 2) % 32 == 0,
                  "a tile must hold whole gate/up block pairs, 4 stores of 8 columns per quad");

    const int M = static_cast<int>(get<0>(problem_shape_mnkl));
    const auto m_coord = get<0>(blk_coord_mnkl);
    const int n_coord = static_cast<int>(get<1>(blk_coord_mnkl));
    if (static_cast<int>(m_coord) * decltype(size<0>(blk_shape_MNK))::value >= M) return;
    auto cD = local_tile(make_identity_tensor(make_shape(M, get<1>(problem_shape_mnkl))),
                         take<0, 2>(blk_shape_MNK), make_coord(m_coord, n_coord));
    auto tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators));

    const int e = static_cast<int>(get<3>(blk_coord_mnkl));
    const Element* bias =
        params.act.b13 != nullptr ? params.act.b13 + static_cast<int64_t>(e) * 2 * params.act.I
                                  : nullptr;
    // One instantiation per activation and bias presence: nothing but the math in the loop.
    const int inter_col0 = n_coord * (kTileN / 2);
    with_activation(params.act.act, [&](auto act) {
      if (bias != nullptr) {
        store<decltype(act), true, FrgShape, kNB, kMM>(accumulators, tCcD, M, e, bias, inter_col0,
                                                       thread_idx & 3);
      } else {
        store<decltype(act), false, FrgShape, kNB, kMM>(accumulators, tCcD, M, e, bias,
                                                        inter_col0, thread_idx & 3);
      }
    });
  }

  // The swapped tile: rows are w13 rows (block layout, B = 8: rows 16b .. 16b + 7
  // gate and 16b + 8 .. 16b + 15 up of intermediate columns 8b .. 8b + 7),
  // columns tokens. The GMMA fragment ((2 columns, 2 row halves, NB 8-column
  // blocks), MMA_M, MMA_N) gives a thread rows r and r + 8 (r % 16 < 8) for
  // each of its columns: gate and up of column (r / 16) * 8 + r % 16.
  template <class FrgShape, class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL,
            class Acc, class TiledMma>
  CUTLASS_DEVICE void store_swapped(ProblemShapeMNKL problem_shape_mnkl,
                                    BlockShapeMNK blk_shape_MNK, BlockCoordMNKL blk_coord_mnkl,
                                    Acc const& accumulators, TiledMma tiled_mma, int thread_idx) {
    using namespace cute;
    static_assert(kBlock == 8, "swapped: gate and up rows are a thread's row halves (8 apart)");
    static_assert(decltype(size<0, 0>(FrgShape{}))::value == 2 &&
                      decltype(size<0, 1>(FrgShape{}))::value == 2,
                  "unexpected GMMA accumulator layout");
    constexpr int kNB = decltype(size<0, 2>(FrgShape{}))::value;
    constexpr int kMM = decltype(size<1>(FrgShape{}))::value;
    constexpr int kNN = decltype(size<2>(FrgShape{}))::value;
    const int rows = static_cast<int>(get<0>(problem_shape_mnkl));    // 2I
    const int tokens = static_cast<int>(get<1>(problem_shape_mnkl));  // M_e
    auto cD = local_tile(make_identity_tensor(make_shape(rows, tokens)), take<0, 2>(blk_shape_MNK),
                         make_coord(get<0>(blk_coord_mnkl), get<1>(blk_coord_mnkl)));
    auto tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators));
    const int e = static_cast<int>(get<3>(blk_coord_mnkl));
    const int I = params.act.I;
    const float alpha = params.act.alpha, limit = params.act.limit;
    const Element* bias =
        params.act.b13 != nullptr ? params.act.b13 + static_cast<int64_t>(e) * 2 * I : nullptr;
    Element* D = params.ptr_D[e];  // inter [M_e, I] row-major
    with_activation(params.act.act, [&](auto act) {
      using Act = decltype(act);
      CUTLASS_PRAGMA_UNROLL
      for (int mm = 0; mm < kMM; ++mm) {
        CUTLASS_PRAGMA_UNROLL
        for (int nn = 0; nn < kNN; ++nn) {
          const int i0 = crd2idx(make_coord(make_coord(0, 0, 0), mm, nn), FrgShape{});
          const int r = static_cast<int>(get<0>(tCcD(i0)));  // the gate row
          if (r >= rows) continue;
          const int n = (r / 16) * 8 + r % 16;  // intermediate column
          float bg = 0.f, bu = 0.f;
          if (bias != nullptr) {
            bg = static_cast<float>(bias[n]);
            bu = static_cast<float>(bias[I + n]);
          }
          CUTLASS_PRAGMA_UNROLL
          for (int nb = 0; nb < kNB; ++nb) {
            CUTLASS_PRAGMA_UNROLL
            for (int v0 = 0; v0 < 2; ++v0) {
              const int gi = crd2idx(make_coord(make_coord(v0, 0, nb), mm, nn), FrgShape{});
              const int ui = crd2idx(make_coord(make_coord(v0, 1, nb), mm, nn), FrgShape{});
              const int t = static_cast<int>(get<1>(tCcD(gi)));
              if (t >= tokens) continue;
              // Rounded to the dtype first, as the separate pipeline's gate_up.
              const float g = static_cast<float>(Element(accumulators(gi))) + bg;
              const float u = static_cast<float>(Element(accumulators(ui))) + bu;
              D[static_cast<int64_t>(t) * I + n] = Element(Act::apply(g, u, alpha, limit));
            }
          }
        }
      }
    });
  }

  // Intermediate block i (8 columns) of the tile: gate in fragment block
  // gate_block(i), up kBlock / 8 blocks later.
  static constexpr int gate_block(int i) {
    return (i / (kBlock / 8)) * 2 * (kBlock / 8) + i % (kBlock / 8);
  }

  // act per column pair, then a 4 x 4 transpose in each quad turns four
  // 8-column blocks of two columns per lane into one block per lane (16-byte
  // stores into inter, columns inter_col0 ...).
  template <class Act, bool kBias, class FrgShape, int kNB, int kMM, class Acc, class Crd>
  CUTLASS_DEVICE void store(Acc const& accumulators, Crd const& tCcD, int M, int e,
                            const Element* bias, int inter_col0, int q) {
    using namespace cute;
    const int I = params.act.I;
    const float alpha = params.act.alpha, limit = params.act.limit;
    Element* D = params.ptr_D[e];
    const int64_t ldd = get<0>(params.dD[e]);
    constexpr int kInterBlocks = kNB / 2;
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kMM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int v1 = 0; v1 < 2; ++v1) {
        const int row = static_cast<int>(
            get<0>(tCcD(crd2idx(make_coord(make_coord(0, v1, 0), mm, 0), FrgShape{}))));
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kInterBlocks / 4; ++c) {
          uint32_t x[4];
          CUTLASS_PRAGMA_UNROLL
          for (int k = 0; k < 4; ++k) {
            const int i = 4 * c + k;
            const int gi = crd2idx(make_coord(make_coord(0, v1, gate_block(i)), mm, 0), FrgShape{});
            const int ui = crd2idx(make_coord(make_coord(0, v1, gate_block(i) + kBlock / 8), mm, 0),
                                   FrgShape{});
            // Rounded to the dtype first, as the separate pipeline's gate_up.
            float g0 = static_cast<float>(Element(accumulators(gi)));
            float g1 = static_cast<float>(Element(accumulators(gi + 1)));
            float u0 = static_cast<float>(Element(accumulators(ui)));
            float u1 = static_cast<float>(Element(accumulators(ui + 1)));
            if constexpr (kBias) {
              // Columns past I (a partial n-tile) would read past the row: clamp;
              // their results are not stored.
              const int n = min(inter_col0 + 8 * i + 2 * q, I - 2);
              const uint32_t bg = __ldg(reinterpret_cast<const unsigned int*>(bias + n));
              const uint32_t bu = __ldg(reinterpret_cast<const unsigned int*>(bias + I + n));
              g0 += static_cast<float>(detail::unpack<Element>(bg, 0));
              g1 += static_cast<float>(detail::unpack<Element>(bg, 1));
              u0 += static_cast<float>(detail::unpack<Element>(bu, 0));
              u1 += static_cast<float>(detail::unpack<Element>(bu, 1));
            }
            x[k] = detail::pack2(Element(Act::apply(g0, u0, alpha, limit)),
                                 Element(Act::apply(g1, u1, alpha, limit)));
          }
          CUTLASS_PRAGMA_UNROLL
          for (int m = 1; m <= 2; m <<= 1) {
            const bool hi = (q & m) != 0;
            CUTLASS_PRAGMA_UNROLL
            for (int k = 0; k < 4; ++k) {
              if (k & m) continue;
              const uint32_t recv = __shfl_xor_sync(0xffffffffu, hi ? x[k] : x[k | m], m);
              if (hi) x[k] = recv; else x[k | m] = recv;
            }
          }
          const int col = inter_col0 + 32 * c + 8 * q;  // lane q: intermediate block 4c + q
          if (row < M && col < I) {
            *reinterpret_cast<uint4*>(D + row * ldd + col) = make_uint4(x[0], x[1], x[2], x[3]);
          }
        }
      }
    }
  }

  Params params;
};

}  // namespace pcg::moe::sm90
