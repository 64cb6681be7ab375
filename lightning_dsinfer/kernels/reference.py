"""Pure-torch version of every op: the CPU execution path and the oracle for the Triton kernels.

Each function takes and returns plain tensors; shapes are in the docstrings. They are written for
speed on the CPU (few ops, in-place where safe, no Python loops over tokens) without changing what
they compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight`` computed in fp32. An fp32 ``weight`` on
    lower-precision rows (Gemma's (1 + w)) scales in fp32 and rounds once, as Gemma does."""
    if x.dtype == torch.float32 or weight.dtype == torch.float32:
        return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)
    # HF order: normalise in fp32, cast back, then scale in the input dtype.
    return F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``h = x + residual`` (a new tensor, one rounding: what a linear with the residual add fused in stores),
    then ``rms_norm(h)``; returns (normed, h). The inputs are not modified."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def projection_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        eps: float, reduce=None, ranks: int = 1):
    """OLMo 2's q / k norms: :func:`rms_norm` of q [..., Nq] and of k [..., Nk], each over its whole last dim (a token's
    whole projection, all heads; weights [Nq] / [Nk], rounding as :func:`rms_norm` for their dtype). Under tensor
    parallelism q and k hold this rank's heads and the weights their slices: ``reduce`` (an in-place sum over the
    group) adds up the fp32 sums of squares, both in one call, and each mean divides by ``ranks`` x the local width
    (a KV head replicated on r ranks is counted r times in both). Returns new (q, k)."""
    if reduce is None:
        return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    qf, kf = q.float(), k.float()
    sums = reduce(torch.stack((qf.square().sum(-1), kf.square().sum(-1)), dim=-1))

    def scaled(xf, x, total, weight):
        y = xf * torch.rsqrt(total.unsqueeze(-1) / (x.shape[-1] * ranks) + eps)
        if x.dtype == torch.float32 or weight.dtype == torch.float32:
            return (y * weight.float()).to(x.dtype)
        return y.to(x.dtype) * weight           # HF's order for weights in the rows' dtype (as rms_norm)

    return scaled(qf, q, sums[..., 0], q_weight), scaled(kf, k, sums[..., 1], k_weight)


def rotary_half(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """NeoX ("rotate half") rotary embedding.

    x: [..., D]; cos: [..., R] (broadcastable) = cat(c, c); sin_signed = cat(-s, s). Equal to HF's
    ``x * cos + rotate_half(x) * sin`` (the sign of ``rotate_half`` lives in ``sin_signed``). R < D (partial
    rotary, Phi-3's ``partial_rotary_factor``): the first R dims rotate, the rest pass through, as HF does.
    """
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((rotary_half(x[..., :r], cos, sin_signed), x[..., r:]), dim=-1)
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin_signed)


def write_columns(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, col) -> None:
    """Write k, v [B, T, Hkv, D] into the cache rows k_cache, v_cache [B, Hkv, S, D] at columns [col, col + T).

    ``col`` is an int, or a LongTensor [1] on the cache's device (the CUDA-graph decode step, T == 1).
    """
    if isinstance(col, torch.Tensor):
        k_cache.index_copy_(2, col, k.transpose(1, 2))
        v_cache.index_copy_(2, col, v.transpose(1, 2))
    else:
        t = k.shape[1]
        k_cache[:, :, col:col + t].copy_(k.transpose(1, 2))
        v_cache[:, :, col:col + t].copy_(v.transpose(1, 2))


def rotary_write_kv(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, col=0,
                    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0):
    """Split the fused QKV projection, rotate Q and K, and write K/V to a cache.

    qkv: [B, T, Hq + 2 Hkv, D] (q heads, then k heads, then v heads), ``num_heads`` = Hq; cos / sin_signed
    as :func:`rotary_half` (the engine passes [B, T, 1, D]). With ``q_norm`` / ``k_norm`` [D], q and k are
    RMS-normed over the head dim first (Qwen3). With caches (the batch's rows [B, Hkv, S, D]) the rotated k
    and v are written at columns [col, col + T) (:func:`write_columns`). Returns (q [B, T, Hq, D],
    k [B, T, Hkv, D], v [B, T, Hkv, D]); v is a view of qkv.
    """
    hq = num_heads
    hkv = (qkv.shape[2] - hq) // 2
    v = qkv[:, :, hq + hkv:]
    if q_norm is None:
        qk = rotary_half(qkv[:, :, :hq + hkv], cos, sin_signed)
        q, k = qk[:, :, :hq], qk[:, :, hq:]
    else:
        q = rotary_half(rms_norm(qkv[:, :, :hq], q_norm, eps), cos, sin_signed)
        k = rotary_half(rms_norm(qkv[:, :, hq:hq + hkv], k_norm, eps), cos, sin_signed)
    if k_cache is not None:
        write_columns(k_cache, v_cache, k, v, col)
    return q, k, v


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)``: ``F.linear``, then the residual added in place."""
    y = F.linear(x, weight, bias)
    if residual is not None:
        y += residual
    return y


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate_up [..., 2I] = cat(gate, up) -> silu(gate) * up [..., I]."""
    inter = gate_up.shape[-1] // 2
    gate = gate_up[..., :inter]
    out = F.silu(gate)
    return out.mul_(gate_up[..., inter:])


