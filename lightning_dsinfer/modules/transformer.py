"""The fused decoder: attention + MLP blocks built from a policy's weights, and the model around them.

A forward pass is described by a :class:`Step` (positions, rotary rows, mask, where K/V go), built
once per call by the caller (engine or generation loop) and shared by every layer. K/V go either to
the engine's :class:`StaticKVCache` (own decode loop), to a Hugging Face ``Cache`` object (HF's
``generate`` loop: beam search, custom processors), or nowhere (a plain forward).

Where the residual adds happen depends on the path (``ops.fuses_residual``), with one module code:

- CPU path: each output projection adds the residual inside its GEMM (``o(out, h)``, ``down(act, h)``:
  oneDNN's binary-add epilogue) and the norms are plain ``rms_norm``.
- Triton path (CUDA, or forced): the projections run without the residual and the add is done by the next
  norm in the same kernel: attention's output with the post-attention norm, the MLP's output with the next
  block's input norm (carried as a pending ``delta``, :meth:`DecoderLayer.run`) or with the final norm. For
  decode-sized rows those norms are the prologue of the GEMM that reads them (``Linear.norm_forward``: add + norm
  + QKV, add + norm + gate/up + SwiGLU, one kernel each); otherwise ``ops.add_rms_norm``. Rotary and the
  KV-cache append are one kernel there too (``ops.rotary_write_kv``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_dsinfer.kernels import ops, reference
from lightning_dsinfer.modules.kv_cache import StaticKVCache
from lightning_dsinfer.modules.linear import Linear


@dataclass
class Step:
    cos: torch.Tensor                      # [B, T, 1, D]
    sin: torch.Tensor                      # [B, T, 1, D] signed sin
    mask: torch.Tensor | None              # bool [B, 1, T, L]; None = attend to every key (L == T or decode)
    window_mask: torch.Tensor | None = None  # bool [B, 1, T, L] for sliding-window layers (None = same as mask)
    cache: StaticKVCache | None = None     # engine-owned cache ...
    start: int = 0                         # ... and the column this step writes at
    hf_cache: Any = None                   # or a transformers Cache (``update(k, v, layer_idx)``)
    q_start: int = 0                       # KV column of the first query (columns of mask / window_mask)
    sliding_cos: torch.Tensor | None = None  # rotary rows of the sliding-window layers (Gemma 3; None: cos / sin)
    sliding_sin: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # [B, T] the tokens' positions (learned position embeddings: OPT, GPT-2)
    valid: torch.Tensor | None = None      # [B, T] bool: the tokens that are not padding (None: all; linear attention
                                           # zeroes the others' inputs, modules/gated_deltanet.py)
    decoding: bool = False                 # a one-token call on held states (a decode step; not a one-token chunk of a
                                           # prompt): Mamba-2 then does as transformers' step does (dt unclamped)
    q_col: torch.Tensor | None = None      # CUDA graphs: the first query's column as a device tensor (q_start is 0)
    deepstack: tuple | None = None         # Qwen3-VL: (image tokens' mask [B, T], [n, H] per early block) added to the
                                           # stream after those blocks (:func:`add_deepstack`)
    lookahead: bool = False                # some query sees later keys (a vision-language prompt's image blocks): the
                                           # step cannot be run in chunks of queries (:meth:`rows`)
    ids: torch.Tensor | None = None        # [B, T] the tokens (Gemma 4 looks its per-layer inputs up by id) ...
    per_layer: torch.Tensor | None = None  # ... [B, T, L, P], one row per layer (:class:`PerLayerInputs`)
    kv_store: dict | None = None           # block -> (K, V) it attended to in this step, for the blocks that read
                                           # another block's K/V (Gemma 4: :class:`SharedKVAttention`)
    last_only: bool = False                # only the last query's output is wanted (a prompt before decoding): blocks
                                           # that write no K/V of their own then run on it alone (:meth:`DecoderModel.
                                           # hidden`)

    def rows(self, a: int, b: int) -> "Step":
        """The step for queries [a, b) of this one (chunked prefill): they write K/V at ``start + a`` and see
        the columns up to their own, so running the chunks in order equals running the whole step."""
        if self.lookahead:
            raise ValueError("a step whose queries see later keys cannot be cut into chunks of queries")
        end = self.q_start + b

        def cut(m):
            return None if m is None else m[:, :, a:b, :end]

        def rows(t):
            return None if t is None else t[:, a:b]

        return Step(cos=rows(self.cos), sin=rows(self.sin), mask=cut(self.mask), window_mask=cut(self.window_mask),
                    cache=self.cache, start=self.start + a, hf_cache=self.hf_cache, q_start=self.q_start + a,
                    sliding_cos=rows(self.sliding_cos), sliding_sin=rows(self.sliding_sin),
                    positions=rows(self.positions), valid=rows(self.valid), decoding=self.decoding,
                    q_col=None if self.q_col is None else self.q_col + a, ids=rows(self.ids),
                    per_layer=rows(self.per_layer))


def add_deepstack(h: torch.Tensor, deepstack: tuple, i: int) -> torch.Tensor:
    """The stream ``h`` [B, T, H] after block ``i`` with Qwen3-VL's deepstack features of that block added at the image
    tokens' rows (in the dtype, as HF adds them)."""
    mask, embeds = deepstack
    h = h.clone()
    h[mask] = h[mask] + embeds[i]
    return h


