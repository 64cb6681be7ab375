"""Falcon-H1 (``falcon_h1``, TII): every block runs GQA attention and a Mamba-2 mixer side by side on the same normed
input and adds both to the residual stream, then a SwiGLU MLP: h = h + ssm_out x mamba(norm(h)) + attn_out x
attn(attn_in x norm(h)); h = h + mlp(pre_ff_norm(h)).

The engine's block mixer is ``modules/gated_deltanet.ParallelMixer``: one GEMM for attention's q | k | v and the
mixer's in_proj rows, one for o_proj's and out_proj's columns over the two read-outs side by side. Falcon-H1's muP
multipliers are folded into the weights when read (:class:`~lightning_dsinfer.policies.weights.Scaled`, in fp32):
``attention_in_multiplier`` into q / k / v, ``key_multiplier`` into k (and its bias), ``attention_out_multiplier``
into o_proj, ``ssm_in_multiplier`` into in_proj, ``ssm_multipliers`` into in_proj's z | x | B | C | dt rows,
``ssm_out_multiplier`` into out_proj, ``mlp_multipliers`` into gate_proj and down_proj; ``embedding_multiplier`` and
``lm_head_multiplier`` scale the embeddings and the logits. The mixer's read-out: y silu(z) (``mamba_rms_norm``
False), or the gated group RMSNorm (with ``mamba_norm_before_gate``: normed, then gated).

Module tree: ``model.model.{embed_tokens, layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, mamba.{in_proj,
conv1d, dt_bias, A_log, D, norm, out_proj}, pre_ff_layernorm, feed_forward.{gate,up,down}_proj}, final_layernorm,
rotary_emb}``, ``model.lm_head``. Refused with the reason: ``mamba_proj_bias`` (transformers zeroes padded tokens
before in_proj, whose bias would then reach the convolution), an activation other than SiLU.
"""
from __future__ import annotations

from torch import nn

from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, UnsupportedModelError
from lightning_dsinfer.policies.granite_hybrid import mamba2_weights
from lightning_dsinfer.policies.llama import rebuilt_rotary
from lightning_dsinfer.policies.weights import (ModuleSource, Scaled, WeightSource, attention_refs, lookups,
                                               tied_embeddings)

FAMILY = ("falcon_h1",)


def has_experts(model_type: str | None) -> bool:
    return False


def read_falcon_h1(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors), multipliers folded."""
    c = model.config
    if c.mamba_proj_bias:
        raise UnsupportedModelError("falcon_h1 with mamba_proj_bias=True is not supported (padded tokens' in_proj bias "
                                    "would reach the convolution); mamba_proj_bias=False (the released models) is.")
    if c.hidden_act not in ("silu", "swish"):
        raise UnsupportedModelError(f"falcon_h1 with hidden_act={c.hidden_act!r} is not supported (SwiGLU and the "
                                    f"Mamba-2 convolution's SiLU: silu).")
    rotary, rope_type, head_dim = rebuilt_rotary(model, max_seq_len)
    mixer = model.model.layers[0].mamba
    inner, gn, heads = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size, mixer.num_heads
    z, x, b, cm, dt = (float(m) for m in c.ssm_multipliers)
    s_in, a_in = float(c.ssm_in_multiplier), float(c.attention_in_multiplier)
    gate_m, down_m = (float(m) for m in c.mlp_multipliers)
    factors = {}
    for i in range(c.num_hidden_layers):
        a, m, f = f"model.layers.{i}.self_attn", f"model.layers.{i}.mamba", f"model.layers.{i}.feed_forward"
        ends = (inner, 2 * inner, 2 * inner + gn, 2 * inner + 2 * gn, 2 * inner + 2 * gn + heads)
        factors.update({
            f"{a}.q_proj.weight": a_in, f"{a}.k_proj.weight": a_in * c.key_multiplier, f"{a}.v_proj.weight": a_in,
            f"{a}.k_proj.bias": float(c.key_multiplier), f"{a}.o_proj.weight": float(c.attention_out_multiplier),
            f"{a}.o_proj.bias": float(c.attention_out_multiplier),
            f"{m}.in_proj.weight": list(zip(ends, (s_in * z, s_in * x, s_in * b, s_in * cm, s_in * dt))),
            f"{m}.out_proj.weight": float(c.ssm_out_multiplier), f"{m}.out_proj.bias": float(c.ssm_out_multiplier),
            f"{f}.gate_proj.weight": gate_m, f"{f}.gate_proj.bias": gate_m, f"{f}.down_proj.weight": down_m,
            f"{f}.down_proj.bias": down_m})
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    source = Scaled(source or ModuleSource(model), {k: v for k, v in factors.items() if k in names})
    ref, opt = lookups(source, names)
    gating = ("gate" if not c.mamba_rms_norm else "norm_before_gate" if c.mamba_norm_before_gate
              else "norm_after_gate")
    layers = []
    for i in range(c.num_hidden_layers):
        block = f"model.layers.{i}"
        a, m, f = f"{block}.self_attn", f"{block}.mamba", f"{block}.feed_forward"
        mamba = mamba2_weights(ref, opt, m, model.model.layers[i].mamba, gating=gating,   # (no norm weight: "gate")
                               out_proj=ref(f"{m}.out_proj.weight"), out_proj_bias=opt(f"{m}.out_proj.bias"))
        layers.append(LayerWeights(
            **attention_refs(ref, opt, a),
            gate=ref(f"{f}.gate_proj.weight"), up=ref(f"{f}.up_proj.weight"), down=ref(f"{f}.down_proj.weight"),
            gate_bias=opt(f"{f}.gate_proj.bias"), up_bias=opt(f"{f}.up_proj.bias"), down_bias=opt(f"{f}.down_proj.bias"),
            input_norm=ref(f"{block}.input_layernorm.weight"), post_norm=ref(f"{block}.pre_ff_layernorm.weight"),
            mamba=mamba))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=c.model_type, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=head_dim, intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps, scaling=head_dim ** -0.5,
        inv_freq=rotary.inv_freq.detach(), attention_scaling=float(rotary.attention_scaling), rope_type=rope_type,
        embed=ref("model.embed_tokens.weight"), final_norm=ref("model.final_layernorm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers,
        embed_scale=float(c.embedding_multiplier) if c.embedding_multiplier != 1 else None,
        logit_scale=float(c.lm_head_multiplier) if c.lm_head_multiplier != 1 else None)