def gelu_and_mul(gate_up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU in the rows' dtype, as HF rounds it: gate_up [..., 2I] = cat(gate, up) -> gelu(gate) * up [..., I]
    (``approximate``: "tanh" or "none"). :func:`gated_act` is the fp32 form the kernels are checked against."""
    inter = gate_up.shape[-1] // 2
    return F.gelu(gate_up[..., :inter], approximate=approximate).mul_(gate_up[..., inter:])


def act(x: torch.Tensor, name: str) -> torch.Tensor:
    """A plain (ungated) MLP activation in x's dtype: gelu (erf), gelu_tanh, relu, relu2 (ReLU squared) or silu
    (torch's ops compute in fp32 and round once, so this equals :func:`bias_act` without a bias)."""
    return _ACTS[name](x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, softcap: float | None = None, alibi: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: [B, Hq, T, D]; k: [B, Hkv, L, D]; v: [B, Hkv, L, DV] (DV: D or another width); mask: bool [B, 1, T, L]
    (True = attend) or None for no masking at all. ``softcap`` (Gemma 2): scores -> softcap * tanh(scores / softcap)
    before the mask; the two products in the inputs' dtype (as HF's eager attention; bf16 products run ~4x faster on the CPU), the scores'
    cap, mask and softmax in fp32. ``alibi`` (BLOOM): slopes [Hq]; scores + slope_h * (j - c) for key column j and
    query column c = L - T + i (the query's own column; softmax does not see the shift from HF's positions), in
    fp32 like the cap. ``sinks`` (gpt-oss): a learned logit per head [Hq] that joins each softmax's denominator (a
    column with no value: the keys' probabilities sum to less than 1), in fp32 like the cap. Returns [B, Hq, T, DV].
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if softcap is not None or alibi is not None or sinks is not None:   # SDPA has none (q heads folded per KV head)
        qg = q.reshape(b, hkv, group * t, d)
        s = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)
        if softcap is not None:
            s.div_(softcap).tanh_().mul_(softcap)
        s = s.view(b, hkv, group, t, -1)
        if alibi is not None:
            length = k.shape[2]
            rel = (torch.arange(length, device=q.device)[None, :]
                   - torch.arange(length - t, length, device=q.device)[:, None]).float()      # [T, L]
            s += alibi.float().view(hkv, group, 1, 1) * rel
        if mask is not None:
            s.masked_fill_(~mask[:, :, None], float("-inf"))
        # (sinks: the sink's column joins the softmax, then is dropped)
        p = s.softmax(dim=-1) if sinks is None else _softmax_with_sinks(s.view(b, hq, t, -1), sinks)
        p = p.to(v.dtype).reshape(b, hkv, group * t, -1)
        return torch.matmul(p, v).view(b, hq, t, v.shape[-1])
    if t == 1 and group > 1:
        # Decode: fold the query heads of each KV group into the query-length axis, so each KV
        # head is read once and nothing is repeated. The mask is per key only ([B,1,1,L]).
        qg = q.reshape(b, hkv, group, d)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, hq, 1, v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)


# ---------------------------------------------------------------------------------------------------
# References of the Triton kernel library (kernels/*.py). Written for clarity: they are the oracle the
# kernel tests compare against, and the CPU path for the ops above does not change.
# ---------------------------------------------------------------------------------------------------


