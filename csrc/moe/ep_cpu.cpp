// pcg::ep_dispatch / pcg::ep_combine: argument validation shared with the
// CUDA launchers, the CPU kernels and their registration. The exact buffer
// contract is in ep_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "common/check.h"
#include "moe/ep_args.h"
#include "moe/ep_kernels.h"

namespace pcg {

namespace {

constexpr const char* kDispatch = "ep_dispatch";
constexpr const char* kCombine = "ep_combine";
constexpr const char* kDispatchPeer = "ep_dispatch_peer";
constexpr const char* kReturnPeer = "ep_return_peer";

bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

ep::DType to_ep_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return ep::DType::kFloat16;
    case at::kBFloat16: return ep::DType::kBFloat16;
    default: return ep::DType::kFloat32;
  }
}

void check_out_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  PCG_CHECK_ARG(op, arg, t.is_contiguous(), "must be contiguous (it is written in place), got strides ",
                t.strides());
}

constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();

}  // namespace

namespace {

// Inputs and the slot_map / counts outputs, shared by both dispatch variants;
// W comes from the send buffers or from peer_ptrs.
ep::DispatchParams check_dispatch_common(const char* op, const at::Tensor& hidden,
                                         const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                         const at::Tensor& expert_rank,
                                         const at::Tensor& expert_local,
                                         const std::optional<at::Tensor>& num_valid,
                                         const at::Tensor& slot_map, const at::Tensor& counts,
                                         int64_t W, std::vector<at::Tensor>& keep) {
  // Device.
  const c10::Device dev = hidden.device();
  check_device(op, "topk_weights", topk_weights, dev);
  check_device(op, "topk_ids", topk_ids, dev);
  check_device(op, "expert_rank", expert_rank, dev);
  check_device(op, "expert_local", expert_local, dev);
  if (num_valid) check_device(op, "num_valid", *num_valid, dev);
  check_device(op, "slot_map", slot_map, dev);
  check_device(op, "counts", counts, dev);
  // Dtype.
  PCG_CHECK_ARG(op, "hidden", is_float_dtype(hidden.scalar_type()),
                "must have dtype float32, float16 or bfloat16, got ",
                dtype_name(hidden.scalar_type()));
  check_dtype(op, "topk_weights", topk_weights, at::kFloat);
  check_dtype(op, "topk_ids", topk_ids, at::kInt);
  check_dtype(op, "expert_rank", expert_rank, at::kInt);
  check_dtype(op, "expert_local", expert_local, at::kInt);
  if (num_valid) check_dtype(op, "num_valid", *num_valid, at::kInt);
  check_dtype(op, "slot_map", slot_map, at::kInt);
  check_dtype(op, "counts", counts, at::kInt);
  // Shape.
  check_dim(op, "hidden", hidden, 2);
  check_dim(op, "topk_ids", topk_ids, 2);
  check_dim(op, "topk_weights", topk_weights, 2);
  check_dim(op, "expert_rank", expert_rank, 1);
  check_dim(op, "expert_local", expert_local, 1);
  check_dim(op, "slot_map", slot_map, 2);
  check_dim(op, "counts", counts, 1);
  const int64_t T = hidden.size(0), H = hidden.size(1), k = topk_ids.size(1);
  const int64_t E = expert_rank.size(0);
  check_size(op, "topk_ids", topk_ids, 0, T, "T = hidden.size(0)");
  check_size(op, "topk_weights", topk_weights, 0, T, "T = hidden.size(0)");
  check_size(op, "topk_weights", topk_weights, 1, k, "top_k = topk_ids.size(1)");
  check_size(op, "expert_local", expert_local, 0, E, "E = expert_rank.size(0)");
  if (num_valid)
    PCG_CHECK_ARG(op, "num_valid", num_valid->numel() == 1,
                  "must hold exactly one element, got shape ", num_valid->sizes());
  check_size(op, "slot_map", slot_map, 0, T, "T = hidden.size(0)");
  check_size(op, "slot_map", slot_map, 1, W, "W, the number of ranks");
  check_size(op, "counts", counts, 0, W, "W, the number of ranks");
  PCG_CHECK_ARG(op, "topk_ids", T * k < kI32Max, "T*top_k must be < 2^31, got shape ",
                topk_ids.sizes());
  check_out_contiguous(op, "slot_map", slot_map);
  check_out_contiguous(op, "counts", counts);
  const at::Tensor* nv = num_valid ? &*num_valid : nullptr;
  for (const auto& [name, t] : {std::pair{"slot_map", &slot_map}, {"counts", &counts}}) {
    check_no_overlap(op, name, *t,
                     {{"hidden", &hidden}, {"topk_weights", &topk_weights}, {"topk_ids", &topk_ids},
                      {"expert_rank", &expert_rank}, {"expert_local", &expert_local},
                      {"num_valid", nv}});
  }
  check_no_overlap(op, "counts", counts, {{"slot_map", &slot_map}});

  auto cont = [&keep](const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    keep.push_back(c);
    return c;
  };
  ep::DispatchParams p;
  p.hidden = cont(hidden).data_ptr();
  p.row_bytes = H * static_cast<int64_t>(hidden.element_size());
  p.topk_weights = cont(topk_weights).data_ptr<float>();
  p.topk_ids = cont(topk_ids).data_ptr<int32_t>();
  p.expert_rank = cont(expert_rank).data_ptr<int32_t>();
  p.expert_local = cont(expert_local).data_ptr<int32_t>();
  p.num_valid = num_valid ? cont(*num_valid).data_ptr<int32_t>() : nullptr;
  p.T = T;
  p.k = k;
  p.E = E;
  p.W = W;
  p.slot_map = slot_map.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  return p;
}

}  // namespace

