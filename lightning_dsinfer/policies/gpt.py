"""The GPT families on the fused engine: gpt_neox (Pythia), gptj, gpt_neo, phi, stablelm, starcoder2, opt, gpt2,
gpt_bigcode (StarCoder 1, SantaCoder), bloom, falcon, cohere (Command R), cohere2 (Command R7B / A: Cohere's blocks with
sliding-window layers that rotate and full-attention layers that do not), olmo (OLMo 1: Llama's blocks under LayerNorms
without a weight or a bias), nemotron (Nemotron 3 / 4, Minitron: LayerNorm1P, a ReLU-squared MLP, partial rotary),
cohere2_moe (Cohere 2's blocks with experts), mpt (MPT: ALiBi with its own slopes), codegen (CodeGen: GPT-J's block
with a packed qkv_proj), jais2 (Jais 2: LayerNorms, a ReLU-squared MLP), dbrx (DBRX: a top-k MoE in every layer),
phimoe (Phi-3.5-MoE: LayerNorms, the sparsemixer's top-2 MoE in every layer), persimmon (Persimmon: q / k LayerNormed
per head).

What they share, and the Llama table lacks: LayerNorms with a bias; a plain MLP ``down(act(up(x)))`` with biases
(StableLM keeps SwiGLU); the parallel residual ``h + attn(norm1(h)) + mlp(norm2(h))`` (GPT-NeoX and StableLM when
the config says so, GPT-J and Phi always, with one shared norm); positions by (partial) rotary, by a learned table
added to the embeddings (OPT, GPT-2) or by ALiBi (BLOOM). Each family is one row of module names; weight layouts
other than separate q / k / v rows are read as row pieces (:class:`RowSlices`, only the rows a rank owns):

- GPT-NeoX's and BLOOM's ``query_key_value`` interleave q, k, v per head ([H, 3, D] rows), Falcon-40B/180B's per KV
  group (each group's query heads, then its key and value), Falcon-7B's and StarCoder's (multi-query) are q | k | v
  (one KV head);
- GPT-2's ``c_attn`` is q | k | v along its columns, and its ``Conv1D`` weights are stored [in, out]
  (:class:`Transposed`);
- GPT-J and Cohere rotate interleaved pairs (2i, 2i + 1); reordering each head's rotary rows of q and k as (0, 2, 4,
  ..., 1, 3, 5, ...) turns that into the engine's rotate-half layout, and the scores q.k do not change under the same
  permutation of both.

Cohere's LayerNorms have no bias (a zero one is read) and its logits are scaled (``logit_scale``); OLMo's have neither
a weight nor a bias (ones and zeros are read).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import Routing
from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, MoEWeights, UnsupportedModelError
from lightning_dsinfer.policies.llama import check_rope
from lightning_dsinfer.policies.weights import (ModuleSource, Ones, Rewritten, RowSlices, Scaled, Transposed,
                                                WeightSource, Zeros, lookups, rotate_half_pieces, tied_embeddings)


@dataclass(frozen=True)
class GPTFamily:
    base: str                        # the decoder stack's module: embeddings, blocks and final norm hang off it
    embed: str
    layers: str
    final_norm: str
    attn: str                        # in a block
    o: str                           # in the attention module
    up: str                          # in a block
    down: str
    input_norm: str
    post_norm: str | None            # None: one norm feeds attention and MLP
    q: str = "q_proj"                # separate projections, in the attention module ...
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None           # ... or one fused, rows laid out as ``qkv_layout`` (:func:`_qkv_pieces`)
    qkv_layout: str = "heads"
    gate: str | None = None          # SwiGLU (StableLM); None: a plain MLP
    act: str | None = "hidden_act"   # config attribute naming the activation (None: ``fixed_act``)
    fixed_act: str = "gelu_tanh"
    eps: str | None = "layer_norm_eps"   # config attribute (None: 1e-5, nn.LayerNorm's default)
    positions: str = "rotary"        # rotary | rotary_interleaved (GPT-J) | learned | alibi
    pos_embed: str | None = None     # learned: the table, in ``base``, looked up at position + ``pos_offset``
    pos_offset: int = 0
    positions_from_mask: bool = False   # a plain forward without position_ids numbers the tokens by the mask (OPT)
    parallel: str = "never"          # never | always | config (``use_parallel_residual``)
    conv1d: bool = False             # GPT-2: 2-D block weights stored [in, out]
    embed_norm: str | None = None    # BLOOM: a LayerNorm of the embeddings, in ``base``
    sliding: str = "none"            # "config": ``config.sliding_window`` on every layer (StarCoder2); "local":
                                     # ``window_size`` on the layers ``attention_layers`` calls local (GPT-Neo);
                                     # "layer_types": on the sliding_attention ones, and only those rotate (Cohere 2:
                                     # the full-attention layers are NoPE)
    unscaled: bool = False           # GPT-Neo: the scores are not scaled by 1 / sqrt(head_dim)
    norms: str = "affine"            # "affine": LayerNorms with a weight (and a bias, else zeros); "none": without
                                     # either (OLMo: ones and zeros are read); "1p": scaled by 1 + weight (Nemotron's
                                     # LayerNorm1P: the 1 added when read, :class:`PlusOne`)
    moe: str = "none"                # "cohere2": Cohere 2 MoE's sparse MLPs by ``mlp_layer_types`` (router
                                     # ``mlp.gate``, experts, ``mlp.shared_experts`` summed or averaged in); "dbrx":
                                     # every layer sparse, DBRX's experts (:class:`DbrxExperts`); "phimoe": every
                                     # layer sparse, Phi-3.5-MoE's sparsemixer router


_NEOX_MLP = dict(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", input_norm="input_layernorm",
                 post_norm="post_attention_layernorm")

FAMILY: dict[str, GPTFamily] = {
    "gpt_neox": GPTFamily(base="gpt_neox", embed="embed_in", layers="layers", final_norm="final_layer_norm",
                          attn="attention", qkv="query_key_value", o="dense", parallel="config", **_NEOX_MLP),
    "bloom": GPTFamily(base="transformer", embed="word_embeddings", layers="h", final_norm="ln_f",
                       attn="self_attention", qkv="query_key_value", o="dense", act=None, eps="layer_norm_epsilon",
                       positions="alibi", embed_norm="word_embeddings_layernorm", **_NEOX_MLP),
    "phi": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="final_layernorm",
                     attn="self_attn", o="dense", up="mlp.fc1", down="mlp.fc2", input_norm="input_layernorm",
                     post_norm=None, parallel="always"),
    "stablelm": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                          o="o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                          input_norm="input_layernorm", post_norm="post_attention_layernorm", parallel="config"),
    "starcoder2": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                            o="o_proj", up="mlp.c_fc", down="mlp.c_proj", input_norm="input_layernorm",
                            post_norm="post_attention_layernorm", eps="norm_epsilon", sliding="config"),
    "gpt_neo": GPTFamily(base="transformer", embed="wte", layers="h", final_norm="ln_f", attn="attn.attention",
                         o="out_proj", up="mlp.c_fc", down="mlp.c_proj", input_norm="ln_1", post_norm="ln_2",
                         act="activation_function", eps="layer_norm_epsilon", positions="learned", pos_embed="wpe",
                         sliding="local", unscaled=True),
    "gptj": GPTFamily(base="transformer", embed="wte", layers="h", final_norm="ln_f", attn="attn", o="out_proj",
                      up="mlp.fc_in", down="mlp.fc_out", input_norm="ln_1", post_norm=None, parallel="always",
                      act="activation_function", eps="layer_norm_epsilon", positions="rotary_interleaved"),
    "opt": GPTFamily(base="model.decoder", embed="embed_tokens", layers="layers", final_norm="final_layer_norm",
                     attn="self_attn", o="out_proj", up="fc1", down="fc2", input_norm="self_attn_layer_norm",
                     post_norm="final_layer_norm", act="activation_function", eps=None, positions="learned",
                     pos_embed="embed_positions", pos_offset=2, positions_from_mask=True),
    "falcon": GPTFamily(base="transformer", embed="word_embeddings", layers="h", final_norm="ln_f",
                        attn="self_attention", qkv="query_key_value", o="dense", act="activation",
                        eps="layer_norm_epsilon", **_NEOX_MLP),   # (norms, layout, residual: :func:`_falcon`)
    "cohere": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                        o="o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                        input_norm="input_layernorm", post_norm=None, parallel="always",
                        positions="rotary_interleaved"),
    "cohere2": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                         o="o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                         input_norm="input_layernorm", post_norm=None, parallel="always",
                         positions="rotary_interleaved", sliding="layer_types"),
    "gpt_bigcode": GPTFamily(base="transformer", embed="wte", layers="h", final_norm="ln_f", attn="attn", qkv="c_attn",
                             o="c_proj", up="mlp.c_fc", down="mlp.c_proj", input_norm="ln_1", post_norm="ln_2",
                             act="activation_function", eps="layer_norm_epsilon", positions="learned", pos_embed="wpe"),
    "gpt2": GPTFamily(base="transformer", embed="wte", layers="h", final_norm="ln_f", attn="attn", qkv="c_attn",
                      qkv_layout="blocks", o="c_proj", up="mlp.c_fc", down="mlp.c_proj", input_norm="ln_1",
                      post_norm="ln_2", act="activation_function", eps="layer_norm_epsilon", positions="learned",
                      pos_embed="wpe", conv1d=True),
    # Nemotron (3 / 4 / Minitron): a plain ReLU-squared MLP under LayerNorm1P (1 + weight, a bias), partial rotary
    "nemotron": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                          o="o_proj", up="mlp.up_proj", down="mlp.down_proj", input_norm="input_layernorm",
                          post_norm="post_attention_layernorm", eps="norm_eps", norms="1p"),
    # Cohere 2 MoE: Cohere 2's parallel block (one LayerNorm without a bias, interleaved rotary on the sliding layers
    # and on the dense ones, NoPE full layers), dense MLPs then top-k experts by mlp_layer_types
    "cohere2_moe": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                             o="o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                             input_norm="input_layernorm", post_norm=None, parallel="always",
                             positions="rotary_interleaved", sliding="layer_types", moe="cohere2"),
    # MPT: ALiBi (MPT's slopes), q | k | v rows in Wqkv, LayerNorms without a bias, GeLU (erf)
    "mpt": GPTFamily(base="transformer", embed="wte", layers="blocks", final_norm="norm_f", attn="attn", qkv="Wqkv",
                     qkv_layout="blocks", o="out_proj", up="ffn.up_proj", down="ffn.down_proj", input_norm="norm_1",
                     post_norm="norm_2", act=None, fixed_act="gelu", eps="layer_norm_epsilon", positions="alibi"),
    # CodeGen: GPT-J's block (one norm, parallel residual, interleaved partial rotary, lm_head bias) with q, v, k packed
    # in qkv_proj in 4 groups of heads (:func:`_qkv_pieces` "codegen")
    "codegen": GPTFamily(base="transformer", embed="wte", layers="h", final_norm="ln_f", attn="attn", qkv="qkv_proj",
                         qkv_layout="codegen", o="out_proj", up="mlp.fc_in", down="mlp.fc_out", input_norm="ln_1",
                         post_norm=None, parallel="always", act="activation_function", eps="layer_norm_epsilon",
                         positions="rotary_interleaved"),
    # Jais 2: GQA with biases, a plain ReLU-squared MLP with biases, LayerNorms, rotary
    "jais2": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                       o="o_proj", up="mlp.up_proj", down="mlp.down_proj", input_norm="input_layernorm",
                       post_norm="post_attention_layernorm"),
    # DBRX: bias-free LayerNorms, GQA q | k | v rows in Wqkv (clip_qkv), rotary, a softmax top-k MoE in every layer
    "dbrx": GPTFamily(base="transformer", embed="wte", layers="blocks", final_norm="norm_f", attn="norm_attn_norm.attn",
                      qkv="Wqkv", qkv_layout="blocks", o="out_proj", gate="ffn.experts.mlp.w1",
                      up="ffn.experts.mlp.v1", down="ffn.experts.mlp.w2", input_norm="norm_attn_norm.norm_1",
                      post_norm="norm_attn_norm.norm_2", act=None, fixed_act="silu", eps=None, moe="dbrx"),
    # Phi-3.5-MoE: LayerNorms (eps rms_norm_eps), GQA with biases, a window, lm_head bias, the sparsemixer top-2 MoE in
    # every layer
    "phimoe": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                        o="o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                        input_norm="input_layernorm", post_norm="post_attention_layernorm", eps="rms_norm_eps",
                        sliding="config", moe="phimoe"),
    # Persimmon: per-head packed QKV (GPT-NeoX's layout) with biases, q and k LayerNormed per head (qk_layernorm),
    # partial rotary, a plain ReLU-squared MLP, sequential LayerNorm blocks
    "persimmon": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="final_layernorm",
                           attn="self_attn", qkv="query_key_value", o="dense", up="mlp.dense_h_to_4h",
                           down="mlp.dense_4h_to_h", input_norm="input_layernorm",
                           post_norm="post_attention_layernorm"),
    # OLMo (1): Llama's modules (SwiGLU, GQA, rotary) under LayerNorms without a weight or a bias, eps 1e-5; q, k, v
    # clamped by clip_qkv (OLMo 1.7)
    "olmo": GPTFamily(base="model", embed="embed_tokens", layers="layers", final_norm="norm", attn="self_attn",
                      o="o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                      input_norm="input_layernorm", post_norm="post_attention_layernorm", eps=None, norms="none"),
}

# transformers' activation names -> the engine's (``reference.act``): gelu_new / gelu_fast / BLOOM's are the tanh form
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
         "relu": "relu", "relu2": "relu2", "silu": "silu", "swish": "silu"}


class PlusOne(Rewritten):
    """Norm weights read as 1 + weight (in fp32: one rounding to the engine's dtype, as HF's ``weight + 1.0`` in the
    weight's dtype); other names pass through. Nemotron's LayerNorm1P."""

    def __init__(self, inner: WeightSource, names):
        super().__init__(inner)
        self.names = set(names)

    def rewrites(self, name):
        return name in self.names

    def read(self, name, dim, start, length):
        t = self.inner.read(name, dim, start, length)
        return t.float() + 1.0 if name in self.names else t


def _refuse(config, family: GPTFamily) -> None:
    """Settings of these families the engine does not reproduce: refused by name, before any weight is read."""
    mt = config.model_type
    flags = {"qk_layernorm": "per-head LayerNorms of q and k", "use_qk_norm": "per-head LayerNorms of q and k",
             "scale_attn_by_inverse_layer_idx": "scores scaled by 1 / layer index",
             "apply_residual_connection_post_layernorm": "the residual taken after the norm",
             "add_cross_attention": "cross-attention"}
    if mt == "persimmon":         # (its q / k LayerNorms per head: HeadLayerNormAttention)
        flags.pop("qk_layernorm")
    for flag, what in flags.items():
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{mt} with {flag}=True ({what}) is not supported by the fused engine.")
    if mt == "opt":
        if not getattr(config, "do_layer_norm_before", True) or not getattr(config, "layer_norm_elementwise_affine", True):
            raise UnsupportedModelError("opt with do_layer_norm_before=False or layer_norm_elementwise_affine=False "
                                        "(OPT-350m's post-norm blocks) is not supported by the fused engine.")
        if getattr(config, "_remove_final_layer_norm", False):
            raise UnsupportedModelError("opt with _remove_final_layer_norm=True (no final LayerNorm) is not supported "
                                        "by the fused engine.")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise UnsupportedModelError("opt with word_embed_proj_dim != hidden_size (projected embeddings, OPT-350m) "
                                        "is not supported by the fused engine.")
    if mt == "falcon" and config.alibi:
        raise UnsupportedModelError("falcon with alibi=True (Falcon-RW: ALiBi added before the scores' scaling) is not "
                                    "supported by the fused engine; the rotary Falcons (7B, 40B, 180B) are.")
    if mt == "dbrx":
        act = (config.ffn_config.ffn_act_fn or {}).get("name", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"dbrx with ffn_act_fn={config.ffn_config.ffn_act_fn} is not supported (the "
                                        f"experts' gated MLP takes silu).")
        p = config.ffn_config.moe_normalize_expert_weights
        if p is not None and float(p) != 1.0:
            raise UnsupportedModelError(f"dbrx with moe_normalize_expert_weights={p} (the top-k weights divided by "
                                        f"their {p}-norm) is not supported by the fused engine; 1 (their sum) and None "
                                        f"are.")
    if mt == "cohere2_moe":
        if getattr(config, "rms_norm_eps", None) is not None:
            raise UnsupportedModelError(f"cohere2_moe with rms_norm_eps={config.rms_norm_eps} (RMSNorms in the "
                                        f"parallel block) is not supported by the fused engine; its LayerNorms "
                                        f"(rms_norm_eps=None) are.")
        if config.expert_selection_fn == "sigmoid" and config.norm_topk_prob and config.num_experts_per_tok > 1:
            raise UnsupportedModelError("cohere2_moe with expert_selection_fn='sigmoid' and norm_topk_prob=True (the "
                                        "top-k sigmoids renormalised) is not supported by the fused engine; softmax "
                                        "routing, and sigmoid without norm_topk_prob, are.")
        strategy = config.shared_expert_combination_strategy
        if config.expert_selection_fn not in ("softmax", "sigmoid") or strategy not in ("sum", "average"):
            raise UnsupportedModelError(f"cohere2_moe with expert_selection_fn={config.expert_selection_fn!r} / "
                                        f"shared_expert_combination_strategy={strategy!r} is not supported.")
    if mt in ("gptj", "codegen") and not getattr(config, "rotary_dim", None):
        raise UnsupportedModelError(f"{mt} without rotary_dim is not supported (HF then rotates with the hidden size's "
                                    f"frequencies); set rotary_dim.")


def _falcon(config, family: GPTFamily) -> GPTFamily:
    """Falcon's block by its config: 40B / 180B (``new_decoder_architecture``) norm attention and MLP inputs apart
    (``ln_attn`` / ``ln_mlp``, or one shared norm) with KV heads in groups; 7B shares one norm between the parallel
    attention and MLP with one KV head (``multi_query``); without ``parallel_attn`` the block is sequential."""
    if config.new_decoder_architecture:
        two = (getattr(config, "num_ln_in_parallel_attn", None) or 2) == 2
        return dataclasses.replace(family, qkv_layout="groups", parallel="always",
                                   input_norm="ln_attn" if two else "input_layernorm", post_norm="ln_mlp" if two else None)
    layout = "blocks" if config.multi_query else "heads"
    if config.parallel_attn:
        return dataclasses.replace(family, qkv_layout=layout, parallel="always", post_norm=None)
    return dataclasses.replace(family, qkv_layout=layout)


def _qkv_pieces(layout: str, heads: int, kv_heads: int, d: int) -> dict[str, list[tuple[int, int]]]:
    """Rows of q, k and v in a fused QKV projection, as (first row, rows) runs: "heads" [H, 3, D] (GPT-NeoX, BLOOM),
    "blocks" q | k | v (GPT-2, Falcon-7B), "groups" [KV, H / KV + 2, D] (Falcon-40B: a group's query heads, its key,
    its value), "codegen" [4, 3, H D / 4] (CodeGen: 4 groups of heads, each q, v, k)."""
    if layout == "heads":
        return {part: [(h * 3 * d + j * d, d) for h in range(heads)] for j, part in enumerate("qkv")}
    if layout == "blocks":
        return {"q": [(0, heads * d)], "k": [(heads * d, kv_heads * d)], "v": [((heads + kv_heads) * d, kv_heads * d)]}
    if layout == "codegen":       # 4 groups of heads, each its q rows, then v, then k ([4, 3, H D / 4])
        local = heads * d // 4
        return {part: [(g * 3 * local + j * local, local) for g in range(4)] for j, part in enumerate("qvk")}
    per = heads // kv_heads + 2                  # rows of one group, in heads
    return {"q": [(g * per * d, (per - 2) * d) for g in range(kv_heads)],
            "k": [((g * per + per - 2) * d, d) for g in range(kv_heads)],
            "v": [((g * per + per - 1) * d, d) for g in range(kv_heads)]}


def _reordered(runs: list[tuple[int, int]], pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``pieces`` (runs of rows of the tensor that ``runs`` cut out of a fused one) as runs of the fused tensor's rows:
    a reorder within q's or k's rows composed with where those rows lie."""
    rows = [first + j for first, n in runs for j in range(n)]
    picked = [rows[p + j] for p, n in pieces for j in range(n)]
    out = []
    for r in picked:
        if out and out[-1][0] + out[-1][1] == r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


def _fused_kv_heads(config, heads: int) -> int:
    """KV heads of a fused QKV projection (Falcon's by its architecture; GPT-NeoX's, BLOOM's, GPT-2's: every head)."""
    if config.model_type == "falcon":
        return config.num_kv_heads if config.new_decoder_architecture else 1 if config.multi_query else heads
    if config.model_type == "gpt_bigcode":
        return 1 if config.multi_query else heads
    if config.model_type == "dbrx":
        return config.attn_config.kv_n_heads
    return heads


def _rotary(model: nn.Module, config, family: GPTFamily, head_dim: int, max_seq_len: int):
    """(inv_freq, attention scaling, rope type) of the model's rotary embedding."""
    if family.positions == "rotary_interleaved" and config.model_type in ("gptj", "codegen"):   # HF's own table,
        #                                                                                           from rotary_dim
        r = config.rotary_dim
        return 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.int64) / r)), 1.0, "default"
    module = model.get_submodule(f"{family.base}.rotary_emb")
    with torch.device("cpu"):     # frequencies are computed, not loaded: rebuild them even for a meta model
        rotary = type(module)(config=config)
    inv_freq, rope_type = rotary.inv_freq, getattr(rotary, "rope_type", "default")
    check_rope(config, rotary, inv_freq, rope_type, head_dim, max_seq_len)
    return inv_freq.detach(), float(rotary.attention_scaling), rope_type


