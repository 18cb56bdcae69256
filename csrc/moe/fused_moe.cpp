// pcg::fused_moe / pcg::moe_align: shared argument validation, the CPU
// kernels (exact: fp32 ATen matmuls per local expert) and their registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_args.h"
#include "moe/moe_align.h"
#include "moe/moe_cutlass.h"

namespace pcg {

namespace {
constexpr const char* kOp = "fused_moe";
constexpr const char* kAlign = "moe_align";

bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

void check_aligned16(const char* arg, const at::Tensor& t, const char* path) {
  PCG_CHECK_ARG(kOp, arg, aligned16(t), "must be 16-byte aligned for ", path);
}

moe::Activation parse_activation(c10::string_view activation) {
  if (activation == "silu") return moe::Activation::kSilu;
  if (activation == "gelu") return moe::Activation::kGelu;
  if (activation == "swigluoai") return moe::Activation::kSwigluOai;
  if (activation == "gelu_tanh") return moe::Activation::kGeluTanh;
  PCG_CHECK_ARG(kOp, "activation", false,
                "must be one of \"silu\", \"gelu\", \"gelu_tanh\", \"swigluoai\", got \"",
                std::string(activation), "\"");
  return moe::Activation::kSilu;
}

FusedMoeShape check_fused_moe_args(const at::Tensor& hidden, const at::Tensor& w13,
                                   const at::Tensor& w2, const at::Tensor& topk_weights,
                                   const at::Tensor& topk_ids,
                                   const std::optional<at::Tensor>& expert_map,
                                   const std::optional<at::Tensor>& num_valid,
                                   const std::optional<at::Tensor>& b13,
                                   const std::optional<at::Tensor>& b2,
                                   c10::string_view activation, int64_t w13_block) {
  FusedMoeShape s;
  // Device.
  const c10::Device dev = hidden.device();
  check_device(kOp, "w13", w13, dev);
  check_device(kOp, "w2", w2, dev);
  check_device(kOp, "topk_weights", topk_weights, dev);
  check_device(kOp, "topk_ids", topk_ids, dev);
  if (expert_map) check_device(kOp, "expert_map", *expert_map, dev);
  if (num_valid) check_device(kOp, "num_valid", *num_valid, dev);
  if (b13) check_device(kOp, "b13", *b13, dev);
  if (b2) check_device(kOp, "b2", *b2, dev);
  // Dtype.
  const auto dt = hidden.scalar_type();
  PCG_CHECK_ARG(kOp, "hidden", is_float_dtype(dt),
                "must have dtype float32, float16 or bfloat16, got ", dtype_name(dt));
  check_dtype(kOp, "w13", w13, dt);
  check_dtype(kOp, "w2", w2, dt);
  if (b13) check_dtype(kOp, "b13", *b13, dt);
  if (b2) check_dtype(kOp, "b2", *b2, dt);
  check_dtype(kOp, "topk_weights", topk_weights, at::kFloat);
  check_dtype(kOp, "topk_ids", topk_ids, at::kInt);
  if (expert_map) check_dtype(kOp, "expert_map", *expert_map, at::kInt);
  if (num_valid) check_dtype(kOp, "num_valid", *num_valid, at::kInt);
  // Shape.
  check_dim(kOp, "hidden", hidden, 2);
  check_dim(kOp, "w13", w13, 3);
  check_dim(kOp, "w2", w2, 3);
  check_dim(kOp, "topk_weights", topk_weights, 2);
  check_dim(kOp, "topk_ids", topk_ids, 2);
  s.T = hidden.size(0);
  s.H = hidden.size(1);
  s.E = w13.size(0);
  PCG_CHECK_ARG(kOp, "w13", w13.size(1) > 0 && w13.size(1) % 2 == 0,
                "dim 1 must be 2*I (gate and up rows) with I >= 1, got shape ", w13.sizes());
  s.I = w13.size(1) / 2;
  PCG_CHECK_ARG(kOp, "w13_block", moe::is_valid_w13_block(w13_block, s.I),
                "must be 0 (gate rows, then up rows) or a power of two >= 8 that divides ",
                "I = ", s.I, ", got ", w13_block);
  s.w13_block = static_cast<int>(w13_block);
  check_size(kOp, "w13", w13, 2, s.H, "H = hidden.size(1)");
  check_size(kOp, "w2", w2, 0, s.E, "E_local = w13.size(0)");
  check_size(kOp, "w2", w2, 1, s.H, "H = hidden.size(1)");
  check_size(kOp, "w2", w2, 2, s.I, "I = w13.size(1) / 2");
  check_size(kOp, "topk_ids", topk_ids, 0, s.T, "T = hidden.size(0)");
  s.k = topk_ids.size(1);
  check_size(kOp, "topk_weights", topk_weights, 0, s.T, "T = hidden.size(0)");
  check_size(kOp, "topk_weights", topk_weights, 1, s.k, "top_k = topk_ids.size(1)");
  if (expert_map) {
    check_dim(kOp, "expert_map", *expert_map, 1);
    s.num_global = expert_map->size(0);
  } else {
    s.num_global = s.E;
  }
  if (num_valid) {
    PCG_CHECK_ARG(kOp, "num_valid", num_valid->numel() == 1,
                  "must hold exactly one element, got shape ", num_valid->sizes());
  }
  if (b13) {
    check_dim(kOp, "b13", *b13, 2);
    check_size(kOp, "b13", *b13, 0, s.E, "E_local = w13.size(0)");
    check_size(kOp, "b13", *b13, 1, 2 * s.I, "2*I = w13.size(1)");
  }
  if (b2) {
    check_dim(kOp, "b2", *b2, 2);
    check_size(kOp, "b2", *b2, 0, s.E, "E_local = w13.size(0)");
    check_size(kOp, "b2", *b2, 1, s.H, "H = hidden.size(1)");
  }
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  PCG_CHECK_ARG(kOp, "topk_ids", s.T * s.k < kMax, "T*top_k must be < 2^31, got shape ",
                topk_ids.sizes());
  PCG_CHECK_ARG(kOp, "w13", s.E < kMax, "E_local must be < 2^31, got shape ", w13.sizes());
  s.act = parse_activation(activation);
  return s;
}

moe::DType to_moe_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return moe::DType::kFloat32;
    case at::kHalf: return moe::DType::kFloat16;
    default: return moe::DType::kBFloat16;
  }
}

