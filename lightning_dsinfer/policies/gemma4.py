"""Gemma 4's text model (``gemma4_text``: ``Gemma4ForCausalLM``; Gemma 4 E2B / E4B / 31B's language model).

Module tree: ``model.model.{embed_tokens, layers[i].{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp, input_layernorm,
post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm, per_layer_input_gate,
per_layer_projection, post_per_layer_input_norm, layer_scalar}, norm, embed_tokens_per_layer,
per_layer_model_projection, per_layer_projection_norm, rotary_emb}``, ``model.lm_head`` (tied). What differs from Gemma 3,
and how the engine reads it:

- Every RMSNorm scales by its weight (not 1 + w), in fp32, rounding once (``norm_fp32``); attention's scaling is 1 (the
  q / k norms set the scale); v is RMS-normed too, without a weight (``LayerWeights.v_norm``).
- Layers by ``layer_types``: the sliding ones have ``head_dim`` and ``num_key_value_heads``; the full ones their own
  (``config.per_layer_config``: ``global_head_dim``, and with ``attention_k_eq_v`` ``num_global_key_value_heads`` heads
  whose values are the keys' projection, read as a v_proj equal to k_proj) and a "proportional" rope (the first quarter
  of the frequencies turn, the rest are zero: one table over the whole head reproduces it exactly). Each layer carries
  its own shape (``LayerWeights.head_dim`` / ``num_kv_heads``) into its block and its KV cache.
- The last ``num_kv_shared_layers`` layers compute queries only and attend to the K/V of the last earlier layer of their
  type (``LayerWeights.kv_source``; no cache of their own); with ``use_double_wide_mlp`` their MLPs are twice as wide.
- Per-layer inputs (``hidden_size_per_layer_input`` > 0: E2B / E4B): a second embedding table and a projection of the
  token embedding give each token a row per layer (:class:`~lightning_dsinfer.policies.base.PerLayerEmbeddings`), gated
  into the stream after each layer's MLP; then the stream is multiplied by the layer's ``layer_scalar``.

Behind its multimodal wrapper (``Gemma4ForConditionalGeneration``, what ``AutoModelForCausalLM`` gives for the released
checkpoints) the language model runs on the engine (multimodal.py); with images, the wrapper's per-layer ids (image
tokens as padding) are caught and looked up by the engine.

With ``enable_moe_block`` (26B-A4B) every layer has experts beside its dense MLP (``LayerWeights.beside``): the router
reads the block's residual stream, RMS-normed without a weight and scaled (``router.scale``, hidden_size ** -0.5); a
softmax top-k renormalised and times each chosen expert's ``per_expert_scale`` (``Routing.expert_scale``); GeGLU experts
on their own norm of the stream; the MLP's and the experts' outputs each normed, summed, then normed as the MLP's output.

Gemma 4 "unified" (``gemma4_unified_text``: Gemma 4 12B's language model, behind
``Gemma4UnifiedForConditionalGeneration``) has the same blocks without per-layer inputs or experts (its config removes
those attributes): the same reader.

Refused with the reason: bidirectional attention over every token, rope types that change with the length.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import GatedAct, Routing
from lightning_dsinfer.policies.base import (ExpertsBeside, LayerWeights, ModelWeights, MoEWeights, PerLayerEmbeddings,
                                             UnsupportedModelError)
from lightning_dsinfer.policies.llama import _GATED_ACTS, check_rope, typed_ropes
from lightning_dsinfer.policies.weights import ModuleSource, WeightSource, lookups, tied_embeddings

# (Gemma 4 "unified" (gemma4_unified_text, Gemma 4 12B's language model): the same blocks without per-layer inputs or
# experts, whose config attributes it removes)
FAMILY = ("gemma4_text", "gemma4_unified_text")
_LAYER_TYPES = ("full_attention", "sliding_attention")


def has_experts(model_type: str | None) -> bool:
    return model_type in FAMILY       # (26B-A4B: enable_moe_block)


def _refuse(model: nn.Module, config) -> None:
    if getattr(config, "use_bidirectional_attention", None) == "all":
        raise UnsupportedModelError("gemma4_text with use_bidirectional_attention='all' (an encoder-style mask) is not "
                                    "supported: the engine's attention is causal.")
    if set(config.layer_types) - set(_LAYER_TYPES):
        raise UnsupportedModelError(f"gemma4_text: layer types {sorted(set(config.layer_types) - set(_LAYER_TYPES))}; "
                                    f"the engine runs {', '.join(_LAYER_TYPES)}.")
    if config.hidden_activation not in _GATED_ACTS:
        raise UnsupportedModelError(f"gemma4_text with hidden_activation={config.hidden_activation!r} is not supported "
                                    f"(the fused gated MLP takes {', '.join(sorted(_GATED_ACTS))}).")


def kv_sources(config) -> list[int | None]:
    """The layer whose K/V each layer attends to, or None where it computes its own (the last
    ``num_kv_shared_layers`` layers reuse the last earlier layer of their type, as transformers'
    ``kv_sharing_modes``)."""
    n, types = config.num_hidden_layers, list(config.layer_types)
    first_shared = n - (getattr(config, "num_kv_shared_layers", 0) or 0)
    last = {kind: max(j for j in range(first_shared) if types[j] == kind) for kind in set(types[:first_shared])}
    out = []
    for i in range(n):
        if i < first_shared:
            out.append(None)
        elif types[i] not in last:
            raise UnsupportedModelError(f"gemma4_text: layer {i} ({types[i]}) shares K/V but no earlier layer of its "
                                        f"type computes any.")
        else:
            out.append(last[types[i]])
    return out


def _experts(config, ref, p: str) -> MoEWeights | None:
    """26B-A4B's experts of layer ``p`` (``enable_moe_block``): softmax over the router's logits, the top-k renormalised
    and times each chosen expert's ``per_expert_scale``; GeGLU experts [E, 2I, H] / [E, H, I]."""
    if not getattr(config, "enable_moe_block", False):
        return None
    return MoEWeights(router=ref(f"{p}.router.proj.weight"), gate_up=ref(f"{p}.experts.gate_up_proj"),
                      down=ref(f"{p}.experts.down_proj"), top_k=config.top_k_experts, renormalize=True,
                      weights_in_dtype=False, routing=Routing(scoring="softmax", renormalize=True),
                      act=GatedAct(_GATED_ACTS[config.hidden_activation]),
                      expert_scale=ref(f"{p}.router.per_expert_scale"))


