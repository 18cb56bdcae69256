// A mainloop for the CUTLASS path's grouped GEMMs whose TMA descriptors span
// whole buffers, so an expert switch rewrites none:
//   - A over every group's rows, [a_rows, K] (the sorted slots: ptr_A[g]
//     points at group g's first one), B over every expert's weights,
//     [b_rows, K] (w13 or w2 as [E * N, K]);
//   - a group's tiles are those tensors shifted to its first rows
//     (cute::domain_offset on TMA coordinates); TMA zero-fills only past the
//     whole buffer, so a group's last M tile reads the next group's rows and
//     an N tile past N reads the next expert's weights: extra rows and
//     columns of the accumulator that the epilogue never stores (it masks
//     by the group's M and N), while every stored element sees the same
//     operands in the same order as with per-group descriptors.
// CUTLASS's ptr-array mainloop instead copies per-group descriptors into a
// per-SM workspace and fences them (release, then acquire before the first
// load) at every expert switch; with its persistent CTAs taking every
// grid-size-th tile, that is every tile, and measured 9-17% of a GEMM at
// Qwen3-30B-A3B T = 8192 (scripts/diag_group_switch.py, session 28).
// The consumer side (wgmma) is CUTLASS's, unchanged.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"

namespace pcg::moe::sm90 {

// The whole operands, beside the base mainloop's per-group arguments.
template <typename Element>
struct ResidentOperands {
  const Element* a = nullptr;  // [a_rows, K], K contiguous: every ptr_A[g] points into it
  const Element* b = nullptr;  // [b_rows, K]: every ptr_B[g] points into it
  int a_rows = 0;
  int b_rows = 0;
  int K = 0;
};

// The current group (load_inputs' third element): its first rows in the
// whole A and B, and its M (K is every group's: Params::K).
struct ResidentGroup {
  int a_row = 0;
  int b_row = 0;
  int M = 0;
};

// Base: CUTLASS's ptr-array TMA mainloop (CollectiveMma of
// MainloopSm90ArrayTmaGmmaWarpSpecialized), K-major A and B, no cluster
// along N (A is not multicast).
template <class Base>
struct ResidentTmaMainloop : Base {
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TensorMapStorage;
  using typename Base::TileShape;
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using ElementA = typename Base::ElementA;

  static_assert(cute::size<1>(ClusterShape{}) == 1, "no multicast of A along N");
  static_assert(cutlass::gemm::detail::is_k_major<typename Base::InternalStrideA>() &&
                    cutlass::gemm::detail::is_k_major<typename Base::InternalStrideB>(),
                "whole operands are K-major row blocks");

  struct Arguments : Base::Arguments {
    ResidentOperands<ElementA> whole;
  };
  struct Params : Base::Params {
    const InternalElementA* a_base = nullptr;
    const InternalElementB* b_base = nullptr;
    int a_rows = 0;
    int b_rows = 0;
    int K = 0;
  };

  // TMA over a [rows, K] K-major matrix, of the base's descriptor type (the
  // multicast count a static integer, as the base's).
  template <class GmemCopy, class Stride, class Elt, class SmemLayout, class BlockShape,
            class Multicast>
  static auto whole_tma(const Elt* base, int rows, int K, SmemLayout smem, BlockShape block,
                        Multicast multicast) {
    using namespace cute;
    Stride stride{};
    get<0>(stride) = K;
    Tensor t = make_tensor(base, make_layout(make_shape(rows, K, 1), stride));
    return make_tma_copy(GmemCopy{}, t, smem, block, multicast);
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    using namespace cute;
    Params p;
    static_cast<typename Base::Params&>(p) =
        Base::to_underlying_arguments(problem_shapes, args, workspace);
    const ResidentOperands<ElementA>& w = args.whole;
    p.a_base = reinterpret_cast<const InternalElementA*>(w.a);
    p.b_base = reinterpret_cast<const InternalElementB*>(w.b);
    p.a_rows = w.a_rows;
    p.b_rows = w.b_rows;
    p.K = w.K;
    p.tma_load_a = whole_tma<typename Base::GmemTiledCopyA, typename Base::InternalStrideA>(
        p.a_base, w.a_rows, w.K, SmemLayoutA{}(_, _, Int<0>{}),
        make_shape(shape<0>(TileShape{}), shape<2>(TileShape{})), size<1>(ClusterShape{}));
    p.tma_load_b = whole_tma<typename Base::GmemTiledCopyB, typename Base::InternalStrideB>(
        p.b_base, w.b_rows, w.K, SmemLayoutB{}(_, _, Int<0>{}),
        make_shape(shape<1>(TileShape{}), shape<2>(TileShape{})), size<0>(ClusterShape{}));
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape problem_shapes, Arguments const& args) {
    const ResidentOperands<ElementA>& w = args.whole;
    const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    return Base::can_implement(problem_shapes, args) && w.a != nullptr && w.b != nullptr &&
           aligned(w.a) && aligned(w.b) && w.a_rows > 0 && w.b_rows > 0 && w.K > 0 &&
           (static_cast<int64_t>(w.K) * static_cast<int64_t>(sizeof(ElementA))) % 16 == 0;
  }

