"""Shared test helpers: tiny random models of each family, padded batches."""
import copy

import torch


# latent attention's shape (3 blocks, 4 heads: q low rank, latent 24, rotary 8 of 24-wide keys, values 12), and
# DeepSeek-V3's MoE at tiny size (8 experts in 2 groups, top 3 from 1 group, a shared expert, a dense first block)
_MLA = dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12)
_MLA_MOE = dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3, moe_intermediate_size=32,
                n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"], norm_topk_prob=True)


def tiny_config(family: str, **overrides):
    """A 2-layer random config of each supported family, with the family's distinctive features on."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, initializer_range=0.1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg = LlamaConfig(**{**common, "attention_bias": True, "mlp_bias": True, "head_dim": 24})
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": 7})
    elif family == "qwen2":
        cfg = Qwen2Config(**{**common, "num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 7,
                             "max_window_layers": 1})
    elif family == "qwen3":
        cfg = Qwen3Config(**{**common, "head_dim": 32})
    elif family == "mixtral":              # every layer sparse: 4 experts, top 2 (renormalised), a window
        from transformers import MixtralConfig

        cfg = MixtralConfig(**{**common, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 7})
    elif family == "qwen2_moe":            # shared expert with its sigmoid gate, top-k not renormalised, a dense layer
        from transformers import Qwen2MoeConfig

        cfg = Qwen2MoeConfig(**{**common, "num_hidden_layers": 3, "num_experts": 6, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 48, "shared_expert_intermediate_size": 80,
                                "norm_topk_prob": False, "mlp_only_layers": [1]})
    elif family == "qwen3_moe":            # q/k norms, sparse every second layer, top-k renormalised
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(**{**common, "num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 3,
                                "moe_intermediate_size": 40, "decoder_sparse_step": 2, "norm_topk_prob": True,
                                "head_dim": 32})
    elif family == "phi3":                 # q|k|v and gate|up packed in one tensor each, a window
        from transformers import Phi3Config

        cfg = Phi3Config(**{**common, "sliding_window": 7})
    elif family == "granite":              # Llama with embedding, residual, attention and logit multipliers
        from transformers import GraniteConfig

        cfg = GraniteConfig(**{**common, "embedding_multiplier": 3.0, "residual_multiplier": 0.3,
                               "attention_multiplier": 0.05, "logits_scaling": 4.0, "attention_bias": True})
    elif family == "gemma":                # (1 + w) norms, sqrt(H)-scaled embedding, GeGLU (tanh), MQA, tied
        from transformers import GemmaConfig

        cfg = GemmaConfig(**{**common, "num_key_value_heads": 1, "head_dim": 32})
    elif family == "gemma2":               # + sandwich norms, soft-capped scores and logits, sliding / full layers
        from transformers import Gemma2Config

        cfg = Gemma2Config(**{**common, "num_hidden_layers": 3, "head_dim": 32, "sliding_window": 7,
                              "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                              "final_logit_softcapping": 3.0,
                              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]})
    elif family == "gemma3_text":          # + q/k norms, a rope table of its own for the sliding layers
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(**{**common, "num_hidden_layers": 3, "head_dim": 32, "sliding_window": 7,
                                  "query_pre_attn_scalar": 32,
                                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                                  "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 100000.0},
                                                      "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 1000.0}}})
    elif family in ("gemma4_text", "gemma4_moe"):  # w (not 1 + w) norms, v norm, full layers of their own head dim with one KV
        from transformers import Gemma4TextConfig  # head whose values are the keys' projection, a proportional rope;
        #                                            the last two layers reading earlier layers' K/V with double-wide
        #                                            MLPs; per-layer inputs; a logit cap
        cfg = Gemma4TextConfig(**{**common, "num_hidden_layers": 6, "head_dim": 16, "global_head_dim": 32,
                                  "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 7,
                                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                                                  "sliding_attention", "sliding_attention", "full_attention"],
                                  "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 97,
                                  "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
                                  "final_logit_softcapping": 30.0,     # (gemma4_moe: 26B-A4B's experts beside
                                  **(dict(enable_moe_block=True, num_experts=4, top_k_experts=2,   # every MLP)
                                          moe_intermediate_size=32) if family == "gemma4_moe" else {}), **overrides})
        overrides = {}
    elif family == "gemma4_unified_text":  # Gemma 4 12B's language model: Gemma 4's blocks (the v norm, full layers of
        from transformers import AutoConfig  # their own head dim with one KV head whose values are the keys', the last
        #                                      two reading earlier layers' K/V with double-wide MLPs, the layer
        #                                      scalars, a logit cap) without per-layer inputs or experts
        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 6, "head_dim": 16, "global_head_dim": 32,
                                              "num_global_key_value_heads": 1, "attention_k_eq_v": True,
                                              "sliding_window": 7,
                                              "layer_types": ["sliding_attention", "sliding_attention",
                                                              "full_attention", "sliding_attention",
                                                              "sliding_attention", "full_attention"],
                                              "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
                                              "final_logit_softcapping": 30.0, **overrides})
        overrides = {}
    elif family == "deepseek_v3":          # latent attention (q low rank, interleaved rotary, yarn), grouped sigmoid
        from transformers import DeepseekV3Config  # routing with a correction bias, a shared expert, a dense layer

        cfg = DeepseekV3Config(**{**common, "num_key_value_heads": 4, "q_lora_rank": 32,
                                  "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                  "v_head_dim": 12, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                                  "num_experts_per_tok": 3, "moe_intermediate_size": 32, "n_shared_experts": 1,
                                  "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                                  "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                      "original_max_position_embeddings": 64, "mscale": 1.0,
                                                      "mscale_all_dim": 1.0}})
    elif family == "sarvam_mla":           # Sarvam-MLA (Sarvam 105B): DeepSeek-V3's model under a config class of
        from transformers import AutoConfig  # its own (plain q_proj, routing over every expert at once, as released)

        cfg = AutoConfig.for_model(family, **{**common, **_MLA, "q_lora_rank": None, "n_routed_experts": 8,
                                              "n_group": 1, "topk_group": 1, "num_experts_per_tok": 3,
                                              "moe_intermediate_size": 32, "n_shared_experts": 1,
                                              "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
                                              "norm_topk_prob": True, **overrides})
        overrides = {}
    elif family in ("deepseek_v32", "glm_moe_dsa"):   # V3 / GLM-4.7-Flash's blocks with DeepSeek Sparse Attention's
        from transformers import AutoConfig           # indexer (dense while a sequence holds <= index_topk keys)

        base = {k: v for k, v in tiny_config("deepseek_v3" if family == "deepseek_v32" else "glm4_moe_lite").to_dict()
                .items() if k not in ("model_type", "architectures", "rope_interleave")}
        cfg = AutoConfig.for_model(family, **{**base, "index_topk": 64, "index_n_heads": 2, "index_head_dim": 16})
    elif family == "minicpm3":             # MiniCPM3: V2's latent attention (q low rank, rotate-half rope), dense
        from transformers import AutoConfig  # SwiGLU MLPs, scaled embeddings, residual branches and final states

        cfg = AutoConfig.for_model(family, **{**common, **_MLA, "scale_emb": 12, "scale_depth": 1.4,
                                              "dim_model_base": 16, **overrides})
        overrides = {}
    elif family == "youtu":                # Youtu-LLM: V3's latent attention (interleaved rope, q low rank) with dense
        from transformers import AutoConfig  # SwiGLU MLPs in Llama's blocks, tied embeddings

        cfg = AutoConfig.for_model(family, **{**common, **_MLA, **overrides})
        overrides = {}
    elif family == "axk1":                 # A.X-K1: V3 (latent attention, interleaved rope, grouped sigmoid routing, a
        from transformers import AutoConfig  # shared expert) with its MoE blocks' outputs RMS-normed; a dense first one

        cfg = AutoConfig.for_model(family, **{**common, **_MLA, **_MLA_MOE, "routed_scaling_factor": 2.5,
                                              **overrides})
        overrides = {}
    elif family == "glm4_moe_lite":        # GLM-4.7-Flash: V3's latent attention (rotate-half here) and MoE, the
        from transformers import AutoConfig   # dense / sparse blocks by mlp_layer_types

        cfg = AutoConfig.for_model(family, **{**common, **_MLA, **_MLA_MOE, "routed_scaling_factor": 1.8,
                                              "rope_interleave": False})
    elif family == "deepseek_v2":          # V2-Lite's form: q without low rank; group-limited softmax routing, two
        from transformers import DeepseekV2Config  # shared experts, a dense first layer

        cfg = DeepseekV2Config(**{**common, "num_key_value_heads": 4, "q_lora_rank": None,
                                  "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                  "v_head_dim": 12, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                                  "topk_method": "group_limited_greedy", "num_experts_per_tok": 3,
                                  "moe_intermediate_size": 32, "n_shared_experts": 2, "first_k_dense_replace": 1,
                                  "routed_scaling_factor": 1.5})
    elif family == "gpt_oss":              # sinks, sliding / full layers, q/k/v/o biases, yarn, a top-2 MoE of 4
        from transformers import GptOssConfig  # experts with biases and a clamped SwiGLU (a low limit: the clamps
        #                                        bind; transformers 5.1x's modules ignore it and clamp at 7)

        cfg = GptOssConfig(**{**common, "intermediate_size": 48, "head_dim": 16, "num_local_experts": 4,
                              "num_experts_per_tok": 2, "sliding_window": 7, "swiglu_limit": 1.0,
                              "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                  "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                                  "original_max_position_embeddings": 64}})
    elif family in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):   # linear-attention blocks (Gated
        from transformers import AutoConfig                              # DeltaNet), one gated full attention

        extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48) if family != "qwen3_5_text" else {}
        if family == "qwen3_next":
            extra.update(decoder_sparse_step=1, norm_topk_prob=True)
        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 3, "head_dim": 32,
                                              "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8,
                                              "linear_value_head_dim": 12, "linear_num_key_heads": 2,
                                              "linear_num_value_heads": 4,
                                              "layer_types": ["linear_attention", "full_attention",
                                                              "linear_attention"], **extra})
    elif family == "olmo_hybrid":          # Gated DeltaNet blocks (separate projections, beta = 2 sigmoid(b)) around
        from transformers import AutoConfig  # OLMo 2's attention blocks (output norms, whole-projection q / k norms);
        #                                      NoPE as the released checkpoints (rope_theta None) unless overridden
        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 4, "linear_conv_kernel_dim": 4,
                                              "linear_key_head_dim": 8, "linear_value_head_dim": 12,
                                              "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                              "layer_types": ["linear_attention", "full_attention",
                                                              "linear_attention", "full_attention"],
                                              "rope_parameters": {"rope_type": "default", "rope_theta": None},
                                              **overrides})
        overrides = {}
    elif family in ("lfm2", "lfm2_moe"):   # two gated short convolutions around an attention block, GQA, q / k norms;
        from transformers import AutoConfig  # the MoE one: a dense first block, then sigmoid-routed top-2 of 4 experts

        moe = dict(intermediate_size=96, moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                   num_dense_layers=1, use_expert_bias=True, routed_scaling_factor=1.5, norm_topk_prob=True)
        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 3, "intermediate_size": 144,
                                              "conv_L_cache": 3, "block_multiple_of": 16,
                                              "layer_types": ["conv", "full_attention", "conv"],
                                              "tie_word_embeddings": True, **(moe if family == "lfm2_moe" else {})})
    elif family == "lfm3":                 # LFM3: short convolutions around a sliding and a full attention block (a
        from transformers import AutoConfig  # rope table each, the full one proportional), a sigmoid gate per head,
        #                                      sandwich norms on every block
        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 4, "intermediate_size": 96,
                                              "head_dim": 16, "conv_L_cache": 3, "sliding_window": 7,
                                              "layer_types": ["conv", "sliding_attention", "full_attention", "conv"],
                                              "tie_word_embeddings": True, **overrides})
        overrides = {}
    elif family == "granitemoehybrid":     # Granite 4: Mamba-2 blocks around a rotary attention block, a top-2 MoE of
        from transformers import AutoConfig  # 4 experts plus the shared MLP, Granite's multipliers

        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 3, "intermediate_size": 40,
                                              "shared_intermediate_size": 48, "num_local_experts": 4,
                                              "num_experts_per_tok": 2, "position_embedding_type": "rope",
                                              "layer_types": ["linear_attention", "attention", "linear_attention"],
                                              "mamba_n_heads": 8, "mamba_n_groups": 2, "mamba_d_state": 8,
                                              "mamba_d_head": 16, "mamba_d_conv": 4, "mamba_expand": 2,
                                              "mamba_chunk_size": 16, "embedding_multiplier": 3.0,
                                              "residual_multiplier": 0.3, "attention_multiplier": 0.05,
                                              "logits_scaling": 4.0})
    elif family == "bamba":                # Mamba-2 blocks (one group: tensor-parallel ranks share it) around a
        from transformers import AutoConfig  # rotary attention block (half of each head)

        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 3, "attn_layer_indices": [1],
                                              "mamba_n_heads": 8, "mamba_n_groups": 1, "mamba_d_state": 8,
                                              "mamba_d_head": 16, "mamba_d_conv": 4, "mamba_expand": 2,
                                              "mamba_chunk_size": 16,
                                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.5}})
    elif family.startswith("nemotron_h"):  # NemotronH's one sub-layer per layer ("M-M*-MM-"): Mamba-2 +
        from transformers import AutoConfig  # ReLU² MLP, a Mamba-2 before an attention layer (a block without MLP),
        #   NoPE attention + MLP, two Mamba-2 in a row; "_moe" (Nemotron 3's "ME*EM-"): sparse layers of 6 ReLU²
        #   experts, top-2 by DeepSeek-V3's router, a shared expert (with biases), after a Mamba-2 and an attention layer;
        #   "_latent": those experts in a latent space of 40 (fc1_latent_proj / fc2_latent_proj, with biases)
        layers = ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp", "linear_attention",
                  "linear_attention", "mlp"]
        moe = dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp"],
                   n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                   moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5)
        cfg = AutoConfig.for_model("nemotron_h", **{**{k: v for k, v in common.items() if k != "num_hidden_layers"},
                                                    "layers_block_type": layers, "head_dim": 24, "mamba_num_heads": 8,
                                                    "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 8,
                                                    "conv_kernel": 4, "chunk_size": 16, "mlp_bias": True,
                                                    **(moe if family != "nemotron_h" else {}),
                                                    **({"moe_latent_size": 40} if family.endswith("latent") else {})})
    elif family == "mamba2":                     # Mamba-2 blocks (8 heads of 16 in 2 groups, state 8) without attention
        from transformers import AutoConfig
        cfg = AutoConfig.for_model(family, **{**{k: v for k, v in common.items() if k not in (
            "intermediate_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
            "num_hidden_layers": 3, "num_heads": 8, "head_dim": 16, "expand": 2, "n_groups": 2, "state_size": 8,
            "conv_kernel": 4, "chunk_size": 16})
    elif family in ("mamba", "falcon_mamba"):   # Mamba-1 blocks (128 channels, state 8, dt rank 6, kernel 4, conv bias);
        from transformers import AutoConfig        # FalconMamba: dt / B / C RMS-normed
        cfg = AutoConfig.for_model(family, **{**{k: v for k, v in common.items() if k not in (
            "intermediate_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
            "num_hidden_layers": 3, "intermediate_size": 128, "state_size": 8, "time_step_rank": 6, "conv_kernel": 4})
    elif family == "jamba":               # Jamba: Mamba-1 blocks (dt / B / C norms) with attention in block 1 of every
        from transformers import AutoConfig  # 2 (no positions), a top-2 MoE of 4 experts every second block from 0
        cfg = AutoConfig.for_model(family, **{**common, "num_hidden_layers": 4, "attn_layer_period": 2,
                                              "attn_layer_offset": 1, "expert_layer_period": 2,
                                              "expert_layer_offset": 0, "num_experts": 4, "num_experts_per_tok": 2,
                                              "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2,
                                              "mamba_dt_rank": 6, "use_mamba_kernels": False})
    elif family.startswith("falcon_h1"):   # Falcon-H1: attention and Mamba-2 side by side in every block (8 Mamba
        from transformers import AutoConfig  # heads of 16 in 2 groups, state 8) with every muP multiplier away from 1,
        #   the read-out y silu(z); "_norm": the gated group RMSNorm (normed before the gate), q/k/v/o, out_proj and
        #   MLP biases
        extra = dict(mamba_rms_norm=True, mamba_norm_before_gate=True, attention_bias=True, projectors_bias=True,
                     mlp_bias=True) if family.endswith("norm") else {}
        cfg = AutoConfig.for_model("falcon_h1", **{**common, "num_hidden_layers": 3, "head_dim": 16,
                                                   "mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_head": 16,
                                                   "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_d_conv": 4,
                                                   "mamba_chunk_size": 16, "embedding_multiplier": 2.0,
                                                   "lm_head_multiplier": 0.5, "key_multiplier": 0.7,
                                                   "attention_in_multiplier": 1.3, "attention_out_multiplier": 0.8,
                                                   "ssm_in_multiplier": 1.2, "ssm_out_multiplier": 0.9,
                                                   "ssm_multipliers": [0.9, 1.1, 0.8, 1.2, 0.7],
                                                   "mlp_multipliers": [1.4, 0.6], **extra})
    elif family.startswith("llama4"):     # Llama 4's text model: chunked rotary layers (chunks of 8) with L2 q / k
        from transformers import AutoConfig  # norms, a NoPE layer with temperature tuning (scales that change within
        #   the tests' lengths), dense (48 wide) and sparse layers (4 experts, top-1 by sigmoid, inputs scaled, a shared
        #   expert); "_top2": two experts per token, q/k/v/o biases
        extra = dict(num_experts_per_tok=2, attention_bias=True) if family.endswith("top2") else {}
        cfg = AutoConfig.for_model("llama4_text", **{**common, "num_hidden_layers": 4, "head_dim": 16,
                                                     "intermediate_size": 32, "intermediate_size_mlp": 48,
                                                     "num_local_experts": 4, "num_experts_per_tok": 1,
                                                     "interleave_moe_layer_step": 2, "no_rope_layers": [1, 1, 0, 1],
                                                     "attention_chunk_size": 8, "floor_scale": 4, "attn_scale": 0.5,
                                                     "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
                                                     **extra})
    elif family in LLAMA_LIKE_FAMILIES:
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(family, **{**common, **LLAMA_LIKE_FAMILIES[family]})
    elif family in GENERIC_FAMILIES or family in GENERIC_PLANNED or family in GPT_FAMILIES:
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(family, **{**_GENERIC_COMMON,       # (a family's own entries win)
                                              **{**GENERIC_FAMILIES, **GENERIC_PLANNED, **GPT_FAMILIES}[family]})
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():              # HF initialises norms to constants (Gemma's (1 + w) to zero, LayerNorms to
        gemma = family.startswith(("gemma", "vaultgemma"))                 # 1 and 0): make them differ, so a norm
        if gemma or family in LLAMA_LIKE_FAMILIES:                         # in the wrong place cannot pass
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0 if gemma and not family.startswith("gemma4") else 1.0, 0.2)
            for name, buf in (*model.named_buffers(), *model.named_parameters()):
                if name.endswith(("layer_scalar", "router.scale", "per_expert_scale")):   # (Gemma 4's: 1 would
                    buf.uniform_(0.5, 1.5)                                                # hide them)
                elif family.startswith("gemma4") and name.endswith("q_norm.weight"):   # its attention's scale is 1: q
                    buf.normal_(0.3, 0.05)       # normed to RMS 1 would make the tiny heads' softmax one-hot (bf16 chaos)
        if family.startswith(("lfm2", "lfm3", "nemotron_h", "llama4", "falcon_h1")) or family in (
                "granitemoehybrid", "bamba", "mamba", "falcon_mamba", "jamba", "mamba2", "olmo_hybrid"):
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.2)
                elif family.startswith("nemotron_h") and name.endswith(("dt_bias", ".D")):   # the first group's heads: dt under
                    low = torch.arange(p.numel()) < p.numel() // 2    # time_step_min (prompts clamp it, decode steps do
                    if name.endswith("dt_bias"):                       # not), no D x to hide their scan's output
                        p.copy_(torch.where(low, -9.0, 0.5))
                    else:
                        p.masked_fill_(low, 0.0)
        if family.startswith("qwen3_5") or family == "qwen3_next":        # (1 + w) norms at w = 0, the gated one
            for name, p in model.named_parameters():                       # at 1
                if "norm" in name:
                    p.normal_(1.0 if "linear_attn.norm" in name else 0.0, 0.2)
        if family.startswith("deepseek") or family in ("glm4_moe_lite", "glm_moe_dsa", "minicpm3", "youtu", "axk1",
                                                       "sarvam_mla"):
            for name, p in model.named_parameters():        # (RMSNorms at 1 would hide a misplaced one)
                if "norm" in name:
                    p.normal_(1.0, 0.2)
        if family in ("exaone", "internlm3", "helium", "hunyuan_v1_moe",   # HF's linear biases start at 0: random
                      "olmo", "nemotron", "jais2", "hyperclovax"):           # ones, so a bias dropped or misplaced
            for name, p in model.named_parameters():                         # (Helium's reordered rows) cannot pass
                if name.endswith("_proj.bias"):
                    p.normal_(0.0, 0.2)
        for name, buf in (*model.named_buffers(), *model.named_parameters()):   # so would a correction bias at 0
            if name.endswith(("e_score_correction_bias", "expert_bias")):            # (HF's init)
                buf.normal_(0.0, 0.3)
            elif (family.startswith("granite") or family == "flint") and name.endswith("sinks"):   # (sinks at 0)
                buf.normal_(0.0, 0.5)
            elif family == "apertus" and name.endswith(("alpha_p", "alpha_n")):     # (and every layer's xIELU alike)
                buf.normal_(0.5, 0.3)
        if family == "gpt_oss":             # norms at 1, the experts' biases at 0 (HF's init) would hide misplacements
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.2)
                elif name.endswith(("sinks", "bias")):
                    p.normal_(0.0, 0.5 if name.endswith("sinks") else 0.2)
        for module in model.modules():      # nn.LayerNorm, and LayerNorms of their own (Cohere's)
            if "LayerNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.normal_(1.0, 0.2)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.2)
    return model


def fake_quantised_int8(hf):
    """A copy of HF with every block linear's weight replaced by dequantise(quantise(weight)), row by row (what
    ``quantize="int8"`` holds: the fused QKV and gate/up rows are the rows of q, k, v, gate and up; MoE: each
    expert's gate|up and down rows and the shared expert's, the router and the shared expert's gate as they are)."""
    from lightning_dsinfer.kernels import reference

    def fake(w):
        q, s = reference.quantize_int8_per_channel(w)
        w.copy_(reference.dequantize_int8(q, s).to(w.dtype))

    return _fake_quantised(hf, fake)


