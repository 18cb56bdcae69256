// A mainloop for GEMM1 of the CUTLASS path that gathers A's rows (the tokens'
// hidden rows) while loading, so no permute kernel writes them in expert
// order first. sm_90 TMA has no row gather, so:
//   - the mainloop producer warp's leader loads B (the weights) by TMA, as
//     CUTLASS's ptr-array mainloop does, and expects B's bytes only;
//   - that warp's 32 lanes and the kernel's auxiliary producer warp
//     (CUTLASS's MainloopAux role, which GatherAPolicy switches on) copy
//     A's rows with cp.async, half each: row r of expert e's tile is
//     hidden[sorted_pairs[first_slot(e) + r] / topk], 16 bytes a lane, into
//     the same swizzled smem stage a TMA load would fill (one warp alone
//     could not issue them fast enough at large T);
//   - each stage's full barrier counts 65 arrivals: the TMA leader (with B's
//     transaction bytes) and the 64 lanes' cp.async completions
//     (cp.async.mbarrier.arrive.noinc), CUTLASS's pattern for its
//     TMA + cp.async mainloops.
// One TMA a row instead (a [T, K] map, box 64 x 1, 128-byte swizzle, issued
// by the 32 lanes) is exact but ~3x slower at T >= 1024, and one cp.async warp
// 1.2-1.6x slower than two (bench/results/ab_gather_*_s27.log, session 27).
// The consumer side (wgmma) is CUTLASS's, unchanged. Rows past the expert's M
// and K past the row's end are zero-filled.
//
// B comes from the whole weights (ResidentTmaMainloop: no descriptor rewrite
// at an expert switch); the expert's first slot is its A row there (ptr_A[e]
// = a_sorted + first_slot(e) * K, the setup's ExpertArgsWriter), which here
// only locates the expert's run of sorted_pairs.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "moe/resident_tma_mainloop.cuh"

namespace pcg::moe::sm90 {

// The base mainloop's dispatch policy (same kernel schedule, stages and
// cluster) with the auxiliary load warp on.
template <class BasePolicy>
struct GatherAPolicy : BasePolicy {};

// What the gather reads, beside the base mainloop's arguments.
template <typename Element>
struct GatherAArguments {
  const Element* hidden = nullptr;        // [T, K] token rows (row stride K)
  const int32_t* sorted_pairs = nullptr;  // [slots] pair t * topk + j, < 0: padding
  int topk = 1;
};

}  // namespace pcg::moe::sm90

namespace cutlass::gemm::kernel::detail {
template <class BasePolicy>
struct HasAuxiliaryLoad<pcg::moe::sm90::GatherAPolicy<BasePolicy>> : cute::true_type {};
}  // namespace cutlass::gemm::kernel::detail

namespace pcg::moe::sm90 {

// Base: CUTLASS's ptr-array TMA mainloop (CollectiveMma of
// MainloopSm90ArrayTmaGmmaWarpSpecialized) with a K-major A; its whole A
// (ResidentOperands::a) is the sorted-slot buffer the rows would be permuted
// into, which locates each expert's run of sorted_pairs (nothing reads it).
template <class Base>
struct GatherAMainloop : ResidentTmaMainloop<Base> {
  using Resident = ResidentTmaMainloop<Base>;
  using Element = typename Base::ElementA;
  using DispatchPolicy = GatherAPolicy<typename Base::DispatchPolicy>;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;

