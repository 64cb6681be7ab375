"""Jamba (``jamba``, AI21): Mamba-1 blocks (``mamba``, with RMSNorms of dt, B and C: ``modules/gated_deltanet.
Mamba1Mixer``) and, every ``attn_layer_period`` blocks, GQA attention without positions; every block then a SwiGLU MLP,
or, every ``expert_layer_period`` blocks, a top-k MoE (softmax router in fp32, the top-k weights not renormalised and
rounded to the dtype, as Qwen's).

Module tree: ``model.model.{embed_tokens, layers[i].{input_layernorm, mamba | self_attn, pre_ff_layernorm,
feed_forward.{gate,up,down}_proj | feed_forward.{router, experts}}, final_layernorm}``, ``model.lm_head``; checkpoints
store the experts one by one (stacked on read). Refused with the reason: ``mamba_proj_bias``.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, MoEWeights
from lightning_dsinfer.policies.llama import FamilyTraits, _experts
from lightning_dsinfer.policies.mamba import check_mamba1, mamba1_weights
from lightning_dsinfer.policies.weights import ModuleSource, WeightSource, lookups, tied_embeddings

FAMILY = ("jamba",)
_EXPERT_NAMES = FamilyTraits(moe="qwen")     # checkpoint experts as experts.{e}.{gate,up,down}_proj


def has_experts(model_type: str | None) -> bool:
    return model_type in FAMILY


def read_jamba(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    check_mamba1(config)
    source = source or ModuleSource(model)
    files = source
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    ref, opt = lookups(source, names)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = []
    for i, (kind, experts) in enumerate(zip(config.layers_block_type, config.layers_num_experts)):
        block, f = f"model.layers.{i}", f"model.layers.{i}.feed_forward"
        moe = None
        if experts > 1:
            moe = MoEWeights(router=ref(f"{f}.router.weight"), gate_up=_experts(files, config, _EXPERT_NAMES, f,
                                                                                  "gate_up_proj"),
                             down=_experts(files, config, _EXPERT_NAMES, f, "down_proj"),
                             top_k=config.num_experts_per_tok, renormalize=False, weights_in_dtype=True)
        dense = moe is None
        common = dict(gate=ref(f"{f}.gate_proj.weight") if dense else None,
                      up=ref(f"{f}.up_proj.weight") if dense else None,
                      down=ref(f"{f}.down_proj.weight") if dense else None, moe=moe,
                      input_norm=ref(f"{block}.input_layernorm.weight"),
                      post_norm=ref(f"{block}.pre_ff_layernorm.weight"))
        if kind == "mamba":
            m = f"{block}.mamba"
            layers.append(LayerWeights(q=None, k=None, v=None, o=ref(f"{m}.out_proj.weight"),
                                       mamba1=mamba1_weights(ref, opt, m, model.model.layers[i].mamba, "weights",
                                                             config.rms_norm_eps), **common))
        else:
            a = f"{block}.self_attn"
            layers.append(LayerWeights(q=ref(f"{a}.q_proj.weight"), k=ref(f"{a}.k_proj.weight"),
                                       v=ref(f"{a}.v_proj.weight"), o=ref(f"{a}.o_proj.weight"), rotary=False,
                                       **common))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps, scaling=head_dim ** -0.5,
        inv_freq=torch.zeros(1), attention_scaling=1.0, rope_type="none", embed=ref("model.embed_tokens.weight"),
        final_norm=ref("model.final_layernorm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, rotary=False)
