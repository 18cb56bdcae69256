// CUTLASS 3.x sm_90a grouped GEMMs of fused_moe's CUTLASS path (interface:
// grouped_gemm_sm90.h), instantiated per dtype in grouped_gemm_sm90_{bf16,f16}.cu.
// A row-major [M,K], B "column-major" [N,K] (the weights as stored), D
// row-major [M,N]; ptr-array grouped kernels (one group per local expert),
// TMA warp-specialized, no C operand (D = A.B^T). Every kernel variant of
// grouped_gemm_variants.h is built; each GEMM runs the one its config names.
// Problem shapes live only on the device (host shapes: nullptr), so the host
// never needs the routing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/pdl.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "moe/direct_store_epilogue.cuh"
#include "moe/gather_a_mainloop.cuh"
#include "moe/gated_act_epilogue.cuh"
#include "moe/grouped_gemm_sm90.h"
#include "moe/grouped_gemm_variants.h"
#include "moe/moe_prepare.cuh"
#include "moe/resident_tma_mainloop.cuh"

namespace pcg::moe::sm90 {

using namespace cute;

// A matching mainloop / epilogue schedule pair (GemmSchedule of the list).
struct CooperativeSchedule {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct PingpongSchedule {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// One CUTLASS kernel type: ptr-array grouped, tile TileShape (CUTLASS's M x N
// x K), cluster ClusterShape (multicast of B across the CTAs along M), Schedule
// one of the pairs above. SwapAB: A is the weights ([N, K] row-major), B the
// tokens ([M_e, K], K-major) and D^T [N, M_e] column-major, i.e. D row-major.
// GatherA: A's rows are gathered from the hidden states (gather_a_mainloop.cuh).
// Resident: TMA descriptors over the whole operands (resident_tma_mainloop.cuh;
// a gather kernel is one).
template <class TmaMainloop, bool GatherA, bool Resident>
using MainloopOf = std::conditional_t<
    GatherA, GatherAMainloop<TmaMainloop>,
    std::conditional_t<Resident, ResidentTmaMainloop<TmaMainloop>, TmaMainloop>>;

template <typename Element, typename TileShape_, typename ClusterShape_, typename Schedule,
          bool SwapAB = false, bool DirectStore = false, bool GatherA = false,
          bool Resident = false>
struct GroupedGemmKernel {
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD =
      std::conditional_t<SwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr bool kSwapAB = SwapAB;
  static constexpr bool kDirectStore = DirectStore;
  static constexpr bool kGatherA = GatherA;
  static constexpr bool kResident = Resident || GatherA;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes
  using Acc = float;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;

  using TmaEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      void, LayoutD*, kAlign,  // no C operand
      Element, LayoutD*, kAlign, typename Schedule::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<Element, Acc>>::CollectiveOp;
  using DirectEpilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      DirectStoreEpilogue<Element, cutlass::detail::TagToStrideC_t<LayoutD*>>>;
  using Epilogue = std::conditional_t<DirectStore, DirectEpilogue, TmaEpilogue>;