namespace {
at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t ? t->contiguous() : at::Tensor();
}
template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}
}  // namespace

FusedMoeInputs::FusedMoeInputs(const at::Tensor& hidden_, const at::Tensor& w13_,
                               const at::Tensor& w2_, const at::Tensor& topk_weights_,
                               const at::Tensor& topk_ids_,
                               const std::optional<at::Tensor>& expert_map_,
                               const std::optional<at::Tensor>& num_valid_,
                               const std::optional<at::Tensor>& b13_,
                               const std::optional<at::Tensor>& b2_)
    : hidden(hidden_.contiguous()),
      w13(w13_.contiguous()),
      w2(w2_.contiguous()),
      topk_weights(topk_weights_.contiguous()),
      topk_ids(topk_ids_.contiguous()),
      expert_map(contiguous_or_none(expert_map_)),
      num_valid(contiguous_or_none(num_valid_)),
      b13(contiguous_or_none(b13_)),
      b2(contiguous_or_none(b2_)) {}

moe::FusedMoeParams FusedMoeInputs::params(const FusedMoeShape& s, double alpha,
                                           double limit) const {
  moe::FusedMoeParams p;
  p.dtype = to_moe_dtype(hidden.scalar_type());
  p.hidden = hidden.data_ptr();
  p.w13 = w13.data_ptr();
  p.w2 = w2.data_ptr();
  p.b13 = ptr_or_null<const void>(b13);
  p.b2 = ptr_or_null<const void>(b2);
  p.topk_weights = topk_weights.data_ptr<float>();
  p.topk_ids = topk_ids.data_ptr<int32_t>();
  p.expert_map = ptr_or_null<const int32_t>(expert_map);
  p.num_global = s.num_global;
  p.num_valid = ptr_or_null<const int32_t>(num_valid);
  p.T = s.T;
  p.H = s.H;
  p.I = s.I;
  p.E = s.E;
  p.k = s.k;
  p.w13_block = s.w13_block;
  p.act = s.act;
  p.alpha = static_cast<float>(alpha);
  p.limit = static_cast<float>(limit);
  return p;
}