def _residual_in(x: torch.Tensor, residual: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (+ bias) (+ residual)`` rounded to x's dtype once, as an unfused model would store it."""
    h = x.float()
    if bias is not None:
        h = h + bias.float()
    if residual is not None:
        h = h + residual.float()
    return h.to(x.dtype)


def add_bias_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, unit_offset: bool = False):
    """Fused-kernel twin of ``kernels/rms_norm.py``.

    h = x (+ bias) (+ residual); out = h / sqrt(mean(h^2) + eps) * w, w = weight or (1 + weight) with
    ``unit_offset`` (Gemma). The scale is applied in fp32, one rounding at the end. Returns ``out`` when
    neither residual nor bias is given, else ``(out, h)`` (h is the new residual). Nothing is modified.
    """
    h = _residual_in(x, residual, bias)
    hf = h.float()
    w = weight.float() + 1.0 if unit_offset else weight.float()
    out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)
    return out if residual is None and bias is None else (out, h)


def add_bias_layer_norm(x: torch.Tensor, weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float,
                        residual: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        unit_offset: bool = False):
    """Fused-kernel twin of ``kernels/layer_norm.py``: LayerNorm of ``h = x (+ bias) (+ residual)``.

    ``norm_bias`` is the LayerNorm's own beta (None = no beta). Returns like :func:`add_bias_rms_norm`.
    """
    h = _residual_in(x, residual, bias)
    hf = h.float()
    w = weight.float() + 1.0 if unit_offset else weight.float()
    out = F.layer_norm(hf, hf.shape[-1:], w, None if norm_bias is None else norm_bias.float(), eps).to(x.dtype)
    return out if residual is None and bias is None else (out, h)


