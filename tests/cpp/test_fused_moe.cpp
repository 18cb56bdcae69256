// pcg::fused_moe through the dispatcher, as a C++ caller would use it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "moe/fused_moe.h"
#include "moe/moe_prepare.h"
#include "moe/moe_stream.h"

namespace {

using FusedMoeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              c10::string_view, double, double, at::OptionalIntArrayRef, int64_t);

at::Tensor fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& weights, const at::Tensor& ids,
                     const std::optional<at::Tensor>& expert_map = std::nullopt,
                     const std::optional<at::Tensor>& num_valid = std::nullopt,
                     const std::optional<at::Tensor>& b13 = std::nullopt,
                     const std::optional<at::Tensor>& b2 = std::nullopt,
                     c10::string_view activation = "silu",
                     at::OptionalIntArrayRef config = std::nullopt, int64_t w13_block = 0) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pcg::fused_moe", "").typed<FusedMoeFn>();
  return op.call(hidden, w13, w2, weights, ids, expert_map, num_valid, b13, b2, activation, 1.702,
                 7.0, config, w13_block);
}

// w13 [E, 2I, H] (gate rows, then up rows) in the block layout of B.
at::Tensor interleave_w13(const at::Tensor& w13, int64_t B) {
  const int64_t E = w13.size(0), I = w13.size(1) / 2, H = w13.size(2);
  return w13.reshape({E, 2, I / B, B, H}).transpose(1, 2).reshape({E, 2 * I, H}).contiguous();
}

// Unfused ATen reference (fp32 everything): loops over tokens and k.
at::Tensor reference(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& map,
                     int64_t num_valid, const at::Tensor& b13, const at::Tensor& b2) {
  const int64_t T = hidden.size(0), k = ids.size(1), I = w2.size(2);
  auto out = at::zeros_like(hidden);
  for (int64_t t = 0; t < num_valid; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int id = ids[t][j].item<int>();
      if (id < 0 || id >= map.size(0)) continue;
      const int e = map[id].item<int>();
      if (e < 0) continue;
      auto gu = at::mv(w13[e], hidden[t]) + b13[e];
      auto h = at::silu(gu.narrow(0, 0, I)) * gu.narrow(0, I, I);
      out[t] += weights[t][j].item<float>() * (at::mv(w2[e], h) + b2[e]);
    }
  }
  (void)T;
  return out;
}

struct Case {
  at::Tensor hidden, w13, w2, weights, ids, map, num_valid, b13, b2;
};

Case make_case() {
  at::manual_seed(0);
  const int64_t T = 7, H = 12, I = 5, E = 3, EG = 5, k = 2;
  Case c;
  c.hidden = at::randn({T, H});
  c.w13 = at::randn({E, 2 * I, H}) * 0.3;
  c.w2 = at::randn({E, H, I}) * 0.3;
  c.weights = at::rand({T, k});
  c.ids = at::randint(-1, EG + 1, {T, k}).to(at::kInt);
  c.map = at::tensor({2, -1, 0, 1, -1}, at::kInt);
  c.num_valid = at::tensor({5}, at::kInt);
  c.b13 = at::randn({E, 2 * I});
  c.b2 = at::randn({E, H});
  return c;
}

TEST(FusedMoe, CpuMatchesReference) {
  Case c = make_case();
  auto out = fused_moe(c.hidden, c.w13, c.w2, c.weights, c.ids, c.map, c.num_valid, c.b13, c.b2);
  auto ref = reference(c.hidden, c.w13, c.w2, c.weights, c.ids, c.map, 5, c.b13, c.b2);
  ASSERT_EQ(out.sizes(), c.hidden.sizes());
  EXPECT_TRUE(at::allclose(out, ref, 1e-5, 1e-5)) << (out - ref).abs().max();
  EXPECT_TRUE(out.narrow(0, 5, 2).eq(0).all().item<bool>());
}

