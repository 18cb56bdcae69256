// A plain epilogue for the CUTLASS path's ptr-array grouped GEMMs that stores
// D = accumulators (rounded to the dtype) straight from registers: no shared
// memory staging, no TMA store, so no per-expert D descriptor to rewrite and
// fence at every tile (CUTLASS's TMA-store epilogue does that in the consumer
// warpgroups between tiles). Any D layout the stride names (row- or
// column-major); 2-byte stores (a warp's store covers 16-byte runs).
//
// Wrapped in CUTLASS's Sm90TmaWarpSpecializedAdapter like gated_act_epilogue.cuh
// (the adapter's names: register_epilogue.cuh).
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "moe/register_epilogue.cuh"

namespace pcg::moe::sm90 {

// Per group: D's base and stride.
template <typename Element, typename StrideD>
struct DirectStoreArguments {
  Element** ptr_D = nullptr;
  StrideD dD{};
};

template <typename Element, typename StrideD_>
class DirectStoreEpilogue
    : public RegisterEpilogueBase<Element, StrideD_, DirectStoreArguments<Element, StrideD_>> {
  using Base = RegisterEpilogueBase<Element, StrideD_, DirectStoreArguments<Element, StrideD_>>;

 public:
  using typename Base::Arguments;
  using typename Base::Params;

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_D != nullptr;
  }

  CUTLASS_HOST_DEVICE DirectStoreEpilogue(Params const& params) : params(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    const int M = static_cast<int>(get<0>(problem_shape_mnkl));
    const int N = static_cast<int>(get<1>(problem_shape_mnkl));
    const auto m_coord = get<0>(blk_coord_mnkl);
    const auto n_coord = get<1>(blk_coord_mnkl);
    auto cD = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                         make_coord(m_coord, n_coord));
    auto tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators));
    const int e = static_cast<int>(get<3>(blk_coord_mnkl));
    Element* D = params.ptr_D[e];
    const auto stride = params.dD[e];
    const int64_t s0 = get<0>(stride), s1 = get<1>(stride);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accumulators); ++i) {
      const int row = static_cast<int>(get<0>(tCcD(i)));
      const int col = static_cast<int>(get<1>(tCcD(i)));
      if (row < M && col < N) D[row * s0 + col * s1] = Element(accumulators(i));
    }
  }

 private:
  Params params;
};

}  // namespace pcg::moe::sm90
