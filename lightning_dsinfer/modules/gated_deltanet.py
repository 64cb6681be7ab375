"""Linear-state token mixers: blocks whose memory is a per-row state instead of a KV cache (``modules/transformer.py``
blocks around them). Gated DeltaNet (Qwen3-Next / Qwen3.5's linear attention), :class:`ShortConv` (LFM2's gated
short convolution) and :class:`Mamba2Mixer` (Granite 4 / Bamba / NemotronH's Mamba-2) share the convolution (:func:`causal_conv`)
and the state plumbing (:func:`layer_states` / :func:`keep_states`, :func:`state_shapes`).

Gated DeltaNet: per token and value head, a state S [Dk, Dv] replaces the KV cache: decayed by exp(g), corrected
toward the token's value along its key (the delta rule), read by the query::

    S <- exp(g) S;  S <- S + beta k (v - S^T k)^T;  o = S^T q      (q, k L2-normed, q scaled by Dk^-1/2)

with beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias) from the token, and q | k | v through a causal
depthwise convolution (kernel K, SiLU) first. A decode step is that recurrence; a prompt runs it in chunks
(:func:`delta_rule`: within a chunk the corrections are one triangular solve, the UT transform), all in fp32 as
transformers' reference does. The output is RMS-normed per head, gated by SiLU(z) (``gated_rms_norm``) and projected
by ``out_proj``. Mamba-2's scan is :func:`ssd_scan`.

What persists between calls, per row: the last K - 1 convolution inputs [C, K - 1] and the state (Gated DeltaNet:
[Hv, Dk, Dv], Mamba-2: [H, P, N], fp32; the short convolution has none). They live in the engine's
:class:`~lightning_dsinfer.modules.kv_cache.StaticKVCache` (``conv`` / ``state``, by layer; the generation loops zero
a batch's rows where its sequences start: ``reset_linear``) or, under Hugging Face's loop (beam search), in its cache's
linear-attention layer (``conv_states`` / ``recurrent_states``, so its ``reorder_cache`` moves them with the beams; a
call at column 0 starts from zeros there). Left padding: padded tokens are zeroed before the convolution (Mamba-2:
after it too), as transformers does, so they leave the states at zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dsinfer.kernels import cpu_gemv, ops
from lightning_dsinfer.modules.linear import Linear


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor | None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over T tokens. q, k [B, T, Hk, Dk] (normed and scaled here), v [B, T, Hv, Dv], g and beta
    [B, T, Hv]; ``state`` [B, Hv, Dk, Dv] fp32 (None: zeros). Each key head serves Hv / Hk consecutive value heads.
    Returns (out [B, T, Hv, Dv], the final state), both fp32. One token: the recurrence; more: chunks of
    ``chunk`` tokens, each one triangular solve for the chunk's corrections and one read / write of the state."""
    b, t, hk, dk = k.shape
    hv, dv = v.shape[2:]
    if hv != hk:
        q, k = q.repeat_interleave(hv // hk, dim=2), k.repeat_interleave(hv // hk, dim=2)
    # [B, H, T, D] fp32; q / k L2-normed in fp32, q scaled by Dk^-1/2
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))
    q, k = l2_normalize(q) * dk ** -0.5, l2_normalize(k)
    s = torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=v.device) if state is None else state.float()
    if t == 1:      # (matrix products over [B, H]: each a single pass over the state)
        s = s * g[..., 0, None, None].exp()
        k_row = k[:, :, :1]                                                           # [B, H, 1, Dk]
        delta = (v[:, :, :1] - k_row @ s) * beta[:, :, :1, None]                      # [B, H, 1, Dv]
        s = torch.baddbmm(s.flatten(0, 1), k_row.transpose(-1, -2).flatten(0, 1), delta.flatten(0, 1)).view_as(s)
        return (q[:, :, :1] @ s).transpose(1, 2), s
    pad = -t % chunk            # (zero keys, values and decays past the end change nothing; cut off after)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    n = (t + pad) // chunk
    q, k, v = (x.reshape(b, hv, n, chunk, -1) for x in (q, k, v))
    beta, g = beta.reshape(b, hv, n, chunk), g.reshape(b, hv, n, chunk)
    gamma = g.cumsum(-1)                                          # log decay from the chunk's start to each token
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [.., i, j], j <= i
    kb = k * beta[..., None]
    # the chunk's tokens correct each other's values: (I + strictly lower(beta_i k_i.k_j decay_ij)) u = beta v, and
    # likewise the state reads w = (...)^-1 beta k exp(gamma)
    system = (kb @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * gamma.exp()[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay                    # within the chunk, the diagonal included
    q_in = q * gamma.exp()[..., None]                             # the queries read the state decayed to them ...
    k_out = k * (gamma[..., -1:] - gamma).exp()[..., None]        # ... the keys write it decayed to the chunk's end
    end = gamma[..., -1].exp()[..., None, None]
    out = torch.empty_like(v)
    for c in range(n):
        new = u[:, :, c] - w[:, :, c] @ s                         # the values' part the state does not predict
        out[:, :, c] = q_in[:, :, c] @ s + scores[:, :, c] @ new
        s = s * end[:, :, c] + k_out[:, :, c].transpose(-1, -2) @ new
    out = out.reshape(b, hv, n * chunk, dv)[:, :, :t].transpose(1, 2)
    return out, s


def causal_conv(x: torch.Tensor, weight: torch.Tensor, t: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The depthwise convolution's last ``t`` outputs over x [B, C, K - 1 + t] (history, then the new inputs), weight
    [C, K] (and a bias [C]): K shifted multiply-adds in fp32, rounded once to x's dtype (for one decode step mkldnn's
    depthwise conv1d costs ~150 us of setup, these ~10)."""
    w = weight.float()
    acc = x[..., :t].float() * w[:, :1]
    if bias is not None:
        acc += bias.float()[:, None]
    for j in range(1, weight.shape[-1]):
        acc.addcmul_(x[..., j:j + t].float(), w[:, j:j + 1])
    return acc.to(x.dtype)


def conv_window(history: torch.Tensor | None, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """The convolution's input window [B, C, K - 1 + T]: the history (zeros where a call has none) then the new
    inputs x [B, C, T]."""
    if history is None:
        history = x.new_zeros(x.shape[0], x.shape[1], kernel - 1)
    return torch.cat((history.to(x.dtype), x), dim=-1)


def layer_states(step, layer: int, b: int, conv: tuple, state: tuple):
    """A linear-state layer's (convolution history [B, *conv] or None, state [B, *state] or None, where the new ones
    go: the engine cache's buffers, a Hugging Face cache layer, or None) for this step: the engine's cache (zeroed
    where its sequences start: the loops' ``reset_linear``; or a chunked plain forward's scratch), HF's cache layer
    (what it holds once a call at a later column comes), or nothing (zeros, kept nowhere: a plain forward)."""
    if step.cache is not None:
        history, rows = step.cache.linear_buffers(layer, b, conv, state)
        return history, rows, (history, rows)
    if step.hf_cache is not None:
        layers = step.hf_cache.layers
        held = layers[layer] if layer < len(layers) else None
        if not hasattr(held, "conv_states"):
            raise RuntimeError(f"dsinfer: the Hugging Face cache passed has no linear-attention layer {layer} "
                               f"({type(held).__name__}); build it with DynamicCache(config=model.config), or pass "
                               f"none.")
        ready = held.is_conv_states_initialized[0] and step.q_start > 0
        return ((held.conv_states[0] if ready else None),
                (held.recurrent_states[0] if ready and held.is_recurrent_states_initialized[0] else None), held)
    return None, None, None


def keep_states(keep, history: torch.Tensor, state: torch.Tensor | None) -> None:
    """Store a call's last convolution inputs (and recurrent state; None: a layer without one) where
    :func:`layer_states` said."""
    if isinstance(keep, tuple):                 # the engine's cache: written in place
        keep[0].copy_(history)
        if state is not None:
            keep[1].copy_(state)
    elif keep is not None:                      # a Hugging Face cache layer
        keep.conv_states[0] = history.contiguous()
        keep.is_conv_states_initialized[0] = keep.has_previous_state[0] = True
        if state is not None:
            keep.recurrent_states[0] = state
            keep.is_recurrent_states_initialized[0] = True
        keep.device, keep.dtype = history.device, history.dtype


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [.., D] (fp32, rounded to x's dtype before the weight), times SiLU(z) in fp32, as transformers'
    ``RMSNormGated``."""
    dtype = x.dtype
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (y * F.silu(z.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention block's token mixer. ``qkv``: one GEMM for in_proj's q | k | v | z | b | a rows (the name
    the blocks use for a token mixer's input projection), ``o``: out_proj. ``conv`` [C, K] the depthwise convolution
    of the C = 2 Hk Dk + Hv Dv q | k | v channels, ``dt_bias`` / ``a_log`` [Hv], ``norm`` [Dv] (the gated norm's
    weight, no offset)."""

    rotary = sliding = False          # (what the blocks' other code asks of a token mixer)
    alibi = sinks = softcap = None

    def __init__(self, layer_idx: int, qkv: Linear, o: Linear, conv: torch.Tensor, dt_bias: torch.Tensor,
                 a_log: torch.Tensor, norm: torch.Tensor, key_heads: int, value_heads: int, key_dim: int,
                 value_dim: int, eps: float, beta_scale: float = 1.0):
        super().__init__()
        self.layer_idx, self.qkv, self.o, self.beta_scale = layer_idx, qkv, o, beta_scale
        self.conv, self.dt_bias, self.a_log, self.norm = conv, dt_bias, a_log, norm
        self.hk, self.hv, self.dk, self.dv, self.eps = key_heads, value_heads, key_dim, value_dim, eps
        self.channels = 2 * key_heads * key_dim + value_heads * value_dim
        self.kernel = conv.shape[-1]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        return self.from_qkv(self.qkv(x), residual, step)

    def from_qkv(self, proj: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        b, t, _ = proj.shape
        hk, hv, dk, dv, c = self.hk, self.hv, self.dk, self.dv, self.channels
        if step.valid is not None:     # left padding: zero rows, as transformers zeroes their inputs (also in a prompt
            proj = proj * step.valid[:, :, None].to(proj.dtype)   # chunk one token wide: offload with many rows)
        if t == 1 and step.decoding and step.cache is not None:   # a decode step on the engine's cache (or a graph's;
            # a one-token chunk of a prompt takes the torch ops, as Mamba-2's and the short convolution's do)
            history, state = step.cache.linear_buffers(self.layer_idx, b, (c, self.kernel - 1), (hv, dk, dv))
            if ops.uses_triton(proj):              # the convolution and the rule in two kernels (gated_delta.py)
                out = ops.gated_delta_step(proj[:, 0], history, self.conv, self.a_log, self.dt_bias, state, hk, dk,
                                           self.beta_scale)
                z = proj[..., c:c + hv * dv].reshape(b, 1, hv, dv)
                out = gated_rms_norm(out[:, None], z, self.norm, self.eps)
                return self.o(out.reshape(b, 1, hv * dv), residual)
            if proj.dtype == torch.bfloat16:       # bf16 on the CPU: that and the gated norm in one C call
                out = cpu_gemv.gated_delta_step(proj, history, self.conv, self.a_log, self.dt_bias, self.norm, state,
                                                hk, hv, dk, dv, self.eps, self.beta_scale)
                if out is not None:
                    return self.o(out, residual)
        mixed, z, beta_in, a = proj.split([c, hv * dv, hv, hv], dim=-1)
        history, state, keep = layer_states(step, self.layer_idx, b, (c, self.kernel - 1), (hv, dk, dv))
        x = conv_window(history, mixed.transpose(1, 2), self.kernel)                  # [B, C, K - 1 + T]
        conv = F.silu(causal_conv(x, self.conv, t))                                   # [B, C, T]
        q, k, v = conv.transpose(1, 2).split([hk * dk, hk * dk, hv * dv], dim=-1)
        beta = torch.sigmoid(beta_in)
        if self.beta_scale != 1.0:          # (OLMo Hybrid's allow_neg_eigval: beta in (0, 2), x 2 exact in any dtype)
            beta = beta * self.beta_scale
        g = -self.a_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out, state = delta_rule(q.reshape(b, t, hk, dk), k.reshape(b, t, hk, dk), v.reshape(b, t, hv, dv), g, beta,
                                state)
        keep_states(keep, x[..., -(self.kernel - 1):], state)
        out = gated_rms_norm(out.to(proj.dtype), z.reshape(b, t, hv, dv), self.norm, self.eps)
        return self.o(out.reshape(b, t, hv * dv), residual)

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.o.nbytes + sum(
            p.numel() * p.element_size() for p in (self.conv, self.dt_bias, self.a_log, self.norm))


class ShortConv(nn.Module):
    """LFM2's gated short convolution, the token mixer of its ``conv`` blocks: in_proj's B | C | x rows (``qkv``: one
    GEMM), the depthwise causal convolution (kernel K, no activation) of B * x, times C, then out_proj (``o``). Per
    row only the last K - 1 inputs of the convolution persist (the cache's ``conv`` buffers; its state is empty)."""

    rotary = sliding = False
    alibi = sinks = softcap = None

    def __init__(self, layer_idx: int, qkv: Linear, o: Linear, conv: torch.Tensor):
        super().__init__()
        self.layer_idx, self.qkv, self.o, self.conv = layer_idx, qkv, o, conv
        self.channels, self.kernel = conv.shape

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        return self.from_qkv(self.qkv(x), residual, step)

    def from_qkv(self, proj: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        b, t, _ = proj.shape
        c = self.channels
        if t == 1 and step.decoding and step.cache is not None and step.valid is None:
            history, _ = step.cache.linear_buffers(self.layer_idx, b, (c, self.kernel - 1), (0,))
            if ops.uses_triton(proj):      # a decode step on the Triton path: B * x, the convolution, C * in one kernel
                return self.o(ops.short_conv_step(proj[:, 0], history, self.conv)[:, None], residual)
            if proj.dtype == torch.bfloat16:   # a bf16 CPU decode step: the same in one C call
                out = cpu_gemv.short_conv_step(proj, history, self.conv)
                if out is not None:
                    return self.o(out, residual)
        if step.valid is not None:     # left padding: zero rows, as transformers zeroes their inputs (a prompt chunk
            proj = proj * step.valid[:, :, None].to(proj.dtype)   # may be one token wide: offload with many rows)
        gate_in, gate_out, x = proj.split([c, c, c], dim=-1)
        history, _, keep = layer_states(step, self.layer_idx, b, (c, self.kernel - 1), (0,))
        window = conv_window(history, (gate_in * x).transpose(1, 2), self.kernel)    # B * x, [B, C, K - 1 + T]
        keep_states(keep, window[..., -(self.kernel - 1):], None)
        y = gate_out * causal_conv(window, self.conv, t).transpose(1, 2)
        return self.o(y, residual)

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.o.nbytes + self.conv.numel() * self.conv.element_size()


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             state: torch.Tensor | None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's selective state space over T tokens, in fp32: per head h, S <- exp(dt_t a_h) S + dt_t x_t b_t^T,
    y_t = S c_t. x [B, T, H, P], dt [B, T, H] (after softplus and limits), a [H] (negative), b / c [B, T, H, N]
    (groups already repeated per head), state [B, H, P, N] or None (zeros). Returns (y [B, T, H, P], final state).
    One token: the recurrence; more: chunks of ``chunk`` (within a chunk the decays as a masked [chunk, chunk]
    matrix, across chunks one state pass)."""
    bsz, t, h, p = x.shape
    n = b.shape[-1]
    x, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    s = torch.zeros(bsz, h, p, n, dtype=torch.float32, device=x.device) if state is None else state.float()
    if t == 1:
        decay = torch.exp(dt[:, 0] * a)                                          # [B, H]
        s = s * decay[..., None, None] + (dt[:, 0, :, None] * x[:, 0])[..., None] * b[:, 0, :, None, :]
        return (s @ c[:, 0, :, :, None])[..., 0][:, None], s
    pad = -t % chunk
    if pad:
        x, b, c = (F.pad(z, (0, 0, 0, 0, 0, pad)) for z in (x, b, c))
        dt = F.pad(dt, (0, 0, 0, pad))
    m = (t + pad) // chunk
    x, b, c = (z.reshape(bsz, m, chunk, h, -1).transpose(2, 3) for z in (x, b, c))     # [B, M, H, L, *]
    dt = dt.reshape(bsz, m, chunk, h).transpose(2, 3)                                     # [B, M, H, L]
    la = (dt * a[:, None]).cumsum(-1)                                                     # log decay from chunk start
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = (la[..., :, None] - la[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [.., l, s], s <= l
    xdt = x * dt[..., None]
    y = ((c @ b.transpose(-1, -2)) * decay) @ xdt                                        # within the chunk
    into_end = (la[..., -1:] - la).exp()                                                  # [B, M, H, L]
    from_start = la.exp()
    out = torch.empty_like(y)
    for i in range(m):
        out[:, i] = y[:, i] + (c[:, i] @ s.transpose(-1, -2)) * from_start[:, i, :, :, None]
        s = s * from_start[:, i, :, -1, None, None] + (xdt[:, i] * into_end[:, i, :, :, None]).transpose(-1, -2) @ b[:, i]
    out = out.transpose(2, 3).reshape(bsz, m * chunk, h, p)[:, :t]
    return out, s


class Mamba2Mixer(nn.Module):
    """Mamba-2 (Granite 4's ``mamba`` blocks): in_proj's z | x B C | dt rows (``qkv``: one GEMM), the depthwise causal
    convolution (with bias) and SiLU over x B C, dt = softplus(dt + dt_bias) clamped to the time-step limits, the
    selective scan (:func:`ssd_scan`) plus D x (prompts clamp dt to the limits, decode steps do not, as transformers), the
    read-out by ``gating`` (``policies.base.Mamba2Weights``: the gated group RMSNorm of x silu(z), normed per group of
    channels; or y silu(z) alone; or the normed y times silu(z)), out_proj (``o``). Per row: the last K - 1
    convolution inputs and the state [H, P, N] (fp32). Beside attention (Falcon-H1, :class:`ParallelMixer`) it has no
    ``qkv`` / ``o`` of its own: :meth:`read_out` is what it adds to the shared GEMMs."""

    rotary = sliding = False
    alibi = sinks = softcap = None

    def __init__(self, layer_idx: int, qkv: Linear | None, o: Linear | None, conv: torch.Tensor,
                 conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, a_log: torch.Tensor, d: torch.Tensor,
                 norm: torch.Tensor | None, heads: int, head_dim: int, groups: int, state_size: int, eps: float,
                 dt_limit: tuple[float, float], norm_reduce=None, norm_group: int | None = None,
                 gating: str = "norm_after_gate", norm_slot: tuple[int, int] = (0, 1)):
        super().__init__()
        self.layer_idx, self.qkv, self.o = layer_idx, qkv, o
        self.conv, self.conv_bias, self.dt_bias, self.a_log, self.d, self.norm = conv, conv_bias, dt_bias, a_log, d, norm
        self.h, self.p, self.g, self.n, self.eps, self.dt_limit = heads, head_dim, groups, state_size, eps, dt_limit
        self.inner = heads * head_dim
        self.gating = gating
        self.channels, self.kernel = conv.shape
        # tensor parallelism with fewer groups than ranks: this rank holds part of its norm group, whose sums of
        # squares are summed over the ranks (``norm_reduce``) and divided by the whole group's ``norm_group`` channels;
        # with several groups (1 < G < ranks) each rank's sum goes to its group's slot of G (``norm_slot``: (its
        # group, G)), so the sum over the ranks is each group's own
        self.norm_reduce, self.norm_group = norm_reduce, norm_group or self.inner // groups
        self.norm_slot = norm_slot

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        return self.from_qkv(self.qkv(x), residual, step)

    def from_qkv(self, proj: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        return self.o(self.read_out(proj, step), residual)

    def read_out(self, proj: torch.Tensor, step) -> torch.Tensor:
        """The mixer's output before out_proj [B, T, I] for in_proj's output ``proj`` [B, T, I + C + H]."""
        bsz, t, _ = proj.shape
        h, p, g, n, inner = self.h, self.p, self.g, self.n, self.inner
        # the time-step limits bound prompts' dt only: transformers' (and mamba_ssm's) one-token step on a held state
        # does not clamp (NemotronH's lower limit is time_step_min); a one-token chunk of a prompt does
        limit = (0.0, float("inf")) if step.decoding else self.dt_limit
        if (t == 1 and step.decoding and step.cache is not None and self.norm_reduce is None
                and (step.valid is None or bool(step.valid.all()))):
            # a decode step on the engine's cache
            history, state = step.cache.linear_buffers(self.layer_idx, bsz, (self.channels, self.kernel - 1), (h, p, n))
            if ops.uses_triton(proj) and self.gating == "norm_after_gate":   # convolution, scan and gated norm in three
                # kernels (kernels/mamba2.py; the other read-outs: the torch ops)
                return ops.mamba2_step(proj[:, 0], history, self.conv, self.conv_bias, self.dt_bias, self.a_log,
                                       self.d, self.norm, state, g, self.eps, limit)[:, None]
            if proj.dtype == torch.bfloat16:   # bf16 on the CPU: the same in one C call
                out = cpu_gemv.mamba2_step(proj.contiguous(), history, self.conv, self.conv_bias, self.dt_bias,
                                           self.a_log, self.d, self.norm, state, h, p, g, n, self.eps, limit,
                                           self.gating)
                if out is not None:
                    return out
        valid = None if step.valid is None else step.valid[:, :, None].to(proj.dtype)
        if valid is not None:          # left padding: rows zeroed before and after the convolution, as transformers
            proj = proj * valid
        z, xbc, dt = proj.split([inner, self.channels, h], dim=-1)
        history, state, keep = layer_states(step, self.layer_idx, bsz, (self.channels, self.kernel - 1), (h, p, n))
        window = conv_window(history, xbc.transpose(1, 2), self.kernel)
        conv = causal_conv(window, self.conv, t, self.conv_bias)
        xbc = F.silu(conv).transpose(1, 2)
        if valid is not None:
            xbc = xbc * valid
        x, b, c = xbc.split([inner, g * n, g * n], dim=-1)
        b, c = (v.reshape(bsz, t, g, n).repeat_interleave(h // g, dim=2) for v in (b, c))
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).clamp(*limit)
        a = -torch.exp(self.a_log.float())
        y, state = ssd_scan(x.reshape(bsz, t, h, p), dt, a, b, c, state)
        keep_states(keep, window[..., -(self.kernel - 1):], state)
        y = (y + x.reshape(bsz, t, h, p).float() * self.d.float()[:, None]).reshape(bsz, t, inner)
        if step.decoding:              # (transformers' step rounds its read-out; its chunked scan hands fp32 on)
            y = y.to(proj.dtype)
        gate = F.silu(z.float())
        if self.gating == "gate":      # (Falcon-H1 without mamba_rms_norm: y silu(z), no norm)
            return (y.float() * gate).to(proj.dtype)
        # the gated group norm: (y silu(z)) in fp32 (or y alone, norm_before_gate), RMS-normed per group of inner / g
        # channels, rounded, times weight (norm_before_gate: in fp32, then times silu(z))
        gated = (y.float() * (gate if self.gating == "norm_after_gate" else 1.0)).view(bsz, t, g, inner // g)
        squares = gated.pow(2).sum(-1, keepdim=True)
        if self.norm_reduce is not None:
            slot, slots = self.norm_slot
            if slots > 1:     # (found by review: a sum over every rank mixed the groups)
                full = squares.new_zeros(*squares.shape[:-1], slots)
                full[..., slot] = squares[..., 0]
                squares = self.norm_reduce(full)[..., slot:slot + 1]
            else:
                squares = self.norm_reduce(squares.contiguous())
        normed = (gated * torch.rsqrt(squares / self.norm_group + self.eps)).view(bsz, t, inner)
        if self.gating == "norm_before_gate":
            return (self.norm.float() * normed * gate).to(proj.dtype)
        return self.norm * normed.to(proj.dtype)

    @property
    def nbytes(self) -> int:
        own = sum(v.numel() * v.element_size() for v in (self.conv, self.dt_bias, self.a_log, self.d, self.norm)
                  if v is not None)
        return own + (self.qkv.nbytes + self.o.nbytes if self.qkv is not None else 0)


class Mamba1Mixer(nn.Module):
    """Mamba (Mamba-1: ``mamba``, FalconMamba, Jamba's mamba layers): in_proj's x | z rows (``qkv``), the depthwise causal
    convolution (with its bias) and SiLU over x, ``x_proj``'s dt (rank R) | B | C (N each) from it (FalconMamba and Jamba:
    each RMS-normed over its own width, ``bcdt_norms`` = (dt, B, C) weights, ones where weightless), dt =
    softplus(``dt_proj`` dt + dt bias) in fp32, the selective scan h = exp(dt A) h + dt B x per channel and state (A =
    -exp(A_log) [I, N]; the state rounded to the dtype for y = h . C, as transformers), y + D x, times silu(z), out_proj
    (``o``). Per row: the last K - 1 convolution inputs and the state [I, N] (fp32). Tensor parallelism: this rank's
    channels; x_proj's partial sums are reduced over the group (``reduce``) before the norms and dt_proj."""

    rotary = sliding = False
    alibi = sinks = softcap = None

    def __init__(self, layer_idx: int, qkv: Linear, o: Linear, conv: torch.Tensor, conv_bias: torch.Tensor | None,
                 x_proj: Linear, dt_proj: Linear, dt_bias: torch.Tensor, a_log: torch.Tensor, d: torch.Tensor,
                 bcdt_norms=None, eps: float = 1e-6, reduce=None):
        super().__init__()
        self.layer_idx, self.qkv, self.o, self.x_proj, self.dt_proj = layer_idx, qkv, o, x_proj, dt_proj
        self.conv, self.conv_bias, self.dt_bias, self.a_log, self.d = conv, conv_bias, dt_bias, a_log, d
        self.bcdt_norms, self.eps, self.reduce = bcdt_norms, eps, reduce
        self.inner, self.n = a_log.shape
        self.rank = dt_proj.in_features
        self.channels, self.kernel = conv.shape

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        return self.from_qkv(self.qkv(x), residual, step)

    def from_qkv(self, proj: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        bsz, t, _ = proj.shape
        inner, n = self.inner, self.n
        dtype = proj.dtype
        if (t == 1 and step.decoding and step.cache is not None and dtype == torch.bfloat16
                and proj.device.type == "cpu" and cpu_gemv.has_wide_ops()
                and (step.valid is None or bool(step.valid.all()))):    # a bf16 CPU decode step: two C calls
            return self.o(self._c_step(proj.contiguous(), step), residual)
        valid = None if step.valid is None else step.valid[:, :, None].to(dtype)
        if valid is not None:          # left padding: rows zeroed before and after the convolution, as transformers
            proj = proj * valid
        x, z = proj.split([inner, inner], dim=-1)
        history, state, keep = layer_states(step, self.layer_idx, bsz, (self.channels, self.kernel - 1), (inner, n))
        window = conv_window(history, x.transpose(1, 2), self.kernel)
        x = F.silu(causal_conv(window, self.conv, t, self.conv_bias)).transpose(1, 2)         # [B, T, I]
        if valid is not None:
            x = x * valid
        dt, b, c = self._dt_b_c(x)
        h = torch.zeros(bsz, inner, n, device=proj.device) if state is None else state.float().contiguous()
        out = None
        scan = (x.contiguous(), z, dt.contiguous(), torch.cat((b, c), -1), self.dt_bias, self.a_log, self.d, h)
        if ops.uses_triton(proj):      # the scan over the call's tokens in one kernel (kernels/mamba1.py; h in place)
            out = ops.mamba1_scan(*scan)
        elif dtype == torch.bfloat16 and proj.device.type == "cpu" and cpu_gemv.has_wide_ops():
            out = cpu_gemv.mamba1_scan(*scan)          # a bf16 CPU prompt: the same in one C call (None: declined)
        if out is not None:
            keep_states(keep, window[..., -(self.kernel - 1):], h)
            return self.o(out, residual)
        dt = F.softplus(dt.float() + self.dt_bias.float())                                     # [B, T, I] fp32
        a = -torch.exp(self.a_log.float())                                                     # [I, N]
        ys = []
        for i in range(t):             # (transformers' own recurrence: per channel and state, one token at a time)
            dti = dt[:, i, :, None]
            h = torch.exp(dti * a) * h + dti * b[:, i, None, :].float() * x[:, i, :, None].float()
            # (h rounded to the dtype, times C, summed in fp32 and rounded: transformers' bf16 product; a multiply and
            # a sum run ~10x faster than that tiny bmm on the CPU)
            ys.append((h.to(dtype).float() * c[:, i, None, :].float()).sum(-1).to(dtype))
        keep_states(keep, window[..., -(self.kernel - 1):], h)
        y = torch.stack(ys, 1).float() + x.float() * self.d.float()
        return self.o((y * F.silu(z.float())).to(dtype), residual)

    def _dt_b_c(self, x: torch.Tensor):
        """(dt_proj's output, B, C) from the convolution's output x: x_proj (its partial sums reduced under tensor
        parallelism), the norms, dt_proj (no bias: the scan adds it in fp32)."""
        sel = self.x_proj(x)
        if self.reduce is not None:    # (this rank's channels' share of dt | B | C)
            sel = self.reduce(sel.contiguous())
        dt, b, c = sel.split([self.rank, self.n, self.n], dim=-1)
        if self.bcdt_norms is not None:
            dt, b, c = (ops.rms_norm(v, w, self.eps) for v, w in zip((dt, b, c), self.bcdt_norms))
        return self.dt_proj(dt), b, c

    def _c_step(self, proj: torch.Tensor, step) -> torch.Tensor:
        """The torch path's decode step with the convolution and the selective-state update in C
        (``cpu_gemv.mamba1_conv`` / ``mamba1_scan``; the GEMVs and norms between them as they are)."""
        history, state = step.cache.linear_buffers(self.layer_idx, proj.shape[0], (self.channels, self.kernel - 1),
                                                   (self.inner, self.n))
        x = cpu_gemv.mamba1_conv(proj, history, self.conv, self.conv_bias)
        out = None
        if x is not None:
            dt, b, c = self._dt_b_c(x)
            out = cpu_gemv.mamba1_scan(x, proj[..., self.inner:], dt.contiguous(), torch.cat((b, c), -1),
                                       self.dt_bias, self.a_log, self.d, state)
        if out is None:      # (has_wide_ops held: the shapes are the engine's own)
            raise RuntimeError("dsinfer: the Mamba-1 C decode step declined the engine's own tensors")
        return out

    @property
    def nbytes(self) -> int:
        own = sum(v.numel() * v.element_size() for v in (self.conv, self.dt_bias, self.a_log, self.d))
        return own + self.qkv.nbytes + self.o.nbytes + self.x_proj.nbytes + self.dt_proj.nbytes


class ParallelMixer(nn.Module):
    """Falcon-H1's block mixer: attention and Mamba-2 side by side on the same normed input, their outputs summed.
    One GEMM for both input projections (``qkv``: attention's q | k | v rows, then in_proj's z | x B C | dt rows) and
    one for both output projections (``o``: o_proj's columns, then out_proj's, over the two read-outs side by side), the
    muP multipliers folded into those weights by the policy."""

    def __init__(self, attn, mamba: Mamba2Mixer, qkv: Linear, o: Linear):
        super().__init__()
        self.attn, self.mamba, self.qkv, self.o = attn, mamba, qkv, o
        self.split = (attn.hq + 2 * attn.hkv) * attn.d      # where in_proj's rows start in qkv's output
        self.layer_idx = attn.layer_idx

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        return self.from_qkv(self.qkv(x), residual, step)

    def from_qkv(self, qkv: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        heads = self.attn.attend(qkv[..., :self.split].contiguous(), step)
        out = self.mamba.read_out(qkv[..., self.split:], step)
        return self.o(torch.cat((heads, out), dim=-1), residual)

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.o.nbytes + self.mamba.nbytes


def state_shapes(lw, ranks: int = 1) -> tuple[tuple, tuple] | None:
    """(convolution history, recurrent state) shapes of one row on each of ``ranks`` tensor-parallel ranks for a block's
    ``policies.base.LayerWeights``: a Gated DeltaNet's, a short convolution's (no state), a Mamba-2's, or None (K/V
    instead)."""
    if lw.deltanet is not None:
        dn = lw.deltanet
        hk, hv = dn.key_heads // ranks, dn.value_heads // ranks
        return (2 * hk * dn.key_dim + hv * dn.value_dim, dn.kernel - 1), (hv, dn.key_dim, dn.value_dim)
    if lw.shortconv is not None:
        return (lw.shortconv.channels // ranks, lw.shortconv.kernel - 1), (0,)
    if getattr(lw, "mamba1", None) is not None:
        m = lw.mamba1
        return (m.inner // ranks, m.kernel - 1), (m.inner // ranks, m.state_size)
    if lw.mamba is not None:
        m = lw.mamba
        heads, groups = m.heads // ranks, max(m.groups // ranks, 1)
        return (heads * m.head_dim + 2 * groups * m.state_size, m.kernel - 1), (heads, m.head_dim, m.state_size)
    return None