@dataclass
class LayerSpec:
    """Numbers one decoder block needs (from the policy)."""
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    scaling: float
    sliding_window: int | None = None
    attention_chunk: int | None = None     # Llama 4's chunked layers (they read ``Step.window_mask``, as sliding ones)
    attn_temperature: tuple[float, float, str] | None = None   # Llama 4's NoPE layers, Ministral 3
                                                               # (TemperatureTunedAttention)
    moe_top_k: int = 0                     # MoE layers (modules/moe.py): experts per token, ...
    moe_renormalize: bool = True           # ... top-k probabilities renormalised, ...
    moe_weights_in_dtype: bool = False     # ... routing weights rounded to the model dtype
    moe_first_expert: int | None = None    # expert parallelism: this rank's first expert (None: experts sliced)
    moe_routing: Any = None                # DeepSeek's grouped routers (kernels.reference.Routing; None: softmax top-k)
    moe_act: Any = None                    # the experts' activation (gpt-oss: reference.ClampedSwiGLU; None: SwiGLU)
    mla: Any = None                        # latent attention's numbers (policies.base.MLAShape; modules/mla.py)
    mlp_act: Any = "silu"                  # gated MLP: silu (SwiGLU) | gelu_tanh / gelu (GeGLU); plain: + relu, relu2,
                                           # or a callable (Apertus' xIELU, its parameters per layer)
    attn_softcap: float | None = None      # attention scores -> cap * tanh(score / cap) (Gemma 2)
    mlp_gated: bool = True                 # False: down(act(up(x))) (the GPT families' MLP, :class:`MLP`)
    rotary: bool = True                    # False: positions enter elsewhere (learned embeddings, ALiBi)
    parallel_residual: bool = False        # h + attn(norm1(h)) + mlp(norm2(h)) (GPT-NeoX, GPT-J, Phi; GPTBlock)
    qk_norm_kind: str = "head"             # q / k norms per head before rotary; "layer": LayerNorms per head
                                           # (HeadLayerNormAttention); "whole": over the whole projection
                                           # (ProjectionNormAttention); "after_rotary": RotaryFirstAttention
    deltanet: Any = None                   # linear attention's numbers (policies.base.DeltaNetWeights: Qwen3-Next / 3.5)
    attn_output_gate: bool = False         # OutputGatedAttention (Qwen3-Next / 3.5)
    mamba: Any = None                      # Mamba-2's numbers (policies.base.Mamba2Weights: Granite 4; Falcon-H1's
                                           # beside the attention, ``beside_attention``)
    mamba1: Any = None                     # Mamba-1's numbers (policies.base.Mamba1Weights: Mamba, FalconMamba, Jamba)
    v_norm: bool = False                   # Gemma 4: v RMS-normed (no weight) before the cache ...
    kv_source: int | None = None           # ... or no K/V computed: block kv_source's read (SharedKVAttention)
    clip_qkv: float | None = None          # the QKV projection's output clamped to [-clip, clip] (ClampedQKVAttention)


class Attention(nn.Module):
    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear,
                 q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                 alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scaling, self.eps = spec.scaling, spec.rms_norm_eps
        self.softcap = spec.attn_softcap
        self.sliding = spec.sliding_window is not None or spec.attention_chunk is not None   # (step.window_mask)
        self.rotary = spec.rotary
        self.alibi = alibi                 # BLOOM: this rank's heads' slopes [Hq] fp32 (positions enter as biases)
        self.sinks = sinks                 # gpt-oss: this rank's heads' sink logits [Hq] (ops.attention)
        self.qkv, self.o = qkv, o
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        """Attention of the normed input x [B, T, H]; ``residual`` is added by o_proj (None: not added)."""
        return self.from_qkv(self.qkv(x), residual, step)

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        """The rest of :meth:`forward` given the QKV projection's output [B, T, (Hq + 2 Hkv) D]."""
        return self.o(self.attend(qkv, step), residual)  # o_proj, with the residual add fused in when given

    def attend(self, qkv: torch.Tensor, step: Step) -> torch.Tensor:
        """The heads' outputs [B, T, Hq D] (before o_proj) for the QKV projection's output."""
        return self.attention(*self.queries_keys_values(qkv, step), step)

    def rotary_rows(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's cos / sin rows for this layer (a sliding-window layer's own table where the model has one)."""
        if self.sliding and step.sliding_cos is not None:
            return step.sliding_cos, step.sliding_sin
        return step.cos, step.sin

    def queries_keys_values(self, qkv: torch.Tensor, step: Step):
        """(q [B, T, Hq, D], the keys and values attention reads [B, Hkv, L, D]) for the QKV projection's output,
        this step's K/V written where the step keeps them."""
        b, t, _ = qkv.shape
        hq, hkv, d = self.hq, self.hkv, self.d
        qkv = qkv.view(b, t, hq + 2 * hkv, d)
        cache = step.cache
        # q / k norms (Qwen3), rotary, and the K/V append to the engine's cache: one op (one kernel on Triton).
        slots = cache.slots(self.layer_idx, b, step.start) if cache is not None else (None, None, 0)
        cos, sin = self.rotary_rows(step)
        if self.rotary:
            q, k, v = ops.rotary_write_kv(qkv, hq, cos, sin, *slots, q_norm=self.q_norm, k_norm=self.k_norm,
                                          eps=self.eps)
        else:                              # learned positions, ALiBi or a NoPE layer: q / k as projected
            q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
            if self.q_norm is not None:    # (Exaone 4's NoPE layers: the head norms without the rotation)
                q, k = ops.rms_norm(q, self.q_norm, self.eps), ops.rms_norm(k, self.k_norm, self.eps)
            if cache is not None:
                reference.write_columns(slots[0], slots[1], k, v, slots[2])
        if cache is not None:
            keys, values = cache.read(self.layer_idx, b, step.start + t)
        elif step.hf_cache is not None:
            keys, values = step.hf_cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        return q, keys, values

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: Step) -> torch.Tensor:
        """The heads' outputs [B, T, Hq D] of queries q [B, T, Hq, D] over keys / values [B, Hkv, L, D]."""
        b, t = q.shape[:2]
        mask = step.window_mask if (self.sliding and step.window_mask is not None) else step.mask
        out = ops.attention(q.transpose(1, 2), keys, values, mask, self.scaling, softcap=self.softcap,
                            alibi=self.alibi, sinks=self.sinks)                                # [B, Hq, T, D]
        return out.transpose(1, 2).reshape(b, t, self.hq * self.d)