def _clip_qkv(config) -> float | None:
    """The clamp of q, k and v after their projection (OLMo's clip_qkv, MPT's and DBRX's in attn_config; a 0 of MPT's
    means none, as transformers reads it)."""
    clip = getattr(config, "clip_qkv", None)
    if clip is None and getattr(config, "attn_config", None) is not None:
        clip = getattr(config.attn_config, "clip_qkv", None) or None
    return None if clip is None else float(clip)


def _alibi_slopes(heads: int, model: nn.Module | None = None) -> torch.Tensor:
    """The ALiBi slopes of every head as transformers computes them: BLOOM's (read off a two-token mask), MPT's (read
    off a two-column table of its ``model``'s own, whose first column is -slope; transformers builds it with the
    default alibi_bias_max of 8 whatever the config says)."""
    if model is not None and model.config.model_type == "mpt":
        with torch.device("cpu"):
            return -model.transformer.build_mpt_alibi_tensor(heads, 2)[:, 0, 0].float().clone()
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 2), heads, torch.float32).view(heads, 2)[:, 1].clone()


def _moe(source: WeightSource, config, block: str) -> MoEWeights:
    """Cohere 2 MoE's sparse MLP of ``block``: router ``mlp.gate``, the experts (3D, or one by one in a checkpoint:
    :func:`llama._experts`), the shared experts; top-k of the logits then a softmax over those k (or their sigmoids);
    the "average" combination, (experts + shared) / 2, folded into the experts' and the shared MLP's down (x 0.5:
    exact)."""
    from lightning_dsinfer.policies.llama import FamilyTraits, _experts

    m = f"{block}.mlp"
    stand_in = FamilyTraits(moe="qwen")            # (checkpoints store the experts as Qwen's: gate / up / down_proj)
    gate_up, down = (_experts(source, config, stand_in, m, n) for n in ("gate_up_proj", "down_proj"))
    shared = config.num_shared_experts > 0
    shared_down = source.ref(f"{m}.shared_experts.down_proj.weight") if shared else None
    if shared and config.shared_expert_combination_strategy == "average":
        down = Scaled(down.source, {down.name: 0.5}).ref(down.name)
        shared_down = Scaled(shared_down.source, {shared_down.name: 0.5}).ref(shared_down.name)
    routing = Routing(scoring="topk_softmax" if config.expert_selection_fn == "softmax" else "topk_sigmoid")
    return MoEWeights(router=source.ref(f"{m}.gate.weight"), gate_up=gate_up, down=down,
                      top_k=config.num_experts_per_tok, renormalize=False, weights_in_dtype=False,
                      shared_gate=source.ref(f"{m}.shared_experts.gate_proj.weight") if shared else None,
                      shared_up=source.ref(f"{m}.shared_experts.up_proj.weight") if shared else None,
                      shared_down=shared_down, routing=routing)


