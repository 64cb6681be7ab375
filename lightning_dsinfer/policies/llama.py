"""The Llama family (llama, mistral, ministral, qwen2, qwen3, phi3, granite, seed_oss, arcee, smollm3, ernie4_5,
hunyuan_v1_dense, glm, glm4, olmo2, olmo3, exaone4, granite_swa, hyperclovax, nanochat, apertus, the MoE ones: mixtral,
qwen2_moe, qwen3_moe, olmoe, flex_olmo, minimax_m2, glm4_moe, sarvam_moe, dots1, exaone_moe, solar_open, mellum,
hunyuan_v1_moe, granitemoe_swa, hy_v3, afmoe, mimo_v2_flash, flint, kolibri1, Llama's modules under other model types:
exaone, internlm3, iquestcoder, cwm, helium, and the Gemma ones: gemma, gemma2, gemma3_text, vaultgemma): one table,
one reader.

All share the module tree ``model.model.{embed_tokens, layers[i].{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, norm, rotary_emb}`` and
``model.lm_head``; the table records only what differs (Phi-3 packs q|k|v into ``qkv_proj`` and gate|up into
``gate_up_proj``, GLM and GLM-4 gate|up only: read as row ranges). In a MoE layer ``mlp`` is a sparse block:
``mlp.gate.weight`` (router) and ``mlp.experts.{gate_up_proj, down_proj}`` (3D, transformers 5), plus Qwen2-MoE's
``mlp.shared_expert.{gate,up,down}_proj`` and ``mlp.shared_expert_gate``. Gemma adds (1 + w) norms, a scaled
embedding and GeGLU; Gemma 2 norms on the attention's and the MLP's outputs (``pre_feedforward_layernorm`` is the MLP's
input norm) and soft-capped attention scores and logits (VaultGemma: the same without the output norms); Gemma 3
q/k norms and a rope table of its own for the sliding-window layers. Granite multiplies the embeddings, each block's
attention and MLP outputs (folded into o_proj and down_proj when they are read) and the logits by constants of its
config.

The others, each one row: Seed-OSS is Llama with q/k/v and o biases; Arcee a plain MLP ``down(relu(up(x))^2)``;
SmolLM3 leaves the rotary out of the layers ``no_rope_layers`` marks 0 (NoPE); HunYuan (dense) norms q and k per
head after the rotation (``query_layernorm``, ``key_layernorm``: ``RotaryFirstAttention``); ERNIE 4.5 and GLM rotate
interleaved pairs (2i, 2i + 1), which each head's q / k rows (and biases) reordered as (0, 2, 4, ..., 1, 3, ...) when
read turn into the engine's rotate-half layout (the scores q.k do not change under the same permutation of both; GLM
rotates the first half of each head only); GLM-4 adds norms on the attention's and the MLP's outputs
(``post_self_attn_layernorm``, ``post_mlp_layernorm``; ``post_attention_layernorm`` is the MLP's input norm). OLMo 2
has no input norms at all: RMSNorms on the attention's and the MLP's outputs (``post_attention_layernorm``,
``post_feedforward_layernorm``) before each residual add, its q / k norms each span the whole projection (all heads at
once, before the head split and rotary: ``ProjectionNormAttention``, the sums of squares all-reduced under tensor
parallelism), and its norms scale in fp32 and round once (weights held in fp32); OLMo 3 adds sliding-window layers
by ``layer_types`` with a rope table per layer type (as Gemma 3); OLMoE is pre-norm with OLMo 2's whole-projection q /
k norms and a softmax top-k MoE in every layer; Exaone 4 has OLMo 2's output norms with per-head q / k norms and, when
it has a window, rotates only its sliding-window layers (the others NoPE). FlexOlmo is OLMo 2's blocks with OLMoE's
MoE; MiniMax-M2 has whole-projection q / k norms and a sigmoid router whose choice adds the block's
``mlp.e_score_correction_bias`` (the weights renormalised). GLM-4.5 (``glm4_moe``; Sarvam's modules are the same),
dots.llm1 and EXAONE MoE put DeepSeek-V3's MoE (``mlp.gate.e_score_correction_bias``, groups, ``shared_experts``,
dense blocks before ``first_k_dense_replace`` or by ``mlp_layer_types``) under GQA attention (GLM-4.5: partial rotary,
q / k norms when ``use_qk_norm``; dots.llm1: Qwen 3's; EXAONE MoE: Exaone 4's, pre-norm); their router is
:func:`policies.deepseek.routing_of`'s; so is Solar Open's (every layer sparse, plain GQA attention). Helium rotates
interleaved pairs (read as GLM's) and scales its norms in fp32 (OLMo 2's); Mellum is Qwen 3's attention with a rope table
per layer type and a softmax top-k MoE by ``mlp_layer_types``; HunYuan MoE is HunYuan's attention with a top-k MoE
(router ``mlp.gate.wg``, renormalised) plus an ungated ``mlp.shared_mlp`` in every layer; Hy3 (``hy_v3``) is Qwen 3's
attention with DeepSeek-V3's sigmoid choice (no groups; the block's ``mlp.e_score_correction_bias``;
``router_scaling_factor``) and ``shared_experts``, its router in fp32; AFMoE, MiMo-V2-Flash, Flint and Kolibri-1: see
their rows in :data:`FAMILY`. Granite SWA is Granite with attention sinks
(``self_attn.sinks``), sliding / full layers and a rope base per layer (``layer_rope_theta``, 0: NoPE);
Granite MoE SWA the same with Granite 3 MoE's experts and shared MLP. HyperCLOVA X has Granite's multipliers (its logits
multiplied by logits_scaling) and, with use_post_norm, Peri-LN: RMSNorms on the attention's and the MLP's outputs too
(``post_norm1``, ``post_norm2``), the residual multiplier folded into their weights rather than into o / down.
NanoChat's RMSNorms have no weight (one more norms the embeddings), its q / k norms come after a rotation by -angle
(read as a rotate-half one: :class:`Negated`), its MLP is ``fc2(relu(fc1 x)^2)`` and its logits soft-capped. Apertus:
per-head q / k norms, pre-norms named attention_layernorm / feedforward_layernorm, a plain MLP whose xIELU activation
has parameters per layer (:class:`XIELU`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import Routing
from lightning_dsinfer.modules.rotary import mrope_axes
from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, MoEWeights, UnsupportedModelError
from lightning_dsinfer.policies.weights import (ExpertStack, ModuleSource, Ones, Rewritten, RowSlices, Scaled,
                                               WeightSource, attention_refs, lookups, rotate_half_pieces,
                                               tied_embeddings)


@dataclass(frozen=True)
class FamilyTraits:
    qk_norm: str = "none"           # RMSNorms of q and k: "head" (per head, before rotary: Qwen3); "whole" (over the
                                    # whole projection, all heads, before rotary: OLMo 2); "after_rotary" (per head,
                                    # on the rotated q / k: HunYuan, whose norms are query_ / key_layernorm)
    sliding_from: str = "none"      # "none" | "config" (every layer) | "layer_types" (per layer)
    moe: str = "none"               # "none" | "mixtral" (every layer sparse) | "qwen" (sparse every
                                    # decoder_sparse_step layers, except mlp_only_layers; shared expert if any) |
                                    # "olmoe" (every layer sparse, routed as Qwen's) | "deepseek" (DeepSeek-V3's MoE:
                                    # sigmoid router with its correction bias and groups, shared_experts, dense first
                                    # layers) | "minimax" (every layer sparse: sigmoid top-k on scores + the block's
                                    # correction bias, renormalised) | "granite" (every layer sparse: block_sparse_moe,
                                    # softmax over the top-k logits; GraniteMoE-Shared's shared_mlp beside it) |
                                    # "ernie" (ERNIE 4.5 MoE: fp32 softmax scores chosen with a correction bias,
                                    # renormalised with a floor, shared experts, sparse layers by start / end / interval)
                                    # | "softmax" (softmax top-k as Qwen's, renormalised by norm_topk_prob, no shared
                                    # expert; sparse by mlp_layer_types where the config has them, else every layer:
                                    # Mellum) | "hunyuan" (HunYuan MoE: every layer sparse, router mlp.gate.wg, top-k
                                    # renormalised, the shared mlp.shared_mlp added ungated) | "hy" (Hy3: an fp32
                                    # sigmoid router choosing on scores + the block's mlp.e_score_correction_bias,
                                    # renormalised, times router_scaling_factor; shared_experts; by mlp_layer_types)
                                    # | "afmoe" (the same choice on logits in the router's dtype, mlp.router.gate and
                                    # mlp.expert_bias, times route_scale; dense before num_dense_layers) | "flint" (an
                                    # fp32 sigmoid top-k, renormalised by norm_topk_prob; sparse as "qwen"; the shared
                                    # expert ungated) | "kolibri" (every layer sparse: the top-k of the fp32 logits +
                                    # gate.e_score_correction_bias, their sigmoids renormalised; shared_experts)
    packed: str = "none"            # "all": Phi-3's self_attn.qkv_proj (q | k | v rows) and mlp.gate_up_proj (gate |
                                    # up); "mlp": the latter only (GLM, GLM-4)
    gemma: int = 0                  # Gemma generation (see the module docstring)
    granite: bool = False           # Granite: embedding, residual and logit multipliers (attention's is its scaling)
    logits_multiplied: bool = False  # HyperCLOVA X: the logits times logits_scaling (Granite divides by it)
    norms: str = "pre"              # "pre": input_layernorm, post_attention_layernorm (Gemma 2 / 3: by their names);
                                    # "afmoe": input_layernorm, post_attention_layernorm (the attention's output),
                                    # pre_mlp_layernorm, post_mlp_layernorm (the MLP's output);
                                    # "post": on the outputs only (OLMo 2, Exaone 4); "glm4": GLM-4's four;
                                    # "peri": the pre-norms and, where the model has them, post_norm1 / post_norm2 on
                                    # the outputs (HyperCLOVA X's Peri-LN: its residual multiplier scales their weights)
    norm_fp32: bool = False         # OLMo 2: (w * x).to(dtype), the scale in fp32
    rope: str = "half"              # "half" (rotate-half) | "interleaved" (pairs 2i, 2i + 1: GLM, ERNIE 4.5) |
                                    # "flipped" (NanoChat's rotate-half with the signs flipped, a rotation by -angle:
                                    # each head's second rotary half of q and k negated when read, :class:`Negated`)
    rope_tables: bool = False       # a rope table per layer type (Gemma 3, OLMo 3: ``{type}_inv_freq``)
    layer_thetas: bool = False      # a rope base per layer (``layer_rope_theta``, 0: NoPE; Granite SWA): one base for
                                    # the rotating sliding layers and one for the rotating full ones at most
    nope: str = "none"              # layers without rotary: "no_rope_layers" (SmolLM3: 0 = NoPE) | "global" (Exaone
                                    # 4: with a sliding window, only the sliding layers rotate)
    plain_mlp: bool = False         # Arcee: down(act(up(x))), no gate
    norm_names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")   # (Apertus: attention_layernorm,
                                                                                    # feedforward_layernorm)
    mlp_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")     # (NanoChat's plain MLP: fc1, fc2)
    weightless_norms: bool = False  # NanoChat: RMSNorms without a weight (ones are read), q / k norms too, and one
                                    # more of the embeddings before the first block (``ModelWeights.embed_norm``)
    logit_softcap: bool = False     # final_logit_softcapping outside the Gemma rows (NanoChat)
    mrope: str = "none"             # vision-language models' language models: M-RoPE, the frequencies read at the time
                                    # / height / width positions in "sections" (Qwen 2 / 2.5-VL) or "interleaved"
                                    # (Qwen3-VL): ``modules.rotary.mrope_axes``
    topk_renormalized: bool = False  # "qwen" MoE renormalised whatever norm_topk_prob says (Qwen3-VL-MoE has none)
    attn_gate: bool = False         # AFMoE: the attention's output x sigmoid(self_attn.gate_proj x) before o_proj
    mimo: bool = False              # MiMo-V2-Flash: the sliding layers' KV heads doubled; v heads of v_head_dim read
                                    # zero-padded to head_dim (:class:`HeadPadded`: v_proj rows and o_proj columns, the
                                    # padding contributes nothing), times attention_value_scale
    position_temperature: bool = False   # Ministral 3: queries x (1 + beta log(1 + floor(position / original max)))
                                    # (rope_parameters' llama_4_scaling_beta, original_max_position_embeddings)


FAMILY: dict[str, FamilyTraits] = {
    "llama": FamilyTraits(),
    "mistral": FamilyTraits(sliding_from="config"),
    "qwen2": FamilyTraits(sliding_from="layer_types"),
    "qwen3": FamilyTraits(qk_norm="head", sliding_from="layer_types"),
    "mixtral": FamilyTraits(sliding_from="config", moe="mixtral"),
    "qwen2_moe": FamilyTraits(sliding_from="layer_types", moe="qwen"),
    "qwen3_moe": FamilyTraits(qk_norm="head", sliding_from="config", moe="qwen"),
    "phi3": FamilyTraits(sliding_from="config", packed="all"),
    "granite": FamilyTraits(granite=True),
    "gemma": FamilyTraits(gemma=1),
    "gemma2": FamilyTraits(sliding_from="layer_types", gemma=2),
    "gemma3_text": FamilyTraits(qk_norm="head", sliding_from="layer_types", gemma=3, rope_tables=True),
    "seed_oss": FamilyTraits(),
    "arcee": FamilyTraits(plain_mlp=True),
    "smollm3": FamilyTraits(sliding_from="layer_types", nope="no_rope_layers"),
    "ernie4_5": FamilyTraits(rope="interleaved"),
    "glm": FamilyTraits(packed="mlp", rope="interleaved"),
    "glm4": FamilyTraits(packed="mlp", rope="interleaved", norms="glm4"),
    "olmo2": FamilyTraits(qk_norm="whole", norms="post", norm_fp32=True),
    "olmo3": FamilyTraits(qk_norm="whole", norms="post", norm_fp32=True, sliding_from="layer_types", rope_tables=True),
    "olmoe": FamilyTraits(qk_norm="whole", moe="olmoe"),
    "exaone4": FamilyTraits(qk_norm="head", norms="post", sliding_from="layer_types", nope="global"),
    "hunyuan_v1_dense": FamilyTraits(qk_norm="after_rotary"),
    "ministral": FamilyTraits(sliding_from="layer_types"),
    "ministral3": FamilyTraits(sliding_from="config", position_temperature=True),   # (Ministral 3 / Mistral 3's LM)
    # DeepSeek-V3's MoE under GQA attention: GLM-4.5 / 4.6 (partial rotary, q/k/v bias, q / k norms by use_qk_norm),
    # Sarvam (GLM-4.5's modules, whole-head rotary), dots.llm1 (Qwen 3's attention), EXAONE MoE (Exaone 4's attention)
    "glm4_moe": FamilyTraits(qk_norm="head", moe="deepseek"),
    "sarvam_moe": FamilyTraits(qk_norm="head", moe="deepseek"),
    "dots1": FamilyTraits(qk_norm="head", sliding_from="layer_types", moe="deepseek"),
    "exaone_moe": FamilyTraits(qk_norm="head", sliding_from="layer_types", nope="global", moe="deepseek"),
    # FlexOlmo: OLMo 2's blocks (output norms, whole-projection q / k norms) with OLMoE's MoE
    "flex_olmo": FamilyTraits(qk_norm="whole", norms="post", norm_fp32=True, moe="olmoe"),
    # MiniMax-M2: whole-projection q / k norms, partial rotary, a sigmoid-routed MoE in every layer
    "minimax_m2": FamilyTraits(qk_norm="whole", moe="minimax"),
    # Granite 3 MoE: Granite's multipliers (the residual one folded into the experts' and shared MLP's down too)
    "granitemoe": FamilyTraits(granite=True, moe="granite"),
    "granitemoeshared": FamilyTraits(granite=True, moe="granite"),
    # ERNIE 4.5 MoE: ERNIE 4.5's attention (interleaved rotary, biases) with its MoE
    "ernie4_5_moe": FamilyTraits(rope="interleaved", moe="ernie"),
    # Qwen 2-VL / Qwen 2.5-VL's language models (behind their vision models: multimodal.py): Qwen 2 with M-RoPE
    "qwen2_vl_text": FamilyTraits(sliding_from="layer_types", mrope="sections"),
    "qwen2_5_vl_text": FamilyTraits(sliding_from="layer_types", mrope="sections"),
    # Qwen3-VL's: Qwen 3 (MoE) with interleaved M-RoPE; its deepstack image features go through multimodal.py
    "qwen3_vl_text": FamilyTraits(qk_norm="head", mrope="interleaved"),
    "qwen3_vl_moe_text": FamilyTraits(qk_norm="head", moe="qwen", mrope="interleaved", topk_renormalized=True),
    # Llama's modules under other names: EXAONE 3 / 3.5 (its checkpoints' transformer.h.* keys renamed on load),
    # InternLM 3, IQuest-Coder; CWM: Llama with sliding / full layers by layer_types
    "exaone": FamilyTraits(),
    "internlm3": FamilyTraits(),
    "iquestcoder": FamilyTraits(),
    "cwm": FamilyTraits(sliding_from="layer_types"),
    # Helium: interleaved rotary over the whole head, its norms scale in fp32 and round once (as OLMo 2's)
    "helium": FamilyTraits(rope="interleaved", norm_fp32=True),
    # Solar Open: DeepSeek-V3's MoE (every layer sparse) under plain GQA attention
    "solar_open": FamilyTraits(moe="deepseek"),
    # Mellum: Qwen 3's attention with sliding / full layers, a rope table each, a softmax top-k MoE by mlp_layer_types
    "mellum": FamilyTraits(qk_norm="head", sliding_from="layer_types", rope_tables=True, moe="softmax"),
    # HunYuan MoE: HunYuan's attention (q / k norms after the rotation), a top-k MoE plus a shared MLP in every layer
    "hunyuan_v1_moe": FamilyTraits(qk_norm="after_rotary", moe="hunyuan"),
    # Hy3 (HunYuan 3): Qwen 3's attention, a sigmoid router in fp32 choosing on scores + the block's correction bias,
    # renormalised and scaled, shared experts, dense / sparse by mlp_layer_types
    "hy_v3": FamilyTraits(qk_norm="head", moe="hy"),
    # AFMoE (Arcee Trinity): per-head q / k norms, the attention's output gated by sigmoid(gate_proj x), only the
    # sliding layers rotating, sandwich norms; a sigmoid router (logits in the weights' dtype) choosing on scores + the
    # block's expert_bias, renormalised, times route_scale, shared experts, the first num_dense_layers dense; muP's
    # embeddings x sqrt(hidden) when mup_enabled
    "afmoe": FamilyTraits(qk_norm="head", sliding_from="layer_types", nope="global", moe="afmoe", norms="afmoe",
                          attn_gate=True),
    # MiMo-V2-Flash: sliding / full layers with a rope table each (partial rotary), the sliding ones with twice the KV
    # heads and attention sinks; values narrower than the keys (v_head_dim) and scaled (attention_value_scale);
    # DeepSeek-V3's routing without shared experts, a dense first layer
    "mimo_v2_flash": FamilyTraits(sliding_from="layer_types", rope_tables=True, moe="deepseek", mimo=True),
    # Flint: Qwen 3's attention with sinks in every layer, only the sliding layers rotating; fp32 norm scales (gpt-oss's
    # RMSNorm); an fp32 sigmoid router's top-k (renormalised by norm_topk_prob) plus an ungated shared expert, the
    # mlp_only_layers dense
    "flint": FamilyTraits(qk_norm="head", sliding_from="layer_types", nope="global", moe="flint", norm_fp32=True),
    # Kolibri-1: Exaone 4's attention (per-head q / k norms, only the sliding layers rotating) in GLM-4's sandwich
    # blocks; every MLP sparse: the top-k of the fp32 logits + a correction bias, weighted by their sigmoid
    # (renormalised by norm_topk_prob), plus shared experts
    "kolibri1": FamilyTraits(qk_norm="head", sliding_from="layer_types", nope="global", moe="kolibri", norms="glm4"),
    # Granite SWA (and its MoE: Granite 3 MoE's experts and shared MLP): Granite's multipliers, sliding / full layers,
    # attention sinks, a rope base per layer (0: NoPE)
    "granite_swa": FamilyTraits(granite=True, sliding_from="layer_types", nope="layer_rope_theta", layer_thetas=True),
    "granitemoe_swa": FamilyTraits(granite=True, moe="granite", sliding_from="layer_types", nope="layer_rope_theta",
                                   layer_thetas=True),
    # HyperCLOVA X: Granite's multipliers (the logits multiplied), Peri-LN output norms when use_post_norm
    "hyperclovax": FamilyTraits(granite=True, logits_multiplied=True, norms="peri"),
    # NanoChat: weightless RMSNorms (the embeddings' too), q / k norms after its sign-flipped rotation, a plain ReLU²
    # MLP (fc1 / fc2), soft-capped logits
    "nanochat": FamilyTraits(qk_norm="after_rotary", rope="flipped", plain_mlp=True, mlp_names=("", "fc1", "fc2"),
                             weightless_norms=True, logit_softcap=True),
    # Apertus: per-head q / k norms, a plain MLP with xIELU (its parameters per layer: XIELU), the pre-norms named
    # attention_layernorm / feedforward_layernorm
    "apertus": FamilyTraits(qk_norm="head", plain_mlp=True,
                            norm_names=("attention_layernorm", "feedforward_layernorm")),
    # VaultGemma: Gemma 2 without the norms on the attention's and the MLP's outputs (pre_feedforward_layernorm is the
    # MLP's input norm); soft caps, sliding / full layers, query_pre_attn_scalar as Gemma 2's
    "vaultgemma": FamilyTraits(sliding_from="layer_types", gemma=2),
}

# transformers' activation names -> the gated MLP's (``reference.gated_act``), and a plain MLP's (``reference.act``)
_GATED_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_PLAIN_ACTS = {"relu2": "relu2", "relu": "relu", "silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu": "gelu"}


def has_experts(model_type: str | None) -> bool:
    """Whether ``model_type`` is a family of this table with mixture-of-experts layers."""
    traits = FAMILY.get(model_type)
    return traits is not None and traits.moe != "none"


def sparse_by_first_k(config, i: int) -> bool:
    """DeepSeek-V3-style models: block ``i``'s MLP is sparse by ``mlp_layer_types`` where the config has them, else
    from ``first_k_dense_replace`` on."""
    types = getattr(config, "mlp_layer_types", None)
    if types:
        return types[i] == "sparse"
    return i >= (getattr(config, "first_k_dense_replace", 0) or 0)


def _sparse_layer(config, traits: FamilyTraits, i: int) -> bool:
    if traits.moe in ("mixtral", "minimax", "granite", "hunyuan", "kolibri"):
        return True
    if traits.moe in ("deepseek", "softmax", "hy"):
        return sparse_by_first_k(config, i)
    if traits.moe == "afmoe":
        return i >= (config.num_dense_layers or 0)
    if traits.moe in ("qwen", "flint"):
        return (i not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
                and (i + 1) % config.decoder_sparse_step == 0)
    if traits.moe == "ernie":
        return ((i + 1) % config.moe_layer_interval == 0 and config.moe_layer_start_index <= i
                <= config.moe_layer_end_index)
    return traits.moe == "olmoe"

# Rope types whose frequencies HF changes with the running sequence length.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def check_rope(config, rotary: nn.Module, inv_freq: torch.Tensor, rope_type: str, head_dim: int,
               max_seq_len: int) -> None:
    """Refuse a rope the static rotary table cannot reproduce (frequencies that change with the running length),
    or frequencies that do not fit the head."""
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        original = getattr(rotary, "original_max_seq_len", config.max_position_embeddings)
        if rope_type == "dynamic" or max_seq_len > original:
            raise UnsupportedModelError(
                f"rope_type={rope_type!r} changes its frequencies with the running sequence length, which the "
                f"static rotary table does not model (max_seq_len={max_seq_len}, original context {original}). "
                f"Supported rope types: default, linear, llama3, yarn, and longrope up to the original context.")
    if not 0 < inv_freq.numel() * 2 <= head_dim:
        raise UnsupportedModelError(
            f"{config.model_type} has {inv_freq.numel()} rotary frequencies for a head dim of {head_dim}.")


def rebuilt_rotary(model: nn.Module, max_seq_len: int, module: nn.Module | None = None):
    """(rotary module, rope type, head dim) of a model whose rotary embedding is ``model.model.rotary_emb`` (or
    ``module``): rebuilt from the config on the CPU (frequencies are computed, not loaded: a meta model too) and
    checked (:func:`check_rope`)."""
    config = model.config
    with torch.device("cpu"):
        rotary = type(module if module is not None else model.model.rotary_emb)(config=config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_type = getattr(rotary, "rope_type", "default")
    check_rope(config, rotary, rotary.inv_freq, rope_type, head_dim, max_seq_len)
    return rotary, rope_type, head_dim


def _sliding_window(config, traits: FamilyTraits, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if traits.sliding_from == "config":
        return window
    if traits.sliding_from == "layer_types":
        types = getattr(config, "layer_types", None)
        if types is not None and types[layer_idx] == "sliding_attention":
            return window
    return None


def _rotates(config, traits: FamilyTraits, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` rotates q and k (False: a NoPE layer)."""
    if traits.nope == "no_rope_layers":
        return bool(config.no_rope_layers[layer_idx])
    if traits.nope == "layer_rope_theta":     # (Granite SWA: a base of 0 is NoPE)
        return bool(config.layer_rope_theta[layer_idx])
    if traits.nope == "global":      # (Exaone 4: "global NoPE for hybrid attention", only without a window every layer)
        return getattr(config, "sliding_window", None) is None or config.layer_types[layer_idx] == "sliding_attention"
    return True