  using TmaMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;
  using Mainloop = MainloopOf<TmaMainloop, GatherA, Resident>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The same mainloop with the gated-activation epilogue (gated_act_epilogue.cuh):
// GEMM1 over block-interleaved w13, writing inter instead of gate_up (SwapAB:
// the weights as wgmma's A operand, as GroupedGemmKernel's).
template <typename Element, typename TileShape_, typename ClusterShape_, typename Schedule,
          bool SwapAB = false, bool GatherA = false, bool Resident = false>
struct GatedGroupedGemmKernel {
  using Plain = GroupedGemmKernel<Element, TileShape_, ClusterShape_, Schedule, SwapAB>;
  using ProblemShape = typename Plain::ProblemShape;
  static constexpr bool kSwapAB = SwapAB;
  static constexpr bool kDirectStore = false;
  static constexpr bool kGatherA = GatherA;
  static constexpr bool kResident = Resident || GatherA;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      GatedActEpilogue<Element, cutlass::detail::TagToStrideC_t<typename Plain::LayoutD*>,
                       SwapAB>>;
  using TmaMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, typename Plain::LayoutA*,
      Plain::kAlign, Element, typename Plain::LayoutB*, Plain::kAlign, typename Plain::Acc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;
  using Mainloop = MainloopOf<TmaMainloop, GatherA, Resident>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Variant<Element, id> / GatedVariant<Element, id>: the kernel types of list
// entry `id` (plain epilogue / gated-activation epilogue).
template <typename Element, int Id>
struct Variant;
template <typename Element, int Id>
struct GatedVariant;
template <bool Swap, int TM, int TN, int TK>
using CutlassTile = std::conditional_t<Swap, Shape<Int<TN>, Int<TM>, Int<TK>>,
                                       Shape<Int<TM>, Int<TN>, Int<TK>>>;
#define PCG_SM90_VARIANT_TYPE(id, name, sched, tm, tn, tk, cm, swap, direct, gather, resident) \
  template <typename Element>                                                                  \
  struct Variant<Element, id>                                                                  \
      : GroupedGemmKernel<Element, CutlassTile<swap != 0, tm, tn, tk>,                         \
                          Shape<Int<cm>, _1, _1>, sched##Schedule, swap != 0, direct != 0,     \
                          gather != 0, resident != 0> {};                                      \
  template <typename Element>                                                                  \
  struct GatedVariant<Element, id>                                                             \
      : GatedGroupedGemmKernel<Element, CutlassTile<swap != 0, tm, tn, tk>,                    \
                               Shape<Int<cm>, _1, _1>, sched##Schedule, swap != 0,             \
                               gather != 0, resident != 0> {};
PCG_MOE_GEMM_VARIANTS(PCG_SM90_VARIANT_TYPE)
#undef PCG_SM90_VARIANT_TYPE

// Calls f(Variant<Element, id>{}) (Gated: f(GatedVariant<Element, id>{})) for
// a listed id (f returns cudaError_t); cudaErrorInvalidValue for another id.
template <typename Element, bool Gated, typename F>
cudaError_t with_variant(int id, F&& f) {
  switch (id) {
#define PCG_SM90_VARIANT_CASE(vid, ...)                                    \
    case vid:                                                              \
      if constexpr (Gated) {                                               \
        return f(GatedVariant<Element, vid>{});                            \
      } else {                                                             \
        return f(Variant<Element, vid>{});                                 \
      }
    PCG_MOE_GEMM_VARIANTS(PCG_SM90_VARIANT_CASE)
#undef PCG_SM90_VARIANT_CASE
    default: return cudaErrorInvalidValue;
  }
}

// Whether kernel K takes the argument types of Base (the default variant):
// the same problem-shape type and, for a plain kernel, the same strides; a
// swap-AB kernel takes B's stride for A, A's for B and a column-major D
// stride (StrideDt), each holding the same one number (a leading dimension).
template <typename Base, typename StrideDt, typename K>
constexpr bool takes_shared_args() {
  using KK = typename K::Kernel;
  using BK = typename Base::Kernel;
  if constexpr (!std::is_same_v<typename K::ProblemShape, typename Base::ProblemShape>) {
    return false;
  } else if constexpr (K::kSwapAB) {
    return std::is_same_v<typename KK::InternalStrideA, typename BK::InternalStrideB> &&
           std::is_same_v<typename KK::InternalStrideB, typename BK::InternalStrideA> &&
           std::is_same_v<typename KK::InternalStrideD, StrideDt>;
  } else {
    return std::is_same_v<typename KK::InternalStrideA, typename BK::InternalStrideA> &&
           std::is_same_v<typename KK::InternalStrideB, typename BK::InternalStrideB> &&
           std::is_same_v<typename KK::InternalStrideD, typename BK::InternalStrideD>;
  }
}

// Both GEMMs of one dtype. Every variant reads the same device argument
// arrays (one setup for all: same shape / stride types, asserted; swap-AB
// kernels read the transposed shapes and the column-major D strides) and the
// same CUTLASS workspace (sized for the largest variant; the GEMMs run one
// after the other).
template <typename Element>
struct GroupedGemm {
  using Base = Variant<Element, kDefaultGemmVariant>;
  using ProblemShape = typename Base::ProblemShape;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Base::Kernel::InternalStrideA;
  using StrideB = typename Base::Kernel::InternalStrideB;
  using StrideD = typename Base::Kernel::InternalStrideD;
  // D's stride as swap-AB kernels take it (column-major D^T).
  using StrideDt =
      cute::remove_pointer_t<cutlass::detail::TagToStrideC_t<cutlass::layout::ColumnMajor*>>;
#define PCG_SM90_VARIANT_SHARES(id, name, ...)                                              \
  static_assert(takes_shared_args<Base, StrideDt, Variant<Element, id>>() &&                 \
                    takes_shared_args<Base, StrideDt, GatedVariant<Element, id>>(),          \
                "variant " #name ": the setup kernel writes one set of shapes / strides " \
                "for every variant");
  PCG_MOE_GEMM_VARIANTS(PCG_SM90_VARIANT_SHARES)
#undef PCG_SM90_VARIANT_SHARES
  static_assert(sizeof(Shape3) <= kGroupedArgSlotBytes && sizeof(StrideA) <= kGroupedArgSlotBytes &&
                    sizeof(StrideB) <= kGroupedArgSlotBytes &&
                    sizeof(StrideD) <= kGroupedArgSlotBytes &&
                    sizeof(StrideDt) <= kGroupedArgSlotBytes,
                "grouped_gemm_sm90_args_bytes undersizes an argument array");