TEST(FusedMoe, ErrorNamesArgument) {
  Case c = make_case();
  try {
    fused_moe(c.hidden, c.w13, c.w2.narrow(1, 0, 11), c.weights, c.ids);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("pcg::fused_moe: argument 'w2'"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(fused_moe(c.hidden, c.w13, c.w2, c.weights, c.ids.to(at::kLong)), c10::Error);
  EXPECT_THROW(fused_moe(c.hidden, c.w13, c.w2, c.weights, c.ids, std::nullopt, std::nullopt,
                         std::nullopt, std::nullopt, "relu"),
               c10::Error);
}

TEST(FusedMoe, ConfigOverride) {
  Case c = make_case();
  auto ref = fused_moe(c.hidden, c.w13, c.w2, c.weights, c.ids, c.map, c.num_valid, c.b13, c.b2);
  const std::vector<int64_t> ok = {32, -1, -1};  // fp32: block_m only
  auto out = fused_moe(c.hidden, c.w13, c.w2, c.weights, c.ids, c.map, c.num_valid, c.b13, c.b2,
                       "silu", ok);
  EXPECT_TRUE(at::equal(out, ref));
  for (const std::vector<int64_t>& bad :
       {std::vector<int64_t>{16, 0}, {48, -1, -1}, {16, 0, 4} /* tiles on fp32 */,
        {-1, 0, 1} /* the CUTLASS path on fp32 */}) {
    try {
      fused_moe(c.hidden, c.w13, c.w2, c.weights, c.ids, c.map, c.num_valid, c.b13, c.b2, "silu",
                bad);
      FAIL() << "expected an error";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("pcg::fused_moe: argument 'config'"), std::string::npos)
          << e.what();
    }
  }
}

// w13 in the block layout: the same result; a bad block names the argument.
TEST(FusedMoe, BlockLayoutMatchesPlain) {
  at::manual_seed(1);
  const int64_t T = 9, H = 12, I = 16, E = 3, k = 2;
  auto hidden = at::randn({T, H});
  auto w13 = at::randn({E, 2 * I, H}) * 0.3;
  auto w2 = at::randn({E, H, I}) * 0.3;
  auto weights = at::rand({T, k});
  auto ids = at::randint(0, E, {T, k}).to(at::kInt);
  auto b13 = at::randn({E, 2 * I});
  auto want = fused_moe(hidden, w13, w2, weights, ids, std::nullopt, std::nullopt, b13);
  for (const int64_t B : {8, 16}) {
    auto got = fused_moe(hidden, interleave_w13(w13, B), w2, weights, ids, std::nullopt,
                         std::nullopt, b13, std::nullopt, "silu", std::nullopt, B);
    EXPECT_TRUE(at::equal(got, want)) << "B = " << B;
  }
  for (const int64_t bad : {4, 12, 32, -8}) {
    try {
      fused_moe(hidden, w13, w2, weights, ids, std::nullopt, std::nullopt, std::nullopt,
                std::nullopt, "silu", std::nullopt, bad);
      FAIL() << "expected an error for w13_block = " << bad;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("pcg::fused_moe: argument 'w13_block'"),
                std::string::npos)
          << e.what();
    }
  }
}

// The row index every kernel uses for the block layout (torch-free).
TEST(FusedMoe, W13Row) {
  using namespace pcg::moe;
  for (const int B : {8, 16, 64}) {
    const int64_t I = 4 * B;
    for (int64_t n = 0; n < I; ++n) {
      EXPECT_EQ(w13_row(n, I, B, false), (n / B) * 2 * B + n % B);
      EXPECT_EQ(w13_row(n, I, B, true), (n / B) * 2 * B + B + n % B);
    }
  }
  EXPECT_EQ(w13_row(5, 40, 0, false), 5);
  EXPECT_EQ(w13_row(5, 40, 0, true), 45);
  EXPECT_TRUE(is_valid_w13_block(0, 40) && is_valid_w13_block(8, 40));
  EXPECT_FALSE(is_valid_w13_block(16, 40) || is_valid_w13_block(24, 48) ||
               is_valid_w13_block(4, 40));
}

// Torch-free selection: shapes outside the table get the heuristic; every
// tile's defaults are consistent.
TEST(FusedMoe, ChooseConfig) {
  using namespace pcg::moe;
  for (int64_t T : {1, 7, 100, 1000, 100000}) {
    const MoeConfig c = choose_config(3, 2, 12, 5, T, DType::kBFloat16);
    EXPECT_EQ(c.block_m, choose_block_m(T, 2, 3));
    EXPECT_EQ(c.tile1, default_tile(c.block_m, true));
    EXPECT_EQ(c.tile2, default_tile(c.block_m, false));
    EXPECT_TRUE(config_is_valid(c, DType::kBFloat16));
    const MoeConfig f = choose_config(3, 2, 12, 5, T, DType::kFloat32);
    EXPECT_EQ(f.block_m, c.block_m);
    EXPECT_EQ(f.tile1, -1);
    EXPECT_TRUE(config_is_valid(f, DType::kFloat32));
  }
  EXPECT_FALSE(config_is_valid(MoeConfig{16, 4, 0}, DType::kBFloat16));  // swapped GEMMs
  EXPECT_FALSE(config_is_valid(MoeConfig{32, 0, 4}, DType::kBFloat16));  // BM != block_m
}