class SharedKVAttention(Attention):
    """Gemma 4's attention: v RMS-normed without a weight before the cache (``v_norm``: unit fp32 scale), as q and k
    are with theirs. A layer with ``kv_source`` computes queries only (its QKV GEMM has q's rows) and attends to the K/V
    that block read in this step (``Step.kv_store``: every block of this kind leaves its keys and values there; with
    the engine's cache, views of its columns so far), with its own mask (the same type: sliding or full)."""

    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear, q_norm: torch.Tensor,
                 k_norm: torch.Tensor | None, v_norm: torch.Tensor | None, kv_source: int | None):
        super().__init__(spec, layer_idx, qkv, o, q_norm=q_norm, k_norm=k_norm)
        self.v_norm, self.kv_source = v_norm, kv_source

    def attend(self, qkv: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, _ = qkv.shape
        if self.kv_source is not None:
            cos, sin = self.rotary_rows(step)
            q = reference.rotary_half(ops.rms_norm(qkv.view(b, t, self.hq, self.d), self.q_norm, self.eps), cos, sin)
            if step.kv_store is None or self.kv_source not in step.kv_store:
                raise RuntimeError(f"dsinfer: block {self.layer_idx} reads block {self.kv_source}'s keys and values, "
                                   f"which this step did not run")
            return self.attention(q, *step.kv_store[self.kv_source], step)
        if self.v_norm is not None:
            n = (self.hq + self.hkv) * self.d
            v = ops.rms_norm(qkv[..., n:].view(b, t, self.hkv, self.d), self.v_norm, self.eps)
            qkv = torch.cat((qkv[..., :n], v.view(b, t, -1)), dim=-1)
        q, keys, values = self.queries_keys_values(qkv, step)
        if step.kv_store is None:
            step.kv_store = {}
        step.kv_store[self.layer_idx] = (keys, values)
        return self.attention(q, keys, values, step)


class OutputGatedAttention(Attention):
    """Qwen3-Next / Qwen3.5's attention: the heads' outputs times sigmoid(gate) before o_proj, the gate [Hq D] being
    the last rows of the QKV GEMM (``q | k | v | gate``: q_proj holds q and the gate interleaved per head; the policy
    reads them apart); AFMoE's from a gate_proj of its own; LFM3's one gate per head [Hq], each head's output times
    its sigmoid."""

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        n = (self.hq + 2 * self.hkv) * self.d
        out = self.attend(qkv[..., :n].contiguous(), step)
        gate = torch.sigmoid(qkv[..., n:])
        if gate.shape[-1] == self.hq and self.d > 1:      # (a gate per head)
            return self.o((out.unflatten(-1, (self.hq, self.d)) * gate[..., None]).flatten(-2), residual)
        return self.o(out * gate, residual)


class ProjectionNormAttention(Attention):
    """OLMo 2's attention: q and k RMS-normed each over a token's whole projection (all heads at once: weights
    [Hq D] / [Hkv D]) before the head split and rotary, rather than per head. Under tensor parallelism a rank holds
    its heads' columns and the weights' slices: ``reduce`` sums the sums of squares over the group first
    (``ops.projection_rms_norm``; ``ranks`` ranks), so each rank norms by the whole projection's RMS."""

    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear, q_norm: torch.Tensor,
                 k_norm: torch.Tensor, alibi: torch.Tensor | None = None, reduce=None, ranks: int = 1):
        super().__init__(spec, layer_idx, qkv, o, alibi=alibi)     # (no per-head norms in the rotary op)
        self.q_norm_whole, self.k_norm_whole = q_norm, k_norm
        self.reduce, self.ranks = reduce, ranks

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        nq, nk = self.hq * self.d, self.hkv * self.d
        q, k = ops.projection_rms_norm(qkv[..., :nq], qkv[..., nq:nq + nk], self.q_norm_whole, self.k_norm_whole,
                                       self.eps, self.reduce, self.ranks)
        return super().from_qkv(torch.cat((q, k, qkv[..., nq + nk:]), dim=-1), residual, step)


