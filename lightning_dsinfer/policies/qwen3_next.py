"""Qwen3-Next and Qwen3.5 (``qwen3_next``, ``qwen3_5_text``, ``qwen3_5_moe_text``): hybrid blocks, most of them linear
attention (Gated DeltaNet, ``modules/gated_deltanet.py``), every ``full_attention_interval``-th one softmax attention
with a gated output.

Module tree: ``model.model.layers[i]`` has ``linear_attn`` or ``self_attn`` by ``config.layer_types``, then ``mlp`` (a
dense SwiGLU, or Qwen2-MoE's sparse block: router ``gate``, 3D ``experts``, ``shared_expert`` behind its sigmoid
``shared_expert_gate``; softmax top-k renormalised, the weights in the model's dtype), with ``input_layernorm`` /
``post_attention_layernorm``. Every RMSNorm but the DeltaNet's gated one scales by (1 + w) in fp32 (Gemma's order:
``norm_offset`` 1). The attention: ``q_proj`` holds per head q's D rows then the output gate's D rows (read as the q
rows, and the gate rows as ``attn_gate``), per-head (1 + w) q / k norms, partial rotary (Qwen3.5's multimodal rope
is plain rope on text: its three position streams are the same; on image tokens they differ: :func:`mrope_axes`); its
output is multiplied by sigmoid(gate) before o_proj. The linear attention: Qwen3.5's ``in_proj_qkv`` / ``in_proj_z`` /
``in_proj_b`` / ``in_proj_a``, or Qwen3-Next's ``in_proj_qkvz`` / ``in_proj_ba`` whose rows are grouped per key head
([q, k, v, z] of each group; [b, a]), read as the q | k | v | z | b | a row pieces of one GEMM; ``conv1d``,
``dt_bias``, ``A_log``, ``norm``, ``out_proj``.

What runs: CPU (a bf16 decode step's linear attention in one C call), CUDA (decode steps through
kernels/gated_delta.py, prompts in torch ops); tensor parallelism (each rank its share of the key and value heads:
their in_proj rows, convolution channels, decays and out_proj columns, one all-reduce after out_proj; the attention
and MLPs as elsewhere; a size that does not divide the key heads is refused in engine.py); pipeline stages; offload;
CUDA graphs; the engine's own decode loop and Hugging Face's (beam search); int8 / int4 linears.
"""
from __future__ import annotations

from torch import nn

from lightning_dsinfer.modules.rotary import mrope_axes
from lightning_dsinfer.policies.base import DeltaNetWeights, LayerWeights, ModelWeights, MoEWeights, UnsupportedModelError
from lightning_dsinfer.policies.llama import FamilyTraits, _experts, rebuilt_rotary
from lightning_dsinfer.policies.weights import (ModuleSource, RowSlices, WeightSource, attention_refs, lookups,
                                               tied_embeddings)

FAMILY = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
_EXPERT_NAMES = FamilyTraits(moe="qwen")        # checkpoint experts as experts.{e}.{gate,up,down}_proj


def _pieces(groups: int, width: int, parts: list[tuple[str, int]]) -> dict[str, list[tuple[int, int]]]:
    """Row pieces of each named part in a tensor of ``groups`` groups of ``width`` rows, each group the parts in
    order (Qwen3-Next's in_proj_qkvz / in_proj_ba; the attention's q | gate per head)."""
    out, offset = {}, 0
    for name, rows in parts:
        out[name] = [(g * width + offset, rows) for g in range(groups)]
        offset += rows
    return out


def is_sparse(config, i: int) -> bool:
    """Whether block i's MLP is a sparse MoE block (Qwen3-Next: by decoder_sparse_step and mlp_only_layers)."""
    if not (getattr(config, "num_experts", 0) or 0):
        return False
    if i in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return (i + 1) % (getattr(config, "decoder_sparse_step", 1) or 1) == 0


def check_hybrid(config) -> list[str]:
    """A Gated DeltaNet hybrid's settings the engine runs (SiLU, linear / full attention blocks, value heads grouped
    under the key heads), checked before any weight is read: its layer types."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{config.model_type} with hidden_act={act!r} is not supported (SwiGLU and the "
                                    f"DeltaNet's convolution take silu).")
    types = list(config.layer_types)
    if set(types) - {"linear_attention", "full_attention"}:
        raise UnsupportedModelError(f"{config.model_type}: layer types {sorted(set(types))}; the engine runs "
                                    f"linear_attention and full_attention blocks.")
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    if hv % hk:
        raise UnsupportedModelError(f"{config.model_type}: linear_num_value_heads={hv} is not a multiple of "
                                    f"linear_num_key_heads={hk}.")
    return types


def deltanet_weights(ref, a: str, config, in_proj: list[str], norm: str, **extra) -> DeltaNetWeights:
    """The Gated DeltaNet of the block whose mixer is ``a``: its in_proj pieces (q | k | v | z | b | a names, read as
    one GEMM), ``conv1d``, ``dt_bias``, ``A_log``, the gated norm ``norm``; ``extra``: DeltaNetWeights' options."""
    conv = ref(f"{a}.conv1d.weight")
    return DeltaNetWeights(
        in_proj=[ref(f"{a}.{name}.weight") for name in in_proj], conv=conv, dt_bias=ref(f"{a}.dt_bias"),
        a_log=ref(f"{a}.A_log"), norm=ref(f"{a}.{norm}.weight"), key_heads=config.linear_num_key_heads,
        value_heads=config.linear_num_value_heads, key_dim=config.linear_key_head_dim,
        value_dim=config.linear_value_head_dim, kernel=conv.shape[-1], **extra)


