"""The Llama family (llama, mistral, qwen2, qwen3): one table, one reader.

All four share the module tree ``model.model.{embed_tokens, layers[i].{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, norm, rotary_emb}`` and
``model.lm_head``; the table records only what differs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, UnsupportedModelError


@dataclass(frozen=True)
class FamilyTraits:
    qk_norm: bool = False           # Qwen3: RMSNorm on q and k per head, before rotary
    sliding_from: str = "none"      # "none" | "config" (every layer) | "layer_types" (per layer)


FAMILY: dict[str, FamilyTraits] = {
    "llama": FamilyTraits(),
    "mistral": FamilyTraits(sliding_from="config"),
    "qwen2": FamilyTraits(sliding_from="layer_types"),
    "qwen3": FamilyTraits(qk_norm=True, sliding_from="layer_types"),
}

# Rope types whose frequencies HF changes with the running sequence length.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _bias(linear: nn.Linear):
    return None if linear.bias is None else linear.bias.detach()


def _sliding_window(config, traits: FamilyTraits, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if traits.sliding_from == "config":
        return window
    if traits.sliding_from == "layer_types":
        types = getattr(config, "layer_types", None)
        if types is not None and types[layer_idx] == "sliding_attention":
            return window
    return None


def read_llama_family(model: nn.Module, max_seq_len: int) -> ModelWeights:
    config = model.config
    traits = FAMILY[config.model_type]
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(
            f"{config.model_type} with hidden_act={act!r} is not supported (the fused MLP is SwiGLU: 'silu').")
    base = model.model
    rotary = base.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        original = getattr(rotary, "original_max_seq_len", config.max_position_embeddings)
        if rope_type == "dynamic" or max_seq_len > original:
            raise UnsupportedModelError(
                f"rope_type={rope_type!r} changes its frequencies with the running sequence length, which the "
                f"static rotary table does not model (max_seq_len={max_seq_len}, original context {original}). "
                f"Supported rope types: default, linear, llama3, yarn, and longrope up to the original context.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = []
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            q=attn.q_proj.weight.detach(), k=attn.k_proj.weight.detach(), v=attn.v_proj.weight.detach(),
            o=attn.o_proj.weight.detach(),
            q_bias=_bias(attn.q_proj), k_bias=_bias(attn.k_proj), v_bias=_bias(attn.v_proj), o_bias=_bias(attn.o_proj),
            gate=mlp.gate_proj.weight.detach(), up=mlp.up_proj.weight.detach(), down=mlp.down_proj.weight.detach(),
            gate_bias=_bias(mlp.gate_proj), up_bias=_bias(mlp.up_proj), down_bias=_bias(mlp.down_proj),
            input_norm=layer.input_layernorm.weight.detach(), post_norm=layer.post_attention_layernorm.weight.detach(),
            q_norm=attn.q_norm.weight.detach() if traits.qk_norm else None,
            k_norm=attn.k_norm.weight.detach() if traits.qk_norm else None,
            sliding_window=_sliding_window(config, traits, i),
        ))
    lm_head = model.lm_head
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps,
        scaling=getattr(base.layers[0].self_attn, "scaling", head_dim ** -0.5),
        inv_freq=rotary.inv_freq.detach(), attention_scaling=float(rotary.attention_scaling), rope_type=rope_type,
        embed=base.embed_tokens.weight.detach(), final_norm=base.norm.weight.detach(),
        lm_head=lm_head.weight.detach(), lm_head_bias=_bias(lm_head),
        tied_embeddings=lm_head.weight is base.embed_tokens.weight,
        layers=layers,
    )
