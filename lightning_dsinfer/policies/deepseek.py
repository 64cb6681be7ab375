"""DeepSeek-V2 / V3 (``deepseek_v2``, ``deepseek_v3``): multi-head latent attention
and a mixture of experts with a shared expert.

Module tree: ``model.model.layers[i].self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj}``; ``mlp`` a dense SwiGLU MLP in the first ``first_k_dense_replace`` blocks, else
``mlp.gate.{weight, e_score_correction_bias (V3)}``, ``mlp.experts.{gate_up_proj, down_proj}`` (3D, transformers 5;
a checkpoint's per-expert ``experts.{e}.{gate,up,down}_proj``) and ``mlp.shared_experts.{gate,up,down}_proj``.
The routers: V2 softmax top-k ("greedy", or "group_limited_greedy": the best experts of the ``topk_group`` groups
with the best single expert), V3 sigmoid scores, the choice made on scores + correction bias within the
``topk_group`` groups whose two best sum highest, the weights renormalised (``norm_topk_prob``); both scaled by
``routed_scaling_factor`` (``kernels.reference.Routing``). The attention is ``modules/mla.py``. GLM-4.7-Flash
(``glm4_moe_lite``) is V3's attention and MoE with its dense blocks named by ``mlp_layer_types``. MiniCPM3
(``minicpm3``) is V2's latent attention with rotate-half rope and dense SwiGLU MLPs in every block, its embeddings
times ``scale_emb``, each residual branch times ``scale_depth / sqrt(layers)`` (folded into o_proj and down_proj when
read) and its final states divided by ``hidden_size / dim_model_base`` (the logits scaled). Youtu-LLM (``youtu``) is
V3's latent attention (``rope_interleave`` by its config) with dense SwiGLU MLPs, tied embeddings. A.X-K1 (``axk1``) is
V3 whose MoE blocks RMS-norm their output (experts + shared expert: ``mlp.post_mlp_layernorm``) before the residual add
(:class:`~lightning_dsinfer.modules.transformer.SandwichDecoderLayer` with the MLP's output norm only).
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import Routing
from lightning_dsinfer.policies.base import (LayerWeights, MLAShape, MLAWeights, ModelWeights, MoEWeights,
                                             UnsupportedModelError)
from lightning_dsinfer.policies.llama import FamilyTraits, _experts, check_rope, num_experts, sparse_by_first_k
from lightning_dsinfer.policies.weights import (ModuleSource, RowSlices, Scaled, WeightSource, lookups,
                                               rotate_half_pieces, tied_embeddings)

# (GLM-4.7-Flash: V3's attention and MoE; DeepSeek-V3.2 and GLM-5 (glm_moe_dsa): V3's / GLM-4.7-Flash's with DeepSeek
# Sparse Attention, dense up to index_topk keys: _check_sparse_attention)
# (MiniCPM3: V2's latent attention with rotate-half rope, dense SwiGLU MLPs, its scales; Youtu-LLM: V3's latent
# attention with dense MLPs in Llama's blocks; A.X-K1: V3 with its MoE blocks' outputs RMS-normed; Sarvam-MLA: V3's
# model under a config class of its own)
FAMILY = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa", "minicpm3", "youtu", "axk1",
          "sarvam_mla")
_EXPERT_NAMES = FamilyTraits(moe="qwen")       # checkpoint experts as experts.{e}.{gate,up,down}_proj


def routing_of(config) -> Routing:
    """The router of a DeepSeek-V2 / V3 config (V3's also serves GLM-4.5, dots.llm1 and EXAONE MoE:
    policies/llama.py), checked against the config's numbers."""
    experts = num_experts(config)
    if config.model_type == "deepseek_v2":
        method = getattr(config, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"deepseek_v2 with topk_method={method!r} is not supported (the engine routes 'greedy' and "
                f"'group_limited_greedy', as transformers does).")
        grouped = method == "group_limited_greedy"
        routing = Routing(scoring="softmax", groups=config.n_group if grouped else 1,
                          topk_groups=config.topk_group if grouped else 1, group_score="max",
                          scale=float(config.routed_scaling_factor), fp32=True)
    else:
        routing = Routing(scoring="sigmoid", groups=config.n_group or 1, topk_groups=config.topk_group or 1,
                          group_score="top2", renormalize=bool(config.norm_topk_prob), eps=1e-20,
                          scale=float(config.routed_scaling_factor), fp32=True)
    if routing.groups > 1 and (experts % routing.groups or not 0 < routing.topk_groups <= routing.groups):
        raise UnsupportedModelError(
            f"{config.model_type}: n_group={routing.groups} must divide the {experts} routed experts and "
            f"topk_group={routing.topk_groups} be at most n_group.")
    per_group = experts // routing.groups
    if routing.group_score == "top2" and routing.groups > 1 and per_group < 2:
        raise UnsupportedModelError(f"{config.model_type}: groups of {per_group} expert cannot be scored by their two "
                                    f"best (n_group={routing.groups}, {experts} experts).")
    if routing.topk_groups * per_group < config.num_experts_per_tok:
        raise UnsupportedModelError(
            f"{config.model_type}: num_experts_per_tok={config.num_experts_per_tok} experts do not fit in "
            f"topk_group={routing.topk_groups} groups of {per_group}.")
    return routing


