"""Tiny random transformers MoE models, one per supported family (no download).

Shared by tests/test_hf.py (fp32 on CPU), tests/test_hf_gpu.py and benchmarks
(bf16 on CUDA):

    from hf_models import FAMILIES, build
    model = build("gpt_oss", dtype=torch.bfloat16, device="cuda")

Every builder returns an eval-mode ``*ForCausalLM`` with ``sdpa`` attention
where the family supports it (``eager`` otherwise), weights drawn with a fixed
seed and a larger spread than the default init (std 0.02 would make every
layer nearly an identity), every bias / correction bias / sink non-zero, so
each code path of the family contributes to the logits.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

VOCAB = 128

# Shared tiny dimensions.
_BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
             rms_norm_eps=1e-6)


def qwen3_moe_config(**overrides: Any):
    from transformers import Qwen3MoeConfig
    kw = dict(_BASE, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=8,
              num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def qwen2_moe_config(**overrides: Any):
    """Qwen2-MoE: shared expert with its sigmoid gate, qkv bias; the first layer
    uses a sliding window of 5 (through layer_types: its attention module passes
    no window to the attention function, only the mask has it)."""
    from transformers import Qwen2MoeConfig
    kw = dict(_BASE, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
              num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
              mlp_only_layers=[], use_sliding_window=True, sliding_window=5, max_window_layers=1)
    kw.update(overrides)
    return Qwen2MoeConfig(**kw)


def mixtral_config(**overrides: Any):
    """Mixtral with a sliding window (6) on every layer."""
    from transformers import MixtralConfig
    kw = dict(_BASE, intermediate_size=32, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
              sliding_window=6)
    kw.update(overrides)
    return MixtralConfig(**kw)


def olmoe_config(**overrides: Any):
    from transformers import OlmoeConfig
    kw = dict(_BASE, intermediate_size=32, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=False)
    kw.update(overrides)
    return OlmoeConfig(**kw)


def deepseek_v2_config(**overrides: Any):
    """DeepSeek-V2: MLA (q_lora), group-limited greedy routing, shared experts,
    a dense first layer."""
    from transformers import DeepseekV2Config
    kw = dict(_BASE, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
              moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
              first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
              routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=12, norm_topk_prob=False)
    kw.update(overrides)
    return DeepseekV2Config(**kw)


def deepseek_v3_config(**overrides: Any):
    """DeepSeek-V3: MLA, sigmoid scores + correction bias, grouped top-k,
    shared experts, a dense first layer."""
    from transformers import DeepseekV3Config
    kw = dict(_BASE, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
              moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
              first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
              kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
              norm_topk_prob=True)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def gpt_oss_config(**overrides: Any):
    """gpt-oss: attention sinks, sliding (window 4) / full layers alternating,
    biased experts with swigluoai."""
    from transformers import GptOssConfig
    kw = dict(_BASE, intermediate_size=32, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
              sliding_window=4, rms_norm_eps=1e-5)
    kw.update(overrides)
    return GptOssConfig(**kw)


def llama4_config(**overrides: Any):
    """Llama-4 (text): MoE blocks with their own expert code (the router
    weight scales the expert's input; a shared expert), top-1; chunked
    attention (chunk 16) with QK L2 norm on the RoPE layers, a NoPE layer every
    4th with temperature tuning (floor_scale 8: positions >= 7 are scaled)."""
    from transformers import Llama4TextConfig
    kw = dict(_BASE, num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=96, head_dim=16,
              num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
              attention_chunk_size=16, floor_scale=8, attn_scale=0.5)
    kw.update(overrides)
    return Llama4TextConfig(**kw)


def dbrx_config(**overrides: Any):
    """DBRX: experts with their own code and [E * I, H] weights (w1 / v1 /
    w2), softmax top-2 with p-norm renormalisation, clipped qkv."""
    from transformers import DbrxConfig
    ffn = dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0)
    ffn.update(overrides.pop("ffn_config", {}))
    kw = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=512,
              attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), ffn_config=ffn,
              tie_word_embeddings=False)
    kw.update(overrides)
    return DbrxConfig(**kw)


def _model_class(config):
    import transformers
    name = {
        "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
        "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
        "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
        "gpt_oss": "GptOssForCausalLM", "llama": "LlamaForCausalLM",
        "llama4_text": "Llama4ForCausalLM", "dbrx": "DbrxForCausalLM",
    }[config.model_type]
    return getattr(transformers, name)


FAMILIES: dict[str, Callable[..., Any]] = {
    "qwen3_moe": qwen3_moe_config,
    "qwen2_moe": qwen2_moe_config,
    "mixtral": mixtral_config,
    "olmoe": olmoe_config,
    "deepseek_v2": deepseek_v2_config,
    "deepseek_v3": deepseek_v3_config,
    "gpt_oss": gpt_oss_config,
    "llama4": llama4_config,
    "dbrx": dbrx_config,
}


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float = 0.08, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight (norm weights around 1), including biases, sinks
    and router correction biases that the default init leaves at zero."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or "inv_freq" in name:
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        parts = name.split(".")
        owner = parts[-2] if len(parts) > 1 else ""
        if "norm" in owner and parts[-1] == "weight":
            val = 1.0 + 0.1 * r
        elif "e_score_correction_bias" in name:
            val = 0.1 * r
        elif "sinks" in name:
            val = 0.5 * r
        elif name.endswith("bias"):
            val = 0.05 * r
        elif t.dim() >= 2 and "embed" not in name:
            fan_in = t.shape[-1] if not name.endswith(("gate_up_proj", "down_proj")) else None
            if fan_in is None:
                # expert weights: [E, out, in] (or transposed [E, in, out] for gpt-oss)
                fan_in = min(t.shape[-1], t.shape[-2])
            val = r * (fan_in ** -0.5)
        else:
            val = std * r * 10 if "embed" in name else std * r
        t.copy_(val.to(t.dtype))
    return model


def build(family: str, dtype: torch.dtype = torch.float32, device: Any = "cpu", seed: int = 0,
          attn_implementation: str | None = None, **overrides: Any) -> torch.nn.Module:
    """A tiny random ``*ForCausalLM`` of ``family`` (see FAMILIES), eval mode."""
    config = FAMILIES[family](**overrides)
    return build_from_config(config, dtype=dtype, device=device, seed=seed,
                             attn_implementation=attn_implementation)


def build_from_config(config, dtype: torch.dtype = torch.float32, device: Any = "cpu", seed: int = 0,
                      attn_implementation: str | None = None) -> torch.nn.Module:
    cls = _model_class(config)
    if attn_implementation is None:
        attn_implementation = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(config)
    randomize(model, seed=seed)
    return model.to(device=device, dtype=dtype).eval()


def llama(dtype: torch.dtype = torch.float32, device: Any = "cpu", seed: int = 0) -> torch.nn.Module:
    """A tiny dense Llama (no experts): pcg.wrap must refuse it."""
    from transformers import LlamaConfig
    config = LlamaConfig(**dict(_BASE, intermediate_size=96))
    return build_from_config(config, dtype=dtype, device=device, seed=seed)


# More transformers MoE families, built from one generic tiny config (the
# attribute names of every family are in it; a family ignores the others).
# Tested by tests/test_hf_more.py; skipped where the installed transformers
# lacks the family.
_GENERIC = dict(_BASE, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=8,
                n_routed_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_k=2,
                moe_num_experts=8, first_k_dense_replace=1, n_group=1, topk_group=1,
                moe_topk=2, num_shared_experts=1, n_shared_experts=1, shared_intermediate_size=32,
                moe_layer_freq=1, decoder_sparse_step=1, mlp_only_layers=[])
MORE_FAMILIES = ["glm4_moe", "ernie4_5_moe", "dots1", "hunyuan_v1_moe", "minimax_m2", "phimoe",
                 "granitemoe", "granitemoeshared", "exaone_moe", "afmoe", "glm4_moe_lite"]
# More families checked on the CPU only so far (tests/test_hf_more.py).
CPU_FAMILIES = ["cohere2_moe", "flex_olmo", "granitemoe_swa", "hy_v3", "laguna", "mellum",
                "mimo_v2_flash", "solar_open", "axk1", "kimi_linear", "gemma4_text", "mistral4",
                "minimax_m3_vl_text", "dots3_note_text"]
_MLA = dict(num_hidden_layers=3, num_key_value_heads=4, n_group=4, topk_group=2, kv_lora_rank=16,
            q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            norm_topk_prob=True)
# Families the generic config does not fit (MLA dimensions, layer patterns).
_MORE_OVERRIDES = {
    "axk1": dict(_MLA, head_dim=8),
    # Mistral-4: MLA whose head_dim is nope + rope (its rotary tables use it).
    "mistral4": dict(_MLA, qk_nope_head_dim=24, head_dim=32, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2),
    # MiniMax-M3's language model: full attention only (its sparse layers have an
    # indexer, refused), experts with gpt-oss's clamped SwiGLU on concatenated halves.
    "minimax_m3_vl_text": dict(intermediate_size=32, dense_intermediate_size=96,
                               shared_intermediate_size=32, rotary_dim=8,
                               layer_types=["full_attention", "full_attention"],
                               mlp_layer_types=["dense", "sparse"]),
    # dots3 without its DeepSeek sparse attention: full and sliding-window MLA layers.
    "dots3_note_text": dict(_MLA, num_hidden_layers=4, head_dim=24, use_dsa=False,
                            shared_experts_intermediate_size=32, sliding_window=4,
                            swa_num_attention_heads=4, swa_num_key_value_heads=4,
                            swa_q_lora_rank=24, swa_kv_lora_rank=16, swa_head_dim=24,
                            swa_qk_nope_head_dim=16, swa_v_head_dim=12),
    # Gemma-4 with its MoE block (tanh-gelu experts), a sliding and a full layer.
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
                        enable_moe_block=True, num_experts=8, top_k_experts=2, global_head_dim=16,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention"]),  # its rotary tables use head_dim (= qk_rope_head_dim)
    "kimi_linear": dict(_MLA, num_hidden_layers=4, linear_attn_config=dict(
        head_dim=16, num_heads=4, short_conv_kernel_size=4, full_attn_layers=[2, 4],
        kda_layers=[1, 3])),
    "glm4_moe_lite": dict(num_hidden_layers=3, num_key_value_heads=4, n_group=4, topk_group=2,
                          kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                          v_head_dim=12, norm_topk_prob=True),
}

# Hybrid models (linear attention, state-space, short convolution layers):
# pcg runs their token mixers per sequence (pcg::mixer).
HYBRID_FAMILIES = {
    # Ling's hybrid: linear-attention groups of 2 (one linear, one MLA layer), dense first layer.
    "bailing_hybrid": dict({k: v for k, v in _GENERIC.items() if k not in _BASE},
                           num_hidden_layers=4, layer_group_size=2, num_key_value_heads=4,
                           kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                           v_head_dim=12, n_group=4, topk_group=2),
    "minimax": dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                    num_experts_per_tok=2),
    "qwen3_next": dict(num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32,
                       num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=32,
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16),
    "lfm2_moe": dict(num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32,
                     num_experts=8, num_experts_per_tok=2, num_dense_layers=1,
                     layer_types=["full_attention", "conv", "full_attention", "conv"]),
    "granitemoehybrid": dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                             num_experts_per_tok=2, layer_types=["mamba", "attention"],
                             mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1),
    "qwen3_5_moe_text": dict(num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32,
                             num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=32,
                             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                             linear_value_head_dim=16),
    "jamba": dict(num_hidden_layers=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                  expert_layer_offset=0, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8,
                  use_mamba_kernels=False),
}


def has_family(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING
    return model_type in CONFIG_MAPPING


# Families whose causal LM the Auto classes do not map (it sits under a
# multimodal model's mapping): the class in the family's modeling module.
_CAUSAL_LM = {"mistral4": "Mistral4ForCausalLM"}


def _causal_lm(model_type: str, config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    if model_type not in _CAUSAL_LM:
        return AutoModelForCausalLM.from_config(config)
    import importlib
    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    return getattr(module, _CAUSAL_LM[model_type])(config)


def build_auto(model_type: str, dtype: torch.dtype = torch.float32, device: Any = "cpu",
               seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random ``*ForCausalLM`` of any transformers family through the
    Auto classes: MORE_FAMILIES from the generic config, HYBRID_FAMILIES from
    theirs."""
    from transformers import AutoConfig
    kw = dict(_BASE, **HYBRID_FAMILIES[model_type]) if model_type in HYBRID_FAMILIES \
        else dict(_GENERIC, **_MORE_OVERRIDES.get(model_type, {}))
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults of a real vocabulary
        v = getattr(config, attr, None)
        if isinstance(v, int) and v >= kw["vocab_size"]:
            setattr(config, attr, 0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    try:
        model = _causal_lm(model_type, config)
    except ValueError:  # a family without sdpa
        config._attn_implementation = "eager"
        model = _causal_lm(model_type, config)
    randomize(model, seed=seed)
    return model.to(device=device, dtype=dtype).eval()


def padding_mask(lens: list, seq_len: int, side: str) -> torch.Tensor:
    """[B, S] attention mask (1 = real token) for rows of the given lengths,
    padded on the ``side`` ("left" or "right")."""
    mask = torch.zeros(len(lens), seq_len, dtype=torch.long)
    for i, n in enumerate(lens):
        if side == "left":
            mask[i, seq_len - n:] = 1
        else:
            mask[i, :n] = 1
    return mask