// Path configs: the CUTLASS path [-1, g1, g2] takes -1 or a listed GEMM kernel
// variant per GEMM; the stream path only [-2, -1, -1]; neither runs fp32.
TEST(FusedMoe, PathConfigs) {
  using namespace pcg::moe;
  for (int g1 = -1; g1 < kNumGemmVariants; ++g1) {
    for (int g2 = -1; g2 < kNumGemmVariants; ++g2) {
      EXPECT_TRUE(config_is_valid(MoeConfig{kCutlassConfig, g1, g2}, DType::kBFloat16));
      EXPECT_FALSE(config_is_valid(MoeConfig{kCutlassConfig, g1, g2}, DType::kFloat32));
    }
  }
  for (const int bad : {-2, kNumGemmVariants, 100}) {
    EXPECT_FALSE(is_path_config(MoeConfig{kCutlassConfig, bad, -1}));
    EXPECT_FALSE(is_path_config(MoeConfig{kCutlassConfig, -1, bad}));
  }
  EXPECT_TRUE(is_path_config(MoeConfig{kStreamConfig, -1, -1}));
  EXPECT_FALSE(is_path_config(MoeConfig{kStreamConfig, 0, -1}));
  EXPECT_EQ(resolve_gemm_variant(-1), kDefaultGemmVariant);
  EXPECT_EQ(resolve_gemm_variant(2), 2);
  // Untuned shapes take the CUTLASS path with the default kernels.
  const MoeConfig c = choose_config(3, 2, 16, 8, 1000, DType::kBFloat16, {true, false});
  EXPECT_EQ(c, (MoeConfig{kCutlassConfig, -1, -1}));
  // ... and stream the weights up to kStreamGuessMaxPairs (token, k) pairs, below
  // the CUTLASS rule, where the call can.
  const MoeConfig stream{kStreamConfig, -1, -1};
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 1, DType::kBFloat16, {true, true}), stream);
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 8, DType::kFloat16, {false, true}), stream);
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 16, DType::kBFloat16, {true, true}), stream);
  // Above them, large experts (H * I >= 6 Mi) take CUTLASS from one row per expert,
  // small ones the tiles until 16 rows per expert.
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 17, DType::kBFloat16, {true, true}),
            (MoeConfig{kCutlassConfig, -1, -1}));
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 17, DType::kBFloat16, {false, true}),
            heuristic_config(17, 8, 128, DType::kBFloat16));
  EXPECT_EQ(choose_config(256, 8, 7168, 2048, 31, DType::kBFloat16, {true, true}),
            heuristic_config(31, 8, 256, DType::kBFloat16));  // 248 pairs < 256 experts
  EXPECT_EQ(choose_config(256, 8, 7168, 2048, 32, DType::kBFloat16, {true, true}),
            (MoeConfig{kCutlassConfig, -1, -1}));
  EXPECT_EQ(choose_config(64, 8, 2048, 1024, 64, DType::kBFloat16, {true, true}),
            heuristic_config(64, 8, 64, DType::kBFloat16));  // 2 Mi: tiles
  EXPECT_EQ(choose_config(64, 8, 2048, 1024, 128, DType::kBFloat16, {true, true}),
            (MoeConfig{kCutlassConfig, -1, -1}));  // 16 rows per expert
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 1, DType::kBFloat16, {true, false}),
            heuristic_config(1, 8, 128, DType::kBFloat16));
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 0, DType::kBFloat16, {true, true}),
            heuristic_config(0, 8, 128, DType::kBFloat16));
  EXPECT_EQ(choose_config(2, 1, 64, 32, 40, DType::kBFloat16, {true, true}),
            (MoeConfig{kCutlassConfig, -1, -1}));  // 40 pairs >= 16 rows x 2 experts
  EXPECT_EQ(choose_config(128, 8, 4096, 1536, 1, DType::kFloat32, {true, true}).block_m,
            choose_block_m(1, 8, 128));
}