ep::DispatchParams ep_dispatch_prepare(const at::Tensor& hidden, const at::Tensor& topk_weights,
                                       const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                                       const at::Tensor& expert_local,
                                       const std::optional<at::Tensor>& num_valid,
                                       const at::Tensor& send_hidden, const at::Tensor& send_meta,
                                       const at::Tensor& slot_map, const at::Tensor& counts,
                                       std::vector<at::Tensor>& keep) {
  const char* op = kDispatch;
  const c10::Device dev = hidden.device();
  check_device(op, "send_hidden", send_hidden, dev);
  check_device(op, "send_meta", send_meta, dev);
  check_dtype(op, "send_hidden", send_hidden, hidden.scalar_type());
  check_dtype(op, "send_meta", send_meta, at::kInt);
  check_dim(op, "send_hidden", send_hidden, 3);
  check_dim(op, "send_meta", send_meta, 3);
  const int64_t W = send_hidden.size(0), C = send_hidden.size(1);
  PCG_CHECK_ARG(op, "send_hidden", W >= 1, "dim 0 must be the number of ranks W >= 1, got shape ",
                send_hidden.sizes());
  ep::DispatchParams p = check_dispatch_common(op, hidden, topk_weights, topk_ids, expert_rank,
                                               expert_local, num_valid, slot_map, counts, W, keep);
  const int64_t T = p.T, H = hidden.size(1), k = p.k;
  PCG_CHECK_ARG(op, "send_hidden", C >= T, "dim 1 (capacity per rank) must be >= T = ", T,
                " (the worst case: every token goes to one rank), got shape ", send_hidden.sizes());
  check_size(op, "send_hidden", send_hidden, 2, H, "H = hidden.size(1)");
  check_size(op, "send_meta", send_meta, 0, W, "W = send_hidden.size(0)");
  check_size(op, "send_meta", send_meta, 1, C, "C = send_hidden.size(1)");
  check_size(op, "send_meta", send_meta, 2, 2 * k, "2 * top_k: local ids, then weight bits");
  PCG_CHECK_ARG(op, "send_hidden", C < kI32Max && W < kI32Max,
                "W and the capacity must be < 2^31, got shape ", send_hidden.sizes());
  check_out_contiguous(op, "send_hidden", send_hidden);
  check_out_contiguous(op, "send_meta", send_meta);
  const at::Tensor* nv = num_valid ? &*num_valid : nullptr;
  for (const auto& [name, t] : {std::pair{"send_hidden", &send_hidden}, {"send_meta", &send_meta}}) {
    check_no_overlap(op, name, *t,
                     {{"hidden", &hidden}, {"topk_weights", &topk_weights}, {"topk_ids", &topk_ids},
                      {"expert_rank", &expert_rank}, {"expert_local", &expert_local},
                      {"num_valid", nv}, {"slot_map", &slot_map}, {"counts", &counts}});
  }
  check_no_overlap(op, "send_meta", send_meta, {{"send_hidden", &send_hidden}});
  p.C = C;
  p.send_hidden = send_hidden.data_ptr();
  p.send_meta = send_meta.data_ptr<int32_t>();
  return p;
}