  static constexpr int kBlockM = cute::size<0>(TileShape{});
  static constexpr int kBlockK = cute::size<2>(TileShape{});
  static constexpr int kVec = 16 / static_cast<int>(sizeof(Element));  // elements a cp.async
  static_assert(sizeof(Element) == 2, "16-bit elements");
  // The stage layout load_auxiliary writes by hand: one 128-byte-swizzled
  // K-major atom (8 rows x 64 elements) across K, atoms stacked along M, then
  // the stages.
  static_assert(kBlockK == 64 && kBlockM % 32 == 0, "tile shape the gather's lane map covers");
  static_assert(std::is_same_v<typename Base::SmemLayoutAtomA,
                               cute::GMMA::Layout_K_SW128_Atom<typename Base::TiledMma::ValTypeA>>,
                "A's smem atom: K-major, 128-byte swizzle");
  static_assert(cute::size<0>(SmemLayoutA{}) == kBlockM && cute::size<1>(SmemLayoutA{}) == kBlockK &&
                    cute::cosize_v<SmemLayoutA> ==
                        kBlockM * kBlockK * Base::DispatchPolicy::Stages,
                "A's smem: (BLK_M, BLK_K, PIPE), dense");
  static_assert(cute::size<1>(typename DispatchPolicy::ClusterShape{}) == 1,
                "A is gathered per CTA: no multicast of A along N");
  static_assert(cutlass::gemm::detail::is_k_major<typename Base::InternalStrideA>(),
                "the gather copies K-contiguous rows");

  // 1 TMA leader (B) + 64 lanes' cp.async arrivals (A, both producer warps)
  // per stage.
  static constexpr int NumProducerThreadEvents = 65;
  static constexpr uint32_t kBytesB = static_cast<uint32_t>(
      cute::size<0>(SmemLayoutB{}) * cute::size<1>(SmemLayoutB{}) * sizeof(Element));

  struct Arguments : Resident::Arguments {
    GatherAArguments<Element> gather;
  };
  struct Params : Resident::Params {
    GatherAArguments<Element> gather;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    Params p;
    static_cast<typename Resident::Params&>(p) =
        Resident::to_underlying_arguments(problem_shapes, args, workspace);
    p.tma_transaction_bytes = kBytesB;  // A's bytes arrive by cp.async
    p.gather = args.gather;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape problem_shapes, Arguments const& args) {
    const auto& g = args.gather;
    return Resident::can_implement(problem_shapes, args) && g.hidden != nullptr &&
           g.sorted_pairs != nullptr && g.topk > 0 &&
           reinterpret_cast<uintptr_t>(g.hidden) % 16 == 0;
  }

  // One warp's share of a tile's A rows. Lane l copies 16-byte column
  // c = l % 8 of rows r = l / 8 + 4 q for the q of parity `half` (q <
  // kBlockM / 4): a warp instruction covers four whole 128-byte rows; the two
  // producer warps take alternate quads. Row r's token lives in lane r % 32
  // (loaded once a tile) and is shuffled out. The stage is CUTLASS's K-major
  // 128-byte-swizzle layout (asserted above): row r at r * 128 bytes, its
  // chunk c at chunk c ^ (r % 8), stages kBlockM * 128 bytes apart; with
  // r % 8 = l / 8 + 4 half a lane's swizzled offset is fixed, so an address
  // costs a shuffle, an add and a wide multiply-add.
  template <int Half>
  struct RowGather {
    int token[kBlockM / 32];
    uint32_t lane_off;
    int row0, c, K;
    uint64_t row_bytes;
    const char* hidden;

    CUTLASS_DEVICE RowGather(Params const& params, ResidentGroup const& g, int m_block, int lane) {
      const int m0 = m_block * kBlockM;
      const int32_t* pairs = params.gather.sorted_pairs + g.a_row;  // the expert's run
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kBlockM / 32; ++i) {
        const int r = m0 + lane + 32 * i;
        const int pair = r < g.M ? __ldg(pairs + r) : -1;
        token[i] = pair >= 0 ? pair / params.gather.topk : -1;
      }
      c = lane % 8;
      row0 = lane / 8;
      const int rm8 = row0 + 4 * Half;
      lane_off = rm8 * 128u + ((c ^ rm8) << 4);
      K = params.K;
      row_bytes = static_cast<uint64_t>(params.K) * sizeof(Element);
      hidden = reinterpret_cast<const char*>(params.gather.hidden);
    }