def fake_quantised_int4(hf, group_size=128):
    """:func:`fake_quantised_int8` for ``quantize="int4"``: each block linear's weight replaced by
    dequantise(quantise(weight)) group-wise (``reference.quantize_int4_groupwise``: a scale per output row and group
    of ``group_size`` inputs; the fused rows are HF's rows, and a row-parallel shard's groups are the whole rows'
    groups when its K is a multiple of the group), cast back to the weight's dtype (the bf16 weights a prompt's
    dequantised GEMM multiplies)."""
    from lightning_dsinfer.kernels import reference

    def fake(w):
        q, s = reference.quantize_int4_groupwise(w.contiguous(), group_size)
        w.copy_(reference.dequantize_int4(q, s, group_size).to(w.dtype))

    return _fake_quantised(hf, fake)


def _fake_quantised(hf, fake):
    """A copy of HF with ``fake`` (in place, on each [out, in] weight) applied to every block linear."""
    ref = copy.deepcopy(hf)
    if ref.config.model_type in GPT_FAMILIES:    # every linear of the blocks (GPT-2's Conv1D weights are [in, out])
        head = ref.get_output_embeddings()
        with torch.no_grad():
            for module in ref.modules():
                if module is head or type(module).__name__ not in ("Linear", "Conv1D"):
                    continue
                fake(module.weight.t() if type(module).__name__ == "Conv1D" else module.weight)
        return ref
    # phi3: packed qkv_proj, gate_up_proj; DeepSeek: q_a / q_b / kv_a (kv_b stays: the engine reads it as is); Qwen3-Next
    # / 3.5's linear attention, LFM2's short convolution, Mamba-2: their input and output projections; the MLPs' (and
    # shared experts': Granite 4's input_linear / output_linear) linears. Routers and Qwen2-MoE's shared gate stay.
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
             "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba", "in_proj", "out_proj",
             "gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w3", "w2", "input_linear", "output_linear",
             "g_proj", "b_proj", "a_proj")     # (OLMo Hybrid's linear attention: its gate, beta and decay projections)
    done = set()
    with torch.no_grad():
        for layer in (ref.model if hasattr(ref, "model") else ref.backbone).layers:   # (Mamba: backbone)
            # (LFM2: feed_forward; Granite 4: mamba, block_sparse_moe + shared_mlp; NemotronH: one mixer per layer)
            parts = [getattr(layer, n) for n in ("self_attn", "linear_attn", "conv", "mamba", "mixer", "mlp",
                                                 "feed_forward", "block_sparse_moe", "shared_mlp") if hasattr(layer, n)]
            parts += [layer] if hasattr(layer, "experts") else []    # (Gemma 4: experts beside the MLP)
            for part in parts:
                dense = [part, *[getattr(part, n) for n in ("shared_expert", "shared_experts") if hasattr(part, n)]]
                for lin in [getattr(m, n, None) for m in dense for n in names]:
                    if isinstance(lin, torch.nn.Linear) and id(lin) not in done:
                        done.add(id(lin))
                        fake(lin.weight)
                experts = getattr(part, "experts", None)
                if experts is None or id(experts) in done:
                    continue
                done.add(id(experts))          # MoE: each expert's gate|up and down, row by row (router stays)
                rows = ((lambda w: w.t()) if ref.config.model_type in ("gpt_oss", "llama4_text")   # (stored
                        else (lambda w: w))                                                        # [in, out])
                for e in range(experts.down_proj.shape[0]):
                    fake(rows((experts.gate_up_proj if hasattr(experts, "gate_up_proj")
                              else experts.up_proj)[e]))           # (NemotronH's experts have no gate)
                    fake(rows(experts.down_proj[e]))
    return ref