namespace {
std::string tile_label(int64_t id) {
  const moe::TileInfo* t = moe::find_tile(id);
  return std::to_string(id) + (t ? std::string(" (") + t->name + ")" : std::string());
}
}  // namespace

std::optional<moe::MoeConfig> check_fused_moe_config(at::OptionalIntArrayRef config,
                                                     c10::ScalarType dtype) {
  if (!config.has_value()) return std::nullopt;
  const c10::IntArrayRef c = *config;
  PCG_CHECK_ARG(kOp, "config", c.size() == 3,
                "must be [block_m, tile1, tile2] (3 ints; tile -1: block_m's default), got ", c);
  const int64_t block_m = c[0], tile1 = c[1], tile2 = c[2];
  if (block_m == moe::kCutlassConfig) {
    // The CUTLASS sm_90a path (moe_cutlass.h): config[1] / config[2] are the
    // GEMM kernel variants (-1: the default); CUDA checks the rest.
    const int64_t ids[2] = {tile1, tile2};
    for (int g = 0; g < 2; ++g) {
      PCG_CHECK_ARG(kOp, "config", moe::is_gemm_variant_id(ids[g]), "config[", g + 1, "] (GEMM",
                    g + 1, "'s kernel on the CUTLASS path [-1, g1, g2]) must be -1 (the default, ",
                    moe::kGemmVariants[moe::kDefaultGemmVariant].name,
                    ") or a kernel variant id in [0, ", moe::kNumGemmVariants,
                    ") (pcg.ops.fused_moe.fused_moe_cutlass_variants()), got ", ids[g], " in ", c);
    }
    PCG_CHECK_ARG(kOp, "config", !moe::gemm_variant_gathers_a(tile2), "config[2] (GEMM2's kernel) ",
                  tile2, " (", moe::find_gemm_variant(tile2)->name, ") gathers A's rows by token, which only GEMM1 can (GEMM2's A is in expert "
                  "order already): choose a variant without gather_a, got ", c);
    PCG_CHECK_ARG(kOp, "config", dtype == at::kBFloat16 || dtype == at::kHalf,
                  "[-1, g1, g2] (the CUTLASS path) needs bfloat16 or float16, got ",
                  dtype_name(dtype));
    return moe::MoeConfig{moe::kCutlassConfig, static_cast<int>(tile1), static_cast<int>(tile2)};
  }
  if (block_m == moe::kStreamConfig) {
    // The weight-streaming path (moe_stream.h), no tiles; CUDA checks the rest.
    const char* which = "[-2, -1, -1] (the stream path)";
    PCG_CHECK_ARG(kOp, "config", tile1 == -1 && tile2 == -1, which,
                  " takes no tiles (config[1], config[2] must be -1), got ", c);
    PCG_CHECK_ARG(kOp, "config", dtype == at::kBFloat16 || dtype == at::kHalf, which,
                  " needs bfloat16 or float16, got ", dtype_name(dtype));
    return moe::MoeConfig{moe::kStreamConfig, -1, -1};
  }
  PCG_CHECK_ARG(kOp, "config", moe::is_supported_block_m(block_m),
                "block_m (config[0]) must be 16, 32, 64 or 128, or a path: -1 (CUTLASS, "
                "[-1, g1, g2]) or -2 (weight streaming, [-2, -1, -1]), got ", c);
  moe::MoeConfig out;
  out.block_m = static_cast<int>(block_m);
  if (dtype == at::kFloat) {
    PCG_CHECK_ARG(kOp, "config", tile1 == -1 && tile2 == -1,
                  "tile ids (config[1], config[2]) must be -1 for float32 (the fp32 kernel has "
                  "no tiles to choose, only block_m), got ", c);
    return out;
  }
  const int64_t tiles[2] = {tile1, tile2};
  for (int g = 0; g < 2; ++g) {
    const bool gated = g == 0;
    const char* which = gated ? "tile1 (config[1], GEMM1)" : "tile2 (config[2], GEMM2)";
    const int64_t id = tiles[g];
    if (id == -1) continue;
    const moe::TileInfo* t = moe::find_tile(id);
    PCG_CHECK_ARG(kOp, "config", t != nullptr, which, " must be -1 or a tile id in [0, ",
                  moe::kNumTiles, ") (pcg.ops.fused_moe.fused_moe_tiles()), got ", c);
    PCG_CHECK_ARG(kOp, "config", t->gated == gated, which, " must be a ",
                  gated ? "GEMM1 (gated, g...)" : "GEMM2 (d...)", " tile, got tile ",
                  tile_label(id), " in ", c);
    PCG_CHECK_ARG(kOp, "config", t->bm == block_m, which, " must have BM = block_m = ",
                  block_m, ", got tile ", tile_label(id), " with BM ", t->bm, " in ", c);
  }
  out.tile1 = static_cast<int>(tile1 == -1 ? moe::default_tile(out.block_m, true) : tile1);
  out.tile2 = static_cast<int>(tile2 == -1 ? moe::default_tile(out.block_m, false) : tile2);
  return out;
}