class RotaryFirstAttention(Attention):
    """HunYuan's attention: q and k rotated first, then RMS-normed per head (``query_layernorm`` / ``key_layernorm``):
    the rotation here, the rest as a layer without rotary, whose path norms q / k per head before the K/V append."""

    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear, q_norm: torch.Tensor,
                 k_norm: torch.Tensor, alibi: torch.Tensor | None = None):
        super().__init__(spec, layer_idx, qkv, o, q_norm=q_norm, k_norm=k_norm, alibi=alibi)
        self.rotary = False          # (for the base class's path: the norms, no rotation)

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        b, t, _ = qkv.shape
        cos, sin = self.rotary_rows(step)
        q, k, v = ops.rotary_write_kv(qkv.view(b, t, self.hq + 2 * self.hkv, self.d), self.hq, cos, sin)
        return super().from_qkv(torch.cat((q, k, v), dim=2).view(b, t, -1), residual, step)


class TemperatureTunedAttention(Attention):
    """Queries scaled by log(1 + floor(i / floor_scale)) * attn_scale + 1 before attention (a per-token scalar, so
    before or after rotary alike). Llama 4's NoPE layers: i = c + 1, c the query's cache column (transformers counts
    the cache's tokens, left padding included), the product in fp32 rounded once. Ministral 3 (Llama 4's scaling in
    every layer, as its rope_parameters' ``llama_4_scaling_beta``): i = the token's position, the scale rounded to the
    dtype first, as HF multiplies."""

    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear, **kw):
        super().__init__(spec, layer_idx, qkv, o, **kw)
        self.attn_scale, self.floor_scale, self.at = spec.attn_temperature

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        t, nq = qkv.shape[1], self.hq * self.d
        if self.at == "position":
            scale = torch.log(1 + torch.floor(step.positions / self.floor_scale)) * self.attn_scale + 1    # [B, T]
            q = qkv[..., :nq] * scale.to(qkv.dtype)[..., None]
        else:
            first = step.q_col if step.q_col is not None else step.q_start
            cols = torch.arange(t, device=qkv.device) + first
            scale = torch.log1p(torch.floor((cols.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (qkv[..., :nq] * scale[:, None]).to(qkv.dtype)
        return super().from_qkv(torch.cat((q, qkv[..., nq:]), dim=-1), residual, step)


class HeadLayerNormAttention(Attention):
    """Persimmon's attention: q and k LayerNormed per head (weight and bias [D] shared by the heads) before rotary, the
    norms here, the rest as plain attention (elementwise per head: each rank norms its own heads)."""

    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear, q_norm: torch.Tensor,
                 k_norm: torch.Tensor, q_norm_bias: torch.Tensor, k_norm_bias: torch.Tensor,
                 alibi: torch.Tensor | None = None):
        super().__init__(spec, layer_idx, qkv, o, alibi=alibi)     # (no RMS norms in the rotary op)
        self.q_ln, self.k_ln = (q_norm, q_norm_bias), (k_norm, k_norm_bias)

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        b, t, _ = qkv.shape
        nq, nk = self.hq * self.d, self.hkv * self.d
        q = ops.layer_norm(qkv[..., :nq].reshape(b, t, self.hq, self.d), *self.q_ln, self.eps).reshape(b, t, nq)
        k = ops.layer_norm(qkv[..., nq:nq + nk].reshape(b, t, self.hkv, self.d), *self.k_ln, self.eps).reshape(b, t, nk)
        return super().from_qkv(torch.cat((q, k, qkv[..., nq + nk:]), dim=-1), residual, step)


class ClampedQKVAttention(Attention):
    """Attention whose QKV projection's output (biases included) is clamped to [-clip, clip] before anything else, as
    transformers' ``clip_qkv`` (OLMo, MPT, DBRX): elementwise, so each rank clamps its own heads' rows."""

    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear, **kw):
        super().__init__(spec, layer_idx, qkv, o, **kw)
        self.clip = spec.clip_qkv

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step: Step) -> torch.Tensor:
        return super().from_qkv(qkv.clamp(-self.clip, self.clip), residual, step)


class GatedMLP(nn.Module):
    def __init__(self, gate_up: Linear, down: Linear, act: str = "silu"):
        super().__init__()
        self.gate_up, self.down, self.act = gate_up, down, act

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(ops.gated_act(self.gate_up(x), self.act), residual)