def routing_margins(hf, **inputs) -> torch.Tensor:
    """HF's own routing margins on these inputs: [sparse layers, tokens], p_k - p_(k+1) of the router's softmax (a
    near tie, which bf16 rounding can flip, makes a bf16 comparison meaningless there)."""
    margins = []

    def hook(module, args, out):
        top = torch.softmax(out[0].float(), -1).sort(-1, descending=True).values
        margins.append(top[:, module.top_k - 1] - top[:, module.top_k])
    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        hf(**inputs)
    for h in handles:
        h.remove()
    return torch.stack(margins)


def quantised_logits_and_reference(ref, opt):
    """A left-padded batch; the fake-quantised HF's logits and greedy tokens (8 new); ours' logits."""
    ids, mask = padded_batch([12, 5, 9])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        want_tokens = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    return ids, mask, want, want_tokens, opt(input_ids=ids, attention_mask=mask).logits


def assert_fp32_matches_quantised(ref, opt):
    """fp32 logits within 2e-4 / 1e-4 of the fake-quantised HF's on a left-padded batch, greedy tokens identical."""
    ids, mask, want, want_tokens, got = quantised_logits_and_reference(ref, opt)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=1e-4)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False), want_tokens)


def streaming_budget(build) -> int:
    """A ``max_memory`` under which an offloaded engine streams most of its units: ``build(max_memory)`` once with
    plenty of memory, then the plan's own numbers (ring of two of its largest units, the batch, a full prefill
    chunk, the staging, the fewest routed-expert slots) plus half a unit. Tests that need a tight budget take it from here rather than a constant
    that any change of the working-set accounting would shift."""
    from lightning_dsinfer.offload.budget import DEFAULT_PREFILL_TOKENS

    ws = build(256 << 20)._dsinfer_engine.working_set
    return (2 * ws.slot_bytes + ws.batch_size * ws.per_sequence_bytes + DEFAULT_PREFILL_TOKENS * ws.per_token_bytes
            + ws.staging_bytes + ws.expert_slots * ws.expert_slot_bytes + ws.slot_bytes // 2)


def streamed_copy(hf, tier: str, folder, **options):
    """An offloaded copy of ``hf`` (``tier`` "cpu" or "nvme", unit files under ``folder``) whose ``max_memory`` streams
    most of its units (:func:`streaming_budget`); checks that the disk tier really streams."""
    import lightning_dsinfer as dsi

    def build(max_memory, sub):
        return dsi.init_inference(copy.deepcopy(hf), offload=tier, offload_path=str(folder / sub), max_memory=max_memory,
                                  **{"max_batch_size": 4, "max_seq_len": 64, **options})

    opt = build(streaming_budget(lambda mm: build(mm, "sizing")), "off")
    streamer = opt._dsinfer_engine.decoder.streamer
    assert tier == "cpu" or len(streamer.order) >= 2, "nothing is streamed"
    return opt


def optimised_from_checkpoint(hf, folder, **options):
    """``hf``'s config built on meta and optimised from what ``hf.save_pretrained`` writes into ``folder``."""
    import lightning_dsinfer as dsi
    from transformers import AutoModelForCausalLM

    hf.save_pretrained(folder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf.config)
    return dsi.init_inference(meta, checkpoint=str(folder), **{"max_seq_len": 64, "dtype": torch.float32, **options})


def assert_forward_and_generate(hf, opt, ids, mask, new, atol=2e-4, rtol=1e-4):
    """fp32 logits of a plain forward and of one with HF's cache, and greedy tokens, as HF's on this batch."""
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    for use_cache in (False, True):
        got = opt(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=atol, rtol=rtol)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False), tokens)