ep::DispatchParams ep_dispatch_peer_prepare(
    const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
    const at::Tensor& expert_rank, const at::Tensor& expert_local,
    const std::optional<at::Tensor>& num_valid, const at::Tensor& peer_ptrs, int64_t rank,
    int64_t capacity, int64_t hidden_offset, int64_t meta_offset, const at::Tensor& slot_map,
    const at::Tensor& counts, std::vector<at::Tensor>& keep) {
  const char* op = kDispatchPeer;
  check_device(op, "peer_ptrs", peer_ptrs, hidden.device());
  check_dtype(op, "peer_ptrs", peer_ptrs, at::kLong);
  check_dim(op, "peer_ptrs", peer_ptrs, 1);
  const int64_t W = peer_ptrs.size(0);
  PCG_CHECK_ARG(op, "peer_ptrs", W >= 1 && W < kI32Max,
                "must hold one workspace address per rank (W >= 1), got shape ", peer_ptrs.sizes());
  ep::DispatchParams p = check_dispatch_common(op, hidden, topk_weights, topk_ids, expert_rank,
                                               expert_local, num_valid, slot_map, counts, W, keep);
  PCG_CHECK_ARG(op, "rank", rank >= 0 && rank < W, "must be in [0, W) = [0, ", W, "), got ", rank);
  PCG_CHECK_ARG(op, "capacity", capacity >= p.T && capacity < kI32Max,
                "must be >= T = ", p.T, " (and < 2^31), got ", capacity);
  PCG_CHECK_ARG(op, "hidden_offset", hidden_offset >= 0 && hidden_offset % 16 == 0,
                "must be a non-negative multiple of 16, got ", hidden_offset);
  PCG_CHECK_ARG(op, "meta_offset", meta_offset >= 0 && meta_offset % 16 == 0,
                "must be a non-negative multiple of 16, got ", meta_offset);
  const at::Tensor pc = peer_ptrs.contiguous();
  keep.push_back(pc);
  p.C = capacity;
  p.peer_base = pc.data_ptr<int64_t>();
  p.rank = rank;
  p.hidden_offset = hidden_offset;
  p.meta_offset = meta_offset;
  return p;
}

ep::ReturnParams ep_return_peer_prepare(const at::Tensor& y, const at::Tensor& meta,
                                        const at::Tensor& peer_ptrs, int64_t rank,
                                        int64_t back_offset, std::vector<at::Tensor>& keep) {
  const char* op = kReturnPeer;
  const c10::Device dev = y.device();
  check_device(op, "meta", meta, dev);
  check_device(op, "peer_ptrs", peer_ptrs, dev);
  PCG_CHECK_ARG(op, "y", is_float_dtype(y.scalar_type()),
                "must have dtype float32, float16 or bfloat16, got ", dtype_name(y.scalar_type()));
  check_dtype(op, "meta", meta, at::kInt);
  check_dtype(op, "peer_ptrs", peer_ptrs, at::kLong);
  check_dim(op, "y", y, 2);
  check_dim(op, "meta", meta, 3);
  check_dim(op, "peer_ptrs", peer_ptrs, 1);
  const int64_t W = peer_ptrs.size(0), C = meta.size(1);
  PCG_CHECK_ARG(op, "peer_ptrs", W >= 1, "must hold one workspace address per rank, got shape ",
                peer_ptrs.sizes());
  check_size(op, "meta", meta, 0, W, "W = peer_ptrs.size(0)");
  PCG_CHECK_ARG(op, "meta", meta.size(2) % 2 == 0, "dim 2 must be 2 * top_k, got shape ",
                meta.sizes());
  check_size(op, "y", y, 0, W * C, "W * C = meta.size(0) * meta.size(1)");
  PCG_CHECK_ARG(op, "rank", rank >= 0 && rank < W, "must be in [0, W) = [0, ", W, "), got ", rank);
  PCG_CHECK_ARG(op, "back_offset", back_offset >= 0 && back_offset % 16 == 0,
                "must be a non-negative multiple of 16, got ", back_offset);
  const at::Tensor yc = y.contiguous(), mc = meta.contiguous(), pc = peer_ptrs.contiguous();
  keep.push_back(yc);
  keep.push_back(mc);
  keep.push_back(pc);
  ep::ReturnParams p;
  p.y = yc.data_ptr();
  p.meta = mc.data_ptr<int32_t>();
  p.peer_base = pc.data_ptr<int64_t>();
  p.rank = rank;
  p.W = W;
  p.C = C;
  p.k = meta.size(2) / 2;
  p.row_bytes = y.size(1) * static_cast<int64_t>(y.element_size());
  p.back_offset = back_offset;
  return p;
}

