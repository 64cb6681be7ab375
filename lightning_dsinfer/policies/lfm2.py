"""LFM2 and LFM2-MoE (``lfm2``, ``lfm2_moe``, Liquid AI): hybrid blocks by ``config.layer_types``, most of them a gated short convolution
(``conv``: ``modules/gated_deltanet.ShortConv``), the others GQA attention with per-head q / k RMSNorms
(``q_layernorm`` / ``k_layernorm``, before rotary) and its output projection named ``out_proj``.

Module tree: ``model.model.layers[i].{operator_norm, conv.{in_proj, conv, out_proj} | self_attn.{q,k,v,out}_proj,
ffn_norm, feed_forward.{w1, w3, w2}}``, ``model.model.embedding_norm`` (the final norm, despite its name),
``model.lm_head`` (tied by default). The SwiGLU's width is the one transformers derives
(``block_auto_adjust_ff_dim``): read off w1's rows. LFM2-MoE: from ``num_dense_layers`` on, ``feed_forward`` is a
sparse block (router ``gate``, 3D ``experts``): sigmoid scores, the choice on scores + ``expert_bias`` where the
model has one, the chosen scores renormalised (+1e-6) and scaled by ``routed_scaling_factor``. LFM3 (``lfm3``): the
same blocks plus sliding-window attention layers (``sliding_attention``) with a rope table per attention type (the full
layers' "proportional": its zero frequencies in one table over the head), Qwen 3's names in the attention
(``o_proj``, ``q_norm`` / ``k_norm``) and each head's output times the sigmoid of a gate of its own (``g_proj`` [Hq, H]:
``OutputGatedAttention``'s per-head gate), and with ``use_sandwich_norm`` RMSNorms on every mixer's and MLP's output
before the residual adds (``post_operator_norm``, ``post_ffn_norm``). Refused with the reason: a convolution or
in_proj with a bias (``conv_bias``): transformers zeroes padded tokens before in_proj, whose bias would then reach the
convolution.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import Routing
from lightning_dsinfer.policies.base import (LayerWeights, ModelWeights, MoEWeights, ShortConvWeights,
                                             UnsupportedModelError)
from lightning_dsinfer.policies.llama import FamilyTraits, _experts, check_rope, rebuilt_rotary, typed_ropes
from lightning_dsinfer.policies.weights import ModuleSource, WeightSource, attention_refs, lookups, tied_embeddings

FAMILY = ("lfm2", "lfm2_moe", "lfm3")
_EXPERT_NAMES = FamilyTraits(moe="mixtral")     # checkpoint experts as experts.{e}.{w1, w3, w2}


def read_lfm2(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    if getattr(config, "conv_bias", False):
        raise UnsupportedModelError("lfm2 with conv_bias=True is not supported (padded tokens' in_proj bias would reach "
                                    "the convolution); conv_bias=False (the released models) is.")
    types = list(config.layer_types)
    lfm3 = config.model_type == "lfm3"
    kinds = {"conv", "full_attention"} | ({"sliding_attention"} if lfm3 else set())
    if set(types) - kinds:
        raise UnsupportedModelError(f"{config.model_type}: layer types {sorted(set(types))}; the engine runs "
                                    f"{', '.join(sorted(kinds))} blocks.")
    source = source or ModuleSource(model)
    base = model.model
    sliding = None
    if lfm3:       # (a rope table per attention type: LFM3's rotary module holds one for each)
        head_dim = config.head_dim
        with torch.device("cpu"):
            rotary = type(base.rotary_emb)(config=config)
        ropes, main, sliding = typed_ropes(rotary)
        for inv_freq, _, kind_rope in ropes.values():
            check_rope(config, rotary, inv_freq, kind_rope, head_dim, max_seq_len)
        inv_freq, scaling, rope_type = main
    else:
        rotary, rope_type, head_dim = rebuilt_rotary(model, max_seq_len,
                                                     getattr(base, "rotary_emb", None) or base.pos_emb)  # (LFM2-MoE)
        inv_freq, scaling = rotary.inv_freq, float(rotary.attention_scaling)
    names = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    files = source
    ref, opt = lookups(source, names)
    sparse_from = config.num_dense_layers if config.model_type == "lfm2_moe" else len(types)
    routing = Routing(scoring="sigmoid", renormalize=bool(getattr(config, "norm_topk_prob", True)), eps=1e-6,
                      scale=float(getattr(config, "routed_scaling_factor", 1.0)))
    layers = []
    for i, kind in enumerate(types):
        block, f = f"model.layers.{i}", f"model.layers.{i}.feed_forward"
        moe = None
        if i >= sparse_from:
            moe = MoEWeights(router=ref(f"{f}.gate.weight"), gate_up=_experts(files, config, _EXPERT_NAMES, f,
                                                                              "gate_up_proj"),
                             down=_experts(files, config, _EXPERT_NAMES, f, "down_proj"),
                             top_k=config.num_experts_per_tok, renormalize=routing.renormalize, weights_in_dtype=True,
                             routing=routing, router_bias=opt(f"{f}.expert_bias"))
        dense = moe is None
        common = dict(gate=ref(f"{f}.w1.weight") if dense else None, up=ref(f"{f}.w3.weight") if dense else None,
                      down=ref(f"{f}.w2.weight") if dense else None, moe=moe,
                      input_norm=ref(f"{block}.operator_norm.weight"), post_norm=ref(f"{block}.ffn_norm.weight"),
                      attn_out_norm=opt(f"{block}.post_operator_norm.weight"),      # (LFM3's sandwich norms)
                      mlp_out_norm=opt(f"{block}.post_ffn_norm.weight"))
        if kind == "conv":
            conv = ref(f"{block}.conv.conv.weight")
            layers.append(LayerWeights(
                q=None, k=None, v=None, o=ref(f"{block}.conv.out_proj.weight"),
                shortconv=ShortConvWeights(in_proj=ref(f"{block}.conv.in_proj.weight"), conv=conv,
                                           channels=conv.shape[0], kernel=conv.shape[-1]), **common))
        elif lfm3:     # (Qwen 3's names; a sigmoid gate per head; sliding layers)
            a = f"{block}.self_attn"
            layers.append(LayerWeights(
                **attention_refs(ref, opt, a), q_norm=ref(f"{a}.q_norm.weight"),
                k_norm=ref(f"{a}.k_norm.weight"), attn_gate=opt(f"{a}.g_proj.weight"),
                sliding_window=config.sliding_window if kind == "sliding_attention" else None, **common))
        else:
            a = f"{block}.self_attn"
            layers.append(LayerWeights(
                q=ref(f"{a}.q_proj.weight"), k=ref(f"{a}.k_proj.weight"), v=ref(f"{a}.v_proj.weight"),
                o=ref(f"{a}.out_proj.weight"), q_norm=ref(f"{a}.q_layernorm.weight"),
                k_norm=ref(f"{a}.k_layernorm.weight"), **common))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        intermediate_size=next((lw.gate.shape[0] for lw in layers if lw.gate is not None), config.intermediate_size),
        vocab_size=config.vocab_size, rms_norm_eps=config.norm_eps,
        scaling=head_dim ** -0.5, inv_freq=inv_freq.detach(), attention_scaling=scaling,
        rope_type=rope_type, embed=ref("model.embed_tokens.weight"), final_norm=ref("model.embedding_norm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=opt("lm_head.bias"),
        tied_embeddings=tied, layers=layers,
        sliding_inv_freq=sliding[0].detach() if sliding is not None and sliding is not main else None,
        sliding_attention_scaling=sliding[1] if sliding is not None else 1.0)


def has_experts(model_type: str | None) -> bool:
    return model_type == "lfm2_moe"
