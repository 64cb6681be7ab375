"""What a policy hands the engine: the model's numbers and, per layer, each weight by role.

Policies are the only code that knows transformers' module names and weight layouts. The engine
asks a policy for a :class:`ModelWeights` of lazy :class:`WeightRef`s, so each rank reads only the
slices it owns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_dsinfer.kernels.reference import Routing
from lightning_dsinfer.policies.weights import WeightRef


class UnsupportedModelError(ValueError):
    """The model (or one of its settings) has no policy; the message names it and what is supported."""


@dataclass
class MoEWeights:
    """A sparse MoE MLP: router [E, H], the experts' fused gate|up [E, 2I, H] and down [E, H, I] (transformers 5
    layout), and, Qwen2-MoE, a shared expert (gate / up / down) scaled by sigmoid(shared_gate [1, H] @ x)."""
    router: WeightRef
    gate_up: WeightRef
    down: WeightRef
    top_k: int
    renormalize: bool                       # divide the top-k probabilities by their sum (Mixtral; Qwen: norm_topk_prob)
    weights_in_dtype: bool                  # routing weights rounded to the model dtype before use (Qwen) or fp32 (Mixtral)
    shared_gate: WeightRef | None = None
    shared_up: WeightRef | None = None
    shared_down: WeightRef | None = None
    shared_expert_gate: WeightRef | None = None
    expert_parallel: bool = False           # whole experts placed over the tensor-parallel group (not sliced)
    routing: Routing | None = None          # DeepSeek's grouped routers (kernels.reference.Routing); None: softmax top-k
    router_bias: WeightRef | None = None    # DeepSeek-V3's e_score_correction_bias [E] (fp32); gpt-oss's router bias
    # gpt-oss: the experts' biases, gate_up_bias [E, 2I] (gate | up, as gate_up's rows) and down_bias [E, H], and their
    # activation (kernels.reference.ClampedSwiGLU; None: SwiGLU)
    gate_up_bias: WeightRef | None = None
    down_bias: WeightRef | None = None
    act: object = None
    # NemotronH: experts without a gate, ``gate_up`` their up rows alone [E, I, H] and ``act`` a
    # ``reference.PlainAct``; the shared expert likewise (``shared_gate`` None, ``shared_up`` / ``shared_down``, the
    # biases where the model has them)
    gated: bool = True
    shared_up_bias: WeightRef | None = None
    shared_down_bias: WeightRef | None = None
    # NemotronH's latent experts (``moe_latent_size``): fc1_latent_proj [L, H] before them, fc2_latent_proj [H, L]
    # after (the experts then [E, I, L] / [E, L, I]), with their biases where the model has them
    latent_in: WeightRef | None = None
    latent_in_bias: WeightRef | None = None
    latent_out: WeightRef | None = None
    latent_out_bias: WeightRef | None = None
    expert_scale: WeightRef | None = None   # Gemma 4: the chosen experts' weights times this [E] (Routing.expert_scale)

    @property
    def expert_inter(self) -> int:
        """An expert's intermediate size (all of it: expert slicing splits it over the ranks)."""
        return self.gate_up.shape[1] // (2 if self.gated else 1)

    @property
    def shared_inter(self) -> int:
        """The shared expert's intermediate size (0: none)."""
        return self.shared_up.shape[0] if self.shared_up is not None else 0