    // cp.async of this warp's rows of K tile k_tile into the stage at smem
    // address `stage` (rows without a token and K past the row: zero-filled).
    CUTLASS_DEVICE void copy(uint32_t stage, int k_tile) const {
      const int k = k_tile * kBlockK + c * kVec;
      const bool k_in = k < K;
      const char* src_k = hidden + static_cast<int64_t>(k) * sizeof(Element);
      const uint32_t dst0 = stage + lane_off;
      CUTLASS_PRAGMA_UNROLL
      for (int q = Half; q < kBlockM / 4; q += 2) {
        // Row r = row0 + 4 q: its token is in lane r % 32, register r / 32.
        const int t = __shfl_sync(0xffffffffu, token[q / 8], row0 + 4 * (q % 8));
        const uint32_t bytes = t >= 0 && k_in ? 16u : 0u;  // 0: zero-fill
        const char* src = src_k + static_cast<uint64_t>(t >= 0 ? t : 0) * row_bytes;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst0 + (q / 2) * 1024u),
                     "l"(src), "r"(bytes)
                     : "memory");
      }
    }
  };

  // A warp's rows of K tile k_tile into stage `state`, whose full barrier
  // counts each lane's arrival when its copies land.
  template <int Half>
  CUTLASS_DEVICE static void gather_stage(RowGather<Half> const& rows, MainloopPipeline& pipeline,
                                          PipelineState const& state, int k_tile,
                                          TensorStorage& shared_tensors) {
    rows.copy(cute::cast_smem_ptr_to_uint(shared_tensors.smem_A.data()) +
                  state.index() * (kBlockM * 128u),
              k_tile);
    cutlass::arch::cpasync_barrier_arrive_noinc(
        reinterpret_cast<uint64_t const*>(pipeline.producer_get_barrier(state)));
  }

  // Mainloop producer warp: B by TMA from the whole weights (the leader) and
  // the even quads of A's rows (every lane).
  template <class LoadInputs, class TensorMaps, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write, LoadInputs const& load_inputs,
                           TensorMaps const& /*descriptors: the parameters'*/,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int lane, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    const bool leader = cute::elect_one_sync();
    const ResidentGroup& g = get<2>(load_inputs);
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr uint32_t cluster_x = get<0>(typename DispatchPolicy::ClusterShape());
    const uint32_t block_x = block_rank_in_cluster % cluster_x;
    auto block_tma_b = params.tma_load_b.get_slice(block_x);
    Tensor tBgB = block_tma_b.partition_S(
        Resident::group_tiles_b(params, g, static_cast<int>(get<1>(blk_coord))));  // (TMA, TMA_N, TMA_K, k)
    Tensor tBsB = block_tma_b.partition_D(sB);  // (TMA, TMA_N, TMA_K, PIPE)
    const uint16_t mcast_mask_b = Resident::b_multicast_mask();
    const RowGather<0> rows(params, get<2>(load_inputs), static_cast<int>(get<0>(blk_coord)), lane);
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      // Every lane waits for the free stage; the leader (the pipeline's is_leader
      // thread, lane 0) arrives expecting B's bytes.
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      if (leader) {
        copy(params.tma_load_b.with(*barrier, mcast_mask_b),
             tBgB(_, _, _, *k_tile_iter), tBsB(_, _, _, smem_pipe_write.index()));
      }
      gather_stage(rows, pipeline, smem_pipe_write, static_cast<int>(*k_tile_iter), shared_tensors);
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  // Auxiliary producer warp: the odd quads of A's rows.
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline,
                                     PipelineState smem_pipe_write, LoadInputs const& load_inputs,
                                     BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                                     int k_tile_count, int lane, uint32_t /*block_rank*/,
                                     TensorStorage& shared_tensors) {
    using namespace cute;
    const RowGather<1> rows(params, get<2>(load_inputs), static_cast<int>(get<0>(blk_coord)), lane);
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);  // wait until the stage is free
      gather_stage(rows, pipeline, smem_pipe_write, static_cast<int>(*k_tile_iter), shared_tensors);
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace pcg::moe::sm90