def assert_c_step_matches_torch(opt, layer: int, c_function: str, rows: int = 3):
    """A bf16 CPU decode step of block ``layer``'s linear-state mixer through ``cpu_gemv.<c_function>`` and through the
    module's torch ops (the C call declined), on the same random in_proj rows, convolution history and state of the
    engine cache: the block's output within a bf16 rounding, the new state within 1e-5, the history identical. (Falcon-H1:
    the Mamba-2 mixer beside the attention, its read-out before the shared out GEMM.)"""
    from lightning_dsinfer.kernels import cpu_gemv
    from lightning_dsinfer.modules.transformer import Step

    cache = opt._dsinfer_engine.cache
    mixer = opt._dsinfer_engine.decoder.layers[layer].attn
    if hasattr(mixer, "mamba"):          # (gated_deltanet.ParallelMixer)
        mixer = mixer.mamba
        width, run = mixer.inner + mixer.channels + mixer.h, mixer.read_out
    else:
        width, run = mixer.qkv.out_features, lambda p, s: mixer.from_qkv(p, None, s)
    proj = torch.randn(rows, 1, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    history, state = cache.conv[layer][:rows], cache.state[layer][:rows]
    real = getattr(cpu_gemv, c_function)
    results = []
    for c_call in (True, False):
        history.copy_(torch.randn(history.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
        state.copy_(torch.randn(state.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
        calls = []
        setattr(cpu_gemv, c_function, lambda *a, **k: calls.append(real(*a, **k) if c_call else None) or calls[-1])
        try:
            out = run(proj, Step(cos=None, sin=None, mask=None, cache=cache, start=7, q_start=7, decoding=True))
        finally:
            setattr(cpu_gemv, c_function, real)
        assert calls and all((c is not None) == c_call for c in calls), calls    # (the C run did run in C)
        results.append((out.float(), history.clone(), state.clone()))
    (out, hist, st), (want, want_hist, want_st) = results
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(hist, want_hist)
    torch.testing.assert_close(st, want_st, atol=1e-5, rtol=1e-5)


def hf_steps(hf, ids, mask, seq, new):
    """HF's logits [B, new, V] (fp32) for each of ``new`` tokens generated after the prompt: the prompt, then the
    tokens of ``seq`` one at a time through HF's own cache (its one-token step, as its generate runs it, whatever
    tokens those are; the cache built as HF's model builds it: windowed and linear-state layers as the config says)."""
    from transformers import DynamicCache

    cache, t = DynamicCache(config=hf.config), ids.shape[1]
    with torch.no_grad():
        steps = [hf(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]]
        for i in range(new - 1):
            mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
            steps.append(hf(input_ids=seq[:, t + i, None], attention_mask=mask, cache=cache,
                            use_cache=True).logits[:, -1])
    return torch.stack(steps, 1).float()


def assert_steps_match_hf(hf, opt, lengths=(12, 5, 9, 3), new=8, atol=2e-4, rtol=1e-4):
    """Prompt logits on a left-padded batch; each decode step's logits against HF's own steps over the same tokens
    (:func:`hf_steps`); fp32: greedy tokens identical to HF's generate (bf16: a near tie may flip, so the steps follow
    our tokens)."""
    ids, mask = padded_batch(list(lengths), seed=1)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits.float()
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    got = opt(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=atol, rtol=rtol)
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                       return_dict_in_generate=True)
    if hf.dtype == torch.float32:
        assert torch.equal(out.sequences, ref)
    torch.testing.assert_close(torch.stack(out.scores, 1).float(), hf_steps(hf, ids, mask, out.sequences, new),
                               atol=atol, rtol=rtol)


def assert_cache_the_caller_builds(hf, opt, lengths=(7, 4), calls=3, atol=2e-4, rtol=1e-4):
    """``DynamicCache(config=model.config)`` built by the caller for each model: a left-padded prompt, then one-token
    steps (HF's greedy token), each call's logits as HF's through its own cache. Returns (ours, theirs)."""
    from transformers import DynamicCache

    ids, mask = padded_batch(list(lengths), seed=3)
    ours, theirs = DynamicCache(config=opt.config), DynamicCache(config=hf.config)
    step_ids, valid = ids, mask.bool()
    for _ in range(calls):
        with torch.no_grad():
            want = hf(input_ids=step_ids, attention_mask=mask, cache=theirs, use_cache=True).logits
        got = opt(input_ids=step_ids, attention_mask=mask, cache=ours, use_cache=True).logits
        torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=atol, rtol=rtol)
        step_ids, valid = want[:, -1:].argmax(-1), torch.ones(len(lengths), 1, dtype=torch.bool)
        mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=mask.dtype)], 1)
    return ours, theirs