ep::CombineParams ep_combine_prepare(const at::Tensor& recv, const at::Tensor& slot_map,
                                     const at::Tensor& out, int64_t max_ranks,
                                     std::vector<at::Tensor>& keep) {
  const char* op = kCombine;
  const c10::Device dev = recv.device();
  check_device(op, "slot_map", slot_map, dev);
  check_device(op, "out", out, dev);
  PCG_CHECK_ARG(op, "recv", is_float_dtype(recv.scalar_type()),
                "must have dtype float32, float16 or bfloat16, got ", dtype_name(recv.scalar_type()));
  check_dtype(op, "slot_map", slot_map, at::kInt);
  check_dtype(op, "out", out, recv.scalar_type());
  check_dim(op, "recv", recv, 3);
  check_dim(op, "slot_map", slot_map, 2);
  check_dim(op, "out", out, 2);
  const int64_t W = recv.size(0), C = recv.size(1), H = recv.size(2), T = slot_map.size(0);
  PCG_CHECK_ARG(op, "recv", W >= 1, "dim 0 must be the number of ranks W >= 1, got shape ",
                recv.sizes());
  PCG_CHECK_ARG(op, "recv", W <= max_ranks, "has W = ", W, " ranks (dim 0); this kernel supports at most ",
                max_ranks);
  check_size(op, "slot_map", slot_map, 1, W, "W = recv.size(0)");
  check_size(op, "out", out, 0, T, "T = slot_map.size(0)");
  check_size(op, "out", out, 1, H, "H = recv.size(2)");
  check_out_contiguous(op, "out", out);
  check_no_overlap(op, "out", out, {{"recv", &recv}, {"slot_map", &slot_map}});
  const at::Tensor rc = recv.contiguous();
  const at::Tensor sc = slot_map.contiguous();
  keep.push_back(rc);
  keep.push_back(sc);
  ep::CombineParams p;
  p.dtype = to_ep_dtype(recv.scalar_type());
  p.recv = rc.data_ptr();
  p.slot_map = sc.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.T = T;
  p.H = H;
  p.W = W;
  p.C = C;
  return p;
}

namespace ep {

void dispatch_cpu(const DispatchParams& p) {
  const int64_t T = p.T, W = p.W, C = p.C, k = p.k;
  int64_t nv = T;
  if (p.num_valid) nv = std::min<int64_t>(T, std::max<int64_t>(0, p.num_valid[0]));
  std::vector<int32_t> used(W, 0);
  std::vector<char> dest(W, 0);
  for (int64_t i = 0; i < T * W; ++i) p.slot_map[i] = -1;
  auto owner = [&](int32_t e) -> int64_t {
    if (e < 0 || e >= p.E) return -1;
    const int32_t r = p.expert_rank[e];
    return (r >= 0 && r < W) ? r : -1;
  };
  for (int64_t t = 0; t < nv; ++t) {
    const int32_t* ids = p.topk_ids + t * k;
    const float* w = p.topk_weights + t * k;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = owner(ids[j]);
      if (r >= 0) dest[r] = 1;
    }
    for (int64_t r = 0; r < W; ++r) {
      if (!dest[r]) continue;
      dest[r] = 0;
      const int32_t s = used[r]++;
      p.slot_map[t * W + r] = s;
      int32_t* meta = dispatch_meta(p, r, s);
      for (int64_t j = 0; j < k; ++j) {
        const bool here = owner(ids[j]) == r;
        meta[j] = here ? p.expert_local[ids[j]] : -1;
        const float wj = here ? w[j] : 0.0f;
        std::memcpy(meta + k + j, &wj, sizeof wj);
      }
    }
  }
  for (int64_t r = 0; r < W; ++r) {
    p.counts[r] = used[r];
    for (int64_t s = used[r]; s < C; ++s) {
      int32_t* meta = dispatch_meta(p, r, s);
      for (int64_t j = 0; j < k; ++j) {
        meta[j] = -1;
        meta[k + j] = 0;  // bits of 0.0f
      }
    }
  }
  // Rows: parallel over tokens.
  const auto* src = static_cast<const char*>(p.hidden);
  const int64_t rb = p.row_bytes;
  at::parallel_for(0, nv, std::max<int64_t>(1, 262144 / std::max<int64_t>(1, rb * W)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin; t < end; ++t)
                       for (int64_t r = 0; r < W; ++r) {
                         const int32_t s = p.slot_map[t * W + r];
                         if (s >= 0) std::memcpy(dispatch_row(p, r, s), src + t * rb, rb);
                       }
                   });
}