def read_qwen3_next(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    types = check_hybrid(config)
    source = source or ModuleSource(model)
    files = source                # (experts stacked from a checkpoint's per-expert tensors: read from the files)
    rotary, rope_type, head_dim = rebuilt_rotary(model, max_seq_len)
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    r = hv // hk
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    slices = {}
    for i, kind in enumerate(types):
        block = f"model.layers.{i}"
        if kind == "full_attention":     # q_proj: per head q's rows, then its output gate's
            for suffix in ("weight", "bias"):
                name = f"{block}.self_attn.q_proj.{suffix}"
                if name in names:
                    pieces = _pieces(hq, 2 * head_dim, [("q", head_dim), ("gate", head_dim)])
                    slices[name] = (name, pieces["q"])
                    slices[f"{block}.self_attn.q_gate.{suffix}"] = (name, pieces["gate"])
        elif f"{block}.linear_attn.in_proj_qkvz.weight" in names:     # Qwen3-Next: rows grouped per key head
            a = f"{block}.linear_attn"
            qkvz = _pieces(hk, 2 * dk + 2 * r * dv, [("q", dk), ("k", dk), ("v", r * dv), ("z", r * dv)])
            ba = _pieces(hk, 2 * r, [("b", r), ("a", r)])
            for part, pieces in qkvz.items():
                slices[f"{a}.in_proj_{part}.weight"] = (f"{a}.in_proj_qkvz.weight", pieces)
            for part, pieces in ba.items():
                slices[f"{a}.in_proj_{part}.weight"] = (f"{a}.in_proj_ba.weight", pieces)
        else:                                                             # Qwen3.5: q | k | v rows of in_proj_qkv
            a = f"{block}.linear_attn"
            for part, first, rows in (("q", 0, hk * dk), ("k", hk * dk, hk * dk), ("v", 2 * hk * dk, hv * dv)):
                slices[f"{a}.in_proj_{part}.weight"] = (f"{a}.in_proj_qkv.weight", [(first, rows)])
    if slices:
        source = RowSlices(source, slices)
        names |= set(slices)

    ref, opt = lookups(source, names)

    layers = []
    for i, kind in enumerate(types):
        block, m = f"model.layers.{i}", f"model.layers.{i}.mlp"
        moe = None
        if is_sparse(config, i):
            moe = MoEWeights(
                router=ref(f"{m}.gate.weight"), gate_up=_experts(files, config, _EXPERT_NAMES, m, "gate_up_proj"),
                down=_experts(files, config, _EXPERT_NAMES, m, "down_proj"), top_k=config.num_experts_per_tok,
                # (Qwen3.5-MoE's router always renormalises; Qwen3-Next's by norm_topk_prob)
                renormalize=config.model_type != "qwen3_next" or bool(config.norm_topk_prob), weights_in_dtype=True,
                shared_gate=opt(f"{m}.shared_expert.gate_proj.weight"),
                shared_up=opt(f"{m}.shared_expert.up_proj.weight"),
                shared_down=opt(f"{m}.shared_expert.down_proj.weight"),
                shared_expert_gate=opt(f"{m}.shared_expert_gate.weight"))
        dense = moe is None
        common = dict(gate=ref(f"{m}.gate_proj.weight") if dense else None,
                      up=ref(f"{m}.up_proj.weight") if dense else None,
                      down=ref(f"{m}.down_proj.weight") if dense else None,
                      input_norm=ref(f"{block}.input_layernorm.weight"),
                      post_norm=ref(f"{block}.post_attention_layernorm.weight"), moe=moe)
        if kind == "linear_attention":
            a = f"{block}.linear_attn"
            dn = deltanet_weights(ref, a, config, [f"in_proj_{part}" for part in "qkvzba"], "norm")
            layers.append(LayerWeights(q=None, k=None, v=None, o=ref(f"{a}.out_proj.weight"), deltanet=dn,
                                       **common))
        else:
            a = f"{block}.self_attn"
            layers.append(LayerWeights(
                **attention_refs(ref, opt, a),
                q_norm=ref(f"{a}.q_norm.weight"), k_norm=ref(f"{a}.k_norm.weight"),
                attn_gate=ref(f"{a}.q_gate.weight"), attn_gate_bias=opt(f"{a}.q_gate.bias"), **common))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=hq, num_kv_heads=hkv,
        head_dim=head_dim, intermediate_size=getattr(config, "intermediate_size", None) or config.moe_intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps, scaling=head_dim ** -0.5,
        inv_freq=rotary.inv_freq.detach(), attention_scaling=float(rotary.attention_scaling), rope_type=rope_type,
        embed=ref("model.embed_tokens.weight"), final_norm=ref("model.norm.weight"),
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, norm_offset=1.0,
        mrope_axes=None if getattr(rotary, "mrope_section", None) is None else mrope_axes(
            rotary.inv_freq.numel(), rotary.mrope_section, interleaved=True))


def has_experts(model_type: str | None) -> bool:
    return model_type in ("qwen3_next", "qwen3_5_moe_text")
