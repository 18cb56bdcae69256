// pcg::weak_ref_tensor: a tensor over t's memory that does not own it.
// Captured graphs keep only such references to their intermediate outputs, so
// the shared graph pool can hand that memory to the next segment or bucket.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/check.h"

namespace pcg {

at::Tensor weak_ref_tensor(const at::Tensor& t) {
  PCG_CHECK_ARG("weak_ref_tensor", "t", t.defined(), "must be a defined tensor");
  PCG_CHECK_ARG("weak_ref_tensor", "t", !t.is_sparse(), "must be a strided (dense) tensor");
  if (t.numel() == 0 || t.data_ptr() == nullptr) {
    // Nothing to keep alive: an empty tensor of the same geometry.
    return at::empty_strided(t.sizes(), t.strides(), t.options());
  }
  // No-op deleter: the storage stays owned by whoever allocated t.
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), [](void*) {}, t.options());
}

// Conjugate / negative views and efficient zero tensors reach a backend kernel
// as a temporary materialised copy: a reference to that copy would dangle. So
// these dispatch keys (ahead of the backends) refuse them.
at::Tensor weak_ref_tensor_lazy_view(const at::Tensor& t) {
  PCG_CHECK_ARG("weak_ref_tensor", "t", !t._is_zerotensor(),
                "is an efficient zero tensor, which has no memory to refer to");
  PCG_CHECK_ARG("weak_ref_tensor", "t", !t.is_conj() && !t.is_neg(),
                "is a lazy ", t.is_conj() ? "conjugate" : "negative",
                " view; its values are not in memory (call .resolve_conj() / .resolve_neg() and "
                "keep that tensor alive)");
  return weak_ref_tensor(t);  // a plain tensor (not expected here): as the backends
}

TORCH_LIBRARY_IMPL(pcg, CPU, m) { m.impl("weak_ref_tensor", &weak_ref_tensor); }
TORCH_LIBRARY_IMPL(pcg, CUDA, m) { m.impl("weak_ref_tensor", &weak_ref_tensor); }
TORCH_LIBRARY_IMPL(pcg, Conjugate, m) { m.impl("weak_ref_tensor", &weak_ref_tensor_lazy_view); }
TORCH_LIBRARY_IMPL(pcg, Negative, m) { m.impl("weak_ref_tensor", &weak_ref_tensor_lazy_view); }
TORCH_LIBRARY_IMPL(pcg, ZeroTensor, m) { m.impl("weak_ref_tensor", &weak_ref_tensor_lazy_view); }

}  // namespace pcg