def typed_ropes(rotary: nn.Module) -> tuple[dict, tuple, tuple | None]:
    """A rotary module holding a table per layer type (Gemma 3 / 4, OLMo 3, LFM3): ({type: (inv_freq, attention scaling,
    rope type)}, the full layers' (or, without full layers, the sliding ones'), the sliding layers' or None)."""
    ropes = {kind: (getattr(rotary, f"{kind}_inv_freq"), float(getattr(rotary, f"{kind}_attention_scaling")),
                    rotary.rope_type[kind]) for kind in rotary.rope_type}
    return ropes, ropes.get("full_attention") or ropes["sliding_attention"], ropes.get("sliding_attention")


def _rope_of(rotary: nn.Module) -> tuple[torch.Tensor, float, str]:
    """(inv_freq, attention scaling, rope type) of a rotary module with one table."""
    return rotary.inv_freq, float(rotary.attention_scaling), getattr(rotary, "rope_type", "default")


def _layer_theta_ropes(config, rotary_type) -> tuple[tuple, tuple | None]:
    """(inv_freq, attention scaling, rope type) of the full layers and of the sliding ones (None: as the full ones)
    for a rope base per layer (``layer_rope_theta``, 0: NoPE; Granite SWA: HF builds one rotary module per base): one
    base per layer type is what two tables hold, more are refused."""
    thetas = {}
    for kind, theta in zip(config.layer_types, config.layer_rope_theta):
        if theta:
            thetas.setdefault(kind, set()).add(float(theta))
    if any(len(t) > 1 for t in thetas.values()):
        raise UnsupportedModelError(
            f"{config.model_type} with layer_rope_theta={list(config.layer_rope_theta)} (several rope bases among the "
            f"{'/'.join(k for k, t in thetas.items() if len(t) > 1)} layers) is not supported: the engine holds one "
            f"rope table for the full-attention layers and one for the sliding ones.")
    tables = {}
    for kind, (theta,) in thetas.items():
        theta_config = copy.deepcopy(config)
        theta_config.rope_parameters = {**config.rope_parameters, "rope_theta": theta}
        with torch.device("cpu"):
            rotary = rotary_type(theta_config)
        tables[kind] = _rope_of(rotary)
    if not tables:        # (every layer NoPE: a table nothing reads)
        with torch.device("cpu"):
            rotary = rotary_type(config)
        return _rope_of(rotary), None
    return tables.get("full_attention", tables.get("sliding_attention")), tables.get("sliding_attention")