def optimised_copy(hf, **options):
    import lightning_dsinfer as dsi

    return dsi.init_inference(copy.deepcopy(hf), **options)


def assert_matches_hf(hf, opt, ids, mask, new_tokens=8, atol=2e-4, rtol=1e-4):
    """The optimised model against HF on one left-padded batch: logits at the real tokens within (atol, rtol),
    greedy tokens identical."""
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    got = opt(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=atol, rtol=rtol)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False),
                       want)


def assert_bf16_within_hf_error(truth, hf, opt):
    """bf16 against HF bf16 and the fp32 model (``truth``), on a left-padded prompt with HF's greedy continuation, and
    ours' decode steps teacher-forced, where the tiny model carries HF's own bf16 error past the fixed tolerance of
    :func:`assert_bf16_follows_hf` (Gemma 4, Youtu, A.X-K1). Gemma 4's tiny random models are chaotic in bf16: every
    sub-layer's output is normed back to unit scale before its residual add, so rounding noise grows layer by layer
    and HF's own bf16 logits sit
    0.1-1.1 from its fp32 ones at worst (the Llama or Gemma 3 tiny models: ~0.04), where two bf16 implementations
    differ by as much as either does from fp32. So the bound is HF's own error: ours no further from fp32 than 1.5x
    HF's on average and 2x at worst, and from HF bf16 within 2x HF's own average; a misplaced op (an error of the
    logits' own scale, ~3 at worst, ~1 on average) does not meet it."""
    ids, mask = padded_batch([12, 5, 9], seed=1)
    full = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        seq = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                       return_dict_in_generate=True)
    checks = [(opt(input_ids=seq, attention_mask=full).logits.float(), seq, full.bool(), slice(None)),
              (torch.stack(out.scores, dim=1).float(), out.sequences, torch.ones(3, 6, dtype=torch.bool),
               slice(-7, -1))]
    for got, tokens, valid, cols in checks:
        with torch.no_grad():
            want = hf(input_ids=tokens, attention_mask=full).logits.float()[:, cols]
            exact = truth(input_ids=tokens, attention_mask=full).logits[:, cols]
        own, ours = (want - exact)[valid].abs(), (got - exact)[valid].abs()
        assert own.max() < 1.5 < exact[valid].abs().max()      # (the premise: HF's bf16 noise below the logits' scale)
        assert ours.mean() <= 1.5 * own.mean() and ours.max() <= 2 * own.max(), (ours.mean(), own.mean(), ours.max())
        assert (got - want)[valid].abs().mean() <= 2 * own.mean()