  // The device argument arrays of one GEMM (E entries each); shape_t and sd_t
  // are what swap-AB kernels read: (N, M, K) and D's column-major stride.
  struct Arrays {
    Shape3* shape;
    const Element** a;
    const Element** b;
    Element** d;
    StrideA* sa;
    StrideB* sb;
    StrideD* sd;
    Shape3* shape_t;
    StrideDt* sd_t;
  };

  // GEMM `which` (1 or 2): arrays kGroupedArgArraysPerGemm * (which - 1) ...
  // of the args workspace.
  static Arrays arrays(void* base, int64_t E, int which) {
    constexpr int kPer = kGroupedArgArraysPerGemm;
    static_assert(kPer == 9, "Arrays holds 9 arrays");
    const size_t per = grouped_gemm_sm90_args_bytes(E) / (2 * kPer);
    char* p = static_cast<char*>(base) + static_cast<size_t>(which - 1) * kPer * per;
    Arrays r;
    r.shape = reinterpret_cast<Shape3*>(p);
    r.a = reinterpret_cast<const Element**>(p + per);
    r.b = reinterpret_cast<const Element**>(p + 2 * per);
    r.d = reinterpret_cast<Element**>(p + 3 * per);
    r.sa = reinterpret_cast<StrideA*>(p + 4 * per);
    r.sb = reinterpret_cast<StrideB*>(p + 5 * per);
    r.sd = reinterpret_cast<StrideD*>(p + 6 * per);
    r.shape_t = reinterpret_cast<Shape3*>(p + 7 * per);
    r.sd_t = reinterpret_cast<StrideDt*>(p + 8 * per);
    return r;
  }

  static cutlass::KernelHardwareInfo hw_info(const MoeGroupedGemmArgs& a) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = a.device;
    hw.sm_count = a.sm_count;
    return hw;
  }