class DbrxExperts(Rewritten):
    """DBRX's experts, stored as ``w1`` (gate) / ``v1`` (up) / ``w2`` [E I, H] (w2 holds each expert's down
    transposed: its rows are the intermediate), seen as the MoE engine's ``gate_up_proj`` [E, 2 I, H] and
    ``down_proj`` [E, H, I] under ``{mlp}.gate_up_proj`` / ``{mlp}.down_proj``; a slice reads only its experts' rows
    (and, along H, narrows what it read); other names pass through."""

    def __init__(self, inner: WeightSource, mlps, experts: int, inter: int, hidden: int):
        super().__init__(inner)
        self.mlps, self.e, self.i, self.h = set(mlps), experts, inter, hidden

    def _split(self, name):
        mlp, _, kind = name.rpartition(".")
        return (mlp, kind) if mlp in self.mlps and kind in ("gate_up_proj", "down_proj") else (None, None)

    def rewrites(self, name):
        return self._split(name)[0] is not None

    def shape(self, name):
        mlp, kind = self._split(name)
        if mlp is None:
            return self.inner.shape(name)
        return (self.e, 2 * self.i, self.h) if kind == "gate_up_proj" else (self.e, self.h, self.i)

    def read(self, name, dim, start, length):
        mlp, kind = self._split(name)
        if mlp is None:
            return self.inner.read(name, dim, start, length)
        experts = range(start, start + length) if dim == 0 else range(self.e)
        out = []
        for e in experts:
            if kind == "gate_up_proj":         # rows: gate (w1), then up (v1)
                first, rows = (start, length) if dim == 1 else (0, 2 * self.i)
                parts = []
                for part, at in (("w1", 0), ("v1", self.i)):
                    a, b = max(first, at), min(first + rows, at + self.i)
                    if a < b:
                        parts.append(self.inner.read(f"{mlp}.{part}", 0, e * self.i + a - at, b - a))
                t = torch.cat(parts) if len(parts) > 1 else parts[0]
                out.append(t[:, start:start + length] if dim == 2 else t)
            else:                              # down [H, I] = w2's expert rows, transposed
                first, rows = (start, length) if dim == 2 else (0, self.i)
                t = self.inner.read(f"{mlp}.w2", 0, e * self.i + first, rows).t()
                out.append(t[start:start + length] if dim == 1 else t)
        return torch.stack(out).contiguous()