def rotary_tables(rotary_dim: int, max_positions: int, base: float = 10000.0, device=None):
    """cos, sin tables [max_positions, rotary_dim // 2] in fp32 (the kernels' table layout)."""
    inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim))
    ang = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def rotary_embedding(x: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
                     interleaved: bool = False, rotary_dim: int | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding of x [B, T, H, D] at positions [B, T]; tables [P, rotary_dim // 2].

    NeoX layout pairs (i, i + r/2), GPT-J (``interleaved``) pairs (2i, 2i + 1); only the first
    ``rotary_dim`` dims rotate (partial rotary), the rest pass through. ``bias`` [H * D] is added first.
    Computed in fp32, rounded once.
    """
    d = x.shape[-1]
    r = d if rotary_dim is None else rotary_dim
    xf = x.float()
    if bias is not None:
        xf = xf + bias.float().view(x.shape[-2], d)
    c = cos_table[positions.long()].unsqueeze(2)   # [B, T, 1, r/2]
    s = sin_table[positions.long()].unsqueeze(2)
    rot, rest = xf[..., :r], xf[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        rot = rotary_half(rot, torch.cat((c, c), -1), torch.cat((-s, s), -1))
    return torch.cat((rot, rest), dim=-1).to(x.dtype)


def rotary_qkv_cache_write(q, k, v, cos_table, sin_table, positions, k_cache=None, v_cache=None,
                           cache_start=None, interleaved=False, rotary_dim=None,
                           q_bias=None, k_bias=None, v_bias=None):
    """Twin of ``kernels/rotary.py``: rotate q [B,T,Hq,D], k [B,T,Hkv,D]; add v's bias; write K/V.

    Caches are [B_max, Hkv, S, D] (``modules/kv_cache.py`` layout); row b's tokens go to columns
    ``cache_start[b] + t``. The caches are written in place. Returns (q_rot, k_rot, v_out).
    """
    qo = rotary_embedding(q, cos_table, sin_table, positions, interleaved, rotary_dim, q_bias)
    ko = rotary_embedding(k, cos_table, sin_table, positions, interleaved, rotary_dim, k_bias)
    vo = v if v_bias is None else (v.float() + v_bias.float().view(v.shape[-2], v.shape[-1])).to(v.dtype)
    if k_cache is not None:
        b, t = k.shape[:2]
        for i in range(b):
            s0 = int(cache_start[i])
            k_cache[i, :, s0:s0 + t] = ko[i].transpose(0, 1).to(k_cache.dtype)
            v_cache[i, :, s0:s0 + t] = vo[i].transpose(0, 1).to(v_cache.dtype)
    return qo, ko, vo


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _relu2(x: torch.Tensor) -> torch.Tensor:
    """ReLU squared (Arcee's ``relu2``: HF squares the ReLU's output, one rounding)."""
    return F.relu(x).square()


_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "relu2": _relu2}


def bias_act(x: torch.Tensor, bias: torch.Tensor | None = None, act: str = "gelu_tanh") -> torch.Tensor:
    """``act(x + bias)`` in fp32, rounded once. act: silu | gelu (erf) | gelu_tanh | relu."""
    h = x.float() if bias is None else x.float() + bias.float()
    return _ACTS[act](h).to(x.dtype)


def gated_act(gate_up: torch.Tensor, bias: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """Gated activation: gate_up [..., 2I] = cat(gate, up) (+ bias [2I]) -> act(gate) * up [..., I].

    act = silu is SwiGLU (equal to :func:`silu_and_mul` up to rounding), gelu / gelu_tanh is GeGLU.
    """
    h = gate_up.float() if bias is None else gate_up.float() + bias.float()
    inter = h.shape[-1] // 2
    return (_ACTS[act](h[..., :inter]) * h[..., inter:]).to(gate_up.dtype)


@dataclass(frozen=True)
class Routing:
    """A router other than softmax top-k (DeepSeek's): ``scoring`` softmax | sigmoid; the experts in ``groups``
    groups, of which only the ``topk_groups`` best are searched (a group scored by its best expert, ``group_score``
    "max" (V2), or by its two best summed, "top2" (V3)); the choice made on the scores plus a per-expert correction
    bias where the model has one (V3), the weights being the scores themselves; ``renormalize`` divides the k weights
    by their sum + ``eps``, then all are multiplied by ``scale`` (routed_scaling_factor). ``fp32``: the router's logits
    from fp32 input and weight (the model keeps the router in fp32). ``scoring`` "topk_softmax" (gpt-oss): the top-k
    of the logits, the router's own bias added to them, and a softmax over those k, all in x's dtype as transformers
    computes it (the other fields unused). ``scoring`` "topk_sigmoid" (Llama 4): the top-k of the logits (x's dtype),
    their sigmoid in fp32 rounded to x's dtype. ``input_scaled`` (Llama 4): a token's weight scales the expert's input,
    expert(w * x), instead of its output (the other fields unused). ``sum_floor`` (ERNIE 4.5 MoE): the renormalising
    sum clamped below at it. ``scoring`` "sparsemixer" (Phi-3.5-MoE, inference): two experts, each the best of the
    logits left (the first one's excluded for the second), weighted by its softmax over the logits within ``jitter`` of
    it (relative to max(|logit|, its logit): ``(best - l) / max(|l|, best) <= 2 jitter``), in x's dtype as
    transformers computes it (the other fields unused)."""
    scoring: str = "softmax"
    groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    renormalize: bool = False
    eps: float = 0.0
    scale: float = 1.0
    fp32: bool = False
    input_scaled: bool = False
    sum_floor: float = 0.0
    jitter: float = 0.0
    # Gemma 4: the renormalised weights times a learned scale of each chosen expert [E] (fp32 products; MoEMLP sets it
    # from the layer's weights)
    expert_scale: torch.Tensor | None = field(default=None, compare=False)
    # Kolibri-1: the choice made on the (fp32) logits plus the correction bias, the weights the chosen logits' sigmoid
    choose_on_logits: bool = False


def input_scaled(routing: Routing | None) -> bool:
    """Whether a router's weights scale the experts' inputs (Llama 4) rather than their outputs."""
    return routing is not None and routing.input_scaled


def moe_topk(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool = True,
             weights_in_dtype: bool = False, routing: Routing | None = None,
             bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing as transformers does it: softmax of the router logits [T, E] in fp32, top-k (renormalised when asked),
    the weights rounded to x's dtype when ``weights_in_dtype`` (Qwen). With ``routing`` (and its correction ``bias``
    [E]), DeepSeek's routers (:class:`Routing`; ``renormalize`` / ``weights_in_dtype`` are then unused). Returns
    (weights [T, k], expert ids [T, k])."""
    if routing is not None:
        return _grouped_topk(x, router, top_k, routing, bias)
    w, ids = torch.topk(torch.softmax(F.linear(x, router).float(), -1), top_k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if weights_in_dtype:
        w = w.to(x.dtype)
    return w, ids


def _sparsemixer(scores: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's router at inference (transformers' ``sparsemixer`` with training off), op for op: (weights [T, 2],
    expert ids [T, 2])."""
    top, first = scores.max(dim=-1, keepdim=True)
    far = ((top - scores) / scores.abs().clamp(min=top)) > 2 * jitter
    w1 = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(-1, first)
    rest = torch.scatter(scores, -1, first, float("-inf"))
    top, second = rest.max(dim=-1, keepdim=True)
    far = ((top - scores) / scores.abs().clamp(min=top)) > 2 * jitter
    w2 = torch.softmax(rest.masked_fill(far, float("-inf")), dim=-1).gather(-1, second)
    return torch.cat((w1, w2), dim=-1), torch.cat((first, second), dim=-1)


def _grouped_topk(x, router, top_k: int, r: Routing, bias):
    if r.scoring == "topk_softmax":     # gpt-oss: ``bias`` is the router's logit bias
        top, ids = torch.topk(F.linear(x, router, bias), top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), ids
    if r.scoring == "sparsemixer":      # Phi-3.5-MoE
        return _sparsemixer(F.linear(x, router), r.jitter)
    if r.scoring == "topk_sigmoid":     # Llama 4
        top, ids = torch.topk(F.linear(x, router), top_k, dim=-1)
        return torch.sigmoid(top.float()).to(x.dtype), ids
    logits = F.linear(x.float(), router.float()) if r.fp32 else F.linear(x, router).float()
    scores = torch.softmax(logits, -1) if r.scoring == "softmax" else torch.sigmoid(logits)
    choice = logits if r.choose_on_logits else scores
    choice = choice if bias is None else choice + bias.float()
    if r.groups > 1:
        t, e = choice.shape
        grouped = choice.view(t, r.groups, e // r.groups)
        score = grouped.amax(-1) if r.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(score).scatter_(1, torch.topk(score, r.topk_groups, dim=-1, sorted=False).indices, 1)
        keep = keep.bool().unsqueeze(-1).expand(t, r.groups, e // r.groups).reshape(t, e)
        # (the models fill the other groups' softmax scores with 0, their sigmoid choices with -inf)
        choice = choice.masked_fill(~keep, 0.0 if r.scoring == "softmax" and bias is None else float("-inf"))
    # (HF's grouped routers take their k unsorted, the plain ones sorted: the renormalising sum adds them in that order)
    ids = torch.topk(choice, top_k, dim=-1, sorted=(r.groups == 1 and bias is None) or r.choose_on_logits).indices
    w = scores.gather(1, ids)
    if r.renormalize:
        w = w / torch.clamp(w.sum(-1, keepdim=True) + r.eps, min=r.sum_floor)
    w = w * r.scale
    if r.expert_scale is not None:
        w = w * r.expert_scale[ids].float()
    return w, ids


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation over gate_up [..., 2I] = cat(gate, up): the gate clamped above at ``limit``, up to
    [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate), each op in the rows' dtype as transformers does
    (its checkpoints interleave gate and up columns: the policy reads them as gate rows, then up rows)."""
    alpha: float
    limit: float

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        inter = gate_up.shape[-1] // 2
        gate = gate_up[..., :inter].clamp(max=self.limit)
        up = gate_up[..., inter:].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


@dataclass(frozen=True)
class GatedAct:
    """A gated expert activation other than SwiGLU (Gemma 4's GeGLU: ``name`` gelu_tanh / gelu) over gate_up [..., 2I],
    in the rows' dtype as transformers rounds it (:func:`gelu_and_mul`)."""
    name: str

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return silu_and_mul(gate_up)
        return gelu_and_mul(gate_up, "tanh" if self.name == "gelu_tanh" else "none")


@dataclass(frozen=True)
class PlainAct:
    """The activation of experts without a gate (NemotronH: down(relu2(up x))): their ``gate_up`` holds the up rows
    alone, and this is :func:`act` of ``name`` over them."""
    name: str

    def __call__(self, up: torch.Tensor) -> torch.Tensor:
        return act(up, self.name)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert, out: torch.Tensor | None = None,
                only=None, input_scaled: bool = False) -> torch.Tensor:
    """sum_j weights[t, j] * expert(ids[t, j], x[t]) for every token t: ``expert(e, rows)`` runs expert e on the rows
    routed to it, experts in ascending order, each scaled result summed into x's dtype (transformers' order and
    rounding). Returns [T, H]. ``only``: run just these experts, summed into ``out`` (offload: experts in groups of
    ascending ids, one call each, give the same sum as one call). ``input_scaled`` (Llama 4): sum_j expert(ids[t, j],
    weights[t, j] * x[t]), the product rounded to x's dtype."""
    k = ids.shape[1]
    w = weights.reshape(-1)
    if x.shape[0] == 1 and only is None:   # a one-row decode step: its k experts in ascending order, no index tables
        out = torch.zeros_like(x) if out is None else out        # (the same products, sums and roundings as below:
        for e, j in sorted(zip(ids[0].tolist(), range(k))):      # w[j, None] keeps the fp32 weight's promotion)
            y = expert(e, x * w[j, None].to(x.dtype) if input_scaled else x)
            if y is not None:
                out += y if input_scaled else (y * w[j, None]).to(x.dtype)
        return out
    groups: dict[int, list[int]] = {}
    for a, e in enumerate(ids.reshape(-1).tolist()):      # assignment a = token * k + slot
        groups.setdefault(e, []).append(a)
    out = torch.zeros_like(x) if out is None else out
    for e in sorted(groups if only is None else groups.keys() & only):
        a = torch.tensor(groups[e], device=x.device)
        tok = a // k
        y = expert(e, x[tok] * w[a, None].to(x.dtype) if input_scaled else x[tok])
        if y is not None:       # None: not this rank's expert (expert parallelism)
            out.index_add_(0, tok, y if input_scaled else (y * w[a, None]).to(x.dtype))
    return out


def moe_mlp(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
            renormalize: bool = True, weights_in_dtype: bool = False, gate_up_scale: torch.Tensor | None = None,
            down_scale: torch.Tensor | None = None, first_expert: int = 0, routing: Routing | None = None,
            router_bias: torch.Tensor | None = None, gate_up_bias: torch.Tensor | None = None,
            down_bias: torch.Tensor | None = None, act=None, experts_x: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse MoE SwiGLU MLP as transformers computes it: x [T, H]; router [E, H]; gate_up [E, 2I, H] (gate rows
    first); down [E, H, I]; routing by :func:`moe_topk` (``routing`` / ``router_bias``: DeepSeek's), the experts by
    :func:`moe_experts`. Returns [T, H]. int8
    experts: ``gate_up_scale`` [E, 2I] and ``down_scale`` [E, H] (per-row scales), int4: packed with group scales
    (:func:`dequantize_experts`); each expert routed to is dequantised to x's dtype when it runs.
    Expert parallelism: gate_up / down hold experts [first_expert, first_expert + E_local) of the router's E; the
    others add nothing here (their rank adds them). gpt-oss: ``gate_up_bias`` [E, 2I], ``down_bias`` [E, H] (this
    rank's experts; None: none) and ``act`` (:class:`ClampedSwiGLU`; None: SwiGLU). ``experts_x`` [T, L]: what the
    experts read instead of x (NemotronH's latent experts: x routes, its latent projection is computed on)."""
    act = act or silu_and_mul
    w, ids = moe_topk(x, router, top_k, renormalize, weights_in_dtype, routing, router_bias)

    def weight(t, scale, e):      # (int8 / int4: only the experts routed to are dequantised, one at a time)
        return t[e] if scale is None else dequantize_experts(t[e:e + 1], scale[e:e + 1])[0].to(x.dtype)

    def expert(e, rows):
        e -= first_expert
        if not 0 <= e < gate_up.shape[0]:
            return None
        h = act(F.linear(rows, weight(gate_up, gate_up_scale, e), None if gate_up_bias is None else gate_up_bias[e]))
        return F.linear(h, weight(down, down_scale, e), None if down_bias is None else down_bias[e])

    return moe_experts(x if experts_x is None else experts_x, w, ids, expert, input_scaled=input_scaled(routing))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, kv_start: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                     window: int | None = None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence over the KV cache (twin of ``kernels/decode_attention.py``).

    q [B, Hq, D]; caches [B_max, Hkv, S, D]; row b's keys are columns [kv_start[b], seq_lens[b]) and the
    query sits at column seq_lens[b] - 1. Scores: q.k * scale, then ``softcap * tanh(s / softcap)``, then
    ``+ slope_h * (j - (seq_len - 1))`` (ALiBi), then keys older than ``window`` columns are dropped. ``sinks``
    [Hq] (gpt-oss): a logit per head in the softmax's denominator, with no value. Returns [B, Hq, D] in q's dtype; a
    row with no visible key gives zeros.
    """
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    k = k_cache[:b].float().repeat_interleave(hq // hkv, dim=1)       # [B, Hq, S, D]
    v = v_cache[:b].float().repeat_interleave(hq // hkv, dim=1)
    sc = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    if softcap is not None:
        sc = softcap * torch.tanh(sc / softcap)
    j = torch.arange(s, device=q.device)
    last = (seq_lens.long() - 1)[:, None]                              # [B, 1]
    if alibi_slopes is not None:
        sc = sc + alibi_slopes.float()[None, :, None] * (j[None, :] - last)[:, None, :]
    start = torch.zeros_like(last) if kv_start is None else kv_start.long()[:, None]
    keep = (j[None, :] >= start) & (j[None, :] <= last)
    if window is not None:
        keep &= j[None, :] > last - window
    sc = sc.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", _softmax_with_sinks(sc, sinks), v).to(q.dtype)


def _softmax_with_sinks(sc: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of fp32 scores [B, H, ..., L] (-inf: masked; a row with none visible gives zeros);
    ``sinks`` [H]: a column of its own in each row's softmax, dropped after (its weight goes to no value)."""
    if sinks is None:
        return torch.softmax(sc, dim=-1).nan_to_num(0.0)
    sink = sinks.float().view(1, -1, *([1] * (sc.dim() - 2))).expand(*sc.shape[:-1], 1)
    return torch.cat((sc, sink), dim=-1).softmax(dim=-1)[..., :-1]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      kv_start: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                      window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a prompt (twin of ``kernels/prefill_attention.py``).

    q [B, T, Hq, D], k [B, L, Hkv, D], v [B, L, Hkv, DV], L >= T: query i sits at key column c = L - T + i. Row
    b's valid keys are [kv_start[b], seq_lens[b]) (left and/or right padding); query i sees valid keys j <= c (and
    j > c - window). ``sinks`` [Hq] (gpt-oss): a logit per head in each row's softmax, with no value. Query rows with
    no visible key (padding) give zeros. Returns [B, T, Hq, DV].
    """
    b, t, hq, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    c = torch.arange(length - t, length, device=q.device)[:, None]      # [Tq, 1] query columns
    j = torch.arange(length, device=q.device)[None, :]                  # [1, L]
    keep = (j <= c)[None].expand(b, t, length).clone()                  # [B, Tq, L]
    if window is not None:
        keep &= (j > c - window)[None]
    if kv_start is not None:
        keep &= j[None] >= kv_start.long()[:, None, None]
    if seq_lens is not None:
        keep &= j[None] < seq_lens.long()[:, None, None]
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    sc = (qf @ kf.transpose(-1, -2)) * scale
    sc = sc.masked_fill(~keep[:, None], float("-inf"))
    return (_softmax_with_sinks(sc, sinks) @ vf).transpose(1, 2).to(q.dtype)


def quantize_int8_per_channel(w: torch.Tensor, amax: torch.Tensor | None = None):
    """Symmetric int8 per output channel: w [N, K] -> (q int8 [N, K], scale fp32 [N]); w ~= q * scale. ``amax``:
    each row's largest |w| when ``w`` holds only part of the rows' columns (a row-parallel shard)."""
    amax = w.float().abs().amax(dim=1) if amax is None else amax.float()
    scale = amax.clamp_min(1e-8) / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groupwise(w: torch.Tensor, group_size: int = 128):
    """Symmetric int4 per (channel, group of ``group_size`` input dims).

    w [N, K] -> (packed uint8 [N, K // 2], scale fp32 [N, K // group_size]). Value q in [-8, 7] is stored
    as the nibble q + 8; input dim 2i is the low nibble of byte i, 2i + 1 the high nibble.
    """
    n, kdim = w.shape
    if kdim % group_size or group_size % 2:
        raise ValueError(f"K={kdim} must be a multiple of group_size={group_size}, which must be even")
    g = w.float().view(n, kdim // group_size, group_size)
    scale = g.abs().amax(dim=2).clamp_min(1e-8) / 7.0
    q = torch.round(g / scale[..., None]).clamp_(-8, 7).view(n, kdim).to(torch.int16) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] + scale [N] -> fp32 [N, K]."""
    return q.float() * scale.float()[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Packed uint8 [N, K // 2] + scale [N, K // group_size] -> fp32 [N, K]."""
    p = packed.to(torch.int16)
    q = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(1).float() - 8.0
    return q * scale.float().repeat_interleave(group_size, dim=1)


def dequantize_experts(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """3D experts to fp32 [E, N, K]: int8 [E, N, K] with a scale per expert row [E, N], or int4 packed uint8
    [E, N, K / 2] (each expert's rows as :func:`quantize_int4_groupwise` packs them) with scales [E, N, K / group]."""
    if q.dtype != torch.uint8:
        return q.float() * scale.float()[..., None]
    e, n, half = q.shape
    return dequantize_int4(q.reshape(e * n, half), scale.reshape(e * n, -1), 2 * half // scale.shape[-1]).view(e, n, -1)


def small_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)`` with fp32 accumulation; x [M, K], weight [N, K] (already
    dequantised to float for the int8 / int4 variants). Returns [M, N] in x's dtype."""
    return norm_small_gemm(x, weight, bias=bias, residual=residual)[0]


def norm_small_gemm(x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None,
                    norm: tuple[torch.Tensor, float] | None = None, bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, gated: bool = False):
    """``small_gemm`` with the Deep-Fusion prologue / epilogue of ``kernels/small_gemm.py``: the input is
    u = x + add (rounded to x's dtype; x itself without ``add``), RMSNorm'd in fp32 by ``norm = (w, eps)`` (not
    rounded before the product, as the GEMV kernel; the tensor-core kernel rounds it to the dtype once);
    ``gated``: weight [2N, K] (dequantised already) gives silu(gate) * up [.., N]. Returns (out in x's dtype, u)."""
    u = x if add is None else x + add
    xin = u.float()
    if norm is not None:
        w, eps = norm
        xin = xin * torch.rsqrt(xin.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    y = xin @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    if gated:
        inter = y.shape[-1] // 2
        y = F.silu(y[..., :inter]) * y[..., inter:]
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype), u


def moe_route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True):
    """Top-k routing with mapping tables (twin of ``kernels/moe_routing.py``).

    logits [T, E] -> (weights fp32 [T, k], ids int32 [T, k], counts int32 [E], offsets int32 [E + 1],
    sorted_ids int32 [T * k], inverse int32 [T * k]). scoring: softmax | sigmoid. Assignment a = t * k + j;
    ``sorted_ids`` lists assignments grouped by expert (in assignment order within an expert);
    ``inverse[a]`` is a's place in that list. ``renormalize`` divides the k weights by their sum.
    """
    t, e = logits.shape
    scores = torch.softmax(logits.float(), -1) if scoring == "softmax" else torch.sigmoid(logits.float())
    w, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=e).to(torch.int32)
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=logits.device)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_ids = torch.argsort(flat, stable=True).to(torch.int32)
    inverse = torch.empty_like(sorted_ids)
    inverse[sorted_ids.long()] = torch.arange(flat.numel(), dtype=torch.int32, device=logits.device)
    return w, ids.to(torch.int32), counts, offsets, sorted_ids, inverse


def moe_gemm(x: torch.Tensor, weight: torch.Tensor, sorted_ids: torch.Tensor, offsets: torch.Tensor,
             rows_per_input: int, row_scale: torch.Tensor | None = None,
             weight_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped expert GEMM (twin of ``kernels/moe_gemm.py``).

    weight [E, N, K]; assignment a (from ``sorted_ids``, grouped by ``offsets``) reads input row
    ``a // rows_per_input`` of x [R, K] and writes out[a] = (x[row] @ weight[e].T + bias[e]) (* row_scale[a]), in fp32
    with one rounding (bias [E, N]: gpt-oss's experts' biases, added before the routing weight as transformers does).
    Returns [A, N] in assignment order, A = sorted_ids.numel(). int8 weight: ``weight_scale`` [E, N]; int4 (packed
    uint8 [E, N, K / 2]): ``weight_scale`` [E, N, K / group] (dequantised: :func:`dequantize_experts`).
    """
    if weight_scale is not None:
        weight = dequantize_experts(weight, weight_scale)
    out = torch.zeros(sorted_ids.numel(), weight.shape[1], dtype=torch.float32, device=x.device)
    for e in range(weight.shape[0]):
        a = sorted_ids[int(offsets[e]):int(offsets[e + 1])].long()
        if a.numel():
            out[a] = x[a // rows_per_input].float() @ weight[e].float().t()
            if bias is not None:
                out[a] += bias[e].float()
    if row_scale is not None:
        out = out * row_scale.float().reshape(-1, 1)
    return out.to(x.dtype)