  // The base's tiled views (the kernel reads only their tile counts along K,
  // the same for every group) and the group, set at its first tile.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                Params const& params) const {
    auto base = Base::load_init(problem_shape_MNKL, params);
    return cute::make_tuple(cute::get<0>(base), cute::get<1>(base), ResidentGroup{});
  }

  // The descriptors live in the kernel's parameters: nothing to copy, rewrite
  // or fence (the kernel calls these at every expert switch).
  CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage&, int32_t, int32_t) {
    if (cute::elect_one_sync()) {
      cute::prefetch_tma_descriptor(params.tma_load_a.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_load_b.get_tma_descriptor());
    }
    return cute::make_tuple(params.tma_load_a.get_tma_descriptor(),
                            params.tma_load_b.get_tma_descriptor());
  }
  template <class TensorMaps, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage&, Params const&, TensorMaps const&,
                                                ProblemShape_MNKL, int32_t) {}
  template <class TensorMaps>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage&, TensorMaps const&) {}
  template <class TensorMaps>
  CUTLASS_DEVICE void tensormaps_fence_acquire(TensorMaps const&) {}

  // On a change of group (the kernel's producer warps): its first rows.
  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& in, Params const& params,
                                                      ProblemShape_MNKL problem_shape_mnkl,
                                                      int32_t next_batch) {
    InputTensors out = in;
    ResidentGroup& g = cute::get<2>(out);
    const InternalElementA* a = params.ptr_A[next_batch];
    const InternalElementB* b = params.ptr_B[next_batch];
    g.M = static_cast<int>(cute::get<0>(problem_shape_mnkl));
    g.a_row = static_cast<int>((a - params.a_base) / params.K);  // K > 0: can_implement
    g.b_row = static_cast<int>((b - params.b_base) / params.K);
    return out;
  }

  // A group's (BLK_M or BLK_N, BLK_K, k) tiles at block `blk` of a whole
  // [rows, K] operand (tma: its descriptor), from the group's first row
  // `row0`; ModeStep picks the operand's mode of TileShape (A: M, B: N).
  template <class ModeStep, class Tma>
  CUTLASS_DEVICE static auto group_tiles(Tma const& tma, int rows, int K, int row0, int blk) {
    using namespace cute;
    Tensor whole = tma.get_tma_tensor(make_shape(rows, K, 1));
    Tensor shifted = domain_offset(make_coord(row0, 0, 0), whole);
    return local_tile(shifted, TileShape{}, make_coord(_, _, _), ModeStep{})(_, _, blk, _, 0);
  }
  CUTLASS_DEVICE static auto group_tiles_a(Params const& params, ResidentGroup const& g, int m) {
    using namespace cute;
    return group_tiles<Step<_1, Underscore, _1>>(params.tma_load_a, params.a_rows, params.K,
                                                  g.a_row, m);
  }
  CUTLASS_DEVICE static auto group_tiles_b(Params const& params, ResidentGroup const& g, int n) {
    using namespace cute;
    return group_tiles<Step<Underscore, _1, _1>>(params.tma_load_b, params.b_rows, params.K,
                                                  g.b_row, n);
  }

  // The CTAs of the cluster that share each B tile (those along M); 0 without
  // multicast.
  CUTLASS_DEVICE static uint16_t b_multicast_mask() {
    using namespace cute;
    uint16_t mask = 0;
    if constexpr (std::is_same_v<typename Base::GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};  // (m, n) -> block
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mask |= uint16_t(1) << block_layout(m, 0, Int<0>{});
      }
    }
    return mask;
  }

  // Mainloop producer warp (one elected lane issues): A and B by TMA from the
  // whole tensors, as CUTLASS's load does from per-group ones.
  template <class LoadInputs, class TensorMaps, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write, LoadInputs const& load_inputs,
                           TensorMaps const& /*descriptors: the parameters'*/,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int /*thread_idx*/, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    if (!cute::elect_one_sync()) return;
    const ResidentGroup& g = get<2>(load_inputs);
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr uint32_t cluster_x = get<0>(ClusterShape{});
    auto block_tma_a = params.tma_load_a.get_slice(0);  // no cluster along N
    auto block_tma_b = params.tma_load_b.get_slice(block_rank_in_cluster % cluster_x);
    Tensor tAgA = block_tma_a.partition_S(group_tiles_a(params, g, static_cast<int>(get<0>(blk_coord))));
    Tensor tAsA = block_tma_a.partition_D(sA);
    Tensor tBgB = block_tma_b.partition_S(group_tiles_b(params, g, static_cast<int>(get<1>(blk_coord))));
    Tensor tBsB = block_tma_b.partition_D(sB);
    const uint16_t mcast_mask_b = b_multicast_mask();
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      copy(params.tma_load_a.with(*barrier, 0), tAgA(_, _, _, *k_tile_iter), tAsA(_, _, _, stage));
      copy(params.tma_load_b.with(*barrier, mcast_mask_b), tBgB(_, _, _, *k_tile_iter),
           tBsB(_, _, _, stage));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace pcg::moe::sm90
