// pcg::route kernels: top-k expert selection for MoE routers.
// Torch-free on purpose: the .cu file includes only this header.
//
// CPU and CUDA must pick bit-identical ids, so every float operation that
// feeds a comparison is written once here and runs unchanged on both sides:
// a portable exp (libm and CUDA expf differ in the last ulp), explicitly
// rounded arithmetic on the device (nvcc would fuse a*b+c otherwise), the
// warp's summation order for the softmax denominator, and one total order
// for "better candidate".
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace pcg {

enum class RouteDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class RouteScoring : int32_t { kSoftmax = 0, kSigmoid = 1 };

// Largest E the CUDA kernel accepts (one warp per token, E/32 slots per lane).
constexpr int64_t kRouteMaxExpertsCuda = 1024;
constexpr int kRouteWarp = 32;

struct RouteParams {
  const void* logits = nullptr;  // [T, E] contiguous
  RouteDtype logits_dtype = RouteDtype::kFloat32;
  const void* bias = nullptr;  // [E] contiguous, or null
  RouteDtype bias_dtype = RouteDtype::kFloat32;
  int64_t T = 0;
  int64_t E = 0;
  int64_t top_k = 1;
  RouteScoring scoring = RouteScoring::kSoftmax;
  bool renormalize = true;
  int64_t num_groups = 1;
  int64_t topk_groups = 1;
  float scale = 1.0f;
  float* weights = nullptr;  // [T, top_k] contiguous
  int32_t* ids = nullptr;    // [T, top_k] contiguous
};

// Validated params in, outputs written. T == 0 does nothing.
void route_cpu(const RouteParams& p);
void route_cuda(const RouteParams& p, CUstream_st* stream);

namespace route_math {

PCG_HD float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PCG_HD float sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
PCG_HD float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PCG_HD float div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
PCG_HD float fma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
PCG_HD float from_bits(int32_t bits) {
#ifdef __CUDA_ARCH__
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}
PCG_HD float pow2(int n) { return from_bits((n + 127) << 23); }  // n in [-126, 127]
PCG_HD float inf() { return from_bits(0x7f800000); }
PCG_HD bool is_nan(float x) { return x != x; }

// exp(x), ~1 ulp, identical bits on host and device: Cody-Waite reduction
// x = n*ln2 + r, degree-7 Taylor for e^r (|r| <= ln2/2), then 2^n applied in
// two exact-or-rounded-once halves so subnormal results round like IEEE.
PCG_HD float exp(float x) {
  if (is_nan(x)) return x;
  if (x > 88.72284f) return inf();
  if (x < -104.0f) return 0.0f;
#ifdef __CUDA_ARCH__
  const float nf = rintf(mul(x, 1.44269504f));
#else
  const float nf = std::nearbyint(mul(x, 1.44269504f));
#endif
  float r = fma(-nf, 0.693145751953125f, x);  // ln2 high part: n*hi is exact
  r = fma(-nf, 1.428606765330187e-06f, r);    // ln2 low part
  float p = 1.0f / 5040.0f;
  p = fma(p, r, 1.0f / 720.0f);
  p = fma(p, r, 1.0f / 120.0f);
  p = fma(p, r, 1.0f / 24.0f);
  p = fma(p, r, 1.0f / 6.0f);
  p = fma(p, r, 0.5f);
  p = fma(p, r, 1.0f);
  p = fma(p, r, 1.0f);
  const int n = static_cast<int>(nf);  // in [-150, 128]
  const int n1 = n / 2;
  return mul(mul(p, pow2(n1)), pow2(n - n1));
}

// exp of a non-positive argument only: no overflow, subnormal tails kept.
PCG_HD float sigmoid(float x) {
  const float e = exp(x < 0.0f ? x : -x);
  return x < 0.0f ? div(e, add(1.0f, e)) : div(1.0f, add(1.0f, e));
}

// Candidate order: larger value first, NaN after every number, ties to the
// lower index; idx < 0 means "no candidate". A strict total order, so every
// reduction tree (warp butterfly or a plain loop) finds the same winner.
PCG_HD bool better(float av, int ai, float bv, int bi) {
  if (bi < 0) return ai >= 0;
  if (ai < 0) return false;
  const bool an = is_nan(av), bn = is_nan(bv);
  if (an != bn) return bn;
  if (!an && av != bv) return av > bv;
  return ai < bi;
}

// Group score: sum of the two largest values (just the largest for n == 1).
PCG_HD float group_score(const float* v, int n) {
  float t1 = -inf(), t2 = -inf();
  for (int i = 0; i < n; ++i) {
    const float x = v[i];
    if (x > t1) {
      t2 = t1;
      t1 = x;
    } else if (x > t2) {
      t2 = x;
    }
  }
  return n == 1 ? t1 : add(t1, t2);
}

}  // namespace route_math
}  // namespace pcg
