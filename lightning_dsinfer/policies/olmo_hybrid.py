"""OLMo Hybrid (``olmo_hybrid``): most blocks linear attention (Gated DeltaNet, ``modules/gated_deltanet.py``, as
Qwen3-Next's), the others OLMo 2's softmax attention.

Module tree: ``model.model.layers[i]`` by ``config.layer_types``:

- ``linear_attention``: pre-norm (``input_layernorm``, ``post_attention_layernorm`` before the MLP); ``linear_attn``
  with separate ``q_proj``, ``k_proj``, ``v_proj``, ``g_proj`` (the output gate: Qwen3-Next's z), ``b_proj``,
  ``a_proj`` (read as the q | k | v | z | b | a rows of one GEMM), ``conv1d`` over q | k | v (checkpoints store it as
  ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``, read joined: :class:`~lightning_dsinfer.policies.weights.Joined`),
  ``A_log``, ``dt_bias``,
  ``o_norm`` (the gated RMSNorm, epsilon 1e-5) and ``o_proj``; with ``linear_allow_neg_eigval`` beta = 2 sigmoid(b)
  (``DeltaNetWeights.beta_scale``).
- ``full_attention``: OLMo 2's block: no input norms, RMSNorms on the attention's and the MLP's outputs
  (``post_attention_layernorm``, ``post_feedforward_layernorm``) before each residual add, q / k RMS-normed over the
  whole projection (``ProjectionNormAttention``); rotary only where the config has a rope (the released checkpoints
  have none: NoPE).

Every RMSNorm but the gated one scales by its weight in fp32 and rounds once (OLMo 2's ``norm_fp32``). What runs: as
Qwen3-Next's (policies/qwen3_next.py): CPU (a bf16 decode step's linear attention in one C call), the Triton path,
tensor parallelism, offload, int8 / int4.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.policies.base import LayerWeights, ModelWeights
from lightning_dsinfer.policies.llama import check_rope
from lightning_dsinfer.policies.qwen3_next import check_hybrid, deltanet_weights
from lightning_dsinfer.policies.weights import (Joined, ModuleSource, WeightSource, attention_refs, lookups,
                                               tied_embeddings)

FAMILY = ("olmo_hybrid",)
GATED_NORM_EPS = 1e-5        # (transformers' OlmoHybridGatedDeltaNet.o_norm: fixed, whatever rms_norm_eps says)


def read_olmo_hybrid(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    types = check_hybrid(config)
    hq, hkv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // hq
    rotary = model.model.rotary_emb is not None
    if rotary:
        with torch.device("cpu"):     # frequencies are computed, not loaded: rebuilt even for a meta model
            rope = type(model.model.rotary_emb)(config=config)
        rope_type = getattr(rope, "rope_type", "default")
        check_rope(config, rope, rope.inv_freq, rope_type, head_dim, max_seq_len)
        inv_freq, scaling = rope.inv_freq.detach(), float(rope.attention_scaling)
    else:                             # (NoPE: no layer reads the table)
        inv_freq, scaling, rope_type = torch.zeros(head_dim // 2), 1.0, "default"
    source = source or ModuleSource(model)
    entries = getattr(source, "entries", None)      # (a checkpoint: its convolutions stored as q / k / v parts)
    if entries is not None:
        linear = [f"model.layers.{i}.linear_attn" for i, kind in enumerate(types) if kind == "linear_attention"]
        joined = {f"{a}.conv1d.weight": [f"{a}.{part}_conv1d.weight" for part in "qkv"] for a in linear}
        joined = {name: parts for name, parts in joined.items() if name not in entries and parts[0] in entries}
        if joined:
            source = Joined(source, joined)
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    ref, opt = lookups(source, names)
    layers = []
    for i, kind in enumerate(types):
        block, m = f"model.layers.{i}", f"model.layers.{i}.mlp"
        mlp = dict(gate=ref(f"{m}.gate_proj.weight"), up=ref(f"{m}.up_proj.weight"), down=ref(f"{m}.down_proj.weight"))
        if kind == "linear_attention":
            a = f"{block}.linear_attn"
            dn = deltanet_weights(ref, a, config, [f"{part}_proj" for part in "qkvgba"], "o_norm",
                                  beta_scale=2.0 if config.linear_allow_neg_eigval else 1.0, norm_eps=GATED_NORM_EPS)
            layers.append(LayerWeights(q=None, k=None, v=None, o=ref(f"{a}.o_proj.weight"), deltanet=dn,
                                       input_norm=ref(f"{block}.input_layernorm.weight"),
                                       post_norm=ref(f"{block}.post_attention_layernorm.weight"), **mlp))
        else:
            a = f"{block}.self_attn"
            layers.append(LayerWeights(
                **attention_refs(ref, opt, a),
                q_norm=ref(f"{a}.q_norm.weight"), k_norm=ref(f"{a}.k_norm.weight"), qk_norm_kind="whole",
                rotary=rotary, input_norm=None, post_norm=None,
                attn_out_norm=ref(f"{block}.post_attention_layernorm.weight"),
                mlp_out_norm=ref(f"{block}.post_feedforward_layernorm.weight"), **mlp))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=hq, num_kv_heads=hkv,
        head_dim=head_dim, intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps, scaling=head_dim ** -0.5, inv_freq=inv_freq, attention_scaling=scaling,
        rope_type=rope_type, embed=ref("model.embed_tokens.weight"), final_norm=ref("model.norm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, norm_fp32=True)