int64_t check_moe_align_args(const at::Tensor& topk_ids, const std::optional<at::Tensor>& expert_map,
                             const std::optional<at::Tensor>& num_valid, int64_t num_local_experts,
                             int64_t block_m, const at::Tensor& sorted_pairs,
                             const at::Tensor& block_expert, const at::Tensor& num_blocks) {
  const c10::Device dev = topk_ids.device();
  if (expert_map) check_device(kAlign, "expert_map", *expert_map, dev);
  if (num_valid) check_device(kAlign, "num_valid", *num_valid, dev);
  check_device(kAlign, "sorted_pairs", sorted_pairs, dev);
  check_device(kAlign, "block_expert", block_expert, dev);
  check_device(kAlign, "num_blocks", num_blocks, dev);
  check_dtype(kAlign, "topk_ids", topk_ids, at::kInt);
  if (expert_map) check_dtype(kAlign, "expert_map", *expert_map, at::kInt);
  if (num_valid) check_dtype(kAlign, "num_valid", *num_valid, at::kInt);
  check_dtype(kAlign, "sorted_pairs", sorted_pairs, at::kInt);
  check_dtype(kAlign, "block_expert", block_expert, at::kInt);
  check_dtype(kAlign, "num_blocks", num_blocks, at::kInt);
  check_dim(kAlign, "topk_ids", topk_ids, 2);
  if (expert_map) check_dim(kAlign, "expert_map", *expert_map, 1);
  if (num_valid) {
    PCG_CHECK_ARG(kAlign, "num_valid", num_valid->numel() == 1,
                  "must hold exactly one element, got shape ", num_valid->sizes());
  }
  PCG_CHECK_ARG(kAlign, "num_local_experts", num_local_experts >= 0 &&
                    num_local_experts < std::numeric_limits<int32_t>::max(),
                "must be in [0, 2^31), got ", num_local_experts);
  PCG_CHECK_ARG(kAlign, "block_m", block_m >= 1 && block_m <= 4096, "must be in [1, 4096], got ",
                block_m);
  check_dim(kAlign, "sorted_pairs", sorted_pairs, 1);
  check_dim(kAlign, "block_expert", block_expert, 1);
  PCG_CHECK_ARG(kAlign, "sorted_pairs", sorted_pairs.is_contiguous(), "must be contiguous");
  PCG_CHECK_ARG(kAlign, "block_expert", block_expert.is_contiguous(), "must be contiguous");
  PCG_CHECK_ARG(kAlign, "num_blocks", num_blocks.numel() >= 1 && num_blocks.is_contiguous(),
                "must be contiguous and hold at least one element, got shape ",
                num_blocks.sizes());
  const at::Tensor* map = expert_map ? &*expert_map : nullptr;
  const at::Tensor* nv = num_valid ? &*num_valid : nullptr;
  for (const auto& [name, t] : {std::pair{"sorted_pairs", &sorted_pairs},
                                {"block_expert", &block_expert}, {"num_blocks", &num_blocks}}) {
    check_no_overlap(kAlign, name, *t,
                     {{"topk_ids", &topk_ids}, {"expert_map", map}, {"num_valid", nv}});
  }
  check_no_overlap(kAlign, "block_expert", block_expert, {{"sorted_pairs", &sorted_pairs}});
  check_no_overlap(kAlign, "num_blocks", num_blocks,
                   {{"sorted_pairs", &sorted_pairs}, {"block_expert", &block_expert}});
  const int64_t pairs = topk_ids.numel();
  PCG_CHECK_ARG(kAlign, "topk_ids", pairs < std::numeric_limits<int32_t>::max(),
                "must hold fewer than 2^31 pairs, got shape ", topk_ids.sizes());
  const int64_t need = moe::moe_align_max_blocks(pairs, num_local_experts, block_m);
  PCG_CHECK_ARG(kAlign, "block_expert", block_expert.size(0) >= need,
                "must hold at least ", need,
                " blocks ((T*k + min(E, T*k)*(block_m-1)) / block_m), got shape ",
                block_expert.sizes());
  PCG_CHECK_ARG(kAlign, "sorted_pairs", sorted_pairs.size(0) >= block_expert.size(0) * block_m,
                "must hold at least block_expert.size(0) * block_m = ",
                block_expert.size(0) * block_m, " slots, got shape ", sorted_pairs.sizes());
  return expert_map ? expert_map->size(0) : num_local_experts;
}

