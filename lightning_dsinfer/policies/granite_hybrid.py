"""Granite 4 and Bamba (``granitemoehybrid``, ``bamba``): Mamba-2 blocks (``layer_types`` "linear_attention": ``mamba``,
``modules/gated_deltanet.Mamba2Mixer``) and GQA attention blocks (rotary when ``position_embedding_type`` is "rope",
else none), each followed by a top-k MoE (``block_sparse_moe``: softmax over the top-k router logits) plus the
shared MLP (``shared_mlp.input_linear`` = gate | up rows, ``output_linear``), or the shared MLP alone when the model
has no experts; Granite's multipliers (embedding, attention scale, residual: folded into every output projection's
and down's weights, logits). Bamba (IBM / Princeton): the same Mamba-2 blocks with rotary attention blocks
(``attn_layer_indices``), a SwiGLU ``feed_forward`` after ``pre_ff_layernorm``, ``final_layernorm``, no multipliers.

Refused with the reason: ``mamba_proj_bias`` (transformers zeroes padded tokens before in_proj, whose bias would then
reach the convolution). Tensor parallelism is refused for it (engine.py); one process, PP and offload run.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import Routing
from lightning_dsinfer.policies.base import (LayerWeights, Mamba2Weights, ModelWeights, MoEWeights,
                                             UnsupportedModelError)
from lightning_dsinfer.policies.llama import FamilyTraits, _experts, check_rope
from lightning_dsinfer.policies.weights import (ModuleSource, RowSlices, WeightSource, attention_refs, lookups,
                                               tied_embeddings)

FAMILY = ("granitemoehybrid", "bamba")
_EXPERT_NAMES = FamilyTraits(moe="granite")


def read_granite_hybrid(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    if getattr(config, "mamba_proj_bias", False):
        raise UnsupportedModelError("granitemoehybrid with mamba_proj_bias=True is not supported (padded tokens' "
                                    "in_proj bias would reach the convolution); mamba_proj_bias=False is.")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"granitemoehybrid with hidden_act={act!r} is not supported (SwiGLU: silu).")
    source = source or ModuleSource(model)
    files = source
    base = model.model
    bamba = config.model_type == "bamba"
    head_dim = config.hidden_size // config.num_attention_heads
    rope = bamba or getattr(config, "position_embedding_type", None) == "rope"
    if rope:
        with torch.device("cpu"):     # frequencies are computed, not loaded: rebuild them even for a meta model
            rotary = type(base.rotary_emb)(config=config)
        inv_freq, scaling, rope_type = rotary.inv_freq.detach(), float(rotary.attention_scaling), rotary.rope_type
        check_rope(config, rotary, inv_freq, rope_type, head_dim, max_seq_len)
    else:
        inv_freq, scaling, rope_type = torch.zeros(1), 1.0, "none"    # (a table nothing reads)
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    inter = config.intermediate_size if bamba else config.shared_intermediate_size
    if not bamba:   # the shared MLP's input_linear: gate rows, then up rows
        slices = {}
        for i in range(config.num_hidden_layers):
            shared = f"model.layers.{i}.shared_mlp"
            for part, first in (("gate", 0), ("up", inter)):
                slices[f"{shared}.{part}_proj.weight"] = (f"{shared}.input_linear.weight", first, inter)
        source = RowSlices(source, slices)
        names |= set(slices)
    ref, opt = lookups(source, names)
    experts = not bamba and (getattr(config, "num_local_experts", 0) or 0) > 0
    layers = []
    for i, kind in enumerate(config.layer_types):
        block = f"model.layers.{i}"
        shared = f"{block}.feed_forward" if bamba else f"{block}.shared_mlp"
        down = f"{shared}.down_proj.weight" if bamba else f"{shared}.output_linear.weight"
        moe = None
        if experts:
            m = f"{block}.block_sparse_moe"
            moe = MoEWeights(router=ref(f"{m}.router.weight"),
                             gate_up=_experts(files, config, _EXPERT_NAMES, m, "gate_up_proj"),
                             down=_experts(files, config, _EXPERT_NAMES, m, "down_proj"),
                             top_k=config.num_experts_per_tok, renormalize=False, weights_in_dtype=True,
                             shared_gate=ref(f"{shared}.gate_proj.weight"), shared_up=ref(f"{shared}.up_proj.weight"),
                             shared_down=ref(down), routing=Routing(scoring="topk_softmax"))
        dense = moe is None
        common = dict(gate=ref(f"{shared}.gate_proj.weight") if dense else None,
                      up=ref(f"{shared}.up_proj.weight") if dense else None, down=ref(down) if dense else None,
                      gate_bias=opt(f"{shared}.gate_proj.bias"), up_bias=opt(f"{shared}.up_proj.bias"),
                      down_bias=opt(f"{shared}.down_proj.bias"), moe=moe, input_norm=ref(f"{block}.input_layernorm.weight"),
                      post_norm=ref(f"{block}.{'pre_ff_layernorm' if bamba else 'post_attention_layernorm'}.weight"),
                      out_scale=None if bamba else config.residual_multiplier)
        if kind in ("linear_attention", "mamba"):
            layers.append(mamba2_layer(ref, opt, f"{block}.mamba", base.layers[i].mamba, **common))
        else:
            a = f"{block}.self_attn"
            layers.append(LayerWeights(
                **attention_refs(ref, opt, a), **common))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate_size=inter,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps,
        scaling=head_dim ** -0.5 if bamba else float(config.attention_multiplier),
        inv_freq=inv_freq, attention_scaling=scaling, rope_type=rope_type, embed=ref("model.embed_tokens.weight"),
        final_norm=ref(f"model.{'final_layernorm' if bamba else 'norm'}.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, rotary=rope, embed_scale=None if bamba else config.embedding_multiplier,
        embed_scale_on="all",
        logit_scale=None if bamba else 1.0 / config.logits_scaling)


def mamba2_weights(ref, opt, prefix: str, mixer: nn.Module, **fields) -> Mamba2Weights:
    """A transformers Mamba-2 mixer's weights under ``prefix`` (Granite 4's, Bamba's, NemotronH's, Mamba-2's,
    Falcon-H1's), its numbers read off the HF ``mixer`` module (its gated norm's weight: None where it has none);
    ``fields``: the rest of :class:`Mamba2Weights` (Falcon-H1's read-out and out_proj)."""
    conv = ref(f"{prefix}.conv1d.weight")
    return Mamba2Weights(
        in_proj=ref(f"{prefix}.in_proj.weight"), conv=conv, conv_bias=opt(f"{prefix}.conv1d.bias"),
        dt_bias=ref(f"{prefix}.dt_bias"), a_log=ref(f"{prefix}.A_log"), d=ref(f"{prefix}.D"),
        norm=opt(f"{prefix}.norm.weight"), heads=mixer.num_heads, head_dim=mixer.head_dim, groups=mixer.n_groups,
        state_size=mixer.ssm_state_size, channels=conv.shape[0], kernel=conv.shape[-1],
        dt_limit=tuple(float(v) for v in mixer.time_step_limit), **fields)


def mamba2_layer(ref, opt, prefix: str, mixer: nn.Module, **common) -> LayerWeights:
    """A Mamba-2 block's weights under ``prefix`` (:func:`mamba2_weights`); ``common``: the block's norms and MLP."""
    return LayerWeights(q=None, k=None, v=None, o=ref(f"{prefix}.out_proj.weight"),
                        mamba=mamba2_weights(ref, opt, prefix, mixer), **common)


def has_experts(model_type: str | None) -> bool:
    return model_type == "granitemoehybrid"