  // The grouped mode, problem shapes, A / B operands and D of kernel K from one
  // GEMM's arrays: a swap-AB kernel computes D^T = W . A^T (transposed shapes, the
  // operands exchanged, column-major D; takes_shared_args: the types match).
  // A resident kernel also takes the whole A (sorted slots) and B (weights);
  // a gather kernel (GEMM1 only, resident) also reads the hidden rows by token.
  template <typename K>
  static void grouped_operands(typename K::Gemm::Arguments& args, const Arrays& r, int64_t E,
                               const MoeGroupedGemmArgs& a, int which) {
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    auto& ml = args.mainloop;
    if constexpr (K::kSwapAB) {
      args.problem_shape = {static_cast<int>(E), r.shape_t, nullptr};
      ml.ptr_A = r.b;
      ml.dA = r.sb;
      ml.ptr_B = r.a;
      ml.dB = r.sa;
      args.epilogue.dD = r.sd_t;
    } else {
      args.problem_shape = {static_cast<int>(E), r.shape, nullptr};
      ml.ptr_A = r.a;
      ml.dA = r.sa;
      ml.ptr_B = r.b;
      ml.dB = r.sb;
      args.epilogue.dD = r.sd;
    }
    if constexpr (K::kResident) {
      static_assert(!K::kSwapAB, "resident kernels keep tokens as A");
      auto& w = ml.whole;
      w.a = static_cast<const Element*>(which == 1 ? a.a1 : a.a2);
      w.b = static_cast<const Element*>(which == 1 ? a.w13 : a.w2);
      w.a_rows = static_cast<int>(a.slots);
      w.b_rows = static_cast<int>(a.E * (which == 1 ? 2 * a.I : a.H));
      w.K = static_cast<int>(which == 1 ? a.H : a.I);
    }
    if constexpr (K::kGatherA) {
      ml.gather.hidden = static_cast<const Element*>(a.hidden);
      ml.gather.sorted_pairs = a.sorted_pairs;
      ml.gather.topk = a.topk;
    }
    args.epilogue.ptr_D = r.d;
  }

  // Arguments of kernel K (a GatedVariant) for GEMM1 with the activation fused.
  template <typename K>
  static typename K::Gemm::Arguments gated_arguments(const MoeGroupedGemmArgs& a) {
    const Arrays r = arrays(a.args, a.E, 1);
    typename K::Gemm::Arguments args;
    grouped_operands<K>(args, r, a.E, a, 1);  // swapped: the epilogue writes inter row-major itself
    GatedActParams<Element>& p = args.epilogue.act;
    p.b13 = static_cast<const Element*>(a.b13);
    p.I = static_cast<int>(a.I);
    p.act = static_cast<int>(a.act);
    p.alpha = a.alpha;
    p.limit = a.limit;
    args.hw_info = hw_info(a);
    return args;
  }

  // Arguments of kernel K (a Variant) for GEMM `which`.
  template <typename K>
  static typename K::Gemm::Arguments arguments(const MoeGroupedGemmArgs& a, int which) {
    const Arrays r = arrays(a.args, a.E, which);
    const cutlass::KernelHardwareInfo hw = hw_info(a);
    typename K::Gemm::Arguments args;
    grouped_operands<K>(args, r, a.E, a, which);
    if constexpr (!K::kDirectStore) {
      args.epilogue.thread.alpha = 1.f;
      args.epilogue.thread.beta = 0.f;
      args.epilogue.ptr_C = nullptr;
      args.epilogue.dC = nullptr;
    }
    args.hw_info = hw;
    return args;
  }
};

// Expert x's run [first, end) of blocks: the first b in [0, n) with v[b] >= x
// and the first with v[b] > x (v non-decreasing on [0, n)). The two searches
// advance together (two loads in flight a step); L2 loads (__ldcg), as the
// kernel may start before its stream predecessor ends (see setup below).
__device__ __forceinline__ int2 expert_run(const int32_t* v, int n, int x) {
  int lo0 = 0, hi0 = n, lo1 = 0, hi1 = n;
  while (lo0 < hi0 || lo1 < hi1) {
    const int m0 = (lo0 + hi0) >> 1, m1 = (lo1 + hi1) >> 1;
    const int a = lo0 < hi0 ? __ldcg(v + m0) : 0;
    const int b = lo1 < hi1 ? __ldcg(v + m1) : 0;
    if (lo0 < hi0) {
      if (a < x) lo0 = m0 + 1; else hi0 = m0;
    }
    if (lo1 < hi1) {
      if (b <= x) lo1 = m1 + 1; else hi1 = m1;
    }
  }
  return make_int2(lo0, lo1);
}

// Writes expert e's arguments of both GEMMs: M rows starting at slot `off`
// of the sorted buffers (0 for an empty expert: a valid base address).
template <typename Element>
struct ExpertArgsWriter {
  using G = GroupedGemm<Element>;
  MoeGroupedGemmArgs a;
  typename G::Arrays g1, g2;

