// fused_moe's weight-streaming path for a few tokens (config [-2, -1, -1]).
// Torch-free. At T*k <= kStreamMaxPairs the op is a stream of the hit
// experts' weights (Qwen3-30B-A3B, T = 1: 8 experts, 75 MB); this path reads
// each hit expert's w13 and w2 once, with two kernels on one stream, no
// moe_align, no host synchronisation, fixed sizes (capturable), both launched
// as programmatic dependents (sm_90 PDL) of the kernel before them:
//   1. up:   inter[p, n] = act(hidden[t] . w13[e, n] + b13[e, n],
//                              hidden[t] . w13[e, I + n] + b13[e, I + n])
//            for every valid pair p = t*k + j (fp32 sums, bias and activation
//            in fp32, rounded to the dtype: as the mma.sync path's GEMM1).
//            Grid (I / 8 column groups, min(T*k, E) expert slots); a CTA
//            finds the y-th distinct expert hit (first-occurrence order) or
//            exits, and computes its 8 gate + 8 up rows against all of the
//            expert's pairs; its 4 warps split K, in batches whose loads all
//            issue before their first mma (from round x mod rounds at
//            2 <= T <= 8: stream_up_rotate). 6 CTAs an SM, or 8 where that
//            makes the grid one wave (stream_up_ctas_per_sm).
//   2. down: out[t, h] = sum_j w[t,j] * (inter[p] . w2[e, h] + b2[e, h]) in
//            fp32, j in fixed order (deterministic), rounded to the dtype;
//            rows t >= num_valid and tokens without a valid pair are zeros.
//            Grid ceil(H / 16) row blocks of W warps (stream_down_warps: one
//            wave over the SMs where it can, entering an SM before the up
//            kernel has left it where it is one CTA an SM); a CTA streams
//            its 16 rows of every hit expert's w2 (units (expert, K slice) spread over the
//            warps, each warp's first weights loaded before the PDL wait;
//            partial sums in shared memory, summed in slice order).
// Both kernels multiply with mma.sync m16n8k16 (fp32 accumulators): 16
// weight rows times 8 pairs per instruction, fed by 16-byte global loads
// (no shared-memory staging; a permutation of K common to both operands).
// Requirements (checked by the launcher): bf16/fp16, T*k <= kStreamMaxPairs,
// H % 8 == 0, I % 8 == 0, 16-byte aligned hidden / w13 / w2, an sm_80+ GPU.
#pragma once

#include <cstdint>

#include "moe/fused_moe.h"