def read_gemma4(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    _refuse(model, config)
    with torch.device("cpu"):       # frequencies are computed, not loaded: rebuilt even for a meta model
        rotary = type(model.model.rotary_emb)(config=config)
    ropes, main, sliding = typed_ropes(rotary)
    shapes = [config.per_layer_config[i] for i in range(config.num_hidden_layers)]
    for kind, (inv_freq, _, rope_type) in ropes.items():
        d = next(s.head_dim for s, t in zip(shapes, config.layer_types) if t == kind)
        check_rope(config, rotary, inv_freq, rope_type, d, max_seq_len)
    source = source or ModuleSource(model)
    names = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    ref, opt = lookups(source, names)
    sources = kv_sources(config)
    ple = getattr(config, "hidden_size_per_layer_input", 0) or 0
    layers = []
    for i, (kind, shape, src) in enumerate(zip(config.layer_types, shapes, sources)):
        a, m, p = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"model.layers.{i}"
        own_kv = src is None
        k = ref(f"{a}.k_proj.weight") if own_kv else None
        v = (ref(f"{a}.v_proj.weight") if f"{a}.v_proj.weight" in names else k) if own_kv else None  # (k_eq_v)
        layers.append(LayerWeights(
            q=ref(f"{a}.q_proj.weight"), k=k, v=v, o=ref(f"{a}.o_proj.weight"),
            q_bias=opt(f"{a}.q_proj.bias"), o_bias=opt(f"{a}.o_proj.bias"),
            k_bias=opt(f"{a}.k_proj.bias") if own_kv else None,
            v_bias=(opt(f"{a}.v_proj.bias") if f"{a}.v_proj.weight" in names else opt(f"{a}.k_proj.bias"))
            if own_kv else None,
            gate=ref(f"{m}.gate_proj.weight"), up=ref(f"{m}.up_proj.weight"), down=ref(f"{m}.down_proj.weight"),
            input_norm=ref(f"{p}.input_layernorm.weight"), post_norm=ref(f"{p}.pre_feedforward_layernorm.weight"),
            attn_out_norm=ref(f"{p}.post_attention_layernorm.weight"),
            mlp_out_norm=ref(f"{p}.post_feedforward_layernorm.weight"),
            q_norm=ref(f"{a}.q_norm.weight"), k_norm=ref(f"{a}.k_norm.weight") if own_kv else None,
            sliding_window=config.sliding_window if kind == "sliding_attention" else None,
            head_dim=shape.head_dim, num_kv_heads=shape.num_key_value_heads,
            intermediate_size=model.model.layers[i].mlp.intermediate_size, v_norm=own_kv, kv_source=src,
            per_layer_gate=ref(f"{p}.per_layer_input_gate.weight") if ple else None,
            per_layer_proj=ref(f"{p}.per_layer_projection.weight") if ple else None,
            per_layer_norm=ref(f"{p}.post_per_layer_input_norm.weight") if ple else None,
            layer_scalar=ref(f"{p}.layer_scalar"), moe=_experts(config, ref, p),
            beside=ExpertsBeside(router_scale=ref(f"{p}.router.scale"),
                                 experts_in=ref(f"{p}.pre_feedforward_layernorm_2.weight"),
                                 experts_out=ref(f"{p}.post_feedforward_layernorm_2.weight"),
                                 dense_out=ref(f"{p}.post_feedforward_layernorm_1.weight"))
            if getattr(config, "enable_moe_block", False) else None))
    per_layer = None
    if ple:
        per_layer = PerLayerEmbeddings(
            embed=ref("model.embed_tokens_per_layer.weight"), projection=ref("model.per_layer_model_projection.weight"),
            norm=ref("model.per_layer_projection_norm.weight"), layers=config.num_hidden_layers, dim=ple,
            embed_scale=ple ** 0.5, projection_scale=config.hidden_size ** -0.5, input_scale=2.0 ** -0.5)
    tied = tied_embeddings(model)
    # (the model's shape: the widest layer's, so the memory plans built on it are upper bounds; every layer names its own)
    widest = max(range(len(layers)), key=lambda i: (layers[i].head_dim * layers[i].num_kv_heads, layers[i].head_dim))
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=layers[widest].num_kv_heads, head_dim=layers[widest].head_dim,
        intermediate_size=max(lw.intermediate_size for lw in layers), vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps, scaling=1.0,
        inv_freq=main[0].detach(), attention_scaling=main[1], rope_type=main[2],
        embed=ref("model.embed_tokens.weight"), final_norm=ref("model.norm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, norm_fp32=True,
        embed_scale=config.hidden_size ** 0.5, embed_scale_rounded=True, embed_scale_on="module",
        final_softcap=config.final_logit_softcapping, mlp_act=_GATED_ACTS[config.hidden_activation],
        sliding_inv_freq=sliding[0].detach() if sliding is not None and sliding is not main else None,
        sliding_attention_scaling=sliding[1] if sliding is not None else 1.0, per_layer=per_layer,
        # (a prompt's image blocks: Gemma 4's in its sliding layers only; Gemma 4 unified's, through transformers'
        # generic mask helper, OR-ed into every layer's mask, after the sliding window, as PaliGemma 2's)
        blocks_in="sliding" if config.model_type == "gemma4_text" else "past_window")
