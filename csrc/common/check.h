// Argument validation shared by every launcher. Messages always name the
// argument so a user sees which input was wrong, from any entry point.
#pragma once

#include <torch/library.h>

#include <string>

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

}  // namespace pcg