def assert_bf16_follows_hf(truth, hf, opt):
    """bf16: ``opt`` (optimised from ``hf``, HF's bf16 model; ``truth`` the same model in fp32) on a left-padded batch
    and HF's greedy continuation of it: the prompt's logits and the decode steps' (teacher-forced) within 6e-2 / 2e-2
    of HF bf16's, and the prompt's no further from fp32 than HF bf16's own (x1.3): a model whose arithmetic differs
    from HF's in rounding only (MoE models: route every expert, so that no near tie flips an expert)."""
    ids, mask = padded_batch([12, 5, 9], seed=1)
    full = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        seq = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        want = hf(input_ids=seq, attention_mask=full).logits.float()
        exact = truth(input_ids=seq, attention_mask=full).logits
    got = opt(input_ids=seq, attention_mask=full).logits.float()
    valid = full.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=6e-2, rtol=2e-2)
    assert (got - exact)[valid].abs().max() <= 1.3 * (want - exact)[valid].abs().max()
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                       return_dict_in_generate=True)
    with torch.no_grad():
        again = hf(input_ids=out.sequences, attention_mask=full).logits.float()
    torch.testing.assert_close(torch.stack(out.scores, dim=1).float(), again[:, -7:-1], atol=6e-2, rtol=2e-2)