  __device__ void operator()(int64_t e, int M, int64_t off) const {
    const int H = static_cast<int>(a.H), I = static_cast<int>(a.I);
    const Element* w13 = static_cast<const Element*>(a.w13);
    const Element* w2 = static_cast<const Element*>(a.w2);
    g1.shape[e] = make_shape(M, 2 * I, H);
    g1.a[e] = static_cast<const Element*>(a.a1) + off * H;
    g1.b[e] = w13 + e * 2 * I * static_cast<int64_t>(H);
    g1.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(M, H, 1));
    g1.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(2 * I, H, 1));
    if (a.fused_act) {  // D = inter [M, I]: the epilogue writes one column per gate/up pair
      g1.d[e] = static_cast<Element*>(a.a2) + off * I;
      g1.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(M, I, 1));
    } else {
      g1.d[e] = static_cast<Element*>(a.d1) + off * 2 * I;
      g1.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(M, 2 * I, 1));
    }
    // What swap-AB kernels read (D^T [N, M] column-major = D [M, N] row-major).
    g1.shape_t[e] = make_shape(2 * I, M, H);
    g1.sd_t[e] = cutlass::make_cute_packed_stride(typename G::StrideDt{}, make_shape(2 * I, M, 1));
    g2.shape[e] = make_shape(M, H, I);
    g2.a[e] = static_cast<const Element*>(a.a2) + off * I;
    g2.b[e] = w2 + e * static_cast<int64_t>(H) * I;
    g2.d[e] = static_cast<Element*>(a.d2) + off * H;
    g2.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(M, I, 1));
    g2.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(H, I, 1));
    g2.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(M, H, 1));
    g2.shape_t[e] = make_shape(H, M, I);
    g2.sd_t[e] = cutlass::make_cute_packed_stride(typename G::StrideDt{}, make_shape(H, M, 1));
  }
};

template <typename Element>
ExpertArgsWriter<Element> args_writer(const MoeGroupedGemmArgs& a) {
  using G = GroupedGemm<Element>;
  return ExpertArgsWriter<Element>{a, G::arrays(a.args, a.E, 1), G::arrays(a.args, a.E, 2)};
}

// One thread per expert: e's run is blocks [lo, hi) of moe_align's output;
// M_e = full blocks + the valid slots of the last one (valid pairs come first).
// Reads only moe_align's outputs and writes only the argument arrays, so it
// may run beside the permute (launched as its PDL dependent); it waits for
// the permute at its end, so that the GEMMs (plain launches after it) start
// after both. Without a permute (GEMM1 gathers) it is moe_align's dependent
// and waits for it first (the align lets dependents launch at its start).
template <typename Element>
__global__ void grouped_setup_kernel(MoeGroupedGemmArgs a, ExpertArgsWriter<Element> write_args) {
  if (a.gather_a) pdl_wait();
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= a.E) {
    pdl_wait();
    return;
  }
  const int nb = __ldcg(a.num_blocks);
  const int2 run = expert_run(a.block_expert, nb, static_cast<int>(e));
  const int lo = run.x, hi = run.y;
  int M = 0;
  int64_t off = 0;  // first slot; 0 for an empty expert (a valid base address)
  if (hi > lo) {
    M = (hi - lo - 1) * a.block_m;
    const int32_t* last = a.sorted_pairs + static_cast<int64_t>(hi - 1) * a.block_m;
#pragma unroll 16
    for (int r = 0; r < a.block_m; ++r) M += __ldcg(last + r) >= 0;
    off = static_cast<int64_t>(lo) * a.block_m;
  }
  write_args(e, M, off);
  pdl_wait();  // the permute (see above)
}

