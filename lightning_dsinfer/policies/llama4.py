"""Llama 4's text model (``llama4_text``: ``Llama4ForCausalLM``; Llama 4 Scout / Maverick's language model).

Module tree: ``model.model.{embed_tokens, layers[i].{self_attn.{q,k,v,o}_proj, feed_forward, input_layernorm,
post_attention_layernorm}, norm, rotary_emb}``, ``model.lm_head``. What differs from Llama, and how the engine reads it:

- Rotary in complex form: pairs (2i, 2i + 1) of each head rotate together. Each head's q / k rows (and biases) are
  read in the order (0, 2, 4, ..., 1, 3, ...), which makes them the engine's rotate-half layout (q.k is unchanged
  by the same permutation of both; the L2 norm below is over the whole head).
- Layers by ``no_rope_layers`` (1: rotates, 0: NoPE) and ``layer_types``: the rotating layers are chunked
  (``chunked_attention``: a query sees the keys of its chunk of ``attention_chunk_size`` tokens, counted from the
  row's first real token, as transformers' mask) and, with ``use_qk_norm``, L2-norm q and k per head after the
  rotation (RMSNorm with unit weights: ``RotaryFirstAttention``); the NoPE layers attend to everything and, with
  ``attn_temperature_tuning``, scale the queries by their cache column (``TemperatureTunedAttention``).
- ``moe_layers`` are sparse (``feed_forward.router``: top-k of the logits, sigmoid of those; the routed experts read
  their weight times the token, ``Routing.input_scaled``; ``feed_forward.shared_expert`` added). The experts are
  stored transposed, gate_up_proj [E, H, 2I] (gate columns first) and down_proj [E, I, H], and read as the engine's
  [E, 2I, H] / [E, H, I]. The other layers are dense SwiGLU MLPs of ``intermediate_size_mlp``.

Refused with the reason: an activation other than SiLU, layer types other than the two above.
"""
from __future__ import annotations

from torch import nn

from lightning_dsinfer.kernels.reference import Routing
from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, MoEWeights, UnsupportedModelError
from lightning_dsinfer.policies.llama import _interleaved_slices, rebuilt_rotary
from lightning_dsinfer.policies.weights import (ModuleSource, Ones, RowSlices, Transposed, WeightSource,
                                               attention_refs, lookups, tied_embeddings)

FAMILY = ("llama4_text",)
_LAYER_TYPES = ("full_attention", "chunked_attention")


def has_experts(model_type: str | None) -> bool:
    return model_type in FAMILY


def read_llama4(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    if config.hidden_act not in ("silu", "swish"):
        raise UnsupportedModelError(f"llama4_text with hidden_act={config.hidden_act!r} is not supported (the fused "
                                    f"MLPs and experts are SwiGLU: silu).")
    types = list(config.layer_types)
    if set(types) - set(_LAYER_TYPES):
        raise UnsupportedModelError(f"llama4_text: layer types {sorted(set(types) - set(_LAYER_TYPES))}; the engine "
                                    f"runs {', '.join(_LAYER_TYPES)}.")
    rotary, rope_type, head_dim = rebuilt_rotary(model, max_seq_len)
    n = config.num_hidden_layers
    sparse = set(config.moe_layers)
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    source = source or ModuleSource(model)
    source = Transposed(source, [f"model.layers.{i}.feed_forward.experts.{p}" for i in sparse
                                 for p in ("gate_up_proj", "down_proj")])
    slices = _interleaved_slices(config, names, head_dim, 2 * rotary.inv_freq.numel())
    source = RowSlices(source, slices)
    names |= set(slices)
    ref, opt = lookups(source, names)
    unit = Ones().ref((head_dim,))        # (the L2 norm: an RMSNorm with unit weights)
    routing = Routing(scoring="topk_sigmoid", input_scaled=True)
    layers = []
    for i in range(n):
        a, f = f"model.layers.{i}.self_attn", f"model.layers.{i}.feed_forward"
        rotates = bool(config.no_rope_layers[i])
        l2 = rotates and config.use_qk_norm
        moe = None
        if i in sparse:
            s = f"{f}.shared_expert"
            moe = MoEWeights(router=ref(f"{f}.router.weight"), gate_up=ref(f"{f}.experts.gate_up_proj"),
                             down=ref(f"{f}.experts.down_proj"), top_k=config.num_experts_per_tok,
                             renormalize=False, weights_in_dtype=True, shared_gate=ref(f"{s}.gate_proj.weight"),
                             shared_up=ref(f"{s}.up_proj.weight"), shared_down=ref(f"{s}.down_proj.weight"),
                             routing=routing)
        dense = moe is None
        layers.append(LayerWeights(
            **attention_refs(ref, opt, a),
            gate=ref(f"{f}.gate_proj.weight") if dense else None, up=ref(f"{f}.up_proj.weight") if dense else None,
            down=ref(f"{f}.down_proj.weight") if dense else None,
            input_norm=ref(f"model.layers.{i}.input_layernorm.weight"),
            post_norm=ref(f"model.layers.{i}.post_attention_layernorm.weight"),
            q_norm=unit if l2 else None, k_norm=unit if l2 else None,
            qk_norm_kind="after_rotary" if l2 else "head", rotary=rotates,
            attention_chunk=config.attention_chunk_size if types[i] == "chunked_attention" else None,
            attn_temperature=(float(config.attn_scale), float(config.floor_scale), "column")
            if config.attn_temperature_tuning and not rotates else None,
            moe=moe))
    tied = tied_embeddings(model)
    any_dense = len(sparse) < n
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size_mlp if any_dense else config.intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps, scaling=head_dim ** -0.5,
        inv_freq=rotary.inv_freq.detach(), attention_scaling=float(rotary.attention_scaling), rope_type=rope_type,
        embed=ref("model.embed_tokens.weight"), final_norm=ref("model.norm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers)
