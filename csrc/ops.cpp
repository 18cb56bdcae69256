// The one schema file: every pcg operator is declared here and nowhere else.
// Kernels are registered next to their launchers (TORCH_LIBRARY_IMPL per
// backend); ops whose kernels live in Python (split ops that find a layer by
// id) are implemented by python/pcg at import time.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(pcg, m) {
  // ---- MoE -----------------------------------------------------------------
  // Top-k routing: softmax/sigmoid scoring, optional bias correction and
  // DeepSeek-V3 grouped selection. Returns (weights [T,k] f32, ids [T,k] i32).
  m.def(
      "route(Tensor router_logits, int top_k, str scoring=\"softmax\", bool renormalize=True, "
      "Tensor? correction_bias=None, int num_groups=1, int topk_groups=1, float scale=1.0) "
      "-> (Tensor, Tensor)");
  // Fused expert MLP over the routed pairs; rows >= num_valid are exact zeros.
  // config = [block_m, tile1, tile2] forces a kernel configuration (default:
  // the tuning table's, csrc/moe/fused_moe.h); config = [-1, g1, g2] selects
  // the CUTLASS sm_90a grouped-GEMM path with GEMM kernel variants g1 / g2
  // (-1: default; bf16/fp16 on sm_90 only, csrc/moe/moe_cutlass.h) and
  // [-2, -1, -1] the weight-streaming path (the CPU kernel validates and
  // ignores config). w13_block: w13's row layout (0: gate rows then up rows;
  // B: blocks of B gate rows and B up rows alternate; csrc/moe/fused_moe.h).
  m.def(
      "fused_moe(Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
      "Tensor? expert_map=None, Tensor? num_valid=None, Tensor? b13=None, Tensor? b2=None, "
      "str activation=\"silu\", float alpha=1.702, float limit=7.0, int[]? config=None, "
      "int w13_block=0) -> Tensor");
  // fused_moe's kernel configuration for these shapes: [block_m, tile1, tile2];
  // and its list of tiles (9 ints per tile: id, BM, BN, BK, warps_m, warps_n,
  // stages, gated, shared memory bytes; and the names).
  m.def("fused_moe_config(int E_local, int top_k, int H, int I, int T, ScalarType dtype, bool cutlass=False, bool stream=False) -> int[]");
  m.def("fused_moe_tiles() -> (int[], str[])");
  // The CUTLASS path's GEMM kernel variants (10 ints per variant: id, pingpong,
  // tile M, N, K, cluster M, swap-AB, direct store, gather A, resident; and the
  // names), csrc/moe/grouped_gemm_variants.h.
  m.def("fused_moe_cutlass_variants() -> (int[], str[])");
  // Internal: sort (token, k) pairs by local expert and pad each expert's run
  // to a multiple of block_m. See csrc/moe/moe_align.h for the exact layout.
  m.def(
      "moe_align(Tensor topk_ids, Tensor? expert_map, Tensor? num_valid, int num_local_experts, "
      "int block_m, Tensor(a!) sorted_pairs, Tensor(b!) block_expert, Tensor(c!) num_blocks) -> ()");

  // ---- expert parallelism --------------------------------------------------
  // Pack each valid token once per destination rank owning one of its experts
  // into fixed-size send buffers [W, C, ...] (C >= T); counts stay on the
  // device. Layout: csrc/moe/ep_kernels.h.
  m.def(
      "ep_dispatch(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor expert_rank, "
      "Tensor expert_local, Tensor? num_valid, Tensor(a!) send_hidden, Tensor(b!) send_meta, "
      "Tensor(c!) slot_map, Tensor(d!) counts) -> ()");
  // out[t] = sum over ranks r of recv[r, slot_map[t, r]] (fp32 accumulation).
  m.def("ep_combine(Tensor recv, Tensor slot_map, Tensor(a!) out) -> ()");
  // Intranode peer-mapped variants: write straight into every rank's mapped
  // workspace (addresses in peer_ptrs) instead of local send buffers; the
  // workspaces are written through raw addresses, so no argument aliases them.
  m.def(
      "ep_dispatch_peer(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor expert_rank, "
      "Tensor expert_local, Tensor? num_valid, Tensor peer_ptrs, int rank, int capacity, "
      "int hidden_offset, int meta_offset, Tensor(a!) slot_map, Tensor(b!) counts) -> ()");
  m.def(
      "ep_return_peer(Tensor y, Tensor meta, Tensor peer_ptrs, int rank, int back_offset) -> ()");

  // ---- graph ---------------------------------------------------------------
  // A tensor viewing t's memory that does not keep t's storage alive.
  m.def("weak_ref_tensor(Tensor t) -> Tensor");
  // A replay's inputs into the static buffers its graphs read, in one launch:
  // static_ids[:n] = ids, static_pos[:n] = positions (when given), and
  // batch[:len(values)] = values (int32; e.g. num_valid and sequence starts).
  m.def(
      "stage_batch(Tensor ids, Tensor? positions, Tensor(a!) static_ids, Tensor(b!) static_pos, "
      "Tensor(c!) batch, int[] values) -> ()");

  // ---- attention -------------------------------------------------------------
  // Causal attention over packed sequences into out[rows, Hq, Dv]; rows past
  // num_tokens are zeroed. meta: CPU int64 [num_tokens, num_seqs, max_seqlen,
  // flags, cu_seqlens...] (flags bit 0: one varlen launch for several
  // sequences; bit 1: skip the short-sequence kernel), read at every call; window_left: keys left of the query it may
  // see (-1: all). The split call a captured forward replays for standard layers.
  m.def(
      "causal_attention_out(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor meta, "
      "float? scale=None, int window_left=-1) -> ()");
  // The same for sequences of at most 64 tokens, the batch read on the device
  // from int32 [num_tokens, num_seqs, cu_seqlens...] when the kernel runs:
  // capturable, a graph follows the batch written there before each replay.
  m.def(
      "causal_attention_graph(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor batch, "
      "float? scale=None, int window_left=-1) -> ()");

  // ---- layer ops (kernels in python/pcg; the layer is found by id) ----------
  // Split op: causal attention over the packed batch of the running forward.
  m.def("attention(Tensor q, Tensor k, Tensor v, int layer) -> Tensor");
  m.def("attention_out(Tensor q, Tensor k, Tensor v, Tensor(a!) out, int layer) -> ()");
  // Split op: a hybrid model's other token mixer (linear attention, state
  // space, convolution) x [rows, H] -> [rows, H], one packed sequence at a time.
  m.def("mixer(Tensor x, int layer) -> Tensor");
  m.def("mixer_out(Tensor x, Tensor(a!) out, int layer) -> ()");
  // Opaque MoE layer: experts (and EP communication) of layer `layer`.
  m.def("moe(Tensor hidden, Tensor topk_weights, Tensor topk_ids, int layer) -> Tensor");
  m.def(
      "moe_out(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor(a!) out, int layer) "
      "-> ()");
}

// No pcg op has a derivative (inference only). Where an input requires grad,
// the outputs get a grad_fn that raises on backward, naming the op, instead
// of gradients that silently miss the op's inputs (the CPU kernels are made
// of ATen ops, which would record a partial graph).
TORCH_LIBRARY_IMPL(pcg, Autograd, m) {
  for (const char* op :
       {"route", "fused_moe", "moe_align", "ep_dispatch", "ep_combine", "ep_dispatch_peer",
        "ep_return_peer", "causal_attention_out", "causal_attention_graph", "stage_batch",
        "weak_ref_tensor", "attention", "attention_out", "mixer", "mixer_out", "moe", "moe_out"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
