"""From a policy's weight refs to this rank's tensors to fused modules.

Two steps, kept apart so offload can sit between them:

- :func:`shard_layer` reads one block's weights (only this rank's slices), fuses QKV and gate/up and
  casts them: a flat ``{name: tensor}`` dict on the CPU. The offload tier writes these dicts to disk
  or host memory one block at a time.
- :func:`make_layer` turns such a dict (resident tensors, or views into a streamed buffer) into a
  :class:`DecoderLayer`.

:func:`build_decoder` does both for every block and returns a resident :class:`DecoderModel`.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

from lightning_dsinfer.kernels import cpu_gemv, reference
from lightning_dsinfer.modules.gated_deltanet import (GatedDeltaNet, Mamba1Mixer, Mamba2Mixer, ParallelMixer, ShortConv,
                                                     state_shapes)
from lightning_dsinfer.modules.linear import (DEQUANT_BYTES_PER_WEIGHT, DEQUANT_CHUNK_BYTES,
                                              DEQUANT_INT4_BYTES_PER_WEIGHT, Linear, quantize_int4_rows, quantize_rows)
from lightning_dsinfer.modules.mla import LatentAttention
from lightning_dsinfer.modules.moe import MoEMLP, quantize_experts
from lightning_dsinfer.modules.transformer import (MLP, Attention, ClampedQKVAttention, DecoderLayer, DecoderModel,
                                                  ExpertsBesideMLP, GatedMLP, GPTDecoderLayer, HeadLayerNormAttention,
                                                  LayerSpec, OutputGatedAttention, PerLayerInputLayer, PerLayerInputs,
                                                  PostNormDecoderLayer, ProjectionNormAttention, RotaryFirstAttention,
                                                  SandwichDecoderLayer, SharedKVAttention, TemperatureTunedAttention)
from lightning_dsinfer.parallel import TensorParallelComm, TensorShardPlan
from lightning_dsinfer.policies import ModelWeights
from lightning_dsinfer.policies.base import LayerWeights
from lightning_dsinfer.policies.weights import load_fused


def shard_plan(w: ModelWeights, comm: TensorParallelComm) -> TensorShardPlan:
    return TensorShardPlan(comm.rank, comm.size, w.num_heads, w.num_kv_heads, w.head_dim, w.intermediate_size,
                           w.vocab_size)


def layer_plan(plan: TensorShardPlan, lw: LayerWeights) -> TensorShardPlan:
    """``plan`` for one block: a layer with an attention shape or MLP width of its own (Gemma 4) gets a plan of its
    own (checked for the ranks like the model's)."""
    if lw.head_dim is None and lw.num_kv_heads is None and lw.intermediate_size is None:
        return plan
    return dataclasses.replace(plan, head_dim=lw.head_dim or plan.head_dim,
                               num_kv_heads=lw.num_kv_heads or plan.num_kv_heads,
                               intermediate_size=lw.intermediate_size or plan.intermediate_size)


def kv_layout(w: ModelWeights, plan: TensorShardPlan) -> tuple[dict[int, tuple[int, int]], list[int]]:
    """(this rank's (KV heads, head dim) of each block whose attention shape is its own, the blocks without K/V of
    their own): :class:`StaticKVCache`'s ``shapes`` and ``no_kv`` (Gemma 4)."""
    shapes = {i: (p.local_kv_heads, p.head_dim) for i, lw in enumerate(w.layers)
              if lw.head_dim is not None or lw.num_kv_heads is not None for p in [layer_plan(plan, lw)]}
    return shapes, [i for i, lw in enumerate(w.layers) if lw.kv_source is not None]


def _fused(parts, dtype) -> torch.Tensor:
    return load_fused(parts, dtype)        # slices read straight into one buffer where the source allows


def _fused_bias(parts, dtype) -> torch.Tensor | None:
    """cat of the (ref, rows) biases of a fused projection; None when none of the parts has a bias."""
    if all(ref is None for ref, _ in parts):
        return None
    return torch.cat([torch.zeros(rows[1], dtype=dtype) if ref is None else ref.load(0, *rows).to(dtype)
                      for ref, rows in parts])


def _load(ref, dtype) -> torch.Tensor | None:
    return None if ref is None else ref.load().to(dtype)


def norm_weight(ref, dtype: torch.dtype, offset: float = 0.0, fp32: bool = False, rows=None) -> torch.Tensor:
    """A norm's scale as the engine's norms take it: the weight in ``dtype``, or with an ``offset`` (Gemma's
    (1 + w)) ``offset + weight`` kept in fp32: the norms then scale in fp32 and round once, in Gemma's order; ``fp32``
    (OLMo 2) likewise without an offset. ``rows``: (start, length) of the weight (a norm split over the ranks)."""
    w = ref.load() if rows is None else ref.load(0, *rows)
    return w.float() + offset if offset or fp32 else w.to(dtype)


def shard_layer(lw: LayerWeights, plan: TensorShardPlan, dtype: torch.dtype, norm_offset: float = 0.0,
                alibi: torch.Tensor | None = None, norm_fp32: bool = False) -> dict[str, torch.Tensor]:
    """This rank's tensors of one block, fused and cast, contiguous, on the CPU.

    Keys: ``qkv.weight``, ``o.weight``, ``gate_up.weight``, ``down.weight``, ``input_norm``, ``post_norm`` and,
    where the model has them, ``qkv.bias``, ``o.bias``, ``gate_up.bias``, ``down.bias``, ``q_norm``, ``k_norm``,
    ``attn_out_norm``, ``mlp_out_norm`` (norms hold ``norm_offset + weight``), the LayerNorms' ``input_norm_bias``,
    ``post_norm_bias`` and ``alibi`` (this rank's heads' slopes, fp32, from the model's ``alibi``). A plain MLP
    (``lw.gate`` None) keeps its up projection under ``gate_up``.
    Row-parallel biases (o, down) are held by tp rank 0 only, so they are added once. A MoE layer has, instead of
    the gate/up and down keys, ``moe.router``, ``moe.gate_up`` [E, 2I, H], ``moe.down`` [E, H, I] and maybe the
    shared expert's ``shared.gate_up.weight``, ``shared.down.weight``, ``shared_gate.weight`` (:func:`_shard_moe`).
    A latent-attention block (DeepSeek) has ``qkv`` = q_a | kv_a and the keys of :func:`_shard_mla`.
    """
    plan = layer_plan(plan, lw)
    q_rows, kv_rows, mlp_rows = plan.q_rows, plan.kv_rows, plan.mlp_rows
    first = plan.adds_bias_once
    out = {
        "o.weight": lw.o.load(1, *out_columns(lw, plan)).to(dtype),
        "o.bias": lw.o_bias.load().to(dtype) if (lw.o_bias is not None and first) else None,
    }
    if lw.mla is not None:
        out.update(_shard_mla(lw.mla, plan, dtype))
    elif lw.deltanet is not None:    # Qwen3-Next / 3.5 linear attention: q | k | v | z | b | a in one GEMM
        out.update(_shard_deltanet(lw.deltanet, plan, dtype))
    elif lw.mamba1 is not None:      # Mamba-1: this rank's channels
        out.update(_shard_mamba1(lw.mamba1, plan, dtype))
    elif lw.mamba is not None and not lw.mamba.beside_attention:   # Granite 4's Mamba-2: this rank's heads (and the
        out.update(_shard_mamba(lw.mamba, plan, dtype))           # groups they read)
    elif lw.shortconv is not None:   # LFM2's short convolution: this rank's channels of B | C | x in one GEMM
        sc = lw.shortconv
        first, n = shortconv_rows(sc, plan)
        out["qkv.weight"] = _fused([(sc.in_proj, (part * sc.channels + first, n)) for part in range(3)], dtype)
        out["sc.conv"] = sc.conv.load(0, first, n).reshape(n, -1).to(dtype)
    else:   # (Qwen3-Next / 3.5: the attention's output gate rows after v's, one GEMM)
        # (a gate per head (LFM3: [Hq, H]) takes this rank's heads' rows, one each)
        gate_rows = q_rows if lw.attn_gate is None or lw.attn_gate.shape[0] == lw.q.shape[0] else (
            q_rows[0] // plan.head_dim, q_rows[1] // plan.head_dim)
        gate = [(lw.attn_gate, gate_rows)] if lw.attn_gate is not None else []
        gate_bias = [(lw.attn_gate_bias, gate_rows)] if lw.attn_gate is not None else []
        kv = [(lw.k, kv_rows), (lw.v, kv_rows)] if lw.kv_source is None else []    # (Gemma 4: another layer's K/V)
        kv_bias = [(lw.k_bias, kv_rows), (lw.v_bias, kv_rows)] if lw.kv_source is None else []
        out["qkv.weight"] = _fused([(lw.q, q_rows), *kv, *gate], dtype)
        out["qkv.bias"] = _fused_bias([(lw.q_bias, q_rows), *kv_bias, *gate_bias], dtype)
        if lw.mamba is not None:     # Falcon-H1: Mamba-2 beside the attention (modules/gated_deltanet.ParallelMixer)
            out.update(_shard_parallel_mamba(out, lw.mamba, plan, dtype))
    # (q / k norms over the whole projection, OLMo 2: this rank's heads' part of them)
    split = {"q_norm": q_rows, "k_norm": kv_rows} if lw.qk_norm_kind == "whole" else {}
    for key in ("input_norm", "post_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm"):
        ref = getattr(lw, key)
        out[key] = None if ref is None else norm_weight(ref, dtype, norm_offset, norm_fp32, split.get(key))
    for key in ("input_norm_bias", "post_norm_bias", "q_norm_bias", "k_norm_bias"):
        ref = getattr(lw, key)
        out[key] = None if ref is None else ref.load().to(dtype)
    if lw.beside is not None:            # Gemma 4: the experts' router scale and norms beside the dense MLP
        out["moe.router_scale"] = lw.beside.router_scale.load().to(dtype)
        for key in ("experts_in", "experts_out", "dense_out"):
            out[f"moe.{key}_norm"] = norm_weight(getattr(lw.beside, key), dtype, norm_offset, norm_fp32)
    if lw.per_layer_gate is not None:    # Gemma 4: the per-layer input's gate, projection and norm (whole on every rank)
        out["ple.gate.weight"] = lw.per_layer_gate.load().to(dtype)
        out["ple.proj.weight"] = lw.per_layer_proj.load().to(dtype)
        out["ple.norm"] = norm_weight(lw.per_layer_norm, dtype, norm_offset, norm_fp32)
    if lw.layer_scalar is not None:
        out["layer_scalar"] = lw.layer_scalar.load().to(dtype)
    if lw.out_scale is not None:     # Granite: h + m * o(x) == h + o'(x) with o' = m * o (likewise down, below)
        out["o.weight"] = (out["o.weight"].float() * lw.out_scale).to(dtype)
        if out["o.bias"] is not None:
            out["o.bias"] = (out["o.bias"].float() * lw.out_scale).to(dtype)
    if alibi is not None:
        d = plan.head_dim
        out["alibi"] = alibi[q_rows[0] // d:(q_rows[0] + q_rows[1]) // d].float()
    if lw.sinks is not None:         # gpt-oss: this rank's heads' sink logits
        d = plan.head_dim
        out["sinks"] = lw.sinks.load(0, q_rows[0] // d, q_rows[1] // d).to(dtype)
    moe = lw.moe
    if moe is None and lw.up is None:    # a block without an MLP (NemotronH: a mixer followed by another)
        pass
    elif moe is None or lw.beside is not None:     # (Gemma 4 26B-A4B: the experts beside it, below)
        mlp_in = [(lw.up, mlp_rows)] if lw.gate is None else [(lw.gate, mlp_rows), (lw.up, mlp_rows)]
        bias_in = [(lw.up_bias, mlp_rows)] if lw.gate is None else [(lw.gate_bias, mlp_rows), (lw.up_bias, mlp_rows)]
        out.update({
            "gate_up.weight": _fused(mlp_in, dtype),
            "gate_up.bias": _fused_bias(bias_in, dtype),
            "down.weight": lw.down.load(1, *mlp_rows).to(dtype),
            "down.bias": lw.down_bias.load().to(dtype) if (lw.down_bias is not None and first) else None,
        })
        if lw.out_scale is not None:
            for key in ("down.weight", "down.bias"):
                if out[key] is not None:
                    out[key] = (out[key].float() * lw.out_scale).to(dtype)
    if moe is not None:
        out.update(_shard_moe(moe, plan, dtype))
        if lw.out_scale is not None:  # Granite MoE: the experts' and the shared MLP's down scaled (no biases)
            for key in ("moe.down", "shared.down.weight"):
                if out.get(key) is not None:
                    out[key] = (out[key].float() * lw.out_scale).to(dtype)
    return {k: v.contiguous() for k, v in out.items() if v is not None}


def out_columns(lw, plan: TensorShardPlan) -> tuple[int, int]:
    """(first, count) of the input columns of a block's output projection on this rank: its attention heads' (o_proj),
    or a linear-state mixer's out_proj: its value heads' (Gated DeltaNet), channels' (short convolution) or heads'
    inner channels (Mamba-2)."""
    if getattr(lw, "deltanet", None) is not None:
        return deltanet_rows(lw.deltanet, plan)[1]
    if getattr(lw, "shortconv", None) is not None:
        return shortconv_rows(lw.shortconv, plan)
    if getattr(lw, "mamba", None) is not None and not lw.mamba.beside_attention:
        return mamba_rows(lw.mamba, plan)[0]
    if getattr(lw, "mamba1", None) is not None:
        return mamba1_rows(lw.mamba1, plan)
    return plan.q_rows


def deltanet_rows(dn, plan: TensorShardPlan) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(q / k rows, v / z rows, b / a rows and decays) of this rank's linear-attention heads: key heads
    [r Hk / N, (r + 1) Hk / N) and the value heads they serve (the policy refuses an N that does not divide Hk)."""
    hk, hv = dn.key_heads // plan.tp, dn.value_heads // plan.tp
    r = plan.tp_rank
    return (r * hk * dn.key_dim, hk * dn.key_dim), (r * hv * dn.value_dim, hv * dn.value_dim), (r * hv, hv)


def mamba_rows(mb, plan: TensorShardPlan) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(inner channels, B / C rows of one of them, heads) of this rank's Mamba-2 heads: heads [r H / N, (r + 1) H / N),
    their P channels each, and the groups those heads read (whole groups when N divides G; else the one group they
    share, replicated: engine._check_linear_attention_options refuses other splits)."""
    heads = mb.heads // plan.tp
    h0 = plan.tp_rank * heads
    per_group = mb.heads // mb.groups
    g0, g1 = h0 // per_group, (h0 + heads - 1) // per_group + 1
    return (h0 * mb.head_dim, heads * mb.head_dim), (g0 * mb.state_size, (g1 - g0) * mb.state_size), (h0, heads)


def _shard_mamba(mb, plan: TensorShardPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Mamba-2 block's tensors on this rank (``modules/gated_deltanet.Mamba2Mixer``): ``qkv`` = its rows of z | x |
    B | C | dt (in_proj: z [I] | x [I] | B [G N] | C [G N] | dt [H]), ``mb.conv`` / ``mb.conv_bias`` its x | B | C
    channels, ``mb.dt_bias`` / ``mb.a_log`` / ``mb.d`` its heads', ``mb.norm`` its channels'."""
    (c0, cn), (b0, bn), heads = mamba_rows(mb, plan)
    inner, gn = mb.heads * mb.head_dim, mb.groups * mb.state_size
    conv_pieces = ((c0, cn), (inner + b0, bn), (inner + gn + b0, bn))       # x | B | C within the conv's channels
    out = {"qkv.weight": _fused([(mb.in_proj, (c0, cn))] + [(mb.in_proj, (inner + a, n)) for a, n in conv_pieces]
                                + [(mb.in_proj, (2 * inner + 2 * gn + heads[0], heads[1]))], dtype),
           "mb.conv": torch.cat([mb.conv.load(0, a, n) for a, n in conv_pieces]).flatten(1).to(dtype),
           "mb.conv_bias": None if mb.conv_bias is None else
           torch.cat([mb.conv_bias.load(0, a, n) for a, n in conv_pieces]).to(dtype),
           "mb.norm": None if mb.norm is None else mb.norm.load(0, c0, cn).to(dtype)}     # (None: no norm)
    for key, ref in (("mb.dt_bias", mb.dt_bias), ("mb.a_log", mb.a_log), ("mb.d", mb.d)):
        out[key] = ref.load(0, *heads).to(dtype)
    return out


def _shard_parallel_mamba(t: dict, mb, plan: TensorShardPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Falcon-H1's Mamba-2 beside the attention whose tensors ``t`` holds: in_proj's rows of this rank after the
    attention's q | k | v rows in ``qkv`` (zero biases beside q / k / v's, where those have one), out_proj's columns
    after o_proj's in ``o`` (one GEMM over both read-outs; the two biases summed, on one rank), and the mixer's
    ``mb.*`` tensors (:func:`_shard_mamba`)."""
    m = _shard_mamba(mb, plan, dtype)
    rows = m["qkv.weight"].shape[0]
    m["qkv.weight"] = torch.cat([t["qkv.weight"], m["qkv.weight"]])
    m["qkv.bias"] = None if t["qkv.bias"] is None else torch.cat([t["qkv.bias"], t["qkv.bias"].new_zeros(rows)])
    m["o.weight"] = torch.cat([t["o.weight"], mb.out_proj.load(1, *mamba_rows(mb, plan)[0]).to(dtype)], dim=1)
    biases = [b for b in (t["o.bias"], _load(mb.out_proj_bias, dtype) if plan.adds_bias_once else None)
              if b is not None]
    m["o.bias"] = sum(biases[1:], biases[0]) if biases else None
    return m


def mamba1_rows(m, plan: TensorShardPlan) -> tuple[int, int]:
    """(first, count) of this rank's Mamba-1 channels (engine._check_linear_attention_options refuses a size that does
    not divide them)."""
    n = m.inner // plan.tp
    return plan.tp_rank * n, n


def _shard_mamba1(m, plan: TensorShardPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Mamba-1 block's tensors on this rank (``modules/gated_deltanet.Mamba1Mixer``): ``qkv`` = its channels' rows of
    x | z (in_proj), ``m1.conv`` / ``m1.conv_bias``, ``m1.x_proj`` (its channels' columns: partial sums, reduced),
    ``m1.dt_proj`` / ``m1.dt_bias`` / ``m1.a_log`` / ``m1.d`` its channels' rows, the dt / B / C norms whole."""
    c0, cn = mamba1_rows(m, plan)
    out = {"qkv.weight": _fused([(m.in_proj, (c0, cn)), (m.in_proj, (m.inner + c0, cn))], dtype),
           "m1.conv": m.conv.load(0, c0, cn).reshape(cn, -1).to(dtype),
           "m1.conv_bias": None if m.conv_bias is None else m.conv_bias.load(0, c0, cn).to(dtype),
           "m1.x_proj": m.x_proj.load(1, c0, cn).to(dtype), "m1.dt_proj": m.dt_proj.load(0, c0, cn).to(dtype),
           "m1.dt_bias": m.dt_bias.load(0, c0, cn).to(dtype), "m1.a_log": m.a_log.load(0, c0, cn).to(dtype),
           "m1.d": m.d.load(0, c0, cn).to(dtype)}
    if m.norms == "weights":
        out.update({f"m1.norm_{k}": ref.load().to(dtype) for k, ref in zip("dbc", (m.dt_norm, m.b_norm, m.c_norm))})
    return out


def shortconv_rows(sc, plan: TensorShardPlan) -> tuple[int, int]:
    """(first, count) of this rank's short-convolution channels (engine._check_linear_attention_options refuses a size
    that does not divide them)."""
    n = sc.channels // plan.tp
    return plan.tp_rank * n, n


def _shard_deltanet(dn, plan: TensorShardPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A linear-attention block's tensors on this rank (``modules/gated_deltanet.py``): ``qkv`` = its heads' rows of
    q | k | v | z | b | a, ``dn.conv`` [C_rank, K] their convolution channels (q's, k's, v's), ``dn.dt_bias`` /
    ``dn.a_log`` their value heads', ``dn.norm`` whole."""
    qk, vz, heads = deltanet_rows(dn, plan)
    q, k, v, z, b, a = dn.in_proj
    width = dn.key_heads * dn.key_dim          # where k's and v's channels start in the convolution
    conv = torch.cat([dn.conv.load(0, first, rows) for first, rows in
                      ((qk[0], qk[1]), (width + qk[0], qk[1]), (2 * width + vz[0], vz[1]))])
    return {"qkv.weight": _fused([(q, qk), (k, qk), (v, vz), (z, vz), (b, heads), (a, heads)], dtype),
            "dn.conv": conv.reshape(conv.shape[0], -1).to(dtype),
            "dn.dt_bias": dn.dt_bias.load(0, *heads).to(dtype), "dn.a_log": dn.a_log.load(0, *heads).to(dtype),
            "dn.norm": dn.norm.load().to(dtype)}


def _shard_mla(m, plan: TensorShardPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A latent-attention block's tensors on this rank (``modules/mla.py``): ``qkv`` = q_a_proj's rows (or, without
    the q low rank, q_proj's rows of this rank's heads) | kv_a_proj_with_mqa's (latent, rotary key), ``q_b.weight``
    (this rank's heads' rows), ``q_a_norm``, ``kv_a_norm``, ``kv_b.weight`` (this rank's heads' k_nope | v rows).
    (Interleaved rotary rows come reordered from the policy: ``policies/deepseek.py``.)"""
    s = m.shape
    h0, heads = plan.tp_rank * plan.local_heads, plan.local_heads
    qk, rope = s.qk_head_dim, s.qk_rope_head_dim
    q_rows = (0, s.q_lora_rank) if s.q_lora_rank else (h0 * qk, heads * qk)
    kv_rows = (0, s.kv_lora_rank + rope)
    out = {"qkv.weight": _fused([(m.q_a, q_rows), (m.kv_a, kv_rows)], dtype),
           "qkv.bias": _fused_bias([(m.q_a_bias, q_rows), (m.kv_a_bias, kv_rows)], dtype),
           "q_b.weight": m.q_b.load(0, h0 * qk, heads * qk).to(dtype) if s.q_lora_rank else None,
           "q_a_norm": m.q_a_norm.load().to(dtype) if s.q_lora_rank else None,
           "kv_a_norm": m.kv_a_norm.load().to(dtype),
           "kv_b.weight": m.kv_b.load(0, h0 * (s.qk_nope_head_dim + s.v_head_dim),
                                      heads * (s.qk_nope_head_dim + s.v_head_dim)).to(dtype)}
    return out


def _slice(n: int, plan: TensorShardPlan, what: str) -> tuple[int, int]:
    """This rank's (start, length) of ``n`` intermediate rows."""
    if n % plan.tp:
        raise ValueError(f"tensor_parallel_size={plan.tp} does not divide the {what} intermediate size {n}; use a "
                         f"tensor_parallel_size that divides it.")
    return plan.tp_rank * (n // plan.tp), n // plan.tp


def experts_per_rank(experts: int, ranks: int, model_type: str = "") -> int:
    """Experts each of ``ranks`` holds under expert parallelism; an error naming the fix when they do not divide."""
    if experts % ranks:
        raise ValueError(f"expert_parallel_size={ranks} does not divide the {experts} experts"
                         f"{' of ' + model_type if model_type else ''}; use expert_parallel_size=1 (expert slicing) "
                         f"or a tensor_parallel_size that divides the experts.")
    return experts // ranks


def expert_range(moe, plan: TensorShardPlan) -> tuple[int, int]:
    """(first expert, experts) this rank holds under expert parallelism."""
    n = experts_per_rank(moe.gate_up.shape[0], plan.tp)
    return plan.tp_rank * n, n


def _shard_moe(moe, plan: TensorShardPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A sparse MLP's tensors on this rank: the router whole (every rank routes every token the same way), and
    each expert sliced like a dense MLP (expert slicing): rows [s, s + n) of its gate and of its up ([E, 2n, H]), the
    same columns of its down ([E, H, n]); or, with ``moe.expert_parallel``, E / N whole experts. The shared expert is
    sliced either way, its sigmoid gate whole. The partial outputs are summed over the group once per layer
    (``MoEMLP``)."""
    # (DeepSeek keeps its router, and its correction bias, in fp32)
    router_dtype = torch.float32 if moe.routing is not None and moe.routing.fp32 else dtype
    # (a correction bias added to the fp32 scores the choice is made on, as it is stored, in fp32: transformers keeps
    # Hy3's and AFMoE's in fp32 in a bf16 model too; gpt-oss's router bias, added to the logits, in the router's dtype)
    choice_bias = moe.routing is not None and moe.routing.scoring in ("sigmoid", "softmax")
    out = {"moe.router": moe.router.load().to(router_dtype),
           "moe.router_bias": (moe.router_bias.load().to(torch.float32 if choice_bias else router_dtype)
                               if moe.router_bias is not None else None)}
    gb, db = moe.gate_up_bias, moe.down_bias       # gpt-oss: the experts' biases (down's added once over the group)
    if moe.expert_parallel:        # this rank's whole experts (expert_parallel_size = tensor_parallel_size)
        first, n = expert_range(moe, plan)
        out.update({"moe.gate_up": moe.gate_up.load(0, first, n).to(dtype),
                    "moe.down": moe.down.load(0, first, n).to(dtype),
                    "moe.gate_up_bias": gb.load(0, first, n).to(dtype) if gb is not None else None,
                    "moe.down_bias": db.load(0, first, n).to(dtype) if db is not None else None})
    elif not moe.gated:            # (NemotronH: each expert's up rows [s, s + n) alone)
        s, n = _slice(moe.expert_inter, plan, "experts'")
        out.update({"moe.gate_up": moe.gate_up.load(1, s, n).to(dtype), "moe.down": moe.down.load(2, s, n).to(dtype)})
    else:
        inter = moe.gate_up.shape[1] // 2
        s, n = _slice(inter, plan, "experts'")
        out.update({"moe.gate_up": torch.cat([moe.gate_up.load(1, s, n), moe.gate_up.load(1, inter + s, n)],
                                             dim=1).to(dtype),
                    "moe.down": moe.down.load(2, s, n).to(dtype),
                    "moe.gate_up_bias": torch.cat([gb.load(1, s, n), gb.load(1, inter + s, n)], dim=1).to(dtype)
                    if gb is not None else None,
                    "moe.down_bias": db.load().to(dtype) if db is not None and plan.adds_bias_once else None})
    if moe.expert_scale is not None:    # (Gemma 4: whole, in the dtype)
        out["moe.expert_scale"] = moe.expert_scale.load().to(dtype)
    if moe.latent_in is not None:   # whole on every rank; the out bias added once (the partial sums follow it)
        out.update({"moe.latent_in.weight": moe.latent_in.load().to(dtype),
                    "moe.latent_in.bias": _load(moe.latent_in_bias, dtype),
                    "moe.latent_out.weight": moe.latent_out.load().to(dtype),
                    "moe.latent_out.bias": _load(moe.latent_out_bias, dtype) if plan.adds_bias_once else None})
    if moe.shared_up is not None:
        s, n = _slice(moe.shared_inter, plan, "shared expert's")
        gate = [moe.shared_gate.load(0, s, n)] if moe.shared_gate is not None else []     # (NemotronH: no gate)
        sb, db = moe.shared_up_bias, moe.shared_down_bias
        out.update({
            "shared.gate_up.weight": torch.cat([*gate, moe.shared_up.load(0, s, n)]).to(dtype),
            "shared.down.weight": moe.shared_down.load(1, s, n).to(dtype),
            "shared.gate_up.bias": sb.load(0, s, n).to(dtype) if sb is not None else None,
            "shared.down.bias": _load(db, dtype) if plan.adds_bias_once else None,
            # (Qwen2-MoE's sigmoid gate of the shared expert; DeepSeek's shared experts have none)
            "shared_gate.weight": moe.shared_expert_gate.load().to(dtype) if moe.shared_expert_gate is not None
            else None,
        })
    return out


def layer_spec(w: ModelWeights, plan: TensorShardPlan, lw: LayerWeights) -> LayerSpec:
    moe = lw.moe
    plan = layer_plan(plan, lw)
    return LayerSpec(hidden_size=w.hidden_size, num_heads=plan.local_heads, num_kv_heads=plan.local_kv_heads,
                     head_dim=plan.head_dim, intermediate_size=plan.mlp_rows[1], rms_norm_eps=w.rms_norm_eps,
                     scaling=w.scaling, sliding_window=lw.sliding_window, attention_chunk=lw.attention_chunk,
                     attn_temperature=lw.attn_temperature, mlp_act=w.mlp_act if lw.mlp_act is None else lw.mlp_act,
                     attn_softcap=w.attn_softcap, mlp_gated=w.mlp_gated, rotary=w.rotary and lw.rotary,
                     parallel_residual=w.parallel_residual, qk_norm_kind=lw.qk_norm_kind,
                     moe_top_k=moe.top_k if moe else 0, moe_renormalize=bool(moe and moe.renormalize),
                     moe_weights_in_dtype=bool(moe and moe.weights_in_dtype),
                     moe_first_expert=expert_range(moe, plan)[0] if moe and moe.expert_parallel else None,
                     moe_routing=moe.routing if moe else None, moe_act=moe.act if moe else None, mla=w.mla,
                     deltanet=lw.deltanet, attn_output_gate=lw.attn_gate is not None, mamba=lw.mamba,
                     mamba1=lw.mamba1, v_norm=lw.v_norm, kv_source=lw.kv_source, clip_qkv=lw.clip_qkv)


# A block's tensors by half: offload streams the attention half (with both norms) and the MLP half as two units.
ATTENTION_KEYS = ("qkv.weight", "qkv.bias", "o.weight", "o.bias", "input_norm", "post_norm", "q_norm", "k_norm",
                  "attn_out_norm", "input_norm_bias", "post_norm_bias", "q_norm_bias", "k_norm_bias", "alibi", "sinks",
                  "q_b.weight", "q_a_norm", "kv_a_norm", "kv_b.weight",
                  "dn.conv", "dn.dt_bias", "dn.a_log", "dn.norm", "sc.conv",
                  "mb.conv", "mb.conv_bias", "mb.dt_bias", "mb.a_log", "mb.d", "mb.norm",
                  "m1.conv", "m1.conv_bias", "m1.x_proj", "m1.dt_proj", "m1.dt_bias", "m1.a_log", "m1.d", "m1.norm_d",
                  "m1.norm_b", "m1.norm_c")
MLP_KEYS = ("gate_up.weight", "gate_up.bias", "down.weight", "down.bias", "mlp_out_norm",
            "moe.router", "moe.router_bias", "moe.gate_up", "moe.down", "moe.gate_up_bias", "moe.down_bias",
            "shared.gate_up.weight", "shared.down.weight", "shared_gate.weight", "shared.gate_up.bias",
            "shared.down.bias", "moe.latent_in.weight", "moe.latent_in.bias", "moe.latent_out.weight",
            "moe.latent_out.bias", "moe.expert_scale", "moe.router_scale", "moe.experts_in_norm",
            "moe.experts_out_norm", "moe.dense_out_norm", "ple.gate.weight", "ple.proj.weight", "ple.norm",
            "layer_scalar")


def split_block(t: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(attention half, MLP half) of :func:`shard_layer`'s dict."""
    return ({k: t[k] for k in ATTENTION_KEYS if k in t}, {k: t[k] for k in MLP_KEYS if k in t})


LINEARS = ("qkv", "o", "gate_up", "down", "q_b")       # (q_b: latent attention's, DeepSeek)


def block_linear_inputs(w: ModelWeights, plan: TensorShardPlan) -> dict[str, int]:
    """K (input dims) of each block linear on this rank: qkv and gate_up read the hidden state, o this rank's heads,
    down this rank's intermediate columns (row-parallel shards under tensor parallelism). Mixture-of-experts layers:
    the experts' down (this rank's slice of each expert's intermediate; whole experts under expert parallelism) and
    the shared expert's down (its slice) for "experts' down" / "shared expert's down"; the dense down only where a
    layer is dense."""
    layers = getattr(w, "layers", None) or []
    ks = {"qkv": w.hidden_size, "o": plan.local_heads * w.head_dim, "gate_up": w.hidden_size}
    for kind, name in (("deltanet", "linear attention's out"), ("mamba", "Mamba-2 out"),
                       ("shortconv", "short convolution's out"), ("mamba1", "Mamba out")):   # (a linear-state
        #                                                                                         mixer's out_proj)
        lw = next((lw for lw in layers if getattr(lw, kind, None) is not None), None)
        if lw is not None and kind == "mamba" and lw.mamba.beside_attention:    # (Falcon-H1: o | out_proj)
            ks["o"] += mamba_rows(lw.mamba, plan)[0][1]
        elif lw is not None:
            ks[name] = out_columns(lw, plan)[1]
    if not layers or any(lw.moe is None and lw.up is not None for lw in layers):   # (blocks without an MLP: none)
        ks["down"] = plan.mlp_rows[1]
    for lw in layers:      # (Gemma 4: layers of their own head dim / MLP width)
        if getattr(lw, "head_dim", None) is not None or getattr(lw, "intermediate_size", None) is not None:
            p = layer_plan(plan, lw)
            ks.setdefault(f"o ({p.head_dim}-wide heads)", p.local_heads * p.head_dim)
            ks.setdefault(f"down ({p.intermediate_size} wide)", p.mlp_rows[1])
    for moe in {id(lw.moe): lw.moe for lw in layers if lw.moe is not None}.values():
        ks.setdefault("experts' down", moe.expert_inter // (1 if moe.expert_parallel else plan.tp))
        if moe.shared_up is not None:
            ks.setdefault("shared expert's down", moe.shared_inter // plan.tp)
        if moe.latent_in is not None:       # (NemotronH's latent experts read L inputs)
            ks.setdefault("experts' up", moe.latent_in.shape[0])
    if w.mla is not None and w.mla.q_lora_rank:
        ks["q_b"] = w.mla.q_lora_rank
    return ks


def check_int4_groups(w: ModelWeights, plan: TensorShardPlan, group_size: int) -> None:
    """``quantize="int4"``: every block linear's K on this rank must be a multiple of the group size (groups never
    straddle a row-parallel shard's boundary); refused before any weight is read, naming the weight and the fix."""
    ks = block_linear_inputs(w, plan)
    bad = {name: k for name, k in ks.items() if k % group_size}
    if not bad:
        return
    common = math.gcd(*ks.values())
    sizes = [g for g in (8, 16, 32, 64, *range(128, common + 1, 128)) if common % g == 0]   # what the kernels take
    fit = max([g for g in sizes if g < group_size] or sizes or [0])
    where = f" on each of the {plan.tp} tensor-parallel ranks" if plan.tp > 1 else ""
    name, k = next(iter(bad.items()))
    raise ValueError(
        f"quantize='int4' with quantize_group_size={group_size}: the {name} projection's K (input dims{where}) is {k}, "
        f"not a multiple of {group_size} ({', '.join(f'{n}: {v}' for n, v in bad.items())}). "
        + (f"Pass quantize_group_size={fit} (it divides every block linear's K), or quantize='int8'."
           if fit else "No group size the int4 kernels take (8, 16, 32, 64, multiples of 128) divides every K; "
                        "use quantize='int8'."))


def quantize_linears(t: dict[str, torch.Tensor], amx: bool = False, row_max=None, quantize: str = "int8",
                     group_size: int = 128, whole_experts: bool = False) -> dict[str, torch.Tensor]:
    """``t`` with each block linear's ``weight`` quantised and its fp32 ``scale`` beside it (what ``Linear(quantize=)``
    holds). int8: one scale per row, the weight row-major or, ``amx``, in the AMX tile order (``cpu_gemv.pack_int8``,
    a flat tensor); ``row_max`` (tensor parallelism: a max over the group) gives the row-parallel shards (o, down)
    the scales of their whole rows, as the resident engine does. int4: packed uint8 [N, K / 2] with scales
    [N, K / group_size] (each group's scale is its own: no collective). Meta tensors give the layout. A sparse MLP
    half: the routed experts as the resident grouped GEMMs hold them (``moe.quantize_experts``: ``moe.gate_up`` /
    ``moe.down`` with ``moe.gate_up_scale`` / ``moe.down_scale``; the down's scales over the group's whole rows unless
    ``whole_experts``, expert parallelism) and the shared expert's linears row-major (router, its bias and the
    shared gate as they are)."""
    out = dict(t)
    for name in ("moe.gate_up", "moe.down"):
        if name in t:
            whole = whole_experts or name == "moe.gate_up"
            out[name], out[f"{name}_scale"] = quantize_experts(t[name], quantize, group_size,
                                                               None if whole else row_max)
    for name in (*LINEARS, "shared.gate_up", "shared.down"):
        w = t.get(f"{name}.weight")
        if w is None:
            continue
        amx_ = amx and not name.startswith("shared.")      # (row-major: in_features is the weight's)
        n, k = w.shape
        if quantize == "int4":
            if w.is_meta:
                q, s = (torch.empty(n, k // 2, dtype=torch.uint8, device="meta"),
                        torch.empty(n, k // group_size, dtype=torch.float32, device="meta"))
            else:
                q, s = quantize_int4_rows(w, group_size)
        elif w.is_meta:
            shape = (cpu_gemv.packed_numel(n, k),) if amx_ else (n, k)
            q, s = (torch.empty(shape, dtype=torch.int8, device="meta"),
                     torch.empty(n, dtype=torch.float32, device="meta"))
        else:
            q, s = quantize_rows(w, row_max if name in ("o", "down", "shared.down") else None)
            q = cpu_gemv.pack_int8(q) if amx_ else q
        out[f"{name}.weight"], out[f"{name}.scale"] = q, s
    return out


def make_layer(index: int, t: dict[str, torch.Tensor], spec: LayerSpec, comm: TensorParallelComm,
               pack: bool = True, quantize: str | None = None, group_size: int = 128, experts=None) -> DecoderLayer:
    """A block over the tensors of :func:`shard_layer` (already on the compute device and dtype).

    ``pack=False`` keeps the tensors as they are (views into a streamed buffer stay views). Either half may be
    missing from ``t`` (an offloaded block's halves come one at a time): its module is then None.
    ``quantize="int8"``: the block linears (:data:`LINEARS`) hold int8 weights with per-row scales; ``"int4"``:
    packed int4 with a scale per row and group of ``group_size`` inputs (norms stay as they are). ``experts``: a sparse
    layer's routed experts read when routed to (offload, :class:`~lightning_dsinfer.offload.experts.LayerExperts`;
    ``t`` then holds no ``moe.gate_up`` / ``moe.down``)."""
    reduce = comm.all_reduce if comm.size > 1 else None
    # o's K on this rank (a quantised unit's packed weight does not show it): the attention heads', or a linear-state
    # mixer's value heads' / channels'
    mamba_inner = spec.mamba.heads // comm.size * spec.mamba.head_dim if spec.mamba is not None else 0
    parallel = spec.mamba is not None and spec.mamba.beside_attention     # (Falcon-H1: o | out_proj, one GEMM)
    o_inputs = (spec.deltanet.value_heads // comm.size * spec.deltanet.value_dim if "dn.conv" in t else
                t["sc.conv"].shape[0] if "sc.conv" in t else
                spec.num_heads * spec.head_dim + mamba_inner if parallel else
                mamba_inner if "mb.conv" in t else t["m1.conv"].shape[0] if "m1.conv" in t else
                spec.num_heads * spec.head_dim)
    row_max = comm.all_reduce_max if comm.size > 1 and quantize == "int8" else None   # row-parallel int8 scales
    first = comm.rank == 0

    def linear(name, **kw):
        scale = t.get(f"{name}.scale")          # quantised already (an offload unit; int8 maybe in AMX tile order)
        if scale is not None and not name.startswith("shared."):    # (the shared expert's: row-major)
            kw["in_features"] = o_inputs if name == "o" else \
                spec.intermediate_size if name == "down" else spec.mla.q_lora_rank if name == "q_b" else \
                spec.hidden_size
        return Linear(t[f"{name}.weight"], t.get(f"{name}.bias"), pack=pack, quantize=quantize, scale=scale,
                      group_size=group_size, **kw)

    # (OLMo 2: q / k normed over the whole projection, its sums of squares summed over the group; HunYuan: normed
    # after the rotation)
    kind, extra = {"whole": (ProjectionNormAttention, dict(reduce=reduce, ranks=comm.size)),
                   "after_rotary": (RotaryFirstAttention, {}),
                   "layer": (HeadLayerNormAttention, dict(q_norm_bias=t.get("q_norm_bias"),
                                                          k_norm_bias=t.get("k_norm_bias")))}.get(
        spec.qk_norm_kind, (Attention, {}))
    if "sinks" in t:                 # gpt-oss (plain Attention)
        extra = {**extra, "sinks": t["sinks"]}
    if spec.attn_output_gate:        # Qwen3-Next / 3.5: the output gated by sigmoid of the qkv GEMM's last rows
        kind = OutputGatedAttention
    if spec.attn_temperature is not None:   # Llama 4's NoPE layers, Ministral 3: queries scaled by column / position
        kind = TemperatureTunedAttention
    if spec.clip_qkv is not None:    # OLMo, MPT, DBRX: q, k, v clamped (the policies set it on plain attention only)
        kind = ClampedQKVAttention

    def out_proj():                  # (row-parallel: this rank's partial sums reduced; the residual added once)
        return linear("o", reduce=reduce, owns_residual=first, row_max=row_max)

    attn = None
    if "qkv.weight" not in t:        # (an offloaded MLP half)
        pass
    elif "mb.conv" in t:             # Granite 4's Mamba-2 (modules/gated_deltanet.Mamba2Mixer); Falcon-H1's beside
        mb, ranks = spec.mamba, comm.size      # the attention (ParallelMixer: one GEMM in, one out for both)
        groups = max(mb.groups // ranks, 1)           # (fewer groups than ranks: each rank within one, replicated)
        attn = Mamba2Mixer(index, None if parallel else linear("qkv"), None if parallel else out_proj(), t["mb.conv"],
                           t.get("mb.conv_bias"), t["mb.dt_bias"], t["mb.a_log"], t["mb.d"], t.get("mb.norm"),
                           mb.heads // ranks, mb.head_dim, groups, mb.state_size, spec.rms_norm_eps, mb.dt_limit,
                           norm_reduce=reduce if mb.groups < ranks else None,
                           norm_slot=(comm.rank // (ranks // mb.groups), mb.groups) if mb.groups < ranks else (0, 1),
                           norm_group=mb.heads * mb.head_dim // mb.groups, gating=mb.gating)
        if parallel:
            attention = kind(spec, index, None, None, q_norm=t.get("q_norm"), k_norm=t.get("k_norm"), **extra)
            attn = ParallelMixer(attention, attn, linear("qkv"), out_proj())
    elif "m1.conv" in t:             # Mamba-1 (modules/gated_deltanet.Mamba1Mixer)
        m1 = spec.mamba1
        n = t["m1.a_log"].shape[1]
        widths = {"d": t["m1.dt_proj"].shape[1], "b": n, "c": n}    # (dt rank, state size)
        norms = None if m1.norms is None else tuple(   # (FalconMamba's weightless norms: unit weights)
            t.get(f"m1.norm_{k}", torch.ones(widths[k], dtype=t["m1.x_proj"].dtype, device=t["m1.x_proj"].device))
            for k in "dbc")
        attn = Mamba1Mixer(index, linear("qkv"), out_proj(), t["m1.conv"], t.get("m1.conv_bias"),
                           Linear(t["m1.x_proj"], pack=pack), Linear(t["m1.dt_proj"], pack=pack), t["m1.dt_bias"],
                           t["m1.a_log"], t["m1.d"], norms, m1.norm_eps, reduce=reduce)
    elif "sc.conv" in t:             # LFM2's gated short convolution (modules/gated_deltanet.ShortConv)
        attn = ShortConv(index, linear("qkv"), out_proj(), t["sc.conv"])
    elif "dn.conv" in t:             # Qwen3-Next / 3.5 linear attention (modules/gated_deltanet.py)
        dn = spec.deltanet
        attn = GatedDeltaNet(index, linear("qkv"), out_proj(), t["dn.conv"], t["dn.dt_bias"], t["dn.a_log"],
                             t["dn.norm"], dn.key_heads // comm.size, dn.value_heads // comm.size, dn.key_dim,
                             dn.value_dim, dn.norm_eps if dn.norm_eps is not None else spec.rms_norm_eps,
                             dn.beta_scale)
    elif "kv_b.weight" in t:         # latent attention (DeepSeek, modules/mla.py)
        attn = LatentAttention(index, spec.num_heads, spec.mla, spec.scaling, spec.mla.norm_eps, linear("qkv"),
                               out_proj(), t["kv_b.weight"], t["kv_a_norm"],
                               linear("q_b") if "q_b.weight" in t else None, t.get("q_a_norm"))
    elif spec.v_norm or spec.kv_source is not None:     # Gemma 4: v normed, or another block's K/V read
        unit = torch.ones(spec.head_dim, dtype=torch.float32, device=t["o.weight"].device) if spec.v_norm else None
        attn = SharedKVAttention(spec, index, linear("qkv"), out_proj(), t["q_norm"], t.get("k_norm"), unit,
                                 spec.kv_source)
    else:
        attn = kind(spec, index, linear("qkv"), out_proj(), q_norm=t.get("q_norm"), k_norm=t.get("k_norm"),
                    alibi=t.get("alibi"), **extra)
    mlp = (GatedMLP if spec.mlp_gated else MLP)(
        linear("gate_up"), linear("down", reduce=reduce, owns_residual=first, row_max=row_max),
        act=spec.mlp_act) if "gate_up.weight" in t else None
    dense = mlp                 # (Gemma 4 26B-A4B: the dense MLP stays, the experts beside it)
    if "moe.router" in t:       # the experts' partial sums are reduced once, in MoEMLP (not in each down)
        shared = None
        if "shared.gate_up.weight" in t:    # (NemotronH's shared expert has no gate: spec.moe_act is a PlainAct)
            plain = isinstance(spec.moe_act, reference.PlainAct)
            shared = (MLP if plain else GatedMLP)(linear("shared.gate_up"), linear("shared.down", row_max=row_max),
                                                  act=spec.moe_act.name if plain else "silu")
        shared_gate = Linear(t["shared_gate.weight"], pack=pack) if "shared_gate.weight" in t else None  # [1, H]
        ep = spec.moe_first_expert is not None      # whole experts: their down rows need no group max
        mlp = MoEMLP(t["moe.router"], t.get("moe.gate_up"), t.get("moe.down"), spec.moe_top_k, spec.moe_renormalize,
                     spec.moe_weights_in_dtype, shared, shared_gate, reduce=reduce, quantize=quantize,
                     row_max=None if ep else row_max, pack=pack, first_expert=spec.moe_first_expert or 0,
                     routing=spec.moe_routing, router_bias=t.get("moe.router_bias"), streamed=experts,
                     gate_up_bias=t.get("moe.gate_up_bias"), down_bias=t.get("moe.down_bias"), act=spec.moe_act,
                     group_size=group_size, gate_up_scale=t.get("moe.gate_up_scale"),
                     down_scale=t.get("moe.down_scale"),
                     latent_in=Linear(t["moe.latent_in.weight"], t.get("moe.latent_in.bias"), pack=pack)
                     if "moe.latent_in.weight" in t else None,
                     latent_out=Linear(t["moe.latent_out.weight"], t.get("moe.latent_out.bias"), pack=pack)
                     if "moe.latent_out.weight" in t else None, expert_scale=t.get("moe.expert_scale"))
    if "input_norm_bias" in t:       # the GPT families (an offloaded MLP half needs no more than DecoderLayer's)
        return GPTDecoderLayer(attn, mlp, t["input_norm"], t["input_norm_bias"], t.get("post_norm"),
                               t.get("post_norm_bias"), spec.rms_norm_eps, spec.parallel_residual)
    if "attn_out_norm" in t and "input_norm" not in t:   # OLMo 2, Exaone 4: norms on the outputs only
        return PostNormDecoderLayer(attn, mlp, spec.rms_norm_eps, t["attn_out_norm"], t.get("mlp_out_norm"))
    if "layer_scalar" in t:          # Gemma 4's MLP half: the per-layer input and the layer's scalar after the MLP
        ple = "ple.gate.weight" in t
        beside = None
        if "moe.router_scale" in t:  # (26B-A4B: the experts beside the dense MLP)
            beside = ExpertsBesideMLP(mlp, t["moe.router_scale"], t["moe.experts_in_norm"], t["moe.experts_out_norm"],
                                      t["moe.dense_out_norm"], spec.hidden_size ** -0.5, spec.rms_norm_eps)
        return PerLayerInputLayer(attn, dense, t.get("input_norm"), t.get("post_norm"),
                                  spec.rms_norm_eps, t.get("attn_out_norm"), t.get("mlp_out_norm"), index,
                                  t["layer_scalar"], Linear(t["ple.gate.weight"], pack=pack) if ple else None,
                                  Linear(t["ple.proj.weight"], pack=pack) if ple else None, t.get("ple.norm"),
                                  spec.mlp_act, beside)
    if "attn_out_norm" in t or "mlp_out_norm" in t:      # Gemma 2 / 3 (an offloaded half holds one of the two)
        return SandwichDecoderLayer(attn, mlp, t.get("input_norm"), t.get("post_norm"), spec.rms_norm_eps,
                                    t.get("attn_out_norm"), t.get("mlp_out_norm"))
    return DecoderLayer(attn, mlp, t.get("input_norm"), t.get("post_norm"), spec.rms_norm_eps)


def vocab_rows(w: ModelWeights, plan: TensorShardPlan) -> tuple[int, int, int]:
    """(start, real rows, padded rows) of this rank's vocabulary shard (padded rows are zero)."""
    if plan.tp == 1:
        return 0, w.vocab_size, w.vocab_size
    start, rows = plan.vocab_rows
    return start, rows, plan.vocab_shard


def head_rows(w: ModelWeights, plan: TensorShardPlan, dtype: torch.dtype, first: int, n: int
              ) -> dict[str, torch.Tensor]:
    """Rows [first, first + n) of this rank's (padded) lm_head shard: ``weight`` and maybe ``bias``."""
    start, real, _ = vocab_rows(w, plan)
    take = max(min(n, real - first), 0)                    # rows past the real vocabulary are zero padding
    weight = w.lm_head.load(0, start + first, take).to(dtype) if take else torch.empty(0, w.hidden_size, dtype=dtype)
    out = {"weight": torch.cat([weight, weight.new_zeros(n - take, w.hidden_size)]) if take < n else weight}
    if w.lm_head_bias is not None:
        bias = w.lm_head_bias.load(0, start + first, take).to(dtype) if take else torch.empty(0, dtype=dtype)
        out["bias"] = torch.cat([bias, bias.new_zeros(n - take)]) if take < n else bias
    return {k: v.contiguous() for k, v in out.items()}


def build_decoder(w: ModelWeights, dtype: torch.dtype, device: torch.device | str = "cpu",
                  comm: TensorParallelComm | None = None, quantize: str | None = None, embed: bool = True,
                  head: bool = True, group_size: int = 128) -> DecoderModel:
    """Resident fused modules from a policy's weight refs, reading only this rank's shards.

    QKV and gate/up are fused into one GEMM each; o and down are row-parallel with the residual add
    fused in (tp rank 0 adds residual and bias; the all-reduce sums the partial products). ``quantize="int8"``:
    the blocks' linears in int8 (the lm_head stays in ``dtype``); with tensor parallelism the row-parallel shards
    take their rows' scales from the whole rows (a max over the group), so the weights are those of one process.
    ``quantize="int4"``: group-wise int4 (``group_size`` inputs per scale; every K a multiple of it, checked first).
    A pipeline stage builds ``w.layers`` (its blocks) and reads the embedding only with ``embed``, the final norm
    and lm_head only with ``head``.
    """
    comm = comm or TensorParallelComm()
    plan = shard_plan(w, comm)
    if quantize == "int4":
        check_int4_groups(w, plan, group_size)

    def dev(t):
        return t.to(device=device, dtype=dtype).contiguous()

    layers = []
    for i, lw in enumerate(w.layers):
        tensors = {k: v.to(device).contiguous() for k, v in shard_layer(lw, plan, dtype, w.norm_offset,
                                                                         w.alibi, w.norm_fp32).items()}
        layers.append(make_layer(i, tensors, layer_spec(w, plan, lw), comm, quantize=quantize, group_size=group_size))
        del tensors
    start, real, padded = vocab_rows(w, plan)
    table = dev(w.embed.load(0, start, real)) if embed else None
    lm_head = final_norm = None
    if head:
        rows = {k: dev(v) for k, v in head_rows(w, plan, dtype, 0, padded).items()}
        lm_head = Linear(rows["weight"], rows.get("bias"))
        final_norm = norm_weight(w.final_norm, dtype, w.norm_offset, w.norm_fp32).to(device)
    return DecoderModel(table, layers, final_norm, w.rms_norm_eps, lm_head, vocab_size=w.vocab_size,
                        vocab_start=start, comm=comm, **model_ends(w, dtype, device, embed, head))


def model_ends(w: ModelWeights, dtype: torch.dtype, device, embed: bool, head: bool, per_layer_rows=None) -> dict:
    """``DecoderModel.set_ends``'s arguments: Gemma's scale and cap; the final LayerNorm's bias (last stage); the
    learned position table and the embeddings' LayerNorm (first stage). Whole on every rank (small). Gemma 4's
    per-layer inputs (first stage): their table on the device, or ``per_layer_rows`` (offload: looked up by row)."""
    def load(ref):
        return None if ref is None else ref.load().to(device=device, dtype=dtype).contiguous()

    per_layer = None
    if embed and w.per_layer is not None:     # (Gemma 4's per-layer inputs, whole on every rank)
        p = w.per_layer
        table = load(p.embed) if per_layer_rows is None else per_layer_rows
        per_layer = PerLayerInputs(table, Linear(load(p.projection)),
                                   norm_weight(p.norm, dtype, w.norm_offset, w.norm_fp32).to(device), p.layers, p.dim,
                                   p.embed_scale, p.projection_scale, p.input_scale, w.rms_norm_eps)
    return dict(per_layer=per_layer,
                embed_scale=w.embed_scale, embed_scale_rounded=w.embed_scale_rounded, embed_scale_on=w.embed_scale_on,
                final_softcap=w.final_softcap,
                logit_scale=w.logit_scale,
                final_norm_bias=load(w.final_norm_bias) if head else None,
                pos_embed=load(w.pos_embed) if embed else None, pos_offset=w.pos_offset,
                embed_norm=(load(w.embed_norm), load(w.embed_norm_bias)) if embed and w.embed_norm is not None else None)


# ---------------------------------------------------------------------- offload (ZeRO-Inference)
def _qkv_rows(w: ModelWeights, plan: TensorShardPlan) -> int:
    """Output rows of a block's QKV projection on this rank, the widest block's (latent attention: q_a or this rank's
    q rows, and kv_a; a linear-state mixer's in_proj rows, Falcon-H1's beside its attention's: found by review, they
    were not counted)."""
    if w.mla is not None:
        return (w.mla.q_lora_rank or plan.local_heads * w.mla.qk_head_dim) + w.mla.cache_dim
    attention = (plan.local_heads + 2 * plan.local_kv_heads) * w.head_dim
    rows = 0 if getattr(w, "layers", None) else attention
    for lw in getattr(w, "layers", None) or []:
        n = attention if lw.q is not None else 0
        if lw.mamba is not None:        # (the rows its _shard_* reads: z | x B C | dt, x | z, B | C | x, q | k | v | z | b | a)
            (_, inner), (_, bc), (_, heads) = mamba_rows(lw.mamba, plan)
            n += 2 * inner + 2 * bc + heads
        elif lw.mamba1 is not None:
            n += 2 * mamba1_rows(lw.mamba1, plan)[1]
        elif lw.shortconv is not None:
            n += 3 * shortconv_rows(lw.shortconv, plan)[1]
        elif lw.deltanet is not None:
            (_, qk), (_, vz), (_, heads) = deltanet_rows(lw.deltanet, plan)
            n += 2 * qk + 2 * vz + 2 * heads
        rows = max(rows, n)
    return rows


def _per_token_bytes(w: ModelWeights, plan: TensorShardPlan, dtype: torch.dtype, max_seq_len: int) -> int:
    """Temporaries of one block for one prefill token: norms, QKV, rotary, attention out, MLP, scores (fp32). A
    MoE layer's MLP holds, per token, its top-k experts' gate|up and SwiGLU rows and its shared expert's (counted
    as intermediate rows of a dense MLP)."""
    e = dtype.itemsize
    qkv = _qkv_rows(w, plan)
    if w.mla is not None:   # latent attention: q, its latent queries, the attention rows and output (cache_dim wide)
        m, h = w.mla, plan.local_heads
        qkv += h * m.qk_head_dim + 3 * h * m.cache_dim
    inter = plan.mlp_rows[1]
    for lw in w.layers:
        if lw.moe is not None:      # expert parallelism: whole experts, so a routed row holds the whole intermediate
            shared = lw.moe.shared_inter // plan.tp
            per_rank = 1 if lw.moe.expert_parallel else plan.tp
            inter = max(inter, lw.moe.top_k * lw.moe.expert_inter // per_rank + shared + 2 * w.hidden_size)
    scores = 4 * plan.local_heads * max_seq_len
    if w.attn_softcap is not None:   # soft-capped prompts: the reference's fp32 scores and probabilities, fp32 q
        scores = 2 * scores + 4 * plan.local_heads * w.head_dim
    elif w.alibi is not None or any(lw.sinks is not None for lw in w.layers):
        scores = 3 * scores          # ALiBi / sinks prompts (the reference): fp32 scores, biases / sink column, probs
    return e * (4 * w.hidden_size + 2 * qkv + plan.local_heads * w.head_dim + 4 * inter) + scores


def cache_row_bytes(w: ModelWeights, plan: TensorShardPlan, dtype: torch.dtype, max_seq_len: int) -> int:
    """One row of this rank's StaticKVCache: K/V of max_seq_len columns (keys only: latent attention), or a
    linear-state layer's convolution history (dtype) and state (fp32) instead."""
    heads, width, keys_only = w.cache_layout(plan.local_kv_heads)
    linear = [shapes for lw in w.layers if (shapes := state_shapes(lw, plan.tp)) is not None]
    own, no_kv = kv_layout(w, plan)       # (Gemma 4: layers of their own shape, layers reading another's K/V)
    kv_layers = [i for i, lw in enumerate(w.layers)
                 if (lw.q is not None or lw.mla is not None) and i not in no_kv]   # (Falcon-H1: both)
    kv = (1 if keys_only else 2) * sum(math.prod(own.get(i, (heads, width))) for i in kv_layers) * max_seq_len \
        * dtype.itemsize
    return kv + sum(math.prod(conv) * dtype.itemsize + math.prod(state) * 4 for conv, state in linear)


def _per_sequence_bytes(w: ModelWeights, plan: TensorShardPlan, dtype: torch.dtype, max_seq_len: int,
                        vocab_shard: int) -> int:
    """One sequence's KV cache (max_seq_len; a linear-attention layer: its convolution history and fp32 state
    instead), hidden state of a full-length prompt (x3: the residual stream, the MLP's input and the next stream) and
    fp32 logits (x2)."""
    e = dtype.itemsize
    kv = cache_row_bytes(w, plan, dtype, max_seq_len)
    if w.attn_softcap is not None:   # soft-capped attention reads one layer's K / V as fp32 copies
        kv += 2 * plan.local_kv_heads * w.head_dim * max_seq_len * 4
    if w.mla is not None:   # latent attention's expanded prompts: one block's k_nope, values and keys for every key
        m = w.mla
        kv += plan.local_heads * (2 * m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * max_seq_len * e
    return kv + 3 * max_seq_len * w.hidden_size * e + 2 * vocab_shard * plan.tp * 4


def _dequant_scratch(w: ModelWeights, plan: TensorShardPlan, quantize: str = "int8") -> int:
    """A row-major int8 / int4 GEMM dequantises a chunk of the weight's rows at a time (modules/linear.py): at most
    DEQUANT_CHUNK_BYTES of temporaries, less for a model whose largest weight needs less (the bytes per weight of
    ``quantize``'s costliest dequantisation). MoE: an expert's gate|up (this rank's rows) and the shared expert's."""
    experts = [max(lw.moe.gate_up.shape[1] // (1 if lw.moe.expert_parallel else plan.tp),
                   (2 if lw.moe.gated else 1) * lw.moe.shared_inter // plan.tp)
               for lw in w.layers if lw.moe is not None]
    largest = max(2 * plan.mlp_rows[1] * w.hidden_size, plan.mlp_rows[1] * w.hidden_size,
                  _qkv_rows(w, plan) * w.hidden_size, max(experts, default=0) * w.hidden_size,
                  plan.local_heads * w.mla.qk_head_dim * w.mla.q_lora_rank if w.mla is not None else 0)
    per_weight = max((DEQUANT_INT4_BYTES_PER_WEIGHT if quantize == "int4" else DEQUANT_BYTES_PER_WEIGHT).values())
    return min(DEQUANT_CHUNK_BYTES, per_weight * largest)


def build_streamed_decoder(w: ModelWeights, dtype: torch.dtype, device: torch.device, comm: TensorParallelComm,
                           tier: str, folder: str | None, max_memory: int, max_seq_len: int,
                           batch_size: int | None, fingerprint: dict | None, source, compress: bool = True,
                           quantize: str | None = None, embed: bool = True, head: bool = True, group_size: int = 128):
    """A :class:`StreamedDecoderModel` whose blocks and lm_head live in the offload tier.

    The tier is written one unit at a time straight from the weight refs (a safetensors checkpoint or an
    in-memory model, whose parameters are released to ``meta`` as they are written), so the model is
    never whole in memory. Returns (decoder, working set). A pipeline stage streams ``w.layers`` (its blocks) and
    has the embedding rows only with ``embed``, the lm_head slices and final norm only with ``head``.
    """
    from lightning_dsinfer.offload import (DiskStore, FileRows, HostStore, ResidentRows, StreamedDecoderModel,
                                           UnitLayout, UnitStreamer, plan_working_set)
    from lightning_dsinfer.offload.budget import (MAX_AUTO_BATCH, MAX_AUTO_BATCH_CPU, release_freed_memory_promptly,
                                                  slot_classes, spread_order)
    from lightning_dsinfer.offload.codec import frame_bytes_for
    from dataclasses import replace

    from lightning_dsinfer.offload.experts import ExpertPool, split_experts
    from lightning_dsinfer.offload.store import staging_bytes
    from lightning_dsinfer.policies.weights import MetaSource, release_refs, with_source

    release_freed_memory_promptly()
    plan = shard_plan(w, comm)
    if quantize == "int4":
        check_int4_groups(w, plan, group_size)
    meta = MetaSource(source)
    specs = [layer_spec(w, plan, lw) for lw in w.layers]
    amx = quantize == "int8" and device.type == "cpu" and dtype == torch.bfloat16 and cpu_gemv.has_amx()

    def row_max(amax):  # a collective: every rank writes its units in the same order (see the store below)
        return comm.all_reduce_max(amax.to(device)).cpu()

    def halves(lw):      # int8 units: in AMX tile order where the resident engine would use it (any rows, no dequant)
        parts = split_block(shard_layer(lw, plan, dtype, w.norm_offset, w.alibi, w.norm_fp32))
        if not quantize:
            return parts
        meta_parts = any(v.is_meta for h in parts for v in h.values())
        collective = quantize == "int8" and not meta_parts and comm.size > 1
        whole = lw.moe is not None and lw.moe.expert_parallel      # (whole experts: no group max for their down)
        return [quantize_linears(h, amx, row_max if collective else None, quantize, group_size, whole) for h in parts]

    # disk tier, CPU compute: a sparse layer's routed experts are units of their own, read when routed to
    on_demand = tier == "nvme" and device.type == "cpu"

    def unit_parts(lw):  # (attention half, MLP half without on-demand experts, expert units)
        attention, mlp = halves(lw)
        mlp, experts = split_experts(mlp) if on_demand else (mlp, [])
        return attention, mlp, experts

    metas = [unit_parts(with_source(lw, meta)) for lw in w.layers]
    layouts = [UnitLayout.of(half) for attention, mlp, _ in metas for half in (attention, mlp)]
    start, real, padded = vocab_rows(w, plan)
    slot = max(l.nbytes for l in layouts)
    rows_per_unit = max(1, slot // (w.hidden_size * dtype.itemsize))
    head_slices = [(a, min(rows_per_unit, padded - a)) for a in range(0, padded, rows_per_unit)] if head else []
    meta_w = with_source(w, meta)
    layouts += [UnitLayout.of(head_rows(meta_w, plan, dtype, a, n)) for a, n in head_slices]
    slot = max(l.nbytes for l in layouts)                 # a slice with a bias can be a page over the blocks' units
    ring_units = len(layouts)                             # the expert units follow, outside the ring's cycle
    expert_units: dict[int, list[int]] = {}
    for i, (_, _, experts) in enumerate(metas):
        if experts:
            expert_units[i] = list(range(len(layouts), len(layouts) + len(experts)))
            layouts += [UnitLayout.of(e) for e in experts]
    expert_slot = max((layouts[u].nbytes for us in expert_units.values() for u in us), default=0)
    least_experts = max((min(specs[i].moe_top_k, len(us)) for i, us in expert_units.items()), default=0)
    frame = frame_bytes_for(layouts, max_memory)          # packed disk units: frame (read request) size
    unit_class, classes = slot_classes([l.nbytes for l in layouts[:ring_units]])
    ws = plan_working_set(max_memory, slot, _per_sequence_bytes(w, plan, dtype, max_seq_len, padded),
                          _per_token_bytes(w, plan, dtype, max_seq_len), batch_size,
                          max_auto_batch=MAX_AUTO_BATCH if device.type == "cuda" else MAX_AUTO_BATCH_CPU,
                          staging_bytes=(staging_bytes(layouts, compress, frame) if tier == "nvme" else 0)
                          + (_dequant_scratch(w, plan, quantize) if quantize and (not amx or any(
                              lw.moe is not None for lw in w.layers)) else 0),    # (experts: row-major even so)
                          classes=classes, expert_slot_bytes=expert_slot, expert_slots=least_experts)
    resident, spare = [], ws.spare          # units the leftover budget keeps for good (never streamed; the
    for u in spread_order(ring_units):      # streamer ignores this where it uses the host tier in place)
        if layouts[u].nbytes <= spare:
            resident.append(u)
            spare -= layouts[u].nbytes
    if expert_units:    # what is left caches experts between uses (resident units first: they save their bytes at
        # every step, a cached expert only when it is routed to again)
        ws = replace(ws, expert_cache_slots=min(spare // expert_slot, len(layouts) - ring_units - least_experts))

    def units():         # (unit, tensors, the block's weights once both halves are written)
        for i, lw in enumerate(w.layers):
            attention, mlp, experts = unit_parts(lw)
            yield 2 * i, attention, None
            for u, tensors in zip(expert_units.get(i, ()), experts):
                yield u, tensors, None
            yield 2 * i + 1, mlp, lw
        for j, (a, n) in enumerate(head_slices):
            yield 2 * len(w.layers) + j, head_rows(w, plan, dtype, a, n), None

    if tier == "cpu":
        store = HostStore(layouts, pin=device.type == "cuda")
        written = True
    else:
        store = DiskStore(folder, layouts, fingerprint, compress=compress, frame_bytes=frame)
        if quantize == "int8" and comm.size > 1:   # row-parallel int8 scales come from a collective while writing:
            rewrite = comm.all_reduce_max(torch.tensor([0.0 if store.reused else 1.0], device=device)).item()
            if rewrite and store.reused:  # the ranks write all or none
                store = DiskStore(folder, layouts, fingerprint, compress=compress, frame_bytes=frame, reuse=False)
        written = not store.reused
    if written:
        for u, tensors, done in units():
            store.write(u, tensors)
            del tensors
            if done is not None:        # a block's weights, both halves written
                release_refs(done)
    layer_units = [(2 * i, 2 * i + 1) for i in range(len(w.layers))]      # (attention half, MLP half)
    head_units = list(range(2 * len(w.layers), ring_units))
    def table_rows(ref, first: int, n: int, name: str):
        """Rows [first, first + n) of an embedding table, looked up row by row: in host memory (pinned on CUDA) on
        the host tier, in a file of the offload folder (written once, read in place) on the disk tier."""
        if tier == "cpu":
            table = ref.load(0, first, n).to(dtype).contiguous()
            return ResidentRows(table.pin_memory() if device.type == "cuda" else table)
        path, width = os.path.join(folder, name), ref.shape[1]
        if written or not os.path.exists(path):
            step = max(1, (8 << 20) // (width * dtype.itemsize))
            FileRows.write(path, (ref.load(0, first + a, min(step, n - a)).to(dtype) for a in range(0, n, step)))
        return FileRows(path, n, width, dtype)

    rows = table_rows(w.embed, start, real, "embed.bin") if embed else None
    # (Gemma 4's per-layer table, often larger than the blocks: looked up as the embedding is, never resident whole)
    per_layer = w.per_layer
    per_layer_rows = table_rows(per_layer.embed, 0, per_layer.embed.shape[0], "per_layer_embed.bin") \
        if embed and per_layer is not None else None
    store.finish()
    source.release([w.embed.name, w.lm_head.name] + ([per_layer.embed.name] if per_layer_rows is not None else []))
    streamer = UnitStreamer(store, layouts, list(range(ring_units)), device, list(ws.class_slots) or ws.n_slots,
                            resident=tuple(resident), classes=unit_class if ws.class_slots else None)
    pool = None
    if expert_units:
        pool = ExpertPool(store, layouts, expert_units, ws.expert_slots + ws.expert_cache_slots, len(w.layers))
        pool.bytes_per_token = sum(min(specs[i].moe_top_k, len(us)) * layouts[us[0]].nbytes
                                   for i, us in expert_units.items())

    def make(i, tensors):
        experts = pool.layer(i, specs[i].moe_first_expert or 0) if i in expert_units else None
        return make_layer(i, tensors, specs[i], comm, pack=False, quantize=quantize, group_size=group_size,
                          experts=experts)

    final_norm = norm_weight(w.final_norm, dtype, w.norm_offset, w.norm_fp32).to(device) if head else None
    kv_heads, width, _ = w.cache_layout(plan.local_kv_heads)
    own, no_kv = kv_layout(w, plan)     # (Gemma 4: a plain forward's chunks would need a scratch K/V per shape)
    decoder = StreamedDecoderModel(streamer, layer_units, head_units, make, rows, final_norm, w.rms_norm_eps,
                                   w.vocab_size, start, ws.prefill_tokens, comm=comm, device=device, experts=pool,
                                   kv_heads=kv_heads, head_dim=width, scratch=not (own or no_kv),
                                   **model_ends(w, dtype, device, embed, head, per_layer_rows))
    return decoder, ws