@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention's numbers (DeepSeek-V2 / V3): q through a low-rank ``q_lora_rank`` (0: a plain
    q_proj), K/V compressed to one latent of ``kv_lora_rank`` per token plus a shared rotary key of
    ``qk_rope_head_dim``; per head, q and k are ``qk_nope_head_dim`` + ``qk_rope_head_dim`` wide, v
    ``v_head_dim``. ``rope_interleave``: the rotary dims are laid out in pairs (read as rotate-half by reordering the
    rows that produce them). The KV cache holds the latent and the rotary key: ``cache_dim`` values per token.
    ``norm_eps``: the eps of q_a_layernorm and kv_a_layernorm (HF builds them with RMSNorm's default, 1e-6, not with
    ``rms_norm_eps``)."""
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass
class MLAWeights:
    """One block's latent attention: ``q_a`` (q_a_proj, or q_proj when there is no q low rank), ``q_a_norm`` and
    ``q_b`` (None without the low rank), ``kv_a`` (kv_a_proj_with_mqa: latent rows, then the rotary key's),
    ``kv_a_norm``, ``kv_b`` (per head: k_nope rows, then v rows); the block's ``o`` is in :class:`LayerWeights`."""
    shape: MLAShape
    q_a: WeightRef
    q_a_norm: WeightRef | None
    q_b: WeightRef | None
    kv_a: WeightRef
    kv_a_norm: WeightRef
    kv_b: WeightRef
    q_a_bias: WeightRef | None = None
    kv_a_bias: WeightRef | None = None


@dataclass
class DeltaNetWeights:
    """A Gated DeltaNet token mixer (Qwen3-Next / Qwen3.5 linear attention, ``modules/gated_deltanet.py``): in_proj's
    q, k [Hk Dk, H], v, z [Hv Dv, H], b, a [Hv, H] (``in_proj``: six refs, read into one fused GEMM in that order;
    under tensor parallelism each rank reads its key and value heads' rows), the depthwise convolution of the q | k | v
    channels [C, 1, K], ``dt_bias`` and ``a_log`` [Hv], the gated norm's weight [Dv] (no offset), out_proj
    (``LayerWeights.o``). ``beta_scale``: beta = sigmoid(b) x it (OLMo Hybrid's allow_neg_eigval: 2); ``norm_eps``: the
    gated norm's epsilon where it is not the model's (OLMo Hybrid: 1e-5)."""
    in_proj: list
    conv: WeightRef
    dt_bias: WeightRef
    a_log: WeightRef
    norm: WeightRef
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    kernel: int
    beta_scale: float = 1.0
    norm_eps: float | None = None


@dataclass
class ShortConvWeights:
    """LFM2's gated short convolution (``modules/gated_deltanet.ShortConv``): in_proj [3C, H] (B | C | x rows; under
    tensor parallelism each rank reads its channels of each), the depthwise convolution [C, 1, K], out_proj
    (``LayerWeights.o``)."""
    in_proj: WeightRef
    conv: WeightRef
    channels: int
    kernel: int


@dataclass
class Mamba2Weights:
    """A Mamba-2 mixer (Granite 4's ``mamba`` blocks, ``modules/gated_deltanet.Mamba2Mixer``): in_proj [I + C + H, H]
    (z | x B C | dt rows), the depthwise convolution [C, 1, K] over the C = I + 2 G N x B C channels and its bias,
    dt_bias / A_log / D [H], the gated group norm's weight [I], out_proj (``LayerWeights.o``); I = H P."""
    in_proj: WeightRef
    conv: WeightRef
    conv_bias: WeightRef | None
    dt_bias: WeightRef
    a_log: WeightRef
    d: WeightRef
    norm: WeightRef
    heads: int
    head_dim: int
    groups: int
    state_size: int
    channels: int
    kernel: int
    dt_limit: tuple[float, float]
    # the read-out before out_proj: "norm_after_gate" (Granite 4: RMSNorm per group of y silu(z), times ``norm``),
    # "gate" (y silu(z), no norm: Falcon-H1 without mamba_rms_norm; ``norm`` None), "norm_before_gate" (RMSNorm per
    # group of y, times ``norm``, times silu(z))
    gating: str = "norm_after_gate"
    # Falcon-H1: the mixer beside the block's attention, its own out_proj (None: ``LayerWeights.o`` is out_proj)
    out_proj: WeightRef | None = None
    out_proj_bias: WeightRef | None = None

    @property
    def beside_attention(self) -> bool:
        """Falcon-H1's: the block's attention runs beside it (its own out_proj; gated_deltanet.ParallelMixer)."""
        return self.out_proj is not None


@dataclass
class Mamba1Weights:
    """A Mamba-1 mixer (``mamba``, FalconMamba, Jamba; ``modules/gated_deltanet.Mamba1Mixer``): in_proj [2I, H] (x | z
    rows), the depthwise convolution [I, 1, K] and its bias, x_proj [R + 2N, I] (dt | B | C rows), dt_proj [I, R] and
    its bias, A_log [I, N], D [I], out_proj (``LayerWeights.o``); ``norms``: the RMSNorms of dt, B and C with
    ``norm_eps`` ("weights": Jamba's, ``dt_norm`` / ``b_norm`` / ``c_norm``; "weightless": FalconMamba's; None)."""
    in_proj: WeightRef
    conv: WeightRef
    conv_bias: WeightRef | None
    x_proj: WeightRef
    dt_proj: WeightRef
    dt_bias: WeightRef
    a_log: WeightRef
    d: WeightRef
    inner: int
    state_size: int
    rank: int
    kernel: int
    norms: str | None = None
    norm_eps: float = 1e-6
    dt_norm: WeightRef | None = None
    b_norm: WeightRef | None = None
    c_norm: WeightRef | None = None


@dataclass
class LayerWeights:
    q: WeightRef
    k: WeightRef
    v: WeightRef
    o: WeightRef
    gate: WeightRef | None                  # dense MLP (None in a MoE layer: see ``moe``)
    up: WeightRef | None
    down: WeightRef | None
    input_norm: WeightRef
    post_norm: WeightRef | None             # None: one norm feeds attention and MLP (GPT-J, Phi: parallel residual)
    q_bias: WeightRef | None = None
    k_bias: WeightRef | None = None
    v_bias: WeightRef | None = None
    o_bias: WeightRef | None = None
    gate_bias: WeightRef | None = None
    up_bias: WeightRef | None = None
    down_bias: WeightRef | None = None
    q_norm: WeightRef | None = None
    k_norm: WeightRef | None = None
    qk_norm_kind: str = "head"              # q_norm / k_norm: "head" (one head's D, before rotary: Qwen3); "whole"
                                            # (the whole q / k projection, [Hq D] / [Hkv D], before rotary: OLMo 2);
                                            # "after_rotary" (per head, on the rotated q / k: HunYuan)
    rotary: bool = True                     # False: this layer does not rotate q / k (NoPE: SmolLM3, Exaone 4)
    sliding_window: int | None = None
    attention_chunk: int | None = None      # Llama 4: keys of the query's chunk only (chunks of this many tokens from
                                            # each row's first real token)
    attn_temperature: tuple[float, float, str] | None = None   # q x (log(1 + floor(i / floor_scale)) * attn_scale + 1):
                                            # (attn_scale, floor_scale, "column": Llama 4's NoPE layers, i = cache
                                            # column + 1 | "position": Ministral 3, i = the token's position)
    moe: MoEWeights | None = None
    # Gemma 2 / 3 "sandwich" norms: on the attention's and the MLP's output, before each residual add (``post_norm``
    # is then the MLP's input norm, HF's pre_feedforward_layernorm)
    attn_out_norm: WeightRef | None = None
    mlp_out_norm: WeightRef | None = None
    # LayerNorm biases (the GPT families; ``ModelWeights.layer_norm``)
    input_norm_bias: WeightRef | None = None
    post_norm_bias: WeightRef | None = None
    out_scale: float | None = None          # Granite's residual_multiplier: o and down (weights, biases) scaled by it
    mla: MLAWeights | None = None           # DeepSeek: latent attention (q / k / v are None then)
    sinks: WeightRef | None = None          # gpt-oss: attention sinks, a logit per head [Hq] in every softmax
    q_norm_bias: WeightRef | None = None    # qk_norm_kind "layer" (Persimmon): q / k LayerNormed per head, these the
    k_norm_bias: WeightRef | None = None    # biases [D] of q_norm / k_norm (HeadLayerNormAttention)
    clip_qkv: float | None = None           # q, k and v clamped to [-clip, clip] after their projection (OLMo, MPT,
                                            # DBRX: ClampedQKVAttention)
    mlp_act: object = None                  # this layer's plain-MLP activation where it has parameters of its own
                                            # (Apertus' xIELU: a callable over the up rows; None: ModelWeights.mlp_act)
    deltanet: DeltaNetWeights | None = None  # Qwen3-Next / 3.5: linear attention instead (q / k / v None then)
    attn_gate: WeightRef | None = None      # Qwen3-Next / 3.5: attention's output x sigmoid(gate rows [Hq D, H] @ x)
    attn_gate_bias: WeightRef | None = None
    shortconv: ShortConvWeights | None = None   # LFM2: a gated short convolution instead (q / k / v None then)
    mamba1: Mamba1Weights | None = None      # Mamba, FalconMamba, Jamba: a Mamba-1 mixer instead (q / k / v None)
    mamba: Mamba2Weights | None = None       # Granite 4: a Mamba-2 mixer instead (q / k / v None then); Falcon-H1:
                                             # beside the attention (q / k / v set, ``mamba.out_proj`` its own)
    # Gemma 4: this layer's own attention shape and MLP width (None: the model's), v RMS-normed without a scale
    # before the cache, K/V not computed but read from layer ``kv_source``'s (the last layer of its type that has its
    # own), and after the MLP a per-layer input gate (``per_layer_*``, :class:`PerLayerEmbeddings`) and the stream
    # times ``layer_scalar``
    head_dim: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    v_norm: bool = False
    kv_source: int | None = None
    per_layer_gate: WeightRef | None = None      # [P, H]
    per_layer_proj: WeightRef | None = None      # [H, P]
    per_layer_norm: WeightRef | None = None      # [H]
    layer_scalar: WeightRef | None = None        # [1]
    beside: ExpertsBeside | None = None          # Gemma 4 26B-A4B: ``moe`` runs beside the dense MLP (gate / up / down)


@dataclass
class ExpertsBeside:
    """Gemma 4's experts beside the dense MLP (the layer's ``moe``): the router reads the block's residual stream
    RMS-normed without a weight, times ``router_scale`` [H] and hidden_size ** -0.5; the experts read it normed by
    ``experts_in``; the MLP's output normed by ``dense_out`` plus the experts' normed by ``experts_out`` is what the
    block's MLP-output norm then sees."""
    router_scale: WeightRef
    experts_in: WeightRef
    experts_out: WeightRef
    dense_out: WeightRef


@dataclass
class PerLayerEmbeddings:
    """Gemma 4's per-layer inputs (PLE): each token's row of ``embed`` [V', L P] times ``embed_scale`` (rounded to the
    dtype), plus the RMS-normed (``norm`` [P]) projection of the token's embedding by ``projection`` [L P, H] times
    ``projection_scale``, both times ``input_scale``: [B, T, L, P], one [P] row per layer and token, which layer i
    gates into its stream after its MLP (``LayerWeights.per_layer_*``)."""
    embed: WeightRef
    projection: WeightRef
    norm: WeightRef
    layers: int
    dim: int
    embed_scale: float
    projection_scale: float
    input_scale: float


@dataclass
class ModelWeights:
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    scaling: float
    inv_freq: torch.Tensor                 # computed from the config, not loaded
    attention_scaling: float
    rope_type: str
    embed: WeightRef
    final_norm: WeightRef
    lm_head: WeightRef
    lm_head_bias: WeightRef | None
    tied_embeddings: bool
    layers: list[LayerWeights] = field(default_factory=list)
    # Gemma: every RMSNorm scales by (norm_offset + weight), the embedding rows by embed_scale (rounded to the
    # dtype), attention scores and final logits are soft-capped (cap * tanh(x / cap)), the MLP is GeGLU
    norm_offset: float = 0.0
    embed_scale: float | None = None
    embed_scale_rounded: bool = False      # Gemma: the embedding scale rounded to the dtype first (HF's torch.tensor);
                                           # the others multiply by the float (Granite, Falcon-H1)
    mrope_axes: torch.Tensor | None = None  # M-RoPE (Qwen 2 / 2.5 / 3-VL, Qwen 3.5): the position row (0 time, 1 height,
                                           # 2 width) of each rotary frequency (image tokens get three positions,
                                           # modules.rotary.mrope_axes); None: one row
    embed_scale_on: str = "ids"            # where HF applies it: "module" (the embedding module: Gemma), "ids" (the model's
                                           # forward, to the rows it looks up: Falcon-H1), "all" (the forward, to
                                           # inputs_embeds a caller passes too: Granite)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    mlp_act: str = "silu"                  # gated MLP activation: silu | gelu_tanh | gelu
    norm_fp32: bool = False                # every RMSNorm scales in fp32 and rounds once (OLMo 2: (w * x).to(dtype));
                                           # the weights are held in fp32 (as Gemma's (1 + w))
    # Gemma 3: sliding-window layers rotate with a table of their own (None: every layer uses inv_freq)
    sliding_inv_freq: torch.Tensor | None = None
    sliding_attention_scaling: float = 1.0
    # The GPT families (policies/gpt.py): LayerNorms with a bias (zeros where the model's norm has none); a plain
    # MLP (``up`` = fc1, ``gate`` None); the parallel residual; positions by rotary, by a learned table added to the
    # embeddings (``pos_embed`` read at position + ``pos_offset``) or by ALiBi (``alibi``: slopes of every head, fp32)
    layer_norm: bool = False
    final_norm_bias: WeightRef | None = None
    mlp_gated: bool = True
    parallel_residual: bool = False
    rotary: bool = True
    pos_embed: WeightRef | None = None
    pos_offset: int = 0
    alibi: torch.Tensor | None = None
    embed_norm: WeightRef | None = None      # BLOOM: a LayerNorm of the embeddings
    embed_norm_bias: WeightRef | None = None
    positions_from_mask: bool = False         # a plain forward without position_ids numbers tokens by the mask (OPT)
    logit_scale: float | None = None          # logits x this (Cohere's logit_scale, Granite's 1 / logits_scaling)
    # DeepSeek: latent attention in every block (num_kv_heads is 1: the latent, on every rank; head_dim is v_head_dim,
    # the width of each head's output, o_proj's columns)
    mla: MLAShape | None = None
    # NemotronH: each block is a mixer layer of the config and the MLP layer after it (if one follows): the Hugging
    # Face cache layer of each block's mixer (None: block i is layer i)
    cache_layers: list[int] | None = None
    per_layer: PerLayerEmbeddings | None = None   # Gemma 4's per-layer inputs
    blocks_in: str = "all"                # a vision-language prompt's image blocks seen whole in "all" layers, or in the
                                          # "sliding" ones only (Gemma 4; modules.masks.build_masks)

    def cache_layout(self, local_kv_heads: int) -> tuple[int, int, bool]:
        """(KV heads, width, keys only) of the KV cache: a latent-attention model caches one latent row per token
        (keys only: attention reads its values from the keys' first columns)."""
        if self.mla is not None:
            return 1, self.mla.cache_dim, True
        return local_kv_heads, self.head_dim, False