namespace {

int64_t host_num_valid(const std::optional<at::Tensor>& num_valid, int64_t T) {
  if (!num_valid) return T;
  const int64_t nv = num_valid->reshape({-1})[0].item<int32_t>();
  return nv < 0 ? 0 : (nv > T ? T : nv);
}

at::Tensor activation_cpu(const at::Tensor& gate, const at::Tensor& up, moe::Activation act,
                          double alpha, double limit) {
  switch (act) {
    case moe::Activation::kSilu: return at::silu(gate) * up;
    case moe::Activation::kGelu: return at::gelu(gate) * up;
    case moe::Activation::kGeluTanh: return at::gelu(gate, "tanh") * up;
    case moe::Activation::kSwigluOai: {
      const at::Tensor g = gate.clamp_max(limit);
      const at::Tensor u = up.clamp(-limit, limit);
      return (u + 1.0) * g * at::sigmoid(g * alpha);
    }
  }
  return gate;
}

at::Tensor fused_moe_cpu(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                         const std::optional<at::Tensor>& expert_map,
                         const std::optional<at::Tensor>& num_valid,
                         const std::optional<at::Tensor>& b13, const std::optional<at::Tensor>& b2,
                         c10::string_view activation, double alpha, double limit,
                         at::OptionalIntArrayRef config, int64_t w13_block) {
  const FusedMoeShape s = check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids,
                                               expert_map, num_valid, b13, b2, activation,
                                               w13_block);
  // Validated like on CUDA; the CPU result does not depend on the config.
  (void)check_fused_moe_config(config, hidden.scalar_type());
  const auto dt = hidden.scalar_type();
  at::Tensor out = at::zeros({s.T, s.H}, hidden.options().dtype(at::kFloat));
  const int64_t nv = host_num_valid(num_valid, s.T);
  if (nv == 0 || s.k == 0 || s.E == 0 || s.H == 0) return out.to(dt);

