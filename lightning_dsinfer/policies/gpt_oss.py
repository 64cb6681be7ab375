"""OpenAI's gpt-oss (``gpt_oss``): GQA attention with q/k/v and o biases, attention sinks, sliding-window layers
alternating with full ones (``layer_types``), YaRN rope, and a mixture of experts in every layer.

Module tree: ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` (+ ``.bias``) and ``self_attn.sinks`` (a logit per
head that joins each softmax's denominator), ``mlp.router.{weight, bias}`` (top-k of the biased logits, a softmax
over those k, in the model's dtype), ``mlp.experts.{gate_up_proj [E, H, 2I], gate_up_proj_bias [E, 2I], down_proj
[E, I, H], down_proj_bias [E, H]}``: stored for ``x @ W`` with gate and up in alternate columns (gate ``::2``, up
``1::2``), read here as the engine's [E, 2I, H] (gate rows, then up rows) and [E, H, I]
(:class:`InterleavedExperts`); the experts' activation is a clamped SwiGLU
(:class:`~lightning_dsinfer.kernels.reference.ClampedSwiGLU`). Norms are RMSNorms that scale in fp32 and round once
(HF keeps them in fp32).
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import ClampedSwiGLU, Routing
from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, MoEWeights, UnsupportedModelError
from lightning_dsinfer.policies.llama import FamilyTraits, _sliding_window, rebuilt_rotary
from lightning_dsinfer.policies.weights import (ModuleSource, Rewritten, WeightSource, attention_refs, lookups,
                                               tied_embeddings)

FAMILY = ("gpt_oss",)
_LAYER_TYPES = ("sliding_attention", "full_attention")


class InterleavedExperts(Rewritten):
    """gpt-oss's expert tensors in the engine's layout; other names pass through to ``inner``. ``gate_up`` names
    ([E, H, 2I], gate and up in alternate columns) read as [E, 2I, H], gate rows then up rows; ``gate_up_bias`` names
    ([E, 2I]) likewise as [E, 2I]; ``down`` names ([E, I, H]) as [E, H, I]. A slice of the [gate | up] rows reads
    only the stored columns it covers (a tensor-parallel rank's gate and up rows: its two runs of columns)."""

    def __init__(self, inner: WeightSource, gate_up=(), gate_up_bias=(), down=()):
        super().__init__(inner)
        self.gate_up, self.gate_up_bias, self.down = set(gate_up), set(gate_up_bias), set(down)

    def rewrites(self, name):
        return name in self.gate_up or name in self.gate_up_bias or name in self.down

    def shape(self, name):
        s = self.inner.shape(name)
        return (s[0], s[2], s[1]) if name in self.gate_up or name in self.down else s

    def read(self, name, dim, start, length):
        if name in self.down:
            return self.inner.read(name, {None: None, 0: 0, 1: 2, 2: 1}[dim], start, length).transpose(1, 2)
        if name not in self.gate_up and name not in self.gate_up_bias:
            return self.inner.read(name, dim, start, length)
        matrix = name in self.gate_up
        col = 2 if matrix else 1                  # the stored dim of the interleaved gate / up columns
        if dim == 1:                              # rows [start, start + length) of [gate | up]
            inter = self.inner.shape(name)[col] // 2
            parts = []
            for half in (0, 1):                   # gate rows are stored columns 2j, up rows 2j + 1
                a, b = max(start, half * inter) - half * inter, min(start + length, (half + 1) * inter) - half * inter
                if a < b:
                    pair = self.inner.read(name, col, 2 * a, 2 * (b - a))
                    parts.append(pair.unflatten(col, (b - a, 2)).select(col + 1, half))
            t = torch.cat(parts, dim=col) if len(parts) > 1 else parts[0]
        else:                                     # experts (0), or the hidden columns (2, stored dim 1), or all
            t = self.inner.read(name, {None: None, 0: 0, 2: 1}[dim], start, length)
            pairs = t.unflatten(col, (-1, 2))
            t = torch.cat((pairs.select(col + 1, 0), pairs.select(col + 1, 1)), dim=col)
        return t.transpose(1, 2) if matrix else t


def _refuse(config) -> None:
    """Settings of gpt-oss the engine does not reproduce: refused by name, before any weight is read."""
    if getattr(config, "output_router_logits", False):
        raise UnsupportedModelError(
            "gpt_oss with output_router_logits=True (router logits and the auxiliary load-balancing loss in the "
            "outputs) is not supported by the fused engine: it returns logits only; set output_router_logits=False.")
    types = list(getattr(config, "layer_types", None) or [])
    odd = sorted(set(types) - set(_LAYER_TYPES))
    if odd or len(types) != config.num_hidden_layers:
        raise UnsupportedModelError(
            f"gpt_oss with layer_types={types!r} is not supported: one of {', '.join(_LAYER_TYPES)} per layer "
            f"({config.num_hidden_layers} layers).")
    if "sliding_attention" in types and not getattr(config, "sliding_window", None):
        raise UnsupportedModelError(
            f"gpt_oss with sliding_attention layers and sliding_window={getattr(config, 'sliding_window', None)!r} "
            f"is not supported: give the window's size.")


def _activation(model: nn.Module) -> ClampedSwiGLU:
    """The experts' clamped SwiGLU as the model's expert modules hold it (transformers >= 5.2x reads swiglu_alpha /
    swiglu_limit from the config, earlier versions fix them at 1.702 / 7.0: the modules say which)."""
    found = {(getattr(layer.mlp.experts, "alpha", None), getattr(layer.mlp.experts, "limit", None))
             for layer in model.model.layers}
    if len(found) != 1 or None in next(iter(found)):
        raise UnsupportedModelError(f"gpt_oss experts with (swiglu_alpha, swiglu_limit) in {sorted(found, key=str)} "
                                    f"are not supported: one float pair for every layer.")
    alpha, limit = next(iter(found))
    return ClampedSwiGLU(alpha=float(alpha), limit=float(limit))


def read_gpt_oss(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    _refuse(config)
    act = _activation(model)
    source = source or ModuleSource(model)
    base = model.model
    rotary, rope_type, head_dim = rebuilt_rotary(model, max_seq_len)
    if 2 * rotary.inv_freq.numel() != head_dim:
        raise UnsupportedModelError(f"gpt_oss has {rotary.inv_freq.numel()} rotary frequencies for head_dim={head_dim} "
                                    f"(it rotates the whole head).")
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    layers_at = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    source = InterleavedExperts(source, gate_up=[f"{p}.mlp.experts.gate_up_proj" for p in layers_at],
                                gate_up_bias=[f"{p}.mlp.experts.gate_up_proj_bias" for p in layers_at],
                                down=[f"{p}.mlp.experts.down_proj" for p in layers_at])

    ref, opt = lookups(source, names)

    routing = Routing(scoring="topk_softmax")
    traits = FamilyTraits(sliding_from="layer_types")
    layers = []
    for i, block in enumerate(layers_at):
        a, m = f"{block}.self_attn", f"{block}.mlp"
        moe = MoEWeights(
            router=ref(f"{m}.router.weight"), router_bias=opt(f"{m}.router.bias"),
            gate_up=ref(f"{m}.experts.gate_up_proj"), down=ref(f"{m}.experts.down_proj"),
            gate_up_bias=opt(f"{m}.experts.gate_up_proj_bias"), down_bias=opt(f"{m}.experts.down_proj_bias"),
            top_k=config.num_experts_per_tok, renormalize=False, weights_in_dtype=True, routing=routing, act=act)
        layers.append(LayerWeights(
            **attention_refs(ref, opt, a), gate=None, up=None, down=None,
            input_norm=ref(f"{block}.input_layernorm.weight"),
            post_norm=ref(f"{block}.post_attention_layernorm.weight"),
            sliding_window=_sliding_window(config, traits, i), moe=moe, sinks=ref(f"{a}.sinks")))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps,
        scaling=float(base.layers[0].self_attn.scaling),
        inv_freq=rotary.inv_freq.detach(), attention_scaling=float(rotary.attention_scaling), rope_type=rope_type,
        embed=ref("model.embed_tokens.weight"), final_norm=ref("model.norm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, norm_fp32=True)


def has_experts(model_type: str | None) -> bool:
    return model_type in FAMILY