def _dbrx_moe(source: WeightSource, config, block: str) -> MoEWeights:
    """DBRX's MoE of ``block``: router ``ffn.router.layer``, the experts (:class:`DbrxExperts`), softmax over every
    expert, the top-k renormalised by their sum (moe_normalize_expert_weights 1) or not (None)."""
    m = f"{block}.ffn.experts.mlp"
    return MoEWeights(router=source.ref(f"{block}.ffn.router.layer.weight"), gate_up=source.ref(f"{m}.gate_up_proj"),
                      down=source.ref(f"{m}.down_proj"), top_k=config.ffn_config.moe_top_k,
                      renormalize=config.ffn_config.moe_normalize_expert_weights is not None, weights_in_dtype=True)


def _phimoe_moe(source: WeightSource, config, block: str) -> MoEWeights:
    """Phi-3.5-MoE's MoE of ``block``: router ``mlp.router``, the experts (3D, or a checkpoint's w1 / w3 / w2 one by
    one: :func:`llama._experts`), the sparsemixer's two experts (transformers' picks two whatever num_experts_per_tok
    says) with its weights, router_jitter_noise its threshold."""
    from lightning_dsinfer.policies.llama import FamilyTraits, _experts

    m = f"{block}.mlp"
    stand_in = FamilyTraits(moe="mixtral")         # (checkpoints store the experts as Mixtral's: w1 / w3 / w2)
    gate_up, down = (_experts(source, config, stand_in, m, n) for n in ("gate_up_proj", "down_proj"))
    return MoEWeights(router=source.ref(f"{m}.router.weight"), gate_up=gate_up, down=down, top_k=2,
                      renormalize=False, weights_in_dtype=True,
                      routing=Routing(scoring="sparsemixer", jitter=float(config.router_jitter_noise)))


