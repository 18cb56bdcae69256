// Argument validation shared by every launcher. Messages always name the
// argument so a user sees which input was wrong, from any entry point.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

namespace pcg {

// PCG_CHECK_ARG(cond, "arg", "what was expected", got...) -> ValueError-like
// c10::Error whose message starts with "pcg::<op>: <arg>".
#define PCG_CHECK_ARG(op, arg, cond, ...)                                          \
  TORCH_CHECK_VALUE((cond), "pcg::", op, ": argument '", arg, "' ", __VA_ARGS__)

inline std::string dtype_name(c10::ScalarType t) { return c10::toString(t); }

inline void check_device(const char* op, const char* arg, const at::Tensor& t,
                         const c10::Device& dev) {
  PCG_CHECK_ARG(op, arg, t.device() == dev, "must be on ", dev, ", got ", t.device());
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t,
                        c10::ScalarType dt) {
  PCG_CHECK_ARG(op, arg, t.scalar_type() == dt, "must have dtype ", dtype_name(dt),
                ", got ", dtype_name(t.scalar_type()));
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  PCG_CHECK_ARG(op, arg, t.dim() == dim, "must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t d,
                       int64_t expected, const char* meaning) {
  PCG_CHECK_ARG(op, arg, t.size(d) == expected, "dim ", d, " must be ", expected, " (",
                meaning, "), got shape ", t.sizes());
}

// Whether a and b may touch the same bytes: ATen's overlap test, and where it
// cannot decide (strided views) whether their address spans intersect.
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  const at::MemOverlapStatus st = at::get_overlap_status(a, b);
  if (st == at::MemOverlapStatus::No) return false;
  if (st != at::MemOverlapStatus::TooHard) return true;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // torch strides are non-negative
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::pair<uintptr_t, uintptr_t>{lo, lo + (last + 1) * t.element_size()};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// An output must share no memory with the op's other arguments: the kernels
// read inputs while they write outputs, in parallel (null entries are skipped).
inline void check_no_overlap(
    const char* op, const char* arg, const at::Tensor& out,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    PCG_CHECK_ARG(op, arg, !may_overlap(out, *t), "must share no memory with '", name, "'");
  }
}

}  // namespace pcg