def padded_batch(lengths, vocab=97, seed=0):
    """Left-padded prompts of the given lengths (pad id 0, tokens in [3, vocab))."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, t - n:] = 1
    return ids, mask


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]

# Families without a fused policy (tensor parallel only, through the generic path). Split by their own tp
# plan: gpt_neox (QKV fused per head), olmo_hybrid (q/k/v gathered because its q/k norms span all heads; planned on
# meta only, GENERIC_PLANNED). By the generic rule: opt, stablelm, and bloom, whose fused QKV stays whole (its layout
# cannot be told from shapes) while its MLP is split. (phi3, packed q|k|v and gate|up, and olmo2 have fused policies
# now; the generic planner's split of phi3's packed tensors is still tested on a meta model.)
_GENERIC_COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=97, initializer_range=0.1, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
GENERIC_FAMILIES = {      # families without a fused policy (the GPT ones, OLMo, OLMo 2, MPT and Persimmon have one now)
    "cohere_compass_text": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                max_position_embeddings=256, sliding_window=7,
                                layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                 for t in ("sliding_attention", "full_attention")}),
    "gpt_neox_japanese": dict(num_attention_heads=4, intermediate_multiple_size=2, max_position_embeddings=256),
    "biogpt": dict(num_attention_heads=4, intermediate_size=96, max_position_embeddings=256),
}
# Families without a fused policy whose plan the planner's tests read on meta models, not run end to end: OLMo-Hybrid
# (OLMo 2's attention in its full-attention layer, whose q / k norms span all heads; a linear-attention layer its plan
# leaves whole) saves renamed and merged tensors that transformers converts on load, which the generic path's
# checkpoint loader does not (from memory it runs: max |dlogits| 1.4e-6 at TP=2)
GENERIC_PLANNED = {
    "olmo_hybrid": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                        max_position_embeddings=256),
}
# (the GPT families' test configs, also used by the planner's tests on meta models)
GPT_FAMILIES = {
    "gpt_neox": dict(num_attention_heads=4, intermediate_size=96, attention_bias=True, max_position_embeddings=256,
                     rotary_pct=0.5),
    "opt": dict(num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=256),
    "stablelm": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                     use_qkv_bias=True, partial_rotary_factor=0.5),
    "bloom": dict(n_head=4),
    "phi": dict(num_attention_heads=4, intermediate_size=96, max_position_embeddings=256, partial_rotary_factor=0.5),
    "starcoder2": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                       max_position_embeddings=256, sliding_window=7),
    "gptj": dict(n_head=4, n_inner=96, n_positions=256, rotary_dim=8),
    "gpt2": dict(n_head=4, n_inner=96, n_positions=256),
    "falcon": dict(num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, bias=True,
                   ffn_hidden_size=96),
    "gpt_neo": dict(num_heads=4, num_layers=2, intermediate_size=96, max_position_embeddings=256,
                    attention_types=[[["global", "local"], 1]], window_size=7),
    "gpt_bigcode": dict(n_head=4, n_inner=96, n_positions=256, multi_query=True),
    "cohere": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                   logit_scale=0.5, rope_theta=5000.0),
    # Command R7B: a sliding-window layer that rotates, a full-attention NoPE layer
    "cohere2": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                    logit_scale=0.5, rope_theta=5000.0, sliding_window=7,
                    layer_types=["sliding_attention", "full_attention"]),
    # Cohere 2 MoE: Cohere 2's parallel blocks (scaled logits, interleaved rotary), a dense full-attention layer that
    # rotates, a sparse NoPE full-attention one, a sparse sliding one; top-2 of 4 experts + a shared expert, averaged
    "cohere2_moe": dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        intermediate_size=32, prefix_dense_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                        num_shared_experts=1, max_position_embeddings=256, logit_scale=0.5, rope_theta=5000.0,
                        sliding_window=7, layer_types=["full_attention", "full_attention", "sliding_attention"],
                        mlp_layer_types=["dense", "sparse", "sparse"]),
    # MPT: ALiBi with MPT's slopes (6 heads: not a power of 2), Wqkv's q | k | v rows, LayerNorms without a bias, GeLU
    # (erf); its MLP is 4 x hidden whatever expansion_ratio says
    "mpt": dict(n_heads=6, hidden_size=96, max_seq_len=256),
    # CodeGen: GPT-J's block with q, v, k packed in 4 groups of heads (8 heads: 2 a group), interleaved rotary on 8 of
    # each head's 16 dims
    "codegen": dict(hidden_size=128, n_head=8, n_inner=96, n_positions=256, rotary_dim=8),
    # Jais 2: GQA, head_dim != hidden / heads, q/k/v/o and MLP biases, a ReLU-squared MLP, LayerNorms
    "jais2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=96,
                  max_position_embeddings=256),
    # DBRX: bias-free LayerNorms, GQA q | k | v rows in Wqkv clamped by clip_qkv (0.5: most of them), a top-2 MoE of 4
    # experts in every layer (w1 / v1 / w2), renormalised
    "dbrx": dict(d_model=64, n_heads=4, max_seq_len=256,
                 attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
    # Phi-3.5-MoE: LayerNorms, GQA with biases, a window, lm_head bias, the sparsemixer's top-2 of 4 experts (its
    # threshold router_jitter_noise at 0.3, not 0.01: most weights then below 1, the softmaxes over several logits)
    "phimoe": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                   max_position_embeddings=256, attention_bias=True, lm_head_bias=True, sliding_window=7,
                   router_jitter_noise=0.3),
    # Persimmon: GPT-NeoX's per-head packed QKV with biases, q / k LayerNorms per head, partial rotary, ReLU squared
    "persimmon": dict(num_attention_heads=4, intermediate_size=96, max_position_embeddings=256, qk_layernorm=True),
    # Nemotron: LayerNorm1P (1 + weight, a bias), a plain ReLU-squared MLP, head_dim != hidden / heads, partial rotary,
    # q/k/v/o and MLP biases
    "nemotron": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                     head_dim=24, attention_bias=True, mlp_bias=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # OLMo (1): Llama's blocks (GQA, SwiGLU, q/k/v/o biases) under LayerNorms without a weight or a bias
    "olmo": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                 attention_bias=True),
}

# The Llama-like families of policies/llama.py added to the table later (tests/test_llama_families.py), on top of the
# shared tiny widths, each with its distinctive features on (norm weights are randomised by tiny_model)
LLAMA_LIKE_FAMILIES = {
    # no input norms, output norms in fp32, q / k norms over the whole projection, q/k/v/o biases
    "olmo2": dict(attention_bias=True),
    # + sliding / full layers with a rope table each (linear scaling on the full one)
    "olmo3": dict(num_hidden_layers=3, sliding_window=7,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    # sandwich norms, packed gate|up, interleaved rotary on half of each head (partial_rotary_factor 0.5), q/k/v bias
    "glm4": dict(head_dim=16),
    "glm": dict(head_dim=16),
    # a NoPE layer (sliding, as SmolLM3 makes them with use_sliding_window)
    "smollm3": dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=7),
    # q/k/v, o and MLP biases, head_dim != hidden / heads
    "seed_oss": dict(head_dim=24, attention_bias=True, attention_out_bias=True, mlp_bias=True),
    # interleaved rotary over the whole head, biases everywhere, tied embeddings
    "ernie4_5": dict(head_dim=16, use_bias=True),
    # per-head q / k norms after the rotation, biases, NTK-alpha rope (a "dynamic" rope with a fixed alpha: static)
    "hunyuan_v1_dense": dict(head_dim=16, attention_bias=True,
                             rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                              "rope_theta": 10000.0}),
    # OLMo 2's output norms, per-head q / k norms, a sliding layer that rotates and a NoPE full layer
    "exaone4": dict(sliding_window=7, layer_types=["sliding_attention", "full_attention"]),
    # a plain ReLU-squared MLP with biases
    "arcee": dict(head_dim=16, mlp_bias=True),
    # whole-projection q / k norms and a top-2 MoE of 4 experts in every layer (not renormalised)
    "olmoe": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    # Qwen 2's blocks, a sliding layer and a full one
    "ministral": dict(head_dim=16, sliding_window=7, layer_types=["sliding_attention", "full_attention"]),
    # Mistral's blocks (a window), yarn rope, Llama 4's query scaling by position from position 4 (every prompt here
    # reaches it: scales up to 1 + 0.5 log 6)
    "ministral3": dict(head_dim=16, sliding_window=7,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 4, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}),
    # DeepSeek-V3's MoE (grouped sigmoid routing with its correction bias, a shared expert, a dense first layer) under
    # GQA attention with partial rotary, q/k/v biases and per-head q / k norms
    "glm4_moe": dict(num_hidden_layers=3, head_dim=16, attention_bias=True, use_qk_norm=True, n_routed_experts=8,
                     n_group=4, topk_group=2, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1,
                     first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    # the same modules, whole-head rotary, two shared experts, not renormalised
    "sarvam_moe": dict(head_dim=16, use_qk_norm=True, n_routed_experts=6, num_experts_per_tok=2,
                       moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
                       routed_scaling_factor=1.5, norm_topk_prob=False),
    # Qwen 3's attention (a sliding layer) and DeepSeek-V3's MoE
    "dots1": dict(num_hidden_layers=3, head_dim=16, n_routed_experts=8, n_group=2, topk_group=1,
                  num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                  routed_scaling_factor=2.0, norm_topk_prob=True, sliding_window=7,
                  layer_types=["full_attention", "sliding_attention", "full_attention"]),
    # Exaone 4's attention (a sliding layer that rotates, a NoPE full one), pre-norm, DeepSeek-V3's MoE by
    # mlp_layer_types
    "exaone_moe": dict(num_hidden_layers=3, head_dim=16, num_experts=8, n_group=2, topk_group=2,
                       num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                       mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=2.0,
                       norm_topk_prob=True, sliding_window=7,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # OLMo 2's blocks with OLMoE's top-2 MoE of 4 experts
    "flex_olmo": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    # Granite's multipliers with a top-2 MoE of 4 experts (softmax over the top-k logits), and with a shared MLP
    "granitemoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                       residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=4.0),
    "granitemoeshared": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=40, embedding_multiplier=3.0, residual_multiplier=0.3,
                             attention_multiplier=0.05, logits_scaling=4.0),
    # ERNIE 4.5's attention with its MoE: 4 experts, top 2 chosen on softmax scores + a correction bias, two shared
    # experts, the first layer dense
    "ernie4_5_moe": dict(num_hidden_layers=3, head_dim=16, use_bias=True, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, moe_num_shared_experts=2, moe_layer_start_index=1,
                         moe_layer_interval=1),
    # whole-projection q / k norms, partial rotary, a sigmoid-routed top-2 MoE of 4 experts with a correction bias
    "minimax_m2": dict(head_dim=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                       rotary_dim=8),
    # Llama's blocks under other model types: EXAONE 3 (saved under its own transformer.h.* names), InternLM 3 (q/k/v/o
    # and MLP biases, its config ties the two), IQuest-Coder (head_dim != hidden / heads); CWM (a sliding layer)
    "exaone": dict(attention_bias=True),
    "internlm3": dict(head_dim=24, attention_bias=True, mlp_bias=True),
    "iquestcoder": dict(head_dim=24),
    "cwm": dict(head_dim=16, sliding_window=7, layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # interleaved rotary over the whole head, q/k/v and MLP biases, norms scaled in fp32
    "helium": dict(head_dim=16, attention_bias=True, mlp_bias=True),
    # DeepSeek-V3's MoE in every layer (grouped sigmoid routing with its correction bias, a shared expert)
    "solar_open": dict(head_dim=16, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                       moe_intermediate_size=32, n_shared_experts=1, routed_scaling_factor=2.0, norm_topk_prob=True),
    # per-head q / k norms, sliding / full layers with a rope table each, a dense first layer then a softmax top-2 MoE
    # of 4 experts (renormalised)
    "mellum": dict(num_hidden_layers=3, head_dim=16, sliding_window=7,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   mlp_layer_types=["dense", "sparse", "sparse"], num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=32, norm_topk_prob=True,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    # HunYuan's attention (q / k norms after the rotation, biases, NTK-alpha rope), a top-2 MoE of 4 experts plus the
    # shared MLP in every layer
    "hunyuan_v1_moe": dict(head_dim=16, intermediate_size=48, attention_bias=True, num_experts=4, moe_topk=2,
                           rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                            "rope_theta": 10000.0}),
    # Hy3: Qwen 3's attention, a dense first layer then a top-2 MoE of 4 experts (an fp32 sigmoid router choosing on
    # scores + a correction bias, renormalised, scaled) plus a shared expert
    "hy_v3": dict(num_hidden_layers=3, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  num_shared_experts=1, router_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse"]),
    # AFMoE: per-head q / k norms, a sigmoid output gate, sliding layers rotating and a NoPE full one, sandwich norms,
    # muP's scaled embeddings; a dense first layer then a top-2 MoE of 4 experts (sigmoid scores + a bias, scaled) plus
    # a shared expert
    "afmoe": dict(num_hidden_layers=3, head_dim=16, sliding_window=7,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"], num_dense_layers=1,
                  num_experts=4, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=32,
                  route_scale=2.0, mup_enabled=True),
    # Flint: Qwen 3's attention with sinks, a sliding layer (rotating) between full ones (NoPE); the first layer dense,
    # then a sigmoid top-2 of 4 experts (renormalised) plus an ungated shared expert
    "flint": dict(num_hidden_layers=3, head_dim=16, sliding_window=7,
                  layer_types=["full_attention", "sliding_attention", "full_attention"], mlp_only_layers=[0],
                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                  norm_topk_prob=True),
    # Kolibri-1: Exaone 4's attention (a full NoPE layer after a sliding rotating one) in GLM-4's sandwich blocks, top-2
    # of 4 experts chosen on the logits + a correction bias, their sigmoids renormalised, plus shared experts
    "kolibri1": dict(num_hidden_layers=2, head_dim=16, sliding_window=7,
                     layer_types=["sliding_attention", "full_attention"], num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, shared_expert_intermediate_size=40, norm_topk_prob=True),
    # MiMo-V2-Flash: a full layer then sliding ones (twice the KV heads, attention sinks), a rope table per layer type
    # with partial rotary, values of 12 under keys of 16 scaled by 0.7; a dense first layer then DeepSeek-V3's routing
    # (2 groups) of 8 experts, top 2, no shared expert
    "mimo_v2_flash": dict(num_hidden_layers=3, head_dim=16, v_head_dim=12, attention_value_scale=0.7,
                          sliding_window=7, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse"], n_routed_experts=8, num_experts_per_tok=2,
                          n_group=2, topk_group=1, moe_intermediate_size=32, routed_scaling_factor=2.0,
                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0,
                                                              "partial_rotary_factor": 0.5},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0,
                                                                 "partial_rotary_factor": 0.5}}),
    # Granite's multipliers, attention sinks, sliding / full layers, a rope base per layer: the sliding ones 1000, the
    # full ones 100000 and a NoPE full one
    "granite_swa": dict(num_hidden_layers=3, head_dim=16, sliding_window=7, embedding_multiplier=3.0,
                        residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=4.0, attention_bias=True,
                        layer_types=["sliding_attention", "full_attention", "full_attention"],
                        layer_rope_theta=[1000.0, 100000.0, 0]),
    # the same with a top-2 MoE of 4 experts (softmax over the top-k logits) and the shared MLP
    "granitemoe_swa": dict(num_hidden_layers=3, head_dim=16, sliding_window=7, embedding_multiplier=3.0,
                           residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=4.0, intermediate_size=48,
                           num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=40,
                           layer_types=["sliding_attention", "full_attention", "full_attention"],
                           layer_rope_theta=[1000.0, 100000.0, 0]),
    # Granite's multipliers (the logits multiplied), Peri-LN: norms on the attention's and the MLP's outputs too,
    # q/k/v/o and MLP biases
    "hyperclovax": dict(head_dim=16, embedding_multiplier=3.0, residual_multiplier=0.3, attention_multiplier=0.05,
                        logits_scaling=0.25, attention_bias=True, mlp_bias=True, use_post_norm=True),
    # weightless RMSNorms (the embeddings' too), q / k norms after a sign-flipped rotation, ReLU² fc1 / fc2, GQA,
    # soft-capped logits
    "nanochat": dict(head_dim=16, final_logit_softcapping=3.0),
    # Apertus: per-head q / k norms, a plain xIELU MLP (its parameters random per layer), llama3 rope
    "apertus": dict(head_dim=16, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}),
    # Gemma 2's blocks without the output norms: (1 + w) norms, scaled embedding, GeGLU, soft-capped scores and
    # logits, sliding / full layers, query_pre_attn_scalar
    "vaultgemma": dict(num_hidden_layers=3, head_dim=32, sliding_window=7, query_pre_attn_scalar=24,
                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def collate_left_padded(rows):
    """Left-pad a list of 1-D prompts into a batch (what a tokenizer with padding_side='left' does)."""
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def random_prompts(n, vocab=97, seed=0):
    """n prompts of 3..11 random tokens (ids >= 3, so never pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(n)]


def generating_module(model, new_tokens=8):
    """The user's LightningModule of the docs: predict_step = greedy generate (unchanged by dsinfer)."""
    import lightning as L

    class Gen(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            return self.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)

    return Gen(model)


def sampling_agrees_across_ranks(model, ids, mask, new_tokens) -> bool:
    """Sample with a different seed on every rank: tensor-parallel generate must still give every rank the
    same tokens (it syncs the RNG)."""
    import torch.distributed as dist

    import lightning_dsinfer as dsi

    torch.manual_seed(1234 + dsi.parallel_rank())
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, top_k=10)
    gathered = [torch.empty_like(sampled) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sampled)
    return all(torch.equal(g, gathered[0]) for g in gathered)