def _check_sparse_attention(config, max_seq_len: int) -> None:
    """DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): each query attends to the ``index_topk`` keys its indexer
    scores highest; while a sequence holds at most that many keys, that is every key (HF's top-k over T <= index_topk
    keys selects them all), i.e. the dense latent attention the engine runs. Longer sequences would need the indexer's
    selection, which the engine does not implement: refused before any work."""
    topk = getattr(config, "index_topk", None)
    if topk is not None and max_seq_len > topk:
        raise UnsupportedModelError(
            f"{config.model_type}'s sparse attention keeps each query's top {topk} keys (index_topk); up to {topk} keys "
            f"that is every key, which the engine runs, beyond it the indexer's selection is not implemented. Pass "
            f"max_seq_len <= {topk} (got {max_seq_len}).")


def read_deepseek(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{config.model_type} with mlp_bias=True is not supported (the shared and routed "
                                    f"experts run without biases).")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{config.model_type} with hidden_act={act!r} is not supported (SwiGLU: silu).")
    _check_sparse_attention(config, max_seq_len)
    source = source or ModuleSource(model)
    base = model.model
    with torch.device("cpu"):     # frequencies are computed, not loaded: rebuild them even for a meta model
        rotary = type(base.rotary_emb)(config=config)
    shape = MLAShape(q_lora_rank=config.q_lora_rank or 0, kv_lora_rank=config.kv_lora_rank,
                     qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                     v_head_dim=config.v_head_dim,
                     # (V2 multiplies the rotary pairs as complex numbers: interleaved too; V3.2 and GLM-5 always
                     # interleave, whatever the config says)
                     rope_interleave=config.model_type != "minicpm3" and (
                         config.model_type in ("deepseek_v2", "deepseek_v32", "glm_moe_dsa")
                         or bool(getattr(config, "rope_interleave", True))),
                     # (the latent norms' own eps: HF leaves them at RMSNorm's default, whatever rms_norm_eps is)
                     norm_eps=float(base.layers[0].self_attn.kv_a_layernorm.variance_epsilon))
    rope_type = getattr(rotary, "rope_type", "default")
    check_rope(config, rotary, rotary.inv_freq, rope_type, shape.qk_rope_head_dim, max_seq_len)
    if 2 * rotary.inv_freq.numel() != shape.qk_rope_head_dim:
        raise UnsupportedModelError(f"{config.model_type} has {rotary.inv_freq.numel()} rotary frequencies for "
                                    f"qk_rope_head_dim={shape.qk_rope_head_dim}.")
    names = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    routing = routing_of(config) if getattr(config, "n_routed_experts", 0) else None
    files = source                # (the experts, stacked from a checkpoint's per-expert tensors, read from the files)
    if shape.rope_interleave:     # each head's q rotary rows and the rotary key's rows read in rotate-half order
        slices = {}
        for i in range(config.num_hidden_layers):
            a = f"model.layers.{i}.self_attn"
            q = f"{a}.q_b_proj.weight" if shape.q_lora_rank else f"{a}.q_proj.weight"
            slices[q] = (q, rotate_half_pieces(config.num_attention_heads, shape.qk_head_dim, shape.qk_rope_head_dim,
                                               shape.qk_nope_head_dim))
            for kind in ("weight", "bias"):
                kv = f"{a}.kv_a_proj_with_mqa.{kind}"
                if kv in names:
                    slices[kv] = (kv, rotate_half_pieces(1, shape.cache_dim, shape.qk_rope_head_dim,
                                                         shape.kv_lora_rank))
        source = RowSlices(source, slices)
    minicpm = config.model_type == "minicpm3"
    if minicpm:     # each block's residual branches x scale_depth / sqrt(layers): folded into o_proj and down_proj
        branch = float(config.scale_depth) / config.num_hidden_layers ** 0.5
        source = Scaled(source, {f"model.layers.{i}.{name}.weight": branch for i in range(config.num_hidden_layers)
                                 for name in ("self_attn.o_proj", "mlp.down_proj")})

    ref, opt = lookups(source, names)

    layers = []
    for i in range(config.num_hidden_layers):
        a, m, block = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"model.layers.{i}"
        low_rank = shape.q_lora_rank > 0
        mla = MLAWeights(
            shape=shape, q_a=ref(f"{a}.q_a_proj.weight" if low_rank else f"{a}.q_proj.weight"),
            q_a_norm=ref(f"{a}.q_a_layernorm.weight") if low_rank else None,
            q_b=ref(f"{a}.q_b_proj.weight") if low_rank else None,
            kv_a=ref(f"{a}.kv_a_proj_with_mqa.weight"), kv_a_norm=ref(f"{a}.kv_a_layernorm.weight"),
            kv_b=ref(f"{a}.kv_b_proj.weight"),
            q_a_bias=opt(f"{a}.q_a_proj.bias"), kv_a_bias=opt(f"{a}.kv_a_proj_with_mqa.bias"))
        moe = None
        if routing is not None and sparse_by_first_k(config, i):
            moe = MoEWeights(
                router=ref(f"{m}.gate.weight"), gate_up=_experts(files, config, _EXPERT_NAMES, m, "gate_up_proj"),
                down=_experts(files, config, _EXPERT_NAMES, m, "down_proj"), top_k=config.num_experts_per_tok,
                renormalize=routing.renormalize, weights_in_dtype=False,
                shared_gate=opt(f"{m}.shared_experts.gate_proj.weight"),
                shared_up=opt(f"{m}.shared_experts.up_proj.weight"),
                shared_down=opt(f"{m}.shared_experts.down_proj.weight"),
                routing=routing, router_bias=opt(f"{m}.gate.e_score_correction_bias"))
        dense = moe is None
        layers.append(LayerWeights(
            q=None, k=None, v=None, o=ref(f"{a}.o_proj.weight"), o_bias=opt(f"{a}.o_proj.bias"),
            gate=ref(f"{m}.gate_proj.weight") if dense else None, up=ref(f"{m}.up_proj.weight") if dense else None,
            down=ref(f"{m}.down_proj.weight") if dense else None,
            input_norm=ref(f"{block}.input_layernorm.weight"),
            post_norm=ref(f"{block}.post_attention_layernorm.weight"),
            mlp_out_norm=opt(f"{m}.post_mlp_layernorm.weight"), moe=moe, mla=mla))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=1, head_dim=shape.v_head_dim, intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps,
        scaling=float(base.layers[0].self_attn.scaling),
        inv_freq=rotary.inv_freq.detach(), attention_scaling=float(rotary.attention_scaling), rope_type=rope_type,
        embed=ref("model.embed_tokens.weight"), final_norm=ref("model.norm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, mla=shape,
        # (MiniCPM3: the embeddings x scale_emb in the embedding module, the scale rounded to the weights' dtype; the
        # final hidden states / logits_scaling before lm_head: the logits scaled, lm_head being linear)
        embed_scale=float(config.scale_emb) if minicpm else None, embed_scale_rounded=minicpm,
        embed_scale_on="module" if minicpm else "ids",
        logit_scale=1.0 / float(config.logits_scaling) if minicpm else None)


def has_experts(model_type: str | None) -> bool:
    return model_type in FAMILY