// The stream path's down kernel: the most warps per CTA that keep all
// ceil(H / 16) row-block CTAs resident at once (1, 2 or 4 CTAs per SM); one
// CTA an SM is 12 warps at T <= 8 (beside an up CTA), 16 above.
TEST(FusedMoe, StreamDownWarps) {
  using pcg::moe::stream_down_warps;
  EXPECT_EQ(stream_down_warps(2048, 132, 1), 12);   // 128 row blocks: Qwen3, DeepSeek-V2-Lite
  EXPECT_EQ(stream_down_warps(2048, 132, 8), 12);
  EXPECT_EQ(stream_down_warps(2048, 132, 9), 16);   // pairs 16 at a time
  EXPECT_EQ(stream_down_warps(2112, 132, 1), 12);   // 132: one per SM
  EXPECT_EQ(stream_down_warps(2112, 132, 32), 16);
  EXPECT_EQ(stream_down_warps(2128, 132, 1), 8);    // 133
  EXPECT_EQ(stream_down_warps(2880, 132, 1), 8);    // 180: gpt-oss
  EXPECT_EQ(stream_down_warps(2880, 132, 32), 8);
  EXPECT_EQ(stream_down_warps(4096, 132, 4), 8);    // 256: Mixtral
  EXPECT_EQ(stream_down_warps(4232, 132, 1), 4);    // 265
  EXPECT_EQ(stream_down_warps(7168, 132, 1), 4);    // 448: DeepSeek-V3
  EXPECT_EQ(stream_down_warps(8448, 132, 1), 4);    // 528
  EXPECT_EQ(stream_down_warps(8464, 132, 1), 16);   // 529: several waves whatever the size
  EXPECT_EQ(stream_down_warps(8, 132, 1), 12);
  EXPECT_EQ(stream_down_warps(2048, 0, 1), 16);     // unknown SM count
  static_assert(stream_down_warps(2880, 132, 1) == 8 && stream_down_warps(2048, 132, 2) == 12,
                "constexpr");
}

// 11 warps instead of 12 beside a one-wave up grid of 6 CTAs an SM, where
// that costs no round of units (unroll 6).
TEST(FusedMoe, StreamDownWarpsBesideUp) {
  using pcg::moe::stream_down_warps_beside_up;
  // Qwen3-30B-A3B, T = 1: 768 up CTAs (one wave at 6), 32 units: 3 rounds at 11 and 12.
  EXPECT_EQ(stream_down_warps_beside_up(12, 1, 8, 128, 768, 6, 132), 11);
  // The up grid at 8 an SM (DeepSeek-V2-Lite, T = 1) or in several waves (Qwen3, T = 2).
  EXPECT_EQ(stream_down_warps_beside_up(12, 1, 6, 64, 1408, 8, 132), 12);
  EXPECT_EQ(stream_down_warps_beside_up(12, 2, 8, 128, 768, 6, 132), 12);
  // One wave at 6 (k = 6, I = 1024: 768 CTAs) but 36 units: 4 rounds at 11, 3 at 12.
  EXPECT_EQ(stream_down_warps_beside_up(12, 1, 6, 64, 1024, 6, 132), 12);
  // Only ever 12 -> 11; unknown SM count or nothing hit: unchanged.
  EXPECT_EQ(stream_down_warps_beside_up(16, 1, 8, 128, 768, 6, 132), 16);
  EXPECT_EQ(stream_down_warps_beside_up(8, 1, 8, 128, 768, 6, 132), 8);
  EXPECT_EQ(stream_down_warps_beside_up(12, 1, 8, 128, 768, 6, 0), 12);
  EXPECT_EQ(stream_down_warps_beside_up(12, 0, 8, 128, 768, 6, 132), 12);
  static_assert(stream_down_warps_beside_up(12, 1, 8, 128, 768, 6, 132) == 11, "constexpr");
}

// The stream path's up kernel: 8 CTAs an SM where that makes one wave of its
// I / 8 x min(T*k, E) CTAs and 6 does not.
TEST(FusedMoe, StreamUpCtasPerSm) {
  using pcg::moe::stream_up_ctas_per_sm;
  EXPECT_EQ(stream_up_ctas_per_sm(768, 132), 6);    // Qwen3-30B-A3B, T = 1: one wave at 6
  EXPECT_EQ(stream_up_ctas_per_sm(792, 132), 6);    // 6 * 132
  EXPECT_EQ(stream_up_ctas_per_sm(793, 132), 8);
  EXPECT_EQ(stream_up_ctas_per_sm(1056, 132), 8);   // DeepSeek-V2-Lite, T = 1: 8 * 132
  EXPECT_EQ(stream_up_ctas_per_sm(1057, 132), 6);   // several waves either way
  EXPECT_EQ(stream_up_ctas_per_sm(1440, 132), 6);   // gpt-oss-20b, T = 1
  EXPECT_EQ(stream_up_ctas_per_sm(1000, 0), 6);     // unknown SM count
  static_assert(stream_up_ctas_per_sm(1024, 132) == 8, "constexpr");
}