template <typename Element, int Id>
size_t workspace_bytes_of(const MoeGroupedGemmArgs& a) {
  using G = GroupedGemm<Element>;
  using K = Variant<Element, Id>;
  using KG = GatedVariant<Element, Id>;
  const size_t w1 = K::Gemm::get_workspace_size(G::template arguments<K>(a, 1));
  const size_t w2 = K::Gemm::get_workspace_size(G::template arguments<K>(a, 2));
  const size_t w = w1 > w2 ? w1 : w2;
  const size_t wg = KG::Gemm::get_workspace_size(G::template gated_arguments<KG>(a));
  return wg > w ? wg : w;
}

// The largest workspace of any variant for any GEMM (one buffer serves
// whichever variants the config names).
template <typename Element>
size_t workspace_bytes(int64_t E, int sm_count) {
  MoeGroupedGemmArgs a;
  a.E = E;
  a.sm_count = sm_count;
  // Only the group count and the SM count matter here; no pointer is read.
  alignas(256) static char dummy[256];
  a.args = dummy;
  size_t w = 0;
#define PCG_SM90_VARIANT_WORKSPACE(id, ...)                                  \
  {                                                                          \
    const size_t v = workspace_bytes_of<Element, id>(a);                     \
    w = v > w ? v : w;                                                       \
  }
  PCG_MOE_GEMM_VARIANTS(PCG_SM90_VARIANT_WORKSPACE)
#undef PCG_SM90_VARIANT_WORKSPACE
  return w;
}

template <typename Element>
cudaError_t setup(const MoeGroupedGemmArgs& a, cudaStream_t stream) {
  if (a.E <= 0) return cudaSuccess;
  const unsigned threads = 128;
  const unsigned blocks = static_cast<unsigned>((a.E + threads - 1) / threads);
  // A PDL dependent of the permute (moe_cutlass.h's order), which lets it
  // launch only after waiting for moe_align itself.
  return launch_maybe_pdl<grouped_setup_kernel<Element>>(
      /*as_dependent=*/true, dim3(blocks), dim3(threads), 0, stream, a, args_writer<Element>(a));
}