namespace pcg::moe {

// Most (token, k) pairs per call: the routing tables live in shared memory
// and the down kernel keeps one partial sum per (K slice, pair, row) there.
constexpr int64_t kStreamMaxPairs = 128;
static_assert(kStreamGuessMaxPairs <= kStreamMaxPairs,
              "choose_config guesses the stream path only where it can run");

// Whether the shapes / dtype suit this path (alignment and the device are
// the launcher's to check).
constexpr bool stream_supported(DType dtype, int64_t T, int64_t k, int64_t H, int64_t I) {
  return dtype != DType::kFloat32 && T >= 0 && k >= 0 && T * k <= kStreamMaxPairs &&
         H % 8 == 0 && I % 8 == 0;
}

// Workspace: the intermediate, one row per pair (rows of invalid pairs are
// neither written nor read).
inline int64_t stream_inter_elems(int64_t T, int64_t k, int64_t I) { return T * k * I; }

// Expert slots a call can hit (the up grid's y extent; exact at T = 1) and
// the up kernel's CTAs (I / 8 column groups for each).
constexpr int64_t stream_hit_slots(int64_t T, int64_t k, int64_t E) {
  return T * k < E ? T * k : E;
}
constexpr int64_t stream_up_ctas(int64_t T, int64_t k, int64_t E, int64_t I) {
  return I / 8 * stream_hit_slots(T, k, E);
}

// Whether the kernels take a call's pairs 8 at a time (one m16n8 tile a pass:
// T <= 8, where an expert rarely gets more pairs than tokens) or 16 (above).
constexpr bool stream_pairs_by_8(int64_t T) { return T <= 8; }

// Warps of a down CTA (16, 12, 8 or 4) for ceil(H / 16) row blocks on `sms`
// SMs and T tokens: the most warps that keep every CTA resident at once (one
// wave: 1, 2 or 4 CTAs an SM), 16 when none does. One CTA an SM takes 12 warps
// where pairs go 8 at a time (T <= 8): within 128 registers it fits beside
// one up CTA (<= 80), so it enters an SM when 5 of the 6 up CTAs there have
// left, not 6 (H200, chain us, 16 -> 12 warps at unroll 6: Qwen3-30B-A3B
// T = 1 / 2 / 4 / 8 23.15 / 40.79 / 69.42 / 121.91 -> 23.01 / 40.08 / 68.74 /
// 118.72, DeepSeek-V2-Lite 29.90 / 52.45 / 86.70 / 144.77 -> 29.68 / 52.45 /
// 85.21 / 142.84; at T = 16 mixed, -0.2% to +1.9%;
// bench/results/ab_w12_s22.log, ab_u_s22.log). gpt-oss-20b (180 row blocks)
// and Mixtral (256) 8, 2-5% faster than 16 in two waves; H = 7168 (448) 4,
// tied with 8. Splitting a row block over several CTAs (tried) was slower
// everywhere.
constexpr int stream_down_warps(int64_t H, int64_t sms, int64_t T) {
  const int64_t rb = (H + 15) / 16;
  if (sms <= 0) return 16;
  if (rb <= sms) return stream_pairs_by_8(T) ? 12 : 16;
  if (rb <= 2 * sms) return 8;
  if (rb <= 4 * sms) return 4;
  return 16;
}

// Whether a down CTA of `warps` warps is one of the one-CTA-an-SM widths that
// fit beside up CTAs within 128 registers (12, or 11 from
// stream_down_warps_beside_up).
constexpr bool stream_down_beside_up(int warps) { return warps == 11 || warps == 12; }

// The up kernel's CTAs an SM (unroll 4, <= 80 registers), and the only count
// at 16 pairs a pass (8 would spill there).
constexpr int kStreamUpCtasPerSm = 6;

// CTAs an SM of the up kernel at T <= 8 (6: unroll 4, <= 80 registers; 8:
// unroll 2, <= 64) for `ctas` up CTAs (I / 8 x min(T*k, E)) on `sms` SMs: 8
// where that makes one wave and 6 does not, else 6. H200, T = 1, chain us: 8
// on DeepSeek-V2-Lite's 1056 CTAs 31.6 -> 30.3, (64, 8, 2048, 1024)'s 1024
// 31.0 -> 29.9, (32, 4, 4096, 2048)'s 1024 54.5 -> 52.1; where 6 is one wave
// (Qwen3's 768) or neither is (gpt-oss's 1440) 8 is 2.1-2.6 us slower, and in
// several waves (T >= 2) mixed, within +-2% (bench/results/ab_up_occ*_s20.log).
constexpr int stream_up_ctas_per_sm(int64_t ctas, int64_t sms) {
  return sms > 0 && ctas > kStreamUpCtasPerSm * sms && ctas <= 8 * sms ? 8 : kStreamUpCtasPerSm;
}

// Whether the up kernel's CTAs start their K loop at different rounds (CTA
// column group x at round x mod rounds, a round being one batch of each
// warp): at 2 <= T <= 8. H200, chain us, in step -> rotated
// (bench/results/ab_rot_s21.log): T = 2 / 4 / 8 Qwen3-30B-A3B 40.5 / 69.8 /
// 123.8 -> 40.5 / 68.8 / 120.7, DeepSeek-V2-Lite 53.1 / 86.8 / 147.2 -> 52.4
// / 86.0 / 143.3, gpt-oss-20b 93.4 / 152.0 / 256.6 -> 90.3 / 147.4 / 250.8,
// Mixtral 0.4-1.0% less; at T = 1 rotating costs 0.5-1.4 us on every shape
// but Mixtral, and at T >= 16 (two pairs a chunk) 1-6%.
constexpr bool stream_up_rotate(int64_t T) { return T >= 2 && T <= 8; }

// Whether the up kernel's `ctas` CTAs are one wave of `ctas_per_sm` an SM on
// `sms` SMs (stream_up_one_wave), and whether it reads its arguments before
// its PDL wait (they are never the previous kernel's output), so that their
// constant-cache misses fall before the wait: where it is one wave (every CTA
// is resident, waiting, when the wait releases). H200,
// T = 1, chain us: Qwen3-30B-A3B 23.19 -> 23.02, DeepSeek-V2-Lite 29.93 ->
// 29.73, (64, 8, 2048, 1024) 29.61 -> 29.40 (ab_rot_s21.log); gpt-oss-20b
// (two waves) 53.31 -> 53.74 with it (ab_s21_experiments.log, call 12): not
// there.
constexpr bool stream_up_one_wave(int64_t ctas, int ctas_per_sm, int64_t sms) {
  return sms > 0 && ctas <= ctas_per_sm * sms;
}
constexpr bool stream_up_early_args(int64_t ctas, int ctas_per_sm, int64_t sms) {
  return stream_up_one_wave(ctas, ctas_per_sm, sms);
}

// How the down kernel cuts K (I / 32 steps of 32 elements): slices of whole
// batches of U steps, about kStreamDownUnits units (hit expert, slice) a CTA,
// at most ks_max slices (its shared memory holds a partial sum per slice).
constexpr int64_t kStreamDownRows = 16;  // rows of w2 (columns of out) a down CTA streams
constexpr int kStreamDownUnits = 64;
constexpr int64_t kStreamDownPartBytes = 32 * 1024;  // the partial sums, at most

constexpr int64_t stream_steps(int64_t K) { return (K / 8 + 3) / 4; }

// Slices the partial sums of P pairs may use at unroll U (>= 1).
constexpr int stream_down_ks_max(int64_t P, int64_t I, int U) {
  const int64_t batches = (stream_steps(I) + U - 1) / U;
  const int64_t fit = P > 0 ? kStreamDownPartBytes / (P * kStreamDownRows * 4) : 1;
  const int64_t m = fit < batches ? fit : batches;
  return static_cast<int>(m < 1 ? 1 : m);
}

struct StreamDownSlicing {
  int64_t slice = 0;  // steps a slice
  int ks = 0;         // slices
};

constexpr StreamDownSlicing stream_down_slicing(int64_t groups, int64_t I, int U, int ks_max) {
  StreamDownSlicing r;
  const int64_t steps = stream_steps(I);
  if (steps <= 0 || groups <= 0) return r;
  int64_t want = (kStreamDownUnits + groups - 1) / groups;
  want = want < 1 ? 1 : (want > ks_max ? ks_max : want);
  const int64_t batches = (steps + U - 1) / U;
  r.slice = (batches + want - 1) / want * U;
  r.ks = static_cast<int>((steps + r.slice - 1) / r.slice);
  return r;
}

// The down kernel's unroll at T <= 8, 8 or 6 (K steps a warp loads at once).
// At 12 (or 11) warps 6 (H200: faster than 8 at every T <= 8 on the three shapes of
// 128 row blocks, also where 8 takes fewer rounds: Qwen3-30B-A3B T = 1 23.02
// -> 22.90, DeepSeek-V2-Lite 29.57 -> 29.24 at 6; ab_w12_s22.log). Else the
// one whose units take fewer rounds over the CTA's `warps` warps, then the one
// that fills its last round better (warps idle in it wait on the others), 8
// on a tie. The hit experts are taken as min(T*k, E) (exact at T = 1; the
// kernel slices for the real count). H200, T = 1, 16 warps: Qwen3-30B-A3B 24
// units in 2 rounds at 8, 32 at 6 (-0.6 us); DeepSeek-V2-Lite 36 / 48 in 3.
constexpr int stream_down_unroll(int64_t T, int64_t k, int64_t E, int64_t I, int warps) {
  const int64_t groups = stream_hit_slots(T, k, E);
  if (groups <= 0 || warps <= 0) return 8;
  if (stream_down_beside_up(warps)) return 6;
  int64_t rounds[2] = {0, 0}, units[2] = {0, 0};
  const int us[2] = {8, 6};
  for (int i = 0; i < 2; ++i) {
    const StreamDownSlicing sl = stream_down_slicing(groups, I, us[i], stream_down_ks_max(T * k, I, us[i]));
    units[i] = groups * sl.ks;
    rounds[i] = (units[i] + warps - 1) / warps;
  }
  if (rounds[1] != rounds[0]) return rounds[1] < rounds[0] ? 6 : 8;
  // Same rounds: the fuller last round (more units in the same rounds).
  return units[1] > units[0] ? 6 : 8;
}

// The down kernel's warps where stream_down_warps gives 12 (one CTA an SM, T
// <= 8) and the up grid is one wave of 6 CTAs an SM (<= 80 registers; up
// CTAs I / 8 x min(T*k, E) <= 6 * sms): 11 warps (45,056 registers) fit
// beside two of those up CTAs and enter an SM when 4 of its 6 have left, 12
// beside one; 11 where that costs no round of units (unroll 6), else 12.
// H200, chain us, 12 -> 11: Qwen3-30B-A3B T = 1 23.01 -> 22.89 and 22.99 ->
// 22.85 (32 units, 3 rounds either way); where the up grid is one wave of 8
// an SM both enter at the same point and 11 loses (DeepSeek-V2-Lite T = 1
// 29.68 -> 30.24), and where it is several waves it is mixed (-0.6% to +2.0%)
// (bench/results/ab_w1x_s22.log, ab_u_s22.log).
constexpr int stream_down_warps_beside_up(int warps, int64_t T, int64_t k, int64_t E, int64_t I,
                                          int up_ctas_per_sm, int64_t sms) {
  const int64_t groups = stream_hit_slots(T, k, E);
  if (warps != 12 || up_ctas_per_sm != 6 || groups <= 0 ||
      !stream_up_one_wave(stream_up_ctas(T, k, E, I), up_ctas_per_sm, sms))
    return warps;
  const StreamDownSlicing sl = stream_down_slicing(groups, I, 6, stream_down_ks_max(T * k, I, 6));
  const int64_t units = groups * sl.ks;
  return (units + 10) / 11 == (units + 11) / 12 ? 11 : 12;
}

// Beyond FusedMoeParams (whose moe_align workspaces and pair_out are unused;
// `inter` is [T*k, I] in the dtype).
struct StreamMoeOptions {
  // Programmatic dependent launches (sm_90; used only where the device code
  // has the wait): the up kernel's CTAs start as the previous kernel on the
  // stream drains and wait for it before reading any input; the down kernel's
  // routing scan and first weight loads overlap the up kernel's tail.
  bool pdl = true;
  // Warps of a down CTA: stream_down_warps for this device and T (16, 12, 8
  // or 4), then stream_down_warps_beside_up (11); 12 and 11 only where pairs
  // go 8 at a time; any other value runs 16.
  int down_warps = 16;
  // Down kernel unroll at T <= 8: stream_down_unroll (6; any other value
  // runs 8). Above T = 8 it is 4.
  int down_unroll = 8;
  // Up kernel CTAs an SM: stream_up_ctas_per_sm at T <= 8, else
  // kStreamUpCtasPerSm (8 runs unroll 2 where pairs go 8 at a time; any other
  // value runs 6).
  int up_ctas_per_sm = kStreamUpCtasPerSm;
  // stream_up_rotate (used at T <= 8 only) / stream_up_early_args for this
  // call and device.
  bool up_rotate = false;
  bool up_early_args = false;
};

}  // namespace pcg::moe

#if defined(__CUDACC__) || defined(PCG_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace pcg::moe {

// Runs the two kernels on `stream`; cudaErrorInvalidValue when the shapes do
// not satisfy stream_supported. Returns the first launch error.
cudaError_t launch_fused_moe_stream(const FusedMoeParams& p, const StreamMoeOptions& o,
                                    cudaStream_t stream);

}  // namespace pcg::moe
#endif
