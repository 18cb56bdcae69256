// Programmatic dependent launch (sm_90 PDL), shared by the kernels that use it.
// Torch-free. Device side: a dependent waits (pdl_wait) before reading anything
// its primary grid may write; a primary lets its dependents launch early
// (pdl_launch_dependents). Host side: launch as a dependent only where the
// kernel's code on this device has the wait.
#pragma once

#include <cuda_runtime.h>

namespace pcg {

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether `kernel`'s code on this device waits for its primary grid
// (compiled for sm_90+; a PTX-JIT build of an older arch has no wait).
template <typename K>
bool has_pdl_wait(K kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.ptxVersion >= 90;
}

// has_pdl_wait of `Kernel`, asked once per kernel (the cache is keyed by the
// kernel itself, not by the launcher that picks it).
template <auto Kernel>
bool pdl_supported() {
  static const bool ok = has_pdl_wait(Kernel);
  return ok;
}

// Launch with the programmatic-stream-serialization attribute.
template <typename K, typename... Args>
cudaError_t launch_pdl(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Launches Kernel as a programmatic dependent when as_dependent and its code
// on this device has the wait (pdl_supported), as a plain launch otherwise.
// For kernels that call pdl_wait before touching global memory.
template <auto Kernel, typename... Args>
cudaError_t launch_maybe_pdl(bool as_dependent, dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, const Args&... args) {
  if (as_dependent && pdl_supported<Kernel>()) {
    return launch_pdl(Kernel, grid, block, smem, stream, args...);
  }
  Kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace pcg