class MLP(nn.Module):
    """The GPT families' MLP: down(act(up(x))), biases inside the linears (``up`` sits where a gated MLP's gate|up
    does: ``gate_up`` in the block's tensors)."""

    def __init__(self, up: Linear, down: Linear, act: str = "gelu"):
        super().__init__()
        self.gate_up, self.down, self.act = up, down, act

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        h = self.gate_up(x)               # (an activation with parameters of its own, Apertus' xIELU: a callable)
        return self.down(self.act(h) if callable(self.act) else ops.act(h, self.act), residual)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm, or LayerNorm when the norm has a ``bias`` (the GPT families; a LayerNorm without one gets zeros)."""
    return ops.rms_norm(x, weight, eps) if bias is None else ops.layer_norm(x, weight, bias, eps)


def _norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
          bias: torch.Tensor | None = None):
    """(norm(h + delta), h + delta); delta None: nothing pending, h as it is. (A LayerNorm block never defers its
    residual add, so only RMSNorms meet a pending delta: ``add_rms_norm``, one kernel on the Triton path.)"""
    if delta is None or bias is not None:
        h = h if delta is None else h + delta
        return norm(h, weight, eps, bias), h
    return ops.add_rms_norm(delta, h, weight, eps)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = h + attn(norm1(h)); h = h + mlp(norm2(h)). A block without an MLP (``post_norm`` and
    ``mlp`` None: NemotronH's mixer followed by another mixer) is h = h + attn(norm1(h)); its offloaded MLP half is
    empty and hands the stream on."""

    def __init__(self, attn: Attention, mlp: GatedMLP, input_norm: torch.Tensor, post_norm: torch.Tensor, eps: float):
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_norm, self.eps = input_norm, post_norm, eps

    def forward(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """One block on its own: the new residual stream (nothing left pending)."""
        return self.run(h, None, step, defer=False)[0]

    def attend(self, h: torch.Tensor, delta: torch.Tensor | None, step: Step):
        """The attention half on the residual stream ``h + delta``: (the MLP's normed input, the new h). Needs
        ``attn`` and the norms only (offload streams a block's two halves as two units)."""
        x, h = _norm(h, delta, self.input_norm, self.eps)
        if self.post_norm is None:  # no MLP in this block: the stream, and no MLP input (None)
            return None, self.attn(x, h, step)
        if ops.fuses_residual(h):   # the residual add in the post-attention norm's kernel
            return ops.add_rms_norm(self.attn(x, None, step), h, self.post_norm, self.eps)
        h = self.attn(x, h, step)   # the residual add in o_proj's GEMM
        return ops.rms_norm(h, self.post_norm, self.eps), h

    def mlp_residual(self, x: torch.Tensor | None, h: torch.Tensor, step: Step | None = None) -> torch.Tensor:
        """The MLP half: ``h + mlp(x)`` for the MLP's normed input x (the add in down_proj's GEMM); x None: a block
        without an MLP, h as it is. (``step``: for the blocks whose MLP half reads it, :class:`PerLayerInputLayer`.)"""
        return h if x is None else self.mlp(x, h)

    def run(self, h: torch.Tensor, delta: torch.Tensor | None, step: Step, defer: bool = True):
        """The block on the residual stream ``h + delta`` (delta: the previous block's MLP output not added yet,
        or None). Returns (h, delta) for the next block: on the Triton path with ``defer`` the MLP's output is
        returned as the pending delta (the next norm adds it), else it is added here and delta is None."""
        if defer and ops.fuses_residual(h) and self.post_norm is not None:
            # Triton path: the input norm (with the pending add) is the QKV GEMM's prologue, and the post-attention
            # norm (with attention's add) the gate/up GEMM's, SwiGLU its epilogue (``Linear.norm_forward``: one
            # kernel each for decode-sized rows, else the separate fused ops).
            qkv, h = self.attn.qkv.norm_forward(h, delta, self.input_norm, self.eps)
            out = self.attn.from_qkv(qkv, None, step)
            if isinstance(self.mlp, GatedMLP) and self.mlp.act == "silu":
                act, h = self.mlp.gate_up.norm_forward(h, out, self.post_norm, self.eps, gated=True)
                return h, self.mlp.down(act)
            x, h = ops.add_rms_norm(out, h, self.post_norm, self.eps)
            return h, self.mlp(x)
        x, h = self.attend(h, delta, step)
        return self.mlp_residual(x, h), None


class SandwichDecoderLayer(DecoderLayer):
    """Gemma 2 / 3 block: h = h + norm_a(attn(norm1(h))); h = h + norm_m(mlp(norm2(h))): the attention's and the MLP's
    outputs are normed before their residual adds (``attn_out_norm``, ``mlp_out_norm``), so the adds stay outside the
    GEMMs and nothing is deferred to the next norm. An offloaded half holds one of the two; a block may have one only
    (A.X-K1: its MoE blocks norm the MLP's output alone), the other output then added as it is."""

    def __init__(self, attn, mlp, input_norm, post_norm, eps, attn_out_norm, mlp_out_norm):
        super().__init__(attn, mlp, input_norm, post_norm, eps)
        self.attn_out_norm, self.mlp_out_norm = attn_out_norm, mlp_out_norm

    def attend(self, h: torch.Tensor, delta: torch.Tensor | None, step: Step):
        x, h = _norm(h, delta, self.input_norm, self.eps)
        if self.attn_out_norm is None:      # (A.X-K1: the attention's output added as it is, the add fused in o)
            h = self.attn(x, h, step)
        else:
            h = h + ops.rms_norm(self.attn(x, None, step), self.attn_out_norm, self.eps)
        return ops.rms_norm(h, self.post_norm, self.eps), h

    def mlp_residual(self, x: torch.Tensor, h: torch.Tensor, step: Step | None = None) -> torch.Tensor:
        if self.mlp_out_norm is None:
            return self.mlp(x, h)
        return h + ops.rms_norm(self.mlp(x), self.mlp_out_norm, self.eps)

    def run(self, h: torch.Tensor, delta: torch.Tensor | None, step: Step, defer: bool = True):
        x, h = self.attend(h, delta, step)
        return self.mlp_residual(x, h, step), None


class ExpertsBesideMLP(nn.Module):
    """Gemma 4 26B-A4B's experts beside its dense MLP (``policies.base.ExpertsBeside``): ``self(m, h)`` for the dense
    MLP's output m and the block's residual stream h is norm_d(m) + norm_e(experts(norm_i(h))), the router reading h
    RMS-normed without a weight, times ``router_scale`` and ``root`` (hidden_size ** -0.5), in transformers' order."""

    def __init__(self, experts: nn.Module, router_scale: torch.Tensor, experts_in: torch.Tensor,
                 experts_out: torch.Tensor, dense_out: torch.Tensor, root: float, eps: float):
        super().__init__()
        self.experts, self.router_scale, self.root, self.eps = experts, router_scale, root, eps
        self.experts_in, self.experts_out, self.dense_out = experts_in, experts_out, dense_out
        self.unit = torch.ones(router_scale.shape[-1], dtype=torch.float32, device=router_scale.device)

    def forward(self, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        route = ops.rms_norm(h, self.unit, self.eps) * self.router_scale * self.root
        e = self.experts(ops.rms_norm(h, self.experts_in, self.eps), route=route)
        return ops.rms_norm(m, self.dense_out, self.eps) + ops.rms_norm(e, self.experts_out, self.eps)


class PerLayerInputLayer(SandwichDecoderLayer):
    """Gemma 4 block: Gemma 3's, then (with per-layer inputs) h = h + norm_p(proj(act(gate(h)) * row)), ``row`` this
    block's row of the step's per-layer inputs (``Step.per_layer[:, :, index]``), and h = h * ``scalar``. The extra
    part belongs to the MLP half (an offloaded block streams it with the MLP)."""

    def __init__(self, attn, mlp, input_norm, post_norm, eps, attn_out_norm, mlp_out_norm, index: int,
                 scalar: torch.Tensor | None, gate: Linear | None = None, proj: Linear | None = None,
                 norm: torch.Tensor | None = None, act: str = "gelu_tanh", beside: ExpertsBesideMLP | None = None):
        super().__init__(attn, mlp, input_norm, post_norm, eps, attn_out_norm, mlp_out_norm)
        self.index, self.scalar = index, scalar
        self.gate, self.proj, self.norm, self.act = gate, proj, norm, act
        self.beside = beside         # (26B-A4B: the experts beside the MLP)

    def mlp_residual(self, x: torch.Tensor, h: torch.Tensor, step: Step | None = None) -> torch.Tensor:
        if self.beside is None:
            h = super().mlp_residual(x, h)
        else:
            h = h + ops.rms_norm(self.beside(self.mlp(x), h), self.mlp_out_norm, self.eps)
        if self.gate is not None:
            g = ops.act(self.gate(h), self.act) * step.per_layer[:, :, self.index]
            h = h + ops.rms_norm(self.proj(g), self.norm, self.eps)
        return h * self.scalar


class PostNormDecoderLayer(SandwichDecoderLayer):
    """OLMo 2 / Exaone 4 block: no input norms; h = h + norm_a(attn(h)); h = h + norm_m(mlp(h)) (HF's
    post_attention_layernorm and post_feedforward_layernorm, on the outputs). The MLP's input is the stream itself:
    an offloaded attention half hands it on as such."""

    def __init__(self, attn, mlp, eps, attn_out_norm, mlp_out_norm):
        super().__init__(attn, mlp, None, None, eps, attn_out_norm, mlp_out_norm)

    def attend(self, h: torch.Tensor, delta: torch.Tensor | None, step: Step):
        h = h if delta is None else h + delta
        h = h + ops.rms_norm(self.attn(h, None, step), self.attn_out_norm, self.eps)
        return h, h


class GPTDecoderLayer(DecoderLayer):
    """The GPT families' block (GPT-NeoX, GPT-J, Phi, StarCoder2, StableLM, OPT, GPT-2, BLOOM): LayerNorms with a
    bias, and either the sequential residual of :class:`DecoderLayer` or, ``parallel``, h + attn(norm1(h)) +
    mlp(norm2(h)) (one shared norm when ``post_norm`` is None: GPT-J, Phi). The residual adds stay in the output
    projections' GEMMs on every path (o adds h, down adds h + attn), so the Triton path runs the separate norm
    kernels rather than the GEMMs' RMSNorm prologue. An offloaded attention half holds both norms, as for
    :class:`DecoderLayer`, and hands the MLP half its normed input."""

    def __init__(self, attn, mlp, input_norm, input_bias, post_norm, post_bias, eps, parallel: bool):
        super().__init__(attn, mlp, input_norm, post_norm, eps)
        self.input_bias, self.post_bias, self.parallel = input_bias, post_bias, parallel

    def attend(self, h: torch.Tensor, delta: torch.Tensor | None, step: Step):
        x, h = _norm(h, delta, self.input_norm, self.eps, self.input_bias)
        if self.parallel:      # the MLP reads the block's input stream, normed (by its own norm or the shared one)
            mlp_in = x if self.post_norm is None else norm(h, self.post_norm, self.eps, self.post_bias)
            return mlp_in, self.attn(x, h, step)
        h = self.attn(x, h, step)
        return norm(h, self.post_norm, self.eps, self.post_bias), h

    def run(self, h: torch.Tensor, delta: torch.Tensor | None, step: Step, defer: bool = True):
        x, h = self.attend(h, delta, step)
        return self.mlp(x, h), None


class PerLayerInputs:
    """Gemma 4's per-layer inputs of a step's tokens (``policies.base.PerLayerEmbeddings``), as transformers computes
    them: [B, T, L, P] from the token ids and their embeddings h [B, T, H] (whole on every tensor-parallel rank).
    ``table``: the [V', L P] table, or (offload) rows looked up one by one (``offload.decoder.FileRows`` /
    ``ResidentRows``)."""

    def __init__(self, table, projection: Linear, norm: torch.Tensor, layers: int, dim: int,
                 embed_scale: float, projection_scale: float, input_scale: float, eps: float):
        self.table, self.projection, self.norm = table, projection, norm
        self.layers, self.dim, self.eps = layers, dim, eps
        self.embed_scale, self.projection_scale, self.input_scale = embed_scale, projection_scale, input_scale

    def __call__(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        rows = nn.functional.embedding(ids, self.table) if isinstance(self.table, torch.Tensor) else \
            self.table.lookup(ids, h.device)
        rows = rows * torch.tensor(self.embed_scale, dtype=h.dtype)
        proj = self.projection(h) * self.projection_scale
        proj = ops.rms_norm(proj.view(b, t, self.layers, self.dim), self.norm, self.eps)
        return (proj + rows.view(b, t, self.layers, self.dim)) * self.input_scale


class DecoderModel(nn.Module):
    """Embedding -> blocks -> final norm -> lm_head. Weights are plain attributes, not parameters.

    With tensor parallelism the embedding and lm_head hold vocab rows [vocab_start, vocab_start + rows):
    lookups outside the shard give zeros and are summed over the group (``comm.all_reduce``); logits are
    gathered over the group (``comm.all_gather_last``) and cut to ``vocab_size``.

    A pipeline stage (``parallel/pipeline.py``) holds some of the blocks: ``embed`` is None except on the first
    stage, ``final_norm`` and ``lm_head`` except on the last; :meth:`hidden` then returns the residual stream.
    """

    def __init__(self, embed: torch.Tensor | None, layers: list[DecoderLayer], final_norm: torch.Tensor | None,
                 eps: float, lm_head: Linear | None, vocab_size: int, vocab_start: int = 0, comm=None, **ends):
        super().__init__()
        self.set_ends(**ends)
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.final_norm, self.eps = final_norm, eps
        self.lm_head = lm_head
        self.vocab_size, self.vocab_start = vocab_size, vocab_start
        self.comm = comm
        self.sharded_vocab = comm is not None and comm.size > 1
        self._stack = False      # CpuDecodeStack, built on the first bf16 CPU call (None: the blocks need the ops)

    def set_ends(self, embed_scale: float | None = None, final_softcap: float | None = None,
                 final_norm_bias: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None, pos_offset: int = 0,
                 embed_norm: tuple[torch.Tensor, torch.Tensor] | None = None, logit_scale: float | None = None,
                 embed_scale_rounded: bool = False, embed_scale_on: str = "ids", per_layer=None) -> None:
        """What some families add around the blocks: Gemma's (Granite's) embedding scale and final logit cap; Cohere's
        and Granite's logit scale; the final LayerNorm's bias (GPT families); on the first stage, learned position
        embeddings looked up at ``positions + pos_offset`` (OPT's offset is 2, GPT-2's 0) and BLOOM's LayerNorm
        (weight, bias) of the embeddings."""
        self.embed_scale, self.final_softcap, self.logit_scale = embed_scale, final_softcap, logit_scale
        self.embed_scale_rounded, self.embed_scale_on = embed_scale_rounded, embed_scale_on
        self.final_norm_bias = final_norm_bias
        self.pos_embed, self.pos_offset, self.embed_norm = pos_embed, pos_offset, embed_norm
        self.per_layer = per_layer           # Gemma 4: PerLayerInputs (first stage)

    def stream_in(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """The embeddings h [B, T, H] as the first block reads them (first stage; unchanged for most families)."""
        if self.pos_embed is not None:
            h = h + nn.functional.embedding(step.positions + self.pos_offset, self.pos_embed)
        if self.embed_norm is not None:    # BLOOM's LayerNorm; without a bias, an RMSNorm (NanoChat's)
            weight, bias = self.embed_norm
            h = ops.layer_norm(h, weight, bias, self.eps) if bias is not None else ops.rms_norm(h, weight, self.eps)
        if self.per_layer is not None:
            if step.ids is None:
                raise ValueError("dsinfer: Gemma 4 looks its per-layer inputs up by token id; pass input_ids (not "
                                 "inputs_embeds alone).")
            step.per_layer = self.per_layer(self.plain_ids(step.ids), h)
        return h

    def final(self, h: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm of the stream ``h + delta`` (a stage before the last: the stream itself)."""
        if self.final_norm is None:
            return h if delta is None else h + delta
        return _norm(h, delta, self.final_norm, self.eps, self.final_norm_bias)[0]

    placeholders = None      # (ids [n], pad id): ids looked up as pad (Gemma 4's wrapper: its media placeholders)

    def plain_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` with the wrapper's placeholder ids as its pad id (Gemma 4's wrapper does so on every call, images or
        not), or as they are."""
        if self.placeholders is None:
            return ids
        placeholders, pad = self.placeholders
        return ids.masked_fill(torch.isin(ids, placeholders.to(ids.device)), pad)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of this rank's embedding shard."""
        return nn.functional.embedding(ids, self.embed)

    @property
    def embed_rows(self) -> int:
        return self.embed.shape[0]

    def embed_tokens(self, input_ids: torch.Tensor, scale: bool = True) -> torch.Tensor:
        """The embeddings of ``input_ids`` as the model's blocks read them (``scale=False``: before the embedding
        scale)."""
        input_ids = self.plain_ids(input_ids)
        if not self.sharded_vocab:
            h = self.lookup(input_ids)
        else:
            local = input_ids - self.vocab_start
            outside = (local < 0) | (local >= self.embed_rows)
            h = self.lookup(local.masked_fill(outside, 0))
            h.masked_fill_(outside.unsqueeze(-1), 0)
            h = self.comm.all_reduce(h)
        return self.scale_embeddings(h) if scale else h

    def scale_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        if self.embed_scale is not None:     # Gemma: the scale rounded to the dtype first, as HF does; others: the float
            h = h * (torch.tensor(self.embed_scale, dtype=h.dtype) if self.embed_scale_rounded else self.embed_scale)
        return h

    def given_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` a caller passes, as the blocks read them: scaled where HF's forward scales them too."""
        return self.scale_embeddings(h) if self.embed_scale_on == "all" else h

    def module_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What HF's embedding module returns for ``input_ids`` (Gemma's scale is inside it; Granite's and Falcon-H1's
        multipliers are applied by the model's forward)."""
        return self.embed_tokens(input_ids, scale=self.embed_scale_on == "module")

    def hidden(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """Run all blocks and the final norm on embeddings h [B, T, H] (a pipeline stage before the last: the
        blocks only, the residual stream out)."""
        h = self.stream_in(h, step)
        stack = self._cpu_stack(h)
        if stack is not None and stack.applies(h, step):      # a bf16 CPU decode step: every block in one C call
            return self.final(stack(h, step))
        delta = None
        cut = self.readers_from if step.last_only and h.shape[1] > 1 and not step.lookahead else None
        for i, layer in enumerate(self.layers):
            if i == cut:
                h, delta, step = self._last_query(h, delta, step)
            h, delta = layer.run(h, delta, step)
            if step.deepstack is not None and i < len(step.deepstack[1]):
                h, delta = add_deepstack(h if delta is None else h + delta, step.deepstack, i), None
        return self.final(h, delta)

    @property
    def readers_from(self) -> int | None:
        """The first of the last blocks that all read other blocks' K/V and write none (Gemma 4's shared layers), or
        None: a step that wants only its last query's output runs them on that query alone, as transformers does."""
        first = None
        for i in range(len(self.layers) - 1, -1, -1):
            if getattr(self.layers[i].attn, "kv_source", None) is None:
                break
            first = i
        return first

    @staticmethod
    def _last_query(h: torch.Tensor, delta: torch.Tensor | None, step: Step):
        """(h, delta, step) cut to the step's last query (its K/V columns and what the blocks before left in
        ``kv_store`` stay as they are)."""
        t = h.shape[1]
        last = step.rows(t - 1, t)
        last.kv_store, last.deepstack = step.kv_store, step.deepstack
        return h[:, -1:], None if delta is None else delta[:, -1:], last

    def _cpu_stack(self, h: torch.Tensor):
        if self._stack is False:
            if h.device.type != "cpu" or h.dtype != torch.bfloat16:
                return None
            from lightning_dsinfer.modules.cpu_stack import CpuDecodeStack

            self._stack = CpuDecodeStack.build(self)
        return self._stack

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if not self.sharded_vocab:
            return self.finish_logits(self.lm_head(h))
        return self.finish_logits(self.comm.all_gather_last(self.lm_head(h))[..., :self.vocab_size])

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Cohere / Granite: the logits times ``logit_scale``; Gemma 2: ``cap * tanh(logits / cap)`` in the logits'
        dtype (HF's three steps); else the logits."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        cap = self.final_softcap
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (all linears + norms; one embedding row; Gemma 4's per-layer
        projection, a row of its table and the blocks' gates)."""
        n = 0 if self.lm_head is None else self.lm_head.nbytes + self.final_norm.numel() * self.final_norm.element_size()
        p = getattr(self, "per_layer", None)
        if p is not None:
            n += p.projection.nbytes * (1 + p.projection.in_features) // p.projection.in_features   # (+ a row of
            #                                                                  the table: as wide as a column of it)
        for layer in self.layers:
            if getattr(layer, "gate", None) is not None:          # (Gemma 4's per-layer input gate)
                n += layer.gate.nbytes + layer.proj.nbytes
            if getattr(layer, "beside", None) is not None:      # (Gemma 4 26B-A4B's experts)
                n += layer.beside.experts.nbytes_per_token
            attn = layer.attn
            n += attn.nbytes if hasattr(attn, "nbytes") else attn.qkv.nbytes + attn.o.nbytes   # (MLA: its own count)
            mlp = layer.mlp
            if mlp is not None:      # (None: a block without an MLP)
                n += mlp.nbytes_per_token if hasattr(mlp, "nbytes_per_token") else mlp.gate_up.nbytes + mlp.down.nbytes
            norm = layer.input_norm if layer.input_norm is not None else layer.attn_out_norm   # (post-norm blocks)
            n += (1 if mlp is None else 2) * norm.numel() * norm.element_size()
        return n