void return_cpu(const ReturnParams& p) {
  const auto* y = static_cast<const char*>(p.y);
  const int64_t rb = p.row_bytes, k = p.k;
  at::parallel_for(0, p.W * p.C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* meta = p.meta + i * 2 * k;
      bool used = false;
      for (int64_t j = 0; j < k; ++j) used |= meta[j] >= 0;
      if (!used) continue;
      const int64_t src = i / p.C, s = i % p.C;
      char* dst = reinterpret_cast<char*>(p.peer_base[src]) + p.back_offset + (p.rank * p.C + s) * rb;
      std::memcpy(dst, y + i * rb, rb);
    }
  });
}

namespace {
template <typename T>
void combine_typed(const CombineParams& p) {
  const auto* recv = static_cast<const T*>(p.recv);
  auto* out = static_cast<T*>(p.out);
  const int64_t H = p.H, W = p.W, C = p.C;
  at::parallel_for(0, p.T, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, H * W)),
                   [&](int64_t begin, int64_t end) {
                     std::vector<float> acc(H);
                     for (int64_t t = begin; t < end; ++t) {
                       std::fill(acc.begin(), acc.end(), 0.0f);
                       for (int64_t r = 0; r < W; ++r) {
                         const int32_t s = p.slot_map[t * W + r];
                         if (s < 0 || s >= C) continue;
                         const T* row = recv + (r * C + s) * H;
                         for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<float>(row[h]);
                       }
                       for (int64_t h = 0; h < H; ++h) out[t * H + h] = static_cast<T>(acc[h]);
                     }
                   });
}
}  // namespace

void combine_cpu(const CombineParams& p) {
  switch (p.dtype) {
    case DType::kFloat16: combine_typed<c10::Half>(p); break;
    case DType::kBFloat16: combine_typed<c10::BFloat16>(p); break;
    default: combine_typed<float>(p); break;
  }
}

}  // namespace ep

namespace {

void ep_dispatch_cpu_op(const at::Tensor& hidden, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                        const at::Tensor& expert_local, const std::optional<at::Tensor>& num_valid,
                        const at::Tensor& send_hidden, const at::Tensor& send_meta,
                        const at::Tensor& slot_map, const at::Tensor& counts) {
  std::vector<at::Tensor> keep;
  const ep::DispatchParams p =
      ep_dispatch_prepare(hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid,
                          send_hidden, send_meta, slot_map, counts, keep);
  ep::dispatch_cpu(p);
}

void ep_dispatch_peer_cpu_op(const at::Tensor& hidden, const at::Tensor& topk_weights,
                             const at::Tensor& topk_ids, const at::Tensor& expert_rank,
                             const at::Tensor& expert_local,
                             const std::optional<at::Tensor>& num_valid, const at::Tensor& peer_ptrs,
                             int64_t rank, int64_t capacity, int64_t hidden_offset,
                             int64_t meta_offset, const at::Tensor& slot_map,
                             const at::Tensor& counts) {
  std::vector<at::Tensor> keep;
  const ep::DispatchParams p = ep_dispatch_peer_prepare(
      hidden, topk_weights, topk_ids, expert_rank, expert_local, num_valid, peer_ptrs, rank,
      capacity, hidden_offset, meta_offset, slot_map, counts, keep);
  ep::dispatch_cpu(p);
}

void ep_return_peer_cpu_op(const at::Tensor& y, const at::Tensor& meta, const at::Tensor& peer_ptrs,
                           int64_t rank, int64_t back_offset) {
  std::vector<at::Tensor> keep;
  const ep::ReturnParams p = ep_return_peer_prepare(y, meta, peer_ptrs, rank, back_offset, keep);
  ep::return_cpu(p);
}

void ep_combine_cpu_op(const at::Tensor& recv, const at::Tensor& slot_map, const at::Tensor& out) {
  std::vector<at::Tensor> keep;
  const ep::CombineParams p = ep_combine_prepare(recv, slot_map, out, kI32Max, keep);
  ep::combine_cpu(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(pcg, CPU, m) {
  m.impl("ep_dispatch", &ep_dispatch_cpu_op);
  m.impl("ep_combine", &ep_combine_cpu_op);
  m.impl("ep_dispatch_peer", &ep_dispatch_peer_cpu_op);
  m.impl("ep_return_peer", &ep_return_peer_cpu_op);
}

}  // namespace pcg