// The up kernel's K rotation (2 <= T <= 8) and its early argument reads (a grid of
// one wave at the CTAs an SM it runs with).
TEST(FusedMoe, StreamUpRotateAndEarlyArgs) {
  using namespace pcg::moe;
  EXPECT_FALSE(stream_up_rotate(1));
  EXPECT_TRUE(stream_up_rotate(2));
  EXPECT_TRUE(stream_up_rotate(8));
  EXPECT_FALSE(stream_up_rotate(9));   // two pairs a chunk: in step is faster
  EXPECT_FALSE(stream_up_rotate(128));
  EXPECT_TRUE(stream_up_early_args(768, 6, 132));    // Qwen3-30B-A3B, T = 1
  EXPECT_TRUE(stream_up_early_args(792, 6, 132));    // 6 * 132
  EXPECT_FALSE(stream_up_early_args(793, 6, 132));
  EXPECT_TRUE(stream_up_early_args(1056, 8, 132));   // DeepSeek-V2-Lite, T = 1, at 8 an SM
  EXPECT_FALSE(stream_up_early_args(1440, 6, 132));  // gpt-oss-20b, T = 1: two waves
  EXPECT_FALSE(stream_up_early_args(10, 6, 0));      // unknown SM count
  static_assert(stream_up_early_args(6, 6, 1) && !stream_up_rotate(0), "constexpr");
}

// The down kernel's K slicing and its unroll at T <= 8 (6 at 12 warps; else
// fewer rounds of units over the warps, then a fuller last round; 8 on a tie).
TEST(FusedMoe, StreamDownSlicingAndUnroll) {
  using namespace pcg::moe;
  EXPECT_EQ(stream_steps(768), 24);
  EXPECT_EQ(stream_steps(200), 7);  // 25 vectors of 8: the last step is partial
  // Qwen3-30B-A3B, T = 1: 8 experts, 24 steps of K.
  EXPECT_EQ(stream_down_ks_max(8, 768, 8), 3);  // 3 batches of 8 steps
  EXPECT_EQ(stream_down_ks_max(8, 768, 6), 4);
  StreamDownSlicing c = stream_down_slicing(8, 768, 8, 3);
  EXPECT_EQ(c.slice, 8);
  EXPECT_EQ(c.ks, 3);  // 24 units: 2 rounds over 16 warps, the second half empty
  c = stream_down_slicing(8, 768, 6, 4);
  EXPECT_EQ(c.slice, 6);
  EXPECT_EQ(c.ks, 4);  // 32 units: 2 full rounds
  EXPECT_EQ(stream_down_unroll(1, 8, 128, 768, 16), 6);
  EXPECT_EQ(stream_down_unroll(2, 8, 128, 768, 16), 8);   // 48 units in 3 rounds vs 64 in 4
  EXPECT_EQ(stream_down_unroll(1, 6, 64, 1408, 16), 6);   // DeepSeek-V2-Lite: 36 vs 48 in 3
  EXPECT_EQ(stream_down_unroll(1, 4, 32, 2880, 8), 8);    // gpt-oss: 6 rounds vs 8
  EXPECT_EQ(stream_down_unroll(1, 2, 8, 14336, 8), 8);    // Mixtral
  // 12 warps: 6, also where 8 takes fewer rounds (24 units in 2 vs 32 in 3).
  EXPECT_EQ(stream_down_unroll(1, 8, 128, 768, 12), 6);
  EXPECT_EQ(stream_down_unroll(1, 6, 64, 1408, 12), 6);
  EXPECT_EQ(stream_down_unroll(8, 8, 128, 768, 12), 6);
  EXPECT_EQ(stream_down_unroll(0, 8, 128, 768, 12), 8);   // nothing to stream
  EXPECT_EQ(stream_down_unroll(1, 8, 128, 768, 11), 6);
  // The partial sums' room caps the slices: 128 pairs leave 4.
  EXPECT_EQ(stream_down_ks_max(128, 14336, 8), 4);
  EXPECT_EQ(stream_down_slicing(100, 14336, 8, 4).ks, 1);
  // Degenerate sizes: nothing to slice, unroll 8.
  EXPECT_EQ(stream_down_slicing(0, 768, 8, 3).ks, 0);
  EXPECT_EQ(stream_down_slicing(8, 0, 8, 1).ks, 0);
  EXPECT_EQ(stream_down_ks_max(0, 768, 8), 1);
  EXPECT_EQ(stream_down_unroll(0, 8, 128, 768, 16), 8);
  EXPECT_EQ(stream_down_unroll(1, 8, 128, 768, 0), 8);
  static_assert(stream_down_unroll(1, 8, 128, 768, 16) == 6, "constexpr");
}