  // Group the valid pairs of rows < nv by local expert (ascending pair order).
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor wts = topk_weights.contiguous();
  at::Tensor map;
  if (expert_map) map = expert_map->contiguous();
  const int32_t* id_p = ids.data_ptr<int32_t>();
  const float* w_p = wts.data_ptr<float>();
  const int32_t* map_p = expert_map ? map.data_ptr<int32_t>() : nullptr;
  std::vector<std::vector<int64_t>> tok(s.E);
  std::vector<std::vector<float>> wt(s.E);
  for (int64_t p = 0; p < nv * s.k; ++p) {
    const int e = moe::local_expert(id_p[p], map_p, s.num_global, s.E);
    if (e < 0) continue;
    tok[e].push_back(p / s.k);
    wt[e].push_back(w_p[p]);
  }

  const at::Tensor x = hidden.narrow(0, 0, nv).to(at::kFloat);
  for (int64_t e = 0; e < s.E; ++e) {
    if (tok[e].empty()) continue;
    const int64_t n = static_cast<int64_t>(tok[e].size());
    const at::Tensor idx = at::from_blob(tok[e].data(), {n}, at::kLong).clone();
    const at::Tensor we = at::from_blob(wt[e].data(), {n, 1}, at::kFloat).clone();
    const at::Tensor xe = x.index_select(0, idx);
    // The expert's w13 in fp32, contiguous, gate rows then up rows: the same
    // product (bitwise) whatever the caller's layout and strides.
    at::Tensor w = w13[e].to(at::kFloat).contiguous();
    if (s.w13_block > 0) {  // [I/B, 2 (gate, up), B, H] -> [2, I/B, B, H]
      w = w.view({s.I / s.w13_block, 2, s.w13_block, s.H}).transpose(0, 1).reshape(
          {2 * s.I, s.H});
    }
    at::Tensor gu = at::mm(xe, w.t());
    if (b13) gu = gu + (*b13)[e].to(at::kFloat);
    at::Tensor h = activation_cpu(gu.narrow(1, 0, s.I), gu.narrow(1, s.I, s.I), s.act, alpha, limit);
    h = h.to(dt).to(at::kFloat);  // the intermediate is rounded to the hidden dtype
    at::Tensor y = at::mm(h, w2[e].to(at::kFloat).t());
    if (b2) y = y + (*b2)[e].to(at::kFloat);
    out.index_add_(0, idx, y * we);
  }
  return out.to(dt);
}

void moe_align_cpu(const at::Tensor& topk_ids, const std::optional<at::Tensor>& expert_map,
                   const std::optional<at::Tensor>& num_valid, int64_t num_local_experts,
                   int64_t block_m, const at::Tensor& sorted_pairs, const at::Tensor& block_expert,
                   const at::Tensor& num_blocks) {
  const int64_t num_global = check_moe_align_args(topk_ids, expert_map, num_valid,
                                                  num_local_experts, block_m, sorted_pairs,
                                                  block_expert, num_blocks);
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor map;
  if (expert_map) map = expert_map->contiguous();
  const int64_t T = topk_ids.size(0);
  int32_t nb = 0;
  moe::moe_align_host(ids.data_ptr<int32_t>(), T, topk_ids.size(1),
                      expert_map ? map.data_ptr<int32_t>() : nullptr, num_global,
                      host_num_valid(num_valid, T), num_local_experts, block_m,
                      sorted_pairs.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                      block_expert.size(0), &nb);
  num_blocks.data_ptr<int32_t>()[0] = nb;
}

