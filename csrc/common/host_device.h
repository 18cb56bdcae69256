// PCG_HD: a function callable from host and device code in CUDA builds, a
// plain inline function in host-only (CPU) builds. Torch-free.
#pragma once

#if defined(__CUDACC__)
#define PCG_HD __host__ __device__ __forceinline__
#else
#define PCG_HD inline
#endif