template <typename Element>
cudaError_t prepare(const MoeGroupedGemmArgs& a, const MoePrepareInputs& in,
                    cudaStream_t stream) {
  if (a.E <= 0 || in.T <= 0 || a.H % 8 != 0) return cudaErrorInvalidValue;
  const int64_t row_vecs = a.H * static_cast<int64_t>(sizeof(Element)) / 16;
  const MoePrepareSplit split = moe_prepare_split(in.T, row_vecs, a.sm_count);
  MoePrepareParams p;
  p.topk_ids = in.topk_ids;
  p.T = in.T;
  p.k = in.k;
  p.expert_map = in.expert_map;
  p.num_global = in.num_global;
  p.num_valid = in.num_valid;
  p.E = static_cast<int>(a.E);
  p.block_m = a.block_m;
  p.sorted_pairs = in.sorted_pairs;
  p.block_expert = in.block_expert;
  p.max_blocks = in.max_blocks;
  p.num_blocks = in.num_blocks;
  p.pair_slot = in.pair_slot;
  p.hidden = static_cast<const uint4*>(in.hidden);
  // A gather GEMM1 reads the hidden rows itself: only the routing here.
  p.a_sorted = a.gather_a ? nullptr : static_cast<uint4*>(const_cast<void*>(a.a1));
  p.row_vecs = row_vecs;
  p.chunk = split.chunk;
  p.chunks = split.chunks;
  p.pieces_per_cta = split.pieces_per_cta;
  const size_t smem = moe_prepare_smem_bytes(p.E, split.tokens_per_cta, p.k);
  constexpr auto kernel = moe_prepare_kernel<ExpertArgsWriter<Element>>;
  // Beside the dynamic shared memory: scan_padded_runs' warp sums.
  const cudaError_t err = allow_dynamic_smem(kernel, smem, sizeof(int) * kPrepareWarps);
  if (err != cudaSuccess) return err;
  // A PDL dependent of the op's previous kernel (it waits before reading).
  return launch_maybe_pdl<kernel>(/*as_dependent=*/true, dim3(static_cast<unsigned>(split.ctas)),
                                  dim3(kPrepareWarps * 32), smem, stream, p,
                                  args_writer<Element>(a));
}

template <typename K>
cudaError_t run_gemm(const typename K::Gemm::Arguments& args, void* workspace,
                     cudaStream_t stream) {
  typename K::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // initialize: host-side parameter building, cudaFuncSetAttribute and at
  // most workspace memsets on `stream` (capturable).
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
    return cudaErrorInvalidConfiguration;
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

// GEMM `which` (1 or 2; GEMM1 with the activation when a.fused_act) with
// kernel variant `variant` (a listed id).
template <typename Element>
cudaError_t run(const MoeGroupedGemmArgs& a, int which, int variant, cudaStream_t stream) {
  using G = GroupedGemm<Element>;
  if (which != 1 && which != 2) return cudaErrorInvalidValue;
  if (a.E <= 0) return cudaSuccess;
  // A gather kernel reads the hidden rows: GEMM1's A only.
  if (gemm_variant_gathers_a(variant) && (which != 1 || a.hidden == nullptr || a.topk <= 0)) {
    return cudaErrorInvalidValue;
  }
  if (which == 1 && a.fused_act) {
    return with_variant<Element, true>(variant, [&](auto v) {
      using K = decltype(v);
      return run_gemm<K>(G::template gated_arguments<K>(a), a.workspace, stream);
    });
  }
  return with_variant<Element, false>(variant, [&](auto v) {
    using K = decltype(v);
    return run_gemm<K>(G::template arguments<K>(a, which), a.workspace, stream);
  });
}

}  // namespace pcg::moe::sm90

// Defines the dtype's three entry points (used by grouped_gemm_sm90_dispatch).
#define PCG_DEFINE_GROUPED_GEMM_SM90(SUFFIX, ELEMENT)                                          \
  namespace pcg::moe::detail {                                                                  \
  size_t grouped_workspace_##SUFFIX(int64_t E, int sm_count) {                                 \
    return sm90::workspace_bytes<ELEMENT>(E, sm_count);                                         \
  }                                                                                             \
  cudaError_t grouped_setup_##SUFFIX(const MoeGroupedGemmArgs& a, cudaStream_t s) {            \
    return sm90::setup<ELEMENT>(a, s);                                                          \
  }                                                                                             \
  cudaError_t grouped_prepare_##SUFFIX(const MoeGroupedGemmArgs& a, const MoePrepareInputs& in, \
                                       cudaStream_t s) {                                        \
    return sm90::prepare<ELEMENT>(a, in, s);                                                    \
  }                                                                                             \
  cudaError_t grouped_run_##SUFFIX(const MoeGroupedGemmArgs& a, int which, int variant,      \
                                   cudaStream_t s) {                                            \
    return sm90::run<ELEMENT>(a, which, variant, s);                                            \
  }                                                                                             \
  }