// pcg::fused_moe_config: the config pcg::fused_moe picks for these shapes
// (moe::choose_config), as [block_m, tile1, tile2] (the CUTLASS path:
// [-1, g1, g2]), when the CUTLASS / stream paths are (flags) or are not
// available to the call.
std::vector<int64_t> fused_moe_config_op(int64_t E_local, int64_t top_k, int64_t H, int64_t I,
                                         int64_t T, c10::ScalarType dtype, bool cutlass,
                                         bool stream) {
  constexpr const char* op = "fused_moe_config";
  PCG_CHECK_ARG(op, "dtype", is_float_dtype(dtype),
                "must be float32, float16 or bfloat16, got ", dtype_name(dtype));
  PCG_CHECK_ARG(op, "E_local", E_local >= 0, "must be >= 0, got ", E_local);
  PCG_CHECK_ARG(op, "top_k", top_k >= 0, "must be >= 0, got ", top_k);
  PCG_CHECK_ARG(op, "T", T >= 0, "must be >= 0, got ", T);
  PCG_CHECK_ARG(op, "H", H >= 0, "must be >= 0, got ", H);
  PCG_CHECK_ARG(op, "I", I >= 0, "must be >= 0, got ", I);
  const moe::MoeConfig c =
      moe::choose_config(E_local, top_k, H, I, T, to_moe_dtype(dtype), {cutlass, stream});
  return {c.block_m, c.tile1, c.tile2};
}

// pcg::fused_moe_tiles: the tile list of fused_moe_tiles.h, kTileFields ints
// per tile (id, BM, BN, BK, warps_m, warps_n, stages, gated, smem bytes), and
// the names.
std::tuple<std::vector<int64_t>, std::vector<std::string>> fused_moe_tiles_op() {
  std::vector<int64_t> info;
  std::vector<std::string> names;
  for (const moe::TileInfo& t : moe::kTiles) {
    info.insert(info.end(), {t.id, t.bm, t.bn, t.bk, t.warps_m, t.warps_n, t.stages,
                             t.gated ? 1 : 0, t.smem_total()});
    names.emplace_back(t.name);
  }
  return {info, names};
}

// pcg::fused_moe_cutlass_variants: the CUTLASS path's GEMM kernel variants
// (grouped_gemm_variants.h), 10 ints per variant (id, pingpong, tile M, N, K,
// cluster M, swap-AB, direct store, gather A, resident), and the names. The list is the same in
// every build (whether this one has the kernels: fused_moe_paths).
std::tuple<std::vector<int64_t>, std::vector<std::string>> fused_moe_cutlass_variants_op() {
  std::vector<int64_t> info;
  std::vector<std::string> names;
  for (const moe::GemmVariantInfo& v : moe::kGemmVariants) {
    info.insert(info.end(), {v.id, v.schedule == moe::GemmSchedule::kPingpong ? 1 : 0, v.tile_m,
                             v.tile_n, v.tile_k, v.cluster_m, v.swap_ab ? 1 : 0,
                             v.direct_store ? 1 : 0, v.gather_a ? 1 : 0, v.resident ? 1 : 0});
    names.emplace_back(v.name);
  }
  return {info, names};
}

}  // namespace

TORCH_LIBRARY_IMPL(pcg, CPU, m) {
  m.impl("fused_moe", &fused_moe_cpu);
  m.impl("moe_align", &moe_align_cpu);
}

// No tensor arguments: one kernel for every backend.
TORCH_LIBRARY_IMPL(pcg, CompositeExplicitAutograd, m) {
  m.impl("fused_moe_config", &fused_moe_config_op);
  m.impl("fused_moe_tiles", &fused_moe_tiles_op);
  m.impl("fused_moe_cutlass_variants", &fused_moe_cutlass_variants_op);
}

}  // namespace pcg
