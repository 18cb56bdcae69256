// What CUTLASS's Sm90TmaWarpSpecializedAdapter and its ptr-array grouped
// kernels ask of an epilogue that stores D straight from registers (no shared
// memory, no TMA, no workspace, no C operand): the type names and the trivial
// host-side statics, shared by gated_act_epilogue.cuh and
// direct_store_epilogue.cuh. Arguments_ is the derived epilogue's argument
// struct, also its Params; the derived class adds can_implement, a constructor
// from Params and the device operator().
#pragma once

#include <cstddef>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"

namespace pcg::moe::sm90 {

template <typename Element, typename StrideD_, typename Arguments_>
struct RegisterEpilogueBase {
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementC = void;  // no C operand
  using StrideC = StrideD_;
  using InternalStrideC = cute::remove_pointer_t<StrideC>;
  using ElementD = Element;
  using ElementOutput = Element;
  using StrideD = StrideD_;
  using InternalStrideD = cute::remove_pointer_t<StrideD>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  // Named by CUTLASS's device adapter only (the math is the derived class's).
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>;
  static_assert(cute::rank(InternalStrideD{}) == 3, "StrideD must be rank-3: [M, N, L]");

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;
  using Arguments = Arguments_;
  using Params = Arguments_;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_source_needed() { return false; }
};

}  // namespace pcg::moe::sm90