class XIELU:
    """Apertus' xIELU over a plain MLP's up rows, its parameters read from the layer's ``act_fn`` (alpha_p, alpha_n
    [1], beta, eps), op for op as transformers' Python form in x's dtype: alpha_p = softplus(a_p), alpha_n = beta +
    softplus(a_n); x > 0: alpha_p x^2 + beta x, else (expm1(min(x, eps)) - x) alpha_n + beta x. The four factors are
    made once per device and dtype (a call then copies nothing from the host: CUDA graphs can capture it)."""

    def __init__(self, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor):
        self.params = (alpha_p, alpha_n, beta, eps)
        self._made: dict = {}

    @classmethod
    def of(cls, source: WeightSource, module: str) -> "XIELU":
        return cls(*(source.read(f"{module}.{n}", None, 0, 0).detach().float().cpu().clone()
                     for n in ("alpha_p", "alpha_n", "beta", "eps")))

    def factors(self, device, dtype) -> tuple[torch.Tensor, ...]:
        key = (torch.device(device), dtype)
        if key not in self._made:
            a_p, a_n, beta, eps = (t.to(device=device, dtype=dtype) for t in self.params)
            self._made[key] = (torch.nn.functional.softplus(a_p), beta + torch.nn.functional.softplus(a_n), beta, eps)
        return self._made[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p, alpha_n, beta, eps = self.factors(x.device, x.dtype)
        return torch.where(x > 0, alpha_p * x * x + beta * x, (torch.expm1(torch.min(x, eps)) - x) * alpha_n + beta * x)


class Negated(Rewritten):
    """Each head's rows [half, rotary) of ``names`` (q / k weights and biases) read negated, the others as they are:
    NanoChat's rotation by -angle (rotate-half with its signs flipped) in the engine's rotate-half layout. The rotated
    q and k come out with those dims negated, which leaves the scores q.k (and the per-head RMS norms that follow,
    weightless) unchanged; other names pass through."""

    def __init__(self, inner: WeightSource, names, head_dim: int, rotary_dim: int):
        super().__init__(inner)
        self.names, self.head_dim, self.rotary_dim = set(names), head_dim, rotary_dim

    def rewrites(self, name):
        return name in self.names

    def read(self, name, dim, start, length):
        t = self.inner.read(name, dim, start, length)
        if name not in self.names:
            return t
        rows = torch.arange(start, start + length) if dim == 0 else torch.arange(t.shape[0])
        within = rows % self.head_dim
        negated = (within >= self.rotary_dim // 2) & (within < self.rotary_dim)
        sign = torch.where(negated, -1.0, 1.0).to(t.dtype)
        return t * sign.view(-1, *([1] * (t.dim() - 1)))


class HeadPadded(Rewritten):
    """Heads narrower than the engine's head width read zero-padded to it: ``names[name] = (axis, heads, width,
    padded, factor)``, each of the ``heads`` blocks of ``width`` along ``axis`` (0: rows, v_proj; 1: columns, o_proj)
    followed by ``padded - width`` zeros, times ``factor`` (in fp32; 1: as stored). MiMo-V2-Flash's values (v_head_dim
    128 under keys of 192): the padded value dims are zero, so are the attention's outputs there, and o_proj's zero
    columns read them: the same output as the narrow heads', for a V cache and an o_proj input 192 / 128 as wide;
    other names pass through."""

    def __init__(self, inner: WeightSource, names: dict):
        super().__init__(inner)
        self.names = names

    def rewrites(self, name):
        return name in self.names

    def shape(self, name):
        shape = list(self.inner.shape(name))
        if name in self.names:
            axis, heads, _, padded, _ = self.names[name]
            shape[axis] = heads * padded
        return tuple(shape)

    def read(self, name, dim, start, length):
        if name not in self.names:
            return self.inner.read(name, dim, start, length)
        axis, heads, width, padded, factor = self.names[name]
        t = self.inner.read(name, None, 0, 0)          # (the whole tensor: attention projections are small)
        t = t.float() * factor if factor != 1.0 else t
        parts = t.unflatten(axis, (heads, width))
        pad = list(parts.shape)
        pad[axis + 1] = padded - width
        t = torch.cat([parts, parts.new_zeros(pad)], dim=axis + 1).flatten(axis, axis + 1)
        return t if dim is None else t.narrow(dim, start, length)


def _kv_heads(config, traits: FamilyTraits, i: int) -> int | None:
    """Layer ``i``'s KV heads where they are its own (MiMo-V2-Flash's sliding layers: twice the config's), else None."""
    if traits.mimo and _sliding_window(config, traits, i) is not None:
        return 2 * config.num_key_value_heads
    return None


def _mimo_values(config, source: WeightSource, names: set[str], head_dim: int, traits: FamilyTraits) -> WeightSource:
    """MiMo-V2-Flash's v_proj (weight and bias) and o_proj read with each value head zero-padded from v_head_dim to
    head_dim, v_proj's rows times attention_value_scale (:class:`HeadPadded`)."""
    width = config.v_head_dim
    factor = float(config.attention_value_scale) if config.attention_value_scale is not None else 1.0
    if width > head_dim:
        raise UnsupportedModelError(f"{config.model_type} with v_head_dim={width} wider than head_dim={head_dim} is "
                                    f"not supported (values are read padded to the keys' width).")
    pads = {}
    for i in range(config.num_hidden_layers):
        a = f"model.layers.{i}.self_attn"
        kv = _kv_heads(config, traits, i) or config.num_key_value_heads
        for kind in ("weight", "bias"):
            if f"{a}.v_proj.{kind}" in names:
                pads[f"{a}.v_proj.{kind}"] = (0, kv, width, head_dim, factor)
        pads[f"{a}.o_proj.weight"] = (1, config.num_attention_heads, width, head_dim, 1.0)
    return HeadPadded(source, pads)


def _refuse(config, traits: FamilyTraits) -> None:
    """Settings of these families the engine does not reproduce: refused by name, before any weight is read."""
    mt = config.model_type
    if getattr(config, "clip_qkv", None) is not None:
        raise UnsupportedModelError(f"{mt} with clip_qkv={config.clip_qkv} (q, k and v clamped after the projection) "
                                    f"is not supported by the fused engine; clip_qkv=None is.")
    if (mt == "smollm3" and not getattr(config, "use_sliding_window", False)
            and "sliding_attention" in (getattr(config, "layer_types", None) or [])):
        raise UnsupportedModelError(
            "smollm3 with layer_types naming sliding_attention layers while use_sliding_window=False is not supported "
            "(transformers' attention implementations disagree there: the masks slide, the flash kernels do not); set "
            "use_sliding_window=True or make every layer full_attention.")


# Expert parts as checkpoints store them (transformers' WeightConverter merges them into the 3D tensors on load).
_EXPERT_PARTS = {"mixtral": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
                 "qwen": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}}
_EXPERT_PARTS["olmoe"] = _EXPERT_PARTS["deepseek"] = _EXPERT_PARTS["ernie"] = _EXPERT_PARTS["qwen"]
for _kind in ("softmax", "hunyuan", "hy", "afmoe", "flint", "kolibri"):
    _EXPERT_PARTS[_kind] = _EXPERT_PARTS["qwen"]
_EXPERT_PARTS["minimax"] = _EXPERT_PARTS["mixtral"]
_EXPERT_PARTS["nemotron_h"] = {"up_proj": ("up_proj",), "down_proj": ("down_proj",)}     # (experts without a gate)


def num_experts(config) -> int:
    """The routed experts of a MoE config, whichever name it gives them."""
    for name in ("n_routed_experts", "num_local_experts", "num_experts"):
        n = getattr(config, name, None)
        if n:
            return n
    raise UnsupportedModelError(f"{config.model_type}: the config names no number of experts.")


def _experts(source: WeightSource, config, traits: FamilyTraits, mlp: str, name: str):
    """The ref of ``{mlp}.experts.{name}`` (3D): the tensor itself where the source holds it (a model in memory), else
    its per-expert parts from a checkpoint, stacked on read (:class:`ExpertStack`)."""
    fused = f"{mlp}.experts.{name}"
    entries = getattr(source, "entries", None)
    if entries is None or fused in entries:
        return source.ref(fused)
    n = num_experts(config)
    stacks = [[f"{mlp}.experts.{e}.{part}.weight" for part in _EXPERT_PARTS[traits.moe][name]] for e in range(n)]
    missing = [p for parts in stacks for p in parts if p not in entries]
    if missing:
        raise ValueError(f"the checkpoint holds neither {fused} nor the experts one by one (missing e.g. "
                         f"{missing[0]}; names there look like {sorted(entries)[:3]}).")
    return ExpertStack(source, {fused: stacks}).ref(fused)


def _packed_slices(config, head_dim: int, packed: str) -> dict[str, tuple]:
    """Phi-3's packed ``qkv_proj`` (q rows, then k, then v) and ``gate_up_proj`` (gate rows, then up; ``packed`` "mlp":
    that one only) under the unpacked names the reader uses (:class:`RowSlices` entries)."""
    q, kv, inter = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.intermediate_size
    slices = {}
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        if packed == "all":
            for part, first, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                slices[f"{a}.{part}_proj.weight"] = (f"{a}.qkv_proj.weight", first, rows)
        for part, first in (("gate", 0), ("up", inter)):
            slices[f"{m}.{part}_proj.weight"] = (f"{m}.gate_up_proj.weight", first, inter)
    return slices


def _interleaved_slices(config, names: set[str], head_dim: int, rotary_dim: int) -> dict[str, tuple]:
    """Each head's rotary rows of q and k (weights and biases) in the order (0, 2, 4, ..., 1, 3, 5, ...), the rest of
    the head after them as it is: interleaved pairs (GLM, ERNIE 4.5) read in the engine's rotate-half layout."""
    slices = {}
    for i in range(config.num_hidden_layers):
        for part, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{part}_proj.{kind}"
                if name in names:
                    slices[name] = (name, rotate_half_pieces(heads, head_dim, rotary_dim))
    return slices


def _same_rope(a, b) -> bool:
    """Whether two (inv_freq, attention scaling, rope type) give the same table (then one table serves both)."""
    return a[1] == b[1] and a[0].shape == b[0].shape and bool(torch.equal(a[0], b[0]))


def read_llama_family(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (as lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    traits = FAMILY[config.model_type]
    _refuse(config, traits)
    act_name = "hidden_activation" if traits.gemma >= 2 else "hidden_act"
    act = getattr(config, act_name, None) or getattr(config, "hidden_act", "silu")
    acts = {**_PLAIN_ACTS, "xielu": "xielu"} if traits.plain_mlp and act == "xielu" else \
        _PLAIN_ACTS if traits.plain_mlp else _GATED_ACTS      # (xIELU: Apertus' plain MLP, per layer: XIELU)
    if act not in acts:
        raise UnsupportedModelError(
            f"{config.model_type} with {act_name}={act!r} is not supported (the fused "
            f"{'plain' if traits.plain_mlp else 'gated'} MLP takes {', '.join(sorted(acts))}).")
    # (behind a vision-language wrapper the wrapper gives the mask: PaliGemma's causal one with its prefix as a block)
    if getattr(config, "use_bidirectional_attention", False) and not model.__dict__.get("_dsinfer_language_model"):
        raise UnsupportedModelError(
            f"{config.model_type} with use_bidirectional_attention=True (an encoder-style mask) is not supported: the "
            f"engine's attention is causal.")
    source = source or ModuleSource(model)
    base = model.model
    with torch.device("cpu"):     # frequencies are computed, not loaded: rebuild them even for a meta model
        rotary = type(base.rotary_emb)(config=config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # (inv_freq, attention scaling, rope type) of every layer, and of the sliding-window layers (Gemma 3, OLMo 3)
    if traits.rope_tables:
        _, main, sliding = typed_ropes(rotary)
    elif traits.layer_thetas:
        main, sliding = _layer_theta_ropes(config, type(base.rotary_emb))
    else:
        main = _rope_of(rotary)
        sliding = None
    for inv_freq, _, rope_type in [main] + ([sliding] if sliding else []):
        check_rope(config, rotary, inv_freq, rope_type, head_dim, max_seq_len)
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    slices = {}
    if traits.packed != "none":   # q / k / v and gate / up as row ranges of the packed tensors, each read on its own
        slices.update(_packed_slices(config, head_dim, traits.packed))
    if traits.rope == "interleaved":
        slices.update(_interleaved_slices(config, names, head_dim, 2 * main[0].numel()))
    if traits.moe == "granite":   # GraniteMoE-Shared: shared_mlp.input_linear holds gate rows, then up rows
        inter = getattr(config, "shared_intermediate_size", 0)
        for i in range(config.num_hidden_layers):
            shared = f"model.layers.{i}.shared_mlp"
            if f"{shared}.input_linear.weight" in names:
                for part, first in (("gate", 0), ("up", inter)):
                    slices[f"{shared}.{part}_proj.weight"] = (f"{shared}.input_linear.weight", first, inter)
    if slices:
        source = RowSlices(source, slices)
        names |= set(slices)
    if traits.rope == "flipped":
        if 2 * main[0].numel() != head_dim:
            raise UnsupportedModelError(f"{config.model_type} with {2 * main[0].numel()} rotary dims of a head of "
                                        f"{head_dim} is not supported (transformers rotates whole heads).")
        flipped = [f"model.layers.{i}.self_attn.{p}_proj.{kind}" for i in range(config.num_hidden_layers)
                   for p in "qk" for kind in ("weight", "bias")]
        source = Negated(source, [n for n in flipped if n in names], head_dim, head_dim)
    if traits.norms == "peri" and traits.granite:     # h + m * norm(x) == h + norm'(x), norm' = m * norm's weight
        peri = {f"model.layers.{i}.{n}.weight": float(config.residual_multiplier)
                for i in range(config.num_hidden_layers) for n in ("post_norm1", "post_norm2")}
        source = Scaled(source, {n: f for n, f in peri.items() if n in names})

    if traits.mimo:
        source = _mimo_values(config, source, names, head_dim, traits)

    ref, opt = lookups(source, names)

    qk_norm = traits.qk_norm if getattr(config, "use_qk_norm", True) else "none"    # (GLM-4.5: by the config)
    q_norm, k_norm = {"none": (None, None), "after_rotary": ("query_layernorm", "key_layernorm")}.get(
        qk_norm, ("q_norm", "k_norm"))
    if traits.weightless_norms:
        q_norm, k_norm = "q_norm", "k_norm"
    gate_n, up_n, down_n = traits.mlp_names

    def norm_ref(name, size=config.hidden_size):      # (NanoChat's norms have no weight: ones)
        return Ones().ref((size,)) if traits.weightless_norms else ref(f"{name}.weight")

    routing, router_bias = None, None
    if traits.moe == "deepseek":
        from lightning_dsinfer.policies.deepseek import routing_of

        routing, router_bias = routing_of(config), "gate.e_score_correction_bias"
    elif traits.moe == "minimax":      # (the router's logits in its weights' dtype, as HF's; no groups, no scale)
        routing = Routing(scoring="sigmoid", renormalize=True)
        router_bias = "e_score_correction_bias"
    elif traits.moe == "hy":           # (V3's choice without groups, the scale named router_scaling_factor)
        routing = Routing(scoring="sigmoid", renormalize=True, eps=1e-20, scale=float(config.router_scaling_factor),
                          fp32=True)
        router_bias = "e_score_correction_bias"
    elif traits.moe == "kolibri":      # (the choice on the logits + bias, not on their sigmoid)
        routing = Routing(scoring="sigmoid", renormalize=bool(config.norm_topk_prob), fp32=True, choose_on_logits=True)
        router_bias = "gate.e_score_correction_bias"
    elif traits.moe == "flint":        # (no correction bias, no scale; the router in fp32 as HF keeps it)
        routing = Routing(scoring="sigmoid", renormalize=bool(config.norm_topk_prob), fp32=True)
    elif traits.moe == "afmoe":        # (the choice as Hy3's, the logits in the router's dtype as MiniMax-M2's)
        routing = Routing(scoring="sigmoid", renormalize=True, eps=1e-20, scale=float(config.route_scale or 1.0))
        router_bias = "expert_bias"
    elif traits.moe == "granite":      # (top-k of the logits, softmax over those k)
        routing = Routing(scoring="topk_softmax")
    elif traits.moe == "ernie":        # (the bias [1, E] broadcasts over the tokens' scores)
        routing = Routing(scoring="softmax", fp32=True, renormalize=True, sum_floor=float(config.moe_norm_min))
        router_bias = "gate.moe_statics.e_score_correction_bias"
    elif traits.moe == "hunyuan" and base.layers[0].mlp.gate.wg.weight.dtype == torch.float32:
        # (HunYuan builds its router in fp32 and keeps it there when loaded in bf16: logits from the input in fp32, the
        # weights fp32; a router cast to the model's dtype routes as the plain softmax top-k, weights in that dtype)
        routing = Routing(scoring="softmax", fp32=True, renormalize=True)
    shared_name = {"deepseek": "shared_experts", "ernie": "shared_experts", "hy": "shared_experts",
                   "afmoe": "shared_experts", "kolibri": "shared_experts", "hunyuan": "shared_mlp"}.get(
        traits.moe, "shared_expert")
    axes = None
    if traits.mrope != "none":
        try:
            axes = mrope_axes(main[0].numel(), rotary.mrope_section, interleaved=traits.mrope == "interleaved")
        except ValueError as e:
            raise UnsupportedModelError(f"{config.model_type}: {e}") from None
    temperature = None
    if traits.position_temperature and config.rope_parameters.get("llama_4_scaling_beta") is not None:
        temperature = (float(config.rope_parameters["llama_4_scaling_beta"]),
                       float(config.rope_parameters["original_max_position_embeddings"]), "position")
    layers = []
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        moe = None
        if _sparse_layer(config, traits, i):
            router = {"hunyuan": f"{m}.gate.wg.weight", "afmoe": f"{m}.router.gate.weight"}.get(traits.moe,
                                                                                               f"{m}.gate.weight")
            top_k = config.num_experts_per_tok    # (HunYuan's moe_topk may be a list: one per layer)
            top_k = top_k[i] if isinstance(top_k, (list, tuple)) else top_k
            shared_mlp, shared_down = f"{m}.{shared_name}", f"{m}.{shared_name}.down_proj.weight"
            if traits.moe == "granite":
                m = f"model.layers.{i}.block_sparse_moe"
                router = f"{m}.router.weight"
                shared_mlp = f"model.layers.{i}.shared_mlp"
                shared_down = f"{shared_mlp}.output_linear.weight"
            shared = f"{shared_mlp}.gate_proj.weight" in names
            moe = MoEWeights(
                router=ref(router), gate_up=_experts(source, config, traits, m, "gate_up_proj"),
                down=_experts(source, config, traits, m, "down_proj"), top_k=top_k,
                renormalize=(routing.renormalize if routing is not None else traits.moe in ("mixtral", "hunyuan")
                             or traits.topk_renormalized or bool(getattr(config, "norm_topk_prob", False))),
                weights_in_dtype=traits.moe in ("qwen", "olmoe", "softmax", "hunyuan"),
                shared_gate=ref(f"{shared_mlp}.gate_proj.weight") if shared else None,
                shared_up=ref(f"{shared_mlp}.up_proj.weight") if shared else None,
                shared_down=ref(shared_down) if shared else None,
                shared_expert_gate=opt(f"{m}.shared_expert_gate.weight"),
                routing=routing, router_bias=ref(f"{m}.{router_bias}") if router_bias else None)
        dense = moe is None
        gated = dense and not traits.plain_mlp
        norm = f"model.layers.{i}"
        if traits.norms == "post":       # OLMo 2, Exaone 4: no input norms, the outputs normed
            input_norm, post_norm = None, None
            attn_out, mlp_out = f"{norm}.post_attention_layernorm", f"{norm}.post_feedforward_layernorm"
        elif traits.norms == "afmoe":
            input_norm, post_norm = f"{norm}.input_layernorm", f"{norm}.pre_mlp_layernorm"
            attn_out, mlp_out = f"{norm}.post_attention_layernorm", f"{norm}.post_mlp_layernorm"
        elif traits.norms == "glm4":
            input_norm, post_norm = f"{norm}.input_layernorm", f"{norm}.post_attention_layernorm"
            attn_out, mlp_out = f"{norm}.post_self_attn_layernorm", f"{norm}.post_mlp_layernorm"
        elif traits.norms == "peri":     # (HyperCLOVA X without use_post_norm: Identity, no weights)
            input_norm, post_norm = f"{norm}.input_layernorm", f"{norm}.post_attention_layernorm"
            attn_out, mlp_out = (f"{norm}.{n}" if f"{norm}.{n}.weight" in names else None
                                 for n in ("post_norm1", "post_norm2"))
        elif f"{norm}.pre_feedforward_layernorm.weight" in names:        # Gemma 2 / 3 (VaultGemma: no output norms)
            input_norm, post_norm = f"{norm}.input_layernorm", f"{norm}.pre_feedforward_layernorm"
            attn_out, mlp_out = (f"{norm}.{n}" if f"{norm}.{n}.weight" in names else None
                                 for n in ("post_attention_layernorm", "post_feedforward_layernorm"))
        else:
            input_norm, post_norm = (f"{norm}.{n}" for n in traits.norm_names)
            attn_out = mlp_out = None
        layers.append(LayerWeights(
            **attention_refs(ref, opt, a),
            gate=ref(f"{m}.{gate_n}.weight") if gated else None, up=ref(f"{m}.{up_n}.weight") if dense else None,
            down=ref(f"{m}.{down_n}.weight") if dense else None,
            gate_bias=opt(f"{m}.{gate_n}.bias"), up_bias=opt(f"{m}.{up_n}.bias"), down_bias=opt(f"{m}.{down_n}.bias"),
            input_norm=norm_ref(input_norm) if input_norm else None,
            post_norm=norm_ref(post_norm) if post_norm else None,
            attn_out_norm=ref(f"{attn_out}.weight") if attn_out else None,
            mlp_out_norm=ref(f"{mlp_out}.weight") if mlp_out else None,
            q_norm=norm_ref(f"{a}.{q_norm}", head_dim) if q_norm else None,
            k_norm=norm_ref(f"{a}.{k_norm}", head_dim) if k_norm else None,
            qk_norm_kind="head" if qk_norm == "none" else qk_norm, rotary=_rotates(config, traits, i),
            sliding_window=_sliding_window(config, traits, i), moe=moe, attn_temperature=temperature,
            out_scale=config.residual_multiplier if traits.granite and attn_out is None else None,
            num_kv_heads=_kv_heads(config, traits, i), sinks=opt(f"{a}.sinks"),
            attn_gate=ref(f"{a}.gate_proj.weight") if traits.attn_gate else None,
            mlp_act=XIELU.of(source, f"{m}.act_fn") if act == "xielu" and dense else None,
        ))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        # (Kolibri-1's config has no dense width: every MLP is sparse)
        intermediate_size=getattr(config, "intermediate_size", None) or config.moe_intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps,
        scaling=getattr(base.layers[0].self_attn, "scaling", head_dim ** -0.5),
        inv_freq=main[0].detach(), attention_scaling=main[1], rope_type=main[2],
        embed=ref("model.embed_tokens.weight"), final_norm=norm_ref("model.norm"),
        embed_norm=Ones().ref((config.hidden_size,)) if traits.weightless_norms else None,
        lm_head=ref("model.embed_tokens.weight" if tied else "lm_head.weight"), lm_head_bias=opt("lm_head.bias"),
        tied_embeddings=tied, layers=layers,
        norm_offset=1.0 if traits.gemma else 0.0, norm_fp32=traits.norm_fp32,
        embed_scale=(config.hidden_size ** 0.5 if traits.gemma or getattr(config, "mup_enabled", False)
                     else config.embedding_multiplier if traits.granite else None),
        embed_scale_rounded=bool(traits.gemma), embed_scale_on="module" if traits.gemma else "all",
        logit_scale=(config.logits_scaling if traits.logits_multiplied else 1.0 / config.logits_scaling)
        if traits.granite else None,
        # (HF's Gemma 3 attention does not apply attn_logit_softcapping even when the config sets it)
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if traits.gemma == 2 else None,
        final_softcap=(getattr(config, "final_logit_softcapping", None) if traits.gemma or traits.logit_softcap
                       else None),
        mlp_act=acts[act], mlp_gated=not traits.plain_mlp,
        sliding_inv_freq=sliding[0].detach() if sliding and not _same_rope(sliding, main) else None,
        sliding_attention_scaling=sliding[1] if sliding else 1.0, mrope_axes=axes,
    )