#ifdef PCG_WITH_CUDA
TEST(FusedMoe, CudaMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  Case c = make_case();
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    auto f = [&](const at::Tensor& t) { return t.to(dt); };
    auto cpu = fused_moe(f(c.hidden), f(c.w13), f(c.w2), c.weights, c.ids, c.map, c.num_valid,
                         f(c.b13), f(c.b2));
    auto g = [&](const at::Tensor& t) { return t.to(at::kCUDA); };
    auto cuda = fused_moe(g(f(c.hidden)), g(f(c.w13)), g(f(c.w2)), g(c.weights), g(c.ids),
                          g(c.map), g(c.num_valid), g(f(c.b13)), g(f(c.b2)));
    const double tol = dt == at::kFloat ? 1e-4 : 2e-2;
    auto diff = (cuda.cpu().to(at::kFloat) - cpu.to(at::kFloat)).norm().item<double>();
    EXPECT_LT(diff, tol * cpu.to(at::kFloat).norm().item<double>()) << "dtype " << dt;
    EXPECT_TRUE(cuda.cpu().narrow(0, 5, 2).eq(0).all().item<bool>());
  }
}
#endif

}  // namespace

// The one-kernel prologue's limits and work split (moe_prepare.h): every piece
// in exactly one CTA, pieces of a multiple of kPrepareWarps a CTA, at most one
// CTA an SM, pieces of 32..256 16-byte vectors (a power of two), and the
// tokens a CTA's pieces touch within tokens_per_cta (sizes its shared memory).
TEST(FusedMoe, PrepareFitsAndSplit) {
  using namespace pcg::moe;
  EXPECT_TRUE(moe_prepare_fits(1, 1));
  EXPECT_TRUE(moe_prepare_fits(kPrepareMaxPairs, kPrepareMaxExperts));
  EXPECT_FALSE(moe_prepare_fits(kPrepareMaxPairs + 1, 128));
  EXPECT_FALSE(moe_prepare_fits(128, kPrepareMaxExperts + 1));
  EXPECT_FALSE(moe_prepare_fits(0, 128));
  EXPECT_FALSE(moe_prepare_fits(128, 0));
  for (int sms : {0, 1, 7, 132}) {
    for (int64_t row_vecs : {1, 9, 256, 513, 896}) {
      for (int64_t T : {1, 2, 7, 16, 64, 513, 1024, 2048, 16384}) {
        const MoePrepareSplit s = moe_prepare_split(T, row_vecs, sms);
        SCOPED_TRACE(testing::Message() << "sms " << sms << " row_vecs " << row_vecs << " T " << T);
        EXPECT_GE(s.chunk, 32);
        EXPECT_LE(s.chunk, 32 * kPrepareUnroll);
        EXPECT_EQ(s.chunk & (s.chunk - 1), 0);
        EXPECT_EQ(s.chunks, (row_vecs + s.chunk - 1) / s.chunk);
        EXPECT_EQ(s.pieces_per_cta % kPrepareWarps, 0);
        const int64_t pieces = T * s.chunks;
        EXPECT_GE(s.ctas * s.pieces_per_cta, pieces);
        EXPECT_LT((s.ctas - 1) * s.pieces_per_cta, pieces);  // no CTA without a piece
        EXPECT_LE(s.ctas, sms > 0 ? sms * kPrepareCtasPerSm : 1);
        for (int64_t c = 0; c < s.ctas; ++c) {
          const int64_t p0 = c * s.pieces_per_cta;
          const int64_t p1 = std::min(p0 + s.pieces_per_cta, pieces);
          EXPECT_LE((p1 - 1) / s.chunks - p0 / s.chunks + 1, s.tokens_per_cta);
        }
      }
    }
  }
  // Qwen3-30B-A3B rows (256 vectors) on 132 SMs: one piece a warp up to 1024 tokens.
  EXPECT_EQ(moe_prepare_split(16, 256, 132).ctas, 16);
  EXPECT_EQ(moe_prepare_split(1024, 256, 132).chunk, 256);
  EXPECT_EQ(moe_prepare_split(1024, 256, 132).pieces_per_cta, kPrepareWarps);
}