_MOE = {"cohere2": _moe, "dbrx": _dbrx_moe, "phimoe": _phimoe_moe}


def has_experts(model_type: str | None) -> bool:
    """Whether ``model_type`` is a family of this table with mixture-of-experts layers."""
    family = FAMILY.get(model_type)
    return family is not None and family.moe != "none"


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def read_gpt_family(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (as lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    family = FAMILY[config.model_type]
    _refuse(config, family)
    if config.model_type == "falcon":
        family = _falcon(config, family)
    if config.model_type == "gpt_bigcode":     # multi-query: q | k | v with one KV head; else per head
        family = dataclasses.replace(family, qkv_layout="blocks" if config.multi_query else "heads")
    act = getattr(config, family.act, None) if family.act else family.fixed_act
    act = _ACTS.get(act, act if family.act is None else None)
    if act is None or (family.gate is not None and act != "silu"):
        raise UnsupportedModelError(
            f"{config.model_type} with {family.act}={getattr(config, family.act, None)!r} is not supported (the "
            f"fused MLP takes {', '.join(sorted(_ACTS))}{'; the gated MLP silu' if family.gate else ''}).")
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads      # (Nemotron's may differ from hidden / heads)
    source = source or ModuleSource(model)
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    base, n_layers = family.base, config.num_hidden_layers

    def block(i):
        return f"{base}.{family.layers}.{i}"

    if family.norms == "1p":
        source = PlusOne(source, [f"{block(i)}.{n}.weight" for i in range(n_layers) for n in (
            family.input_norm, family.post_norm)] + [f"{base}.{family.final_norm}.weight"])
    if family.moe == "dbrx":
        ffn = config.ffn_config
        source = DbrxExperts(source, [f"{block(i)}.ffn.experts.mlp" for i in range(n_layers)], ffn.moe_num_experts,
                             ffn.ffn_hidden_size, hidden)
    if family.conv1d:
        source = Transposed(source, [f"{block(i)}.{p}.weight" for i in range(n_layers)
                                     for p in (f"{family.attn}.{family.qkv}", f"{family.attn}.{family.o}",
                                               family.up, family.down)])
    slices = {}
    kv_heads = _fused_kv_heads(config, heads)
    if family.qkv is not None:    # q, k, v as row pieces of the fused projection (its bias likewise)
        pieces = _qkv_pieces(family.qkv_layout, heads, kv_heads, head_dim)
        for i in range(n_layers):
            fused = f"{block(i)}.{family.attn}.{family.qkv}"
            for part in "qkv":
                for kind in ("weight", "bias"):
                    if f"{fused}.{kind}" in names:
                        slices[f"{fused}.{part}.{kind}"] = (f"{fused}.{kind}", pieces[part])
    rotary = family.positions.startswith("rotary")
    inv_freq, attention_scaling, rope_type = _rotary(model, config, family, head_dim, max_seq_len) if rotary else \
        (torch.zeros(1), 1.0, "none")    # (a table nothing reads: the blocks' attention does not rotate)
    if family.qkv is None and family.positions == "rotary_interleaved":   # each head's rotary rows of q and k to
        for i in range(n_layers):                                         # rotate-half order
            for part in ("q", "k"):
                name = f"{block(i)}.{family.attn}.{getattr(family, part)}.weight"
                slices[name] = (name, rotate_half_pieces(source.shape(name)[0] // head_dim, head_dim,
                                                         2 * inv_freq.numel()))
    elif family.positions == "rotary_interleaved":    # (CodeGen: the same reorder of the fused projection's q / k rows)
        for name, (fused, runs) in list(slices.items()):
            if name.endswith((".q.weight", ".k.weight", ".q.bias", ".k.bias")):
                slices[name] = (fused, _reordered(runs, rotate_half_pieces(heads, head_dim, 2 * inv_freq.numel())))
    if slices:
        source = RowSlices(source, slices)
        names |= set(slices)

    ref, opt = lookups(source, names)

    def norm_bias(norm):          # a LayerNorm without a bias (Cohere's) takes a zero one
        return ref(f"{norm}.bias") if f"{norm}.bias" in names else Zeros().ref((hidden,))

    def norm_weight(norm):        # a LayerNorm without a weight (OLMo's) takes ones
        return Ones().ref((hidden,)) if family.norms == "none" else ref(f"{norm}.weight")

    def proj(i, part):
        a = f"{block(i)}.{family.attn}"
        return f"{a}.{family.qkv}.{part}" if family.qkv is not None else f"{a}.{getattr(family, part)}"

    parallel = family.parallel == "always" or (family.parallel == "config" and config.use_parallel_residual)
    if family.qkv is None:
        kv_heads = ref(f"{proj(0, 'k')}.weight").shape[0] // head_dim
    def sparse(i):
        return family.moe in ("dbrx", "phimoe") or (family.moe != "none" and config.mlp_layer_types[i] == "sparse")

    def rotates(i):               # (Cohere 2 MoE: its dense layers rotate too when prefix_dense_sliding_window_pattern
        #                             is 1)
        force = (family.moe == "cohere2" and not sparse(i)
                 and getattr(config, "prefix_dense_sliding_window_pattern", 0) == 1)
        return family.sliding != "layer_types" or window(i) is not None or force

    def window(i):
        if family.sliding == "config":
            return getattr(config, "sliding_window", None)
        if family.sliding == "local" and config.attention_layers[i] == "local":
            return config.window_size
        if family.sliding == "layer_types" and config.layer_types[i] == "sliding_attention":
            return config.sliding_window
        return None
    clip = _clip_qkv(config)

    def qk_layer_norms(i):        # Persimmon's q / k LayerNorms per head (weight and bias [D])
        if not (config.model_type == "persimmon" and config.qk_layernorm):
            return {}
        a = f"{block(i)}.{family.attn}"
        return dict(q_norm=ref(f"{a}.q_layernorm.weight"), k_norm=ref(f"{a}.k_layernorm.weight"),
                    q_norm_bias=ref(f"{a}.q_layernorm.bias"), k_norm_bias=ref(f"{a}.k_layernorm.bias"),
                    qk_norm_kind="layer")

    layers = []
    for i in range(n_layers):
        b = block(i)
        o = f"{b}.{family.attn}.{family.o}"
        post = f"{b}.{family.post_norm}" if family.post_norm and (
            f"{b}.{family.post_norm}.weight" in names or family.norms == "none") else None
        layers.append(LayerWeights(
            q=ref(f"{proj(i, 'q')}.weight"), k=ref(f"{proj(i, 'k')}.weight"), v=ref(f"{proj(i, 'v')}.weight"),
            o=ref(f"{o}.weight"), q_bias=opt(f"{proj(i, 'q')}.bias"), k_bias=opt(f"{proj(i, 'k')}.bias"),
            v_bias=opt(f"{proj(i, 'v')}.bias"), o_bias=opt(f"{o}.bias"),
            gate=ref(f"{b}.{family.gate}.weight") if family.gate and not sparse(i) else None,
            up=None if sparse(i) else ref(f"{b}.{family.up}.weight"),
            down=None if sparse(i) else ref(f"{b}.{family.down}.weight"),
            moe=_MOE[family.moe](source, config, b) if sparse(i) else None,
            gate_bias=opt(f"{b}.{family.gate}.bias") if family.gate else None, up_bias=opt(f"{b}.{family.up}.bias"),
            down_bias=opt(f"{b}.{family.down}.bias"),
            input_norm=norm_weight(f"{b}.{family.input_norm}"), input_norm_bias=norm_bias(f"{b}.{family.input_norm}"),
            post_norm=norm_weight(post) if post else None, post_norm_bias=norm_bias(post) if post else None,
            sliding_window=window(i), rotary=rotates(i), clip_qkv=clip, **qk_layer_norms(i)))
    if not parallel and any(lw.post_norm is None for lw in layers):
        raise UnsupportedModelError(f"{config.model_type}: a sequential block without its second norm.")
    if config.model_type == "mpt" and max_seq_len > config.max_seq_len:    # (HF's ALiBi table ends there)
        raise ValueError(f"dsinfer: max_seq_len={max_seq_len} exceeds mpt's max_seq_len={config.max_seq_len} (the "
                         f"length of transformers' ALiBi table for it); pass max_seq_len={config.max_seq_len} or less "
                         f"to init_inference / DSInferStrategy.")
    if family.pos_embed is not None:     # a learned table ends where it ends: refuse a cache that runs past it
        table = source.shape(f"{base}.{family.pos_embed}.weight")[0] - family.pos_offset
        if max_seq_len > table:
            raise ValueError(f"dsinfer: max_seq_len={max_seq_len} exceeds the {table} positions of {config.model_type}'s "
                             f"learned position table; pass max_seq_len={table} or less to init_inference / "
                             f"DSInferStrategy.")
    dense = [lw for lw in layers if lw.up is not None]
    embed_name = f"{_module_name(model, model.get_input_embeddings())}.weight"
    head = model.get_output_embeddings()
    tied = tied_embeddings(model)
    head_name = _module_name(model, head)
    first_attn = model.get_submodule(f"{block(0)}.{family.attn}")
    scaling = 1.0 if family.unscaled else getattr(first_attn, "scaling", None)
    if scaling is None:           # (MPT's: attn_config.softmax_scale, else 1 / sqrt(head_dim))
        scaling = getattr(first_attn, "softmax_scale", None)
    if scaling is None:
        scaling = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    eps = getattr(config, family.eps) if family.eps else 1e-5
    return ModelWeights(
        model_type=config.model_type, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=dense[0].up.shape[0] if dense else layers[0].moe.expert_inter, vocab_size=config.vocab_size,
        rms_norm_eps=eps, scaling=scaling,
        inv_freq=inv_freq, attention_scaling=attention_scaling, rope_type=rope_type,
        embed=ref(embed_name), final_norm=norm_weight(f"{base}.{family.final_norm}"),
        final_norm_bias=norm_bias(f"{base}.{family.final_norm}"),
        logit_scale=getattr(config, "logit_scale", None) if config.model_type != "mpt" else None,  # (HF's MPT ignores
        #                                                                                            its logit_scale)
        lm_head=ref(embed_name if tied else f"{head_name}.weight"), lm_head_bias=opt(f"{head_name}.bias"),
        tied_embeddings=tied, layers=layers, mlp_act=act, layer_norm=True, mlp_gated=family.gate is not None,
        parallel_residual=parallel, rotary=rotary,
        pos_embed=ref(f"{base}.{family.pos_embed}.weight") if family.pos_embed else None, pos_offset=family.pos_offset,
        positions_from_mask=family.positions_from_mask,
        alibi=_alibi_slopes(heads, model) if family.positions == "alibi" else None,
        embed_norm=ref(f"{base}.{family.embed_norm}.weight") if family.embed_norm else None,
        embed_norm_bias=ref(f"{base}.{family.embed_norm}.bias") if family.embed_norm else None,
    )
