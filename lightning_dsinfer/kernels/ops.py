"""The ops the engine's modules call, dispatched to the Triton kernels or to ``reference.py``.

Same names and signatures as :mod:`lightning_dsinfer.kernels.reference` (``rms_norm``, ``add_rms_norm``,
``rotary_half``, ``rotary_write_kv``, ``silu_and_mul``, ``attention``, ``linear``). A call goes to the Triton
kernel when its tensors are on CUDA and Triton imports, or when the Triton path is forced (:func:`force_triton`,
or ``DSINFER_FORCE_TRITON=1`` read at import), which with ``TRITON_INTERPRET=1`` runs the whole engine through
the kernels on CPU tensors.
Everything else (the CPU path) calls the reference, except bf16 decode-sized calls of ``rms_norm``,
``layer_norm``, ``silu_and_mul``, ``gated_act``, ``act``, ``rotary_write_kv`` (full or partial rotary) and
``attention`` (one query per row, soft-capped or not, with sinks / ALiBi or not), which take the one-call C kernels of
:mod:`~lightning_dsinfer.kernels.cpu_gemv` (each tested against the reference there); Triton is imported only on the
first Triton dispatch.

How the engine's calls map onto the kernels, and what stays on the reference:

- ``rms_norm(x, w, eps)`` -> ``kernels/rms_norm.py`` (any shape, strided x allowed). In bf16/fp16 the
  kernel scales by the weight in fp32 and rounds once; the reference (HF's order) rounds before the scale.
- ``add_rms_norm(x, residual, w, eps)`` -> ``kernels/rms_norm.py`` with ``residual=``: h = x + residual and
  its norm in one pass, h stored once (Deep-Fusion residual + norm). The engine's blocks use it on the Triton
  path (:func:`fuses_residual`): the output projections run without the residual, and the add happens in the
  next norm (post-attention norm, the next block's input norm, the final norm). On the CPU path the add stays
  inside the GEMM (oneDNN's binary-add epilogue) and the norms are plain ``rms_norm``, as before.
- ``rotary_write_kv(qkv, Hq, cos, sin_signed, k_cache, v_cache, col, q_norm, k_norm, eps)`` ->
  ``kernels/rotary.rotary_qkv`` with the caches: q and k heads rotated and K/V appended to the cache rows in one
  kernel, reading q / k / v straight from the fused QKV output (strided views). The per-head q / k norms
  (Qwen3) run first through ``kernels/rms_norm.py``. ``col``: an int (an int32 [1] tensor of it, kept for
  later calls, expanded over the rows is the kernel's ``cache_start``: no fill per layer) or a LongTensor [1] on the
  device (the CUDA-graph step, no host sync). Tables and
  positions as for ``rotary_half`` (below); other layouts and caches -> reference.
- ``linear(x, w, bias, residual)`` -> ``kernels/small_gemm.py`` when the rows M = x.numel() / K are
  1..:data:`SMALL_GEMM_MAX_M` (decode) and x, w are both bf16 or both fp16; else ``F.linear`` (counted as
  ``"torch:..."``, the intended path for prefill and fp32, not a fallback).
- ``linear_int8`` / ``linear_int4(x, packed, scale, group_size, bias, residual)`` (weight-only int8 / group-wise
  int4) -> ``kernels/small_gemm.py``'s int8 / int4 GEMM for M <= 32 (int4: any float dtype, power-of-two groups of
  at least 32), the dequantisation fused into the tile load; else the weight is dequantised in torch for the call.
- ``norm_linear(h, delta, norm_w, eps, w, bias, scale, gated)`` -> ``kernels/small_gemm.py`` with its norm
  prologue (and the residual add when ``delta`` is given) and, ``gated``, its SwiGLU epilogue: the input norm +
  QKV and the post-attention norm + gate/up + SwiGLU of a decode step, one kernel each (the engine's blocks on
  the Triton path). Rows, dtypes: as ``linear`` (fp32 included); else None and the caller runs the separate ops.
- ``silu_and_mul(gate_up)`` -> ``kernels/activations.gated_act(act="silu")``; ``clamped_swiglu`` (gpt-oss's
  experts, inside the reference's ``moe_mlp``) -> ``kernels/activations.clamped_swiglu``.
- ``rotary_half(x, cos, sin_signed)`` with x [B, T, H, D] and cos / sin [B, T, 1, D] (the engine's Step) ->
  ``kernels/rotary.rotary_qkv``: each token's cos row becomes one row of a [B*T, D/2] table, read at
  position ``b * T + t``. This relies on the reference's documented layout cos = cat(c, c),
  sin_signed = cat(-s, s) (``modules/rotary.py`` builds it so); the values are not checked. Other shapes
  (cos not per token, odd D, x not 4-D) -> reference. The engine calls ``rotary_write_kv`` (same tables).
- ``attention(q, k, v, mask, scale)`` (q [B, Hq, T, D], k / v [B, Hkv, L, D], mask bool [B|1, 1, T, L]
  in KV-column space or None). The kernels take per-row key ranges instead of a mask, so the mask is
  converted (once per mask object: the layers of one forward share it; one or two host syncs):

  * decode (T == 1) -> ``kernels/decode_attention``: the visible keys of each row must be one run
    [kv_start[b], L) ending at the query (left padding and the sliding window give exactly that);
    ``seq_lens`` = L. ``mask=None`` -> every key. Ranges registered with :func:`kv_ranges` (the CUDA-graph
    decode step) are used as given, with no sync. Keys up to 1024 wide, values up to as wide as the keys (at most
    512 past 256-wide keys): multi-head latent attention (``modules/mla.py``, DeepSeek-V3: 576-wide latent +
    rotary rows, 128 heads on one kv head) passes ``v = k[..., :512]``, a view the kernel reads from the key rows.
  * prefill (T > 1, L >= T; L > T for a later chunk or an HF-cache continuation, query i at column
    c = L - T + i) -> ``kernels/prefill_attention``: the mask must be the engine's left-padding mask
    ``((j >= p_b) & (j <= c) & (j > c - w)) | (j == c)`` (``modules/masks.py``); p_b and w are read off
    the mask and the rebuilt mask is compared with it. Query rows before p_b (padding) see only
    themselves there, so their output is their own V row: written after the kernel (which gives zeros).
  * reference fallback: T > 1 with ``mask=None`` (non-causal), non-bool masks, masks with holes (an
    attention_mask with zeros inside the prompt), more than 128 query heads per KV head, prompts (T > 1) with
    keys or values wider than 256, single queries with keys wider than 1024 or values wider than the keys (or
    than 512 past 256-wide keys).
  On the CPU path, values that are a view of the keys' first columns (the latent attention's) run as the whole key
  rows and the output is cut: the reference's SDPA and the C decode attention take one width.

On a GPU the first decode steps compile one decode kernel per split count (it grows with L until it
reaches the GPU's program target); the CUDA-graph step passes the cache length instead, one compile.
"""
from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections import Counter

import torch

from lightning_dsinfer.kernels import cpu_gemv, reference, triton_available

_FORCE = os.environ.get("DSINFER_FORCE_TRITON", "0") not in ("", "0", "false", "False")
_GEMM_FUSION = os.environ.get("DSINFER_GEMM_FUSION", "1") not in ("", "0", "false", "False")
_CPU_TRITON_OK: bool | None = None   # triton_available("cpu"), asked once when forcing

# (op, path) -> calls that took that path since the last clear(); path is "triton", "reference:<why>" (a
# fallback) or "torch:<why>" (``linear`` on F.linear by design). Counted on the Triton-capable path only (CUDA
# tensors or forced): the plain CPU path is not touched.
dispatch_counts: Counter = Counter()

SMALL_GEMM_MAX_M = 32   # rows up to which ``linear`` uses kernels/small_gemm.py (its one M tile)
_NORM_MAX_FEATURES = 65536   # = kernels/_common.MAX_FEATURES (not imported: that module imports Triton)


@contextlib.contextmanager
def force_triton(enabled: bool = True):
    """Within the block, CPU tensors also go through the Triton kernels (needs ``TRITON_INTERPRET=1`` set
    before Triton was first imported). ``force_triton(False)`` turns a forced env setting off."""
    global _FORCE
    if enabled and not _cpu_triton_ok():
        raise RuntimeError("force_triton: Triton cannot run on CPU tensors here; it needs triton installed and "
                           "TRITON_INTERPRET=1 set before triton is first imported.")
    old, _FORCE = _FORCE, enabled
    try:
        yield dispatch_counts
    finally:
        _FORCE = old


@contextlib.contextmanager
def gemm_fusion(enabled: bool = True):
    """Within the block, :func:`norm_linear` fuses (``enabled``) or declines (the separate norm, GEMM and SwiGLU
    kernels run: the A/B of ``benchmarks/gpu_check.py``). ``DSINFER_GEMM_FUSION=0`` sets the default off."""
    global _GEMM_FUSION
    old, _GEMM_FUSION = _GEMM_FUSION, enabled
    try:
        yield
    finally:
        _GEMM_FUSION = old


def _cpu_triton_ok() -> bool:
    global _CPU_TRITON_OK
    if _CPU_TRITON_OK is None:
        _CPU_TRITON_OK = triton_available("cpu")
    return _CPU_TRITON_OK


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ops on tensors like ``x`` go to the Triton kernels (CUDA, or CPU tensors under ``force_triton``)."""
    return _triton(x)


def _triton(x: torch.Tensor) -> bool:
    """Whether tensors like ``x`` go to the Triton kernels (False on the plain CPU path)."""
    if x.is_cuda:
        return _cuda_triton_ok()
    if _FORCE:
        if not _cpu_triton_ok():
            raise RuntimeError("DSINFER_FORCE_TRITON is set but Triton cannot run on CPU tensors (set "
                               "TRITON_INTERPRET=1 before triton is imported).")
        return True
    return False


_CUDA_TRITON_OK: bool | None = None


def _cuda_triton_ok() -> bool:
    global _CUDA_TRITON_OK
    if _CUDA_TRITON_OK is None:
        _CUDA_TRITON_OK = triton_available("cuda")
    return _CUDA_TRITON_OK


def _count(op: str, path: str) -> None:
    dispatch_counts[(op, path)] += 1


# ----------------------------------------------------------------------- per-object memo (one forward)
class _Memo:
    """Results computed from a tensor, kept while that tensor object lives (weakly referenced), at most
    ``size`` of them. For tensors built once per forward and shared by every layer (masks, rotary rows);
    a tensor changed in place after its first use would be served a stale entry."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, t: torch.Tensor):
        hit = self.entries.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def put(self, t: torch.Tensor, value) -> None:
        self.entries = {k: e for k, e in self.entries.items() if e[0]() is not None}
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[id(t)] = (weakref.ref(t), value)


_rotary_memo = _Memo()
_mask_memo = _Memo()
_RANGES: dict[int, tuple] = {}   # id(mask) -> (mask, kv_start, seq_lens, window): see kv_ranges


@contextlib.contextmanager
def kv_ranges(*entries):
    """Declare decode masks by their key ranges: each entry is ``(mask, kv_start, seq_lens, window)``
    meaning mask[b, 0, 0, j] == (kv_start[b] <= j < seq_lens[b] and j >= seq_lens[b] - window). Within the
    block :func:`attention` uses these device tensors for those masks instead of reading the mask (no host
    sync, fixed shapes: what a captured CUDA graph needs). The caller keeps the mask consistent."""
    added = []
    for mask, kv_start, seq_lens, window in entries:
        if mask is not None:
            _RANGES[id(mask)] = (mask, kv_start, seq_lens, window)
            added.append(id(mask))
    try:
        yield
    finally:
        for key in added:
            _RANGES.pop(key, None)


# ----------------------------------------------------------------------- the ops
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See :func:`reference.rms_norm`."""
    if not _triton(x):
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            y = cpu_gemv.rms_norm(x, weight, eps)    # decode-sized bf16 rows: one C call
            if y is not None:
                return y
        return reference.rms_norm(x, weight, eps)
    from lightning_dsinfer.kernels.rms_norm import rms_norm as kernel
    _count("rms_norm", "triton")
    return kernel(x, weight, eps)


def projection_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        eps: float, reduce=None, ranks: int = 1):
    """See :func:`reference.projection_rms_norm` (OLMo 2's q / k norms over the whole projection): on one rank two
    :func:`rms_norm` calls (the Triton kernel takes the strided column views); split over ranks, the torch ops around
    the all-reduce of the sums of squares, on every path (there is no kernel for it)."""
    if reduce is None:
        return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    if _triton(q):
        _count("projection_rms_norm", "reference:tensor-parallel")
    return reference.projection_rms_norm(q, k, q_weight, k_weight, eps, reduce, ranks)


def fuses_residual(x: torch.Tensor) -> bool:
    """Whether residual adds for tensors like ``x`` belong in the norm that follows (:func:`add_rms_norm`, one
    kernel: the Triton path) rather than in the output projection's GEMM (the CPU path, where oneDNN fuses the
    add into the GEMM). The engine's blocks ask this once per call and place the add accordingly."""
    return _triton(x)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """See :func:`reference.add_rms_norm`: returns (rms_norm(x + residual), x + residual); inputs untouched."""
    if not _triton(x):
        return reference.add_rms_norm(x, residual, weight, eps)
    n = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype or weight.shape != (n,) or n > _NORM_MAX_FEATURES:
        _count("add_rms_norm", "reference:layout")
        return reference.add_rms_norm(x, residual, weight, eps)
    from lightning_dsinfer.kernels.rms_norm import rms_norm as kernel
    _count("add_rms_norm", "triton")
    return kernel(x, weight, eps, residual=residual)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with weight and bias (the GPT families' norms); in fp32, rounded once: torch's
    own ``layer_norm`` on the CPU (as HF runs it; decode-sized bf16 rows: one C call, within a bf16 ulp of it),
    ``kernels/layer_norm.py`` on the Triton path."""
    if not _triton(x):
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            y = cpu_gemv.layer_norm(x, weight, bias, eps)    # decode-sized bf16 rows: one C call
            if y is not None:
                return y
        return torch.nn.functional.layer_norm(x, weight.shape, weight, bias, eps)
    from lightning_dsinfer.kernels.layer_norm import layer_norm as kernel
    _count("layer_norm", "triton")
    return kernel(x, weight, bias, eps)


def act(x: torch.Tensor, name: str) -> torch.Tensor:
    """A plain MLP's activation (gelu | gelu_tanh | relu | silu) over x: torch's op in x's dtype on the CPU (fp32
    inside, one rounding, as HF; decode-sized bf16 rows: one C call), ``kernels/activations.bias_act`` on the Triton
    path. relu2 (Arcee's and NemotronH's ReLU squared) has no Triton kernel: the C call on the CPU, torch's ops on
    CUDA."""
    if not _triton(x) or name == "relu2":
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            y = cpu_gemv.act(x, name)                # decode-sized bf16 rows: one C call
            if y is not None:
                return y
        if _triton(x):
            _count("act", "reference:relu2")
        return reference.act(x, name)
    from lightning_dsinfer.kernels.activations import bias_act
    _count("act", "triton")
    return bias_act(x, None, name)


_plain_act = act          # (moe_mlp's ``act`` parameter hides this module's function)


def gated_act(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """A gated MLP's activation: SwiGLU (:func:`silu_and_mul`) or GeGLU (``act`` gelu_tanh / gelu; one kernel on the
    Triton path, in fp32; on the CPU in the rows' dtype, as HF rounds: act(gate), then the product; ~4x faster in
    bf16 than widening the whole [rows, 2I] to fp32)."""
    if act == "silu":
        return silu_and_mul(gate_up)
    if not _triton(gate_up):
        if gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu":
            y = cpu_gemv.gated_act(gate_up, act)     # decode-sized bf16 rows: one C call (the C decode step's)
            if y is not None:
                return y
        return reference.gelu_and_mul(gate_up, "tanh" if act == "gelu_tanh" else "none")
    from lightning_dsinfer.kernels.activations import gated_act as kernel
    _count("gated_act", "triton")
    return kernel(gate_up, None, act)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """See :func:`reference.silu_and_mul`."""
    if not _triton(gate_up):
        if gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu":
            y = cpu_gemv.silu_and_mul(gate_up)     # decode-sized bf16 rows: one C call
            if y is not None:
                return y
        return reference.silu_and_mul(gate_up)
    from lightning_dsinfer.kernels.activations import gated_act
    _count("silu_and_mul", "triton")
    return gated_act(gate_up, None, "silu")


def gated_delta_step(proj: torch.Tensor, history: torch.Tensor, conv: torch.Tensor, a_log: torch.Tensor,
                     dt_bias: torch.Tensor, state: torch.Tensor, key_heads: int, key_dim: int,
                     beta_scale: float = 1.0) -> torch.Tensor:
    """A Gated DeltaNet decode step on the Triton path (``kernels/gated_delta.py``): proj [B, W] one token's in_proj
    row (q | k | v | z | b | a), the convolution history [B, C, K - 1] and the fp32 state [B, Hv, Dk, Dv] (both
    updated in place); beta = sigmoid(b) x ``beta_scale``. Returns the rule's read-out [B, Hv, Dv] in proj's dtype (the
    module norms and gates it). The reference: the module's torch ops (``modules/gated_deltanet.py``)."""
    from lightning_dsinfer.kernels.gated_delta import conv_step, delta_step

    hv, dv = state.shape[1], state.shape[3]
    c = history.shape[1]
    _count("gated_delta", "triton")
    qkv = conv_step(proj[:, :c], history, conv)
    return delta_step(qkv, proj[:, c + hv * dv:], a_log, dt_bias, state, key_heads, key_dim, beta_scale)


def short_conv_step(proj: torch.Tensor, history: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
    """LFM2's gated short convolution for a decode step on the Triton path (``kernels/gated_delta.short_conv_step``):
    proj [B, 3C] one token's in_proj row (B | C | x), the history [B, C, K - 1] (updated in place). Returns [B, C]."""
    from lightning_dsinfer.kernels.gated_delta import short_conv_step as kernel

    _count("short_conv", "triton")
    return kernel(proj, history, conv)


def mamba2_step(proj: torch.Tensor, history: torch.Tensor, conv: torch.Tensor, conv_bias: torch.Tensor | None,
                dt_bias: torch.Tensor, a_log: torch.Tensor, d: torch.Tensor, norm: torch.Tensor, state: torch.Tensor,
                groups: int, eps: float, limit: tuple[float, float]) -> torch.Tensor:
    """A Mamba-2 decode step on the Triton path (``kernels/mamba2.py``): proj [B, W] one token's in_proj row (z [I] |
    x B C [C] | dt [H]), the convolution history [B, C, K - 1] and the fp32 state [B, H, P, N] (both updated in
    place). Returns the gated norm's output [B, I] in proj's dtype (out_proj's input). The reference: the module's
    torch ops (``modules/gated_deltanet.Mamba2Mixer``)."""
    from lightning_dsinfer.kernels.gated_delta import conv_step
    from lightning_dsinfer.kernels.mamba2 import gated_norm, ssm_step

    _, h, p, _ = state.shape
    inner, c = h * p, history.shape[1]
    _count("mamba2", "triton")
    xbc = conv_step(proj[:, inner:inner + c], history, conv, conv_bias)
    y = ssm_step(xbc, proj[:, inner + c:], dt_bias, a_log, d, state, groups, limit)
    return gated_norm(y, proj, norm, groups, eps)


def mamba1_scan(x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, bc: torch.Tensor, dt_bias: torch.Tensor,
                a_log: torch.Tensor, d: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Mamba-1's selective scan over a call's tokens on the Triton path (``kernels/mamba1.py``; shapes there), the
    state updated in place. The reference: the module's torch recurrence (``modules/gated_deltanet.Mamba1Mixer``)."""
    from lightning_dsinfer.kernels.mamba1 import scan

    _count("mamba1", "triton")
    return scan(x, z, dt, bc, dt_bias, a_log, d, state)


def clamped_swiglu(gate_up: torch.Tensor, act: reference.ClampedSwiGLU) -> torch.Tensor:
    """gpt-oss's expert activation ``act(gate_up)`` (:class:`reference.ClampedSwiGLU`): on the Triton path
    ``kernels/activations.clamped_swiglu`` (fp32 inside, one rounding), else the reference (each op in the rows'
    dtype, as HF)."""
    if not _triton(gate_up):
        return act(gate_up)
    from lightning_dsinfer.kernels.activations import clamped_swiglu as kernel
    _count("clamped_swiglu", "triton")
    return kernel(gate_up, act.alpha, act.limit)


def moe_mlp(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
            renormalize: bool = True, weights_in_dtype: bool = False, gate_up_scale: torch.Tensor | None = None,
            down_scale: torch.Tensor | None = None, first_expert: int = 0, routing: reference.Routing | None = None,
            router_bias: torch.Tensor | None = None, gate_up_bias: torch.Tensor | None = None,
            down_bias: torch.Tensor | None = None, act=None, experts_x: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`reference.moe_mlp`. On the Triton path: routing with mapping tables (``kernels/moe_routing.py``:
    top-k, per-expert counts, offsets and the token permutation), the experts' gate|up as one grouped GEMM over the
    permuted tokens (``kernels/moe_gemm.py``), SwiGLU, the down grouped GEMM with the routing weights as row
    scales, and the k rows of each token summed. int8 experts (``gate_up_scale`` [E, 2I], ``down_scale`` [E, H]): the
    grouped GEMMs widen the int8 tiles and apply the row scales. Expert parallelism (gate_up / down hold the
    router's experts [first_expert, first_expert + E_local)): routing over all experts, the grouped GEMMs over this
    rank's segment of the routing tables, the other assignments' rows zero. DeepSeek's routers (``routing``: groups,
    correction bias, fp32 router) choose in torch (:func:`reference.moe_topk`), the tables then by kernel. gpt-oss's
    experts: ``gate_up_bias`` / ``down_bias`` added in the grouped GEMMs' epilogues (down's before the routing weight),
    the clamped SwiGLU ``act`` through :func:`clamped_swiglu`; experts without a gate (``reference.PlainAct``) their
    activation through :func:`act` between the grouped GEMMs; GeGLU experts (``reference.GatedAct``, Gemma 4) the
    gated-activation kernel; any other ``act`` runs the reference (counted
    ``reference:act``), as do dtypes the kernels do not take (counted ``reference:dtype``). Llama 4's router
    (``routing.input_scaled``): the gate|up GEMM reads each assignment's w * x row, the down GEMM is not scaled."""
    int8 = gate_up_scale is not None
    clamped = isinstance(act, reference.ClampedSwiGLU)
    plain = isinstance(act, reference.PlainAct)     # (NemotronH: experts without a gate, gate_up their up rows)
    geglu = isinstance(act, reference.GatedAct)     # (Gemma 4: GeGLU experts)
    why = None
    if _triton(x):
        why = ("act" if act is not None and not clamped and not plain and not geglu
               else "dtype" if (x.dtype != router.dtype and routing is None) or (x.dtype != gate_up.dtype and not int8)
               else None)
    if not _triton(x) or why:
        if why:
            _count("moe_mlp", "reference:" + why)
            if clamped:
                act = functools.partial(clamped_swiglu, act=act)
        return reference.moe_mlp(x, router, gate_up, down, top_k, renormalize, weights_in_dtype, gate_up_scale,
                                 down_scale, first_expert, routing, router_bias, gate_up_bias, down_bias, act,
                                 experts_x)
    from lightning_dsinfer.kernels.activations import gated_act
    from lightning_dsinfer.kernels.moe_gemm import moe_gemm
    from lightning_dsinfer.kernels.moe_routing import moe_route, moe_tables
    _count("moe_mlp", "triton")
    t = x.shape[0]
    if routing is not None:
        w, ids = reference.moe_topk(x, router, top_k, routing=routing, bias=router_bias)
        _, offsets, sorted_ids, _ = moe_tables(ids, router.shape[0])
    else:
        w, _, _, offsets, sorted_ids, _ = moe_route(linear(x, router), top_k, "softmax", renormalize)
    if weights_in_dtype:
        w = w.to(x.dtype)
    local = gate_up.shape[0]
    partial = local != router.shape[0]          # expert parallelism: this rank's segment of the tables
    offsets = offsets[first_expert:first_expert + local + 1]
    # (expert parallelism: other ranks' rows of the gate|up product stay zero, so SwiGLU sees no stale memory there;
    # the down GEMM reads this rank's rows only)
    gu = torch.zeros(sorted_ids.numel(), gate_up.shape[1], dtype=x.dtype, device=x.device) if partial else None
    xe = x if experts_x is None else experts_x      # (latent experts read experts_x's rows)
    scaled = reference.input_scaled(routing)         # Llama 4: each assignment's row is w * x, rounded to x's dtype
    if scaled:
        xe = (xe[:, None, :] * w[:, :, None].to(x.dtype)).reshape(t * top_k, -1)
    gu = moe_gemm(xe, gate_up, sorted_ids, offsets, 1 if scaled else top_k, weight_scale=gate_up_scale, out=gu,
                  bias=gate_up_bias)
    h = clamped_swiglu(gu, act) if clamped else _plain_act(gu, act.name) if plain else \
        gated_act(gu, None, act.name if geglu else "silu")
    out = torch.zeros(sorted_ids.numel(), down.shape[1], dtype=x.dtype, device=x.device) if partial else None
    y = moe_gemm(h, down, sorted_ids, offsets, 1, row_scale=None if scaled else w.reshape(-1),
                 weight_scale=down_scale, out=out, bias=down_bias)   # [T * k, H]: other ranks' assignments stay zero
    return y.view(t, top_k, -1).sum(1, dtype=torch.float32).to(x.dtype)


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor):
    """Per-token rows [B, T, 1, R] -> tables [B*T, R/2] (fp32) and positions [B, T] = b * T + t."""
    hit = _rotary_memo.get(cos)
    if hit is not None and hit[0] is sin:
        return hit[1]
    b, t, _, d = cos.shape
    half = d // 2
    tables = (cos.reshape(b * t, d)[:, :half].float().contiguous(),
              sin.reshape(b * t, d)[:, half:].float().contiguous(),
              torch.arange(b * t, device=cos.device).view(b, t))
    _rotary_memo.put(cos, (sin, tables))
    return tables


def _rotary_rows(cos: torch.Tensor, shape) -> bool:
    """cos is the engine's per-token rows [B, T, 1, R] for heads of shape [B, T, H, D], R even and <= D."""
    return cos.dim() == 4 and cos.shape[:3] == (shape[0], shape[1], 1) and cos.shape[3] % 2 == 0 \
        and 0 < cos.shape[3] <= shape[3]


def rotary_half(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """See :func:`reference.rotary_half`."""
    if not _triton(x):
        return reference.rotary_half(x, cos, sin_signed)
    if x.dim() != 4 or x.shape[-1] % 2 or x.stride(-1) != 1 or not _rotary_rows(cos, x.shape) \
            or sin_signed.shape != cos.shape:
        _count("rotary_half", "reference:layout")
        return reference.rotary_half(x, cos, sin_signed)
    from lightning_dsinfer.kernels.rotary import rotary_qkv
    _count("rotary_half", "triton")
    cos_t, sin_t, pos = _rotary_tables(cos, sin_signed)
    out, _, _ = rotary_qkv(x, x[:, :, :0], cos_t, sin_t, pos, rotary_dim=cos.shape[-1])   # every head as a "q" head
    return out


_COLUMNS: dict[tuple, torch.Tensor] = {}


def _column(device: torch.device, col: int) -> torch.Tensor:
    """An int32 [1] tensor holding ``col`` (read-only; kept for the next call, so the layers of one step, and later
    steps' layers, do not each fill a new tensor: a kernel launch per call on a GPU)."""
    key = (device, col)
    t = _COLUMNS.get(key)
    if t is None:
        if len(_COLUMNS) >= 4096:
            _COLUMNS.clear()
        t = _COLUMNS[key] = torch.full((1,), col, dtype=torch.int32, device=device)
    return t


def rotary_write_kv(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, col=0,
                    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0):
    """See :func:`reference.rotary_write_kv`. On the Triton path q and k are new contiguous tensors and v is
    the view of qkv, as in the reference."""
    if not _triton(qkv):
        if qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu":   # decode-sized: C (norms, rotary, K/V write)
            out = cpu_gemv.rotary_write_kv(qkv, num_heads, cos, sin_signed, k_cache, v_cache, col, q_norm, k_norm, eps)
            if out is not None:
                return out
        return reference.rotary_write_kv(qkv, num_heads, cos, sin_signed, k_cache, v_cache, col, q_norm, k_norm, eps)
    args = (qkv, num_heads, cos, sin_signed, k_cache, v_cache, col, q_norm, k_norm, eps)
    if qkv.dim() != 4 or qkv.shape[-1] % 2 or qkv.stride(-1) != 1 or (qkv.shape[2] - num_heads) % 2 \
            or not _rotary_rows(cos, qkv.shape) or sin_signed.shape != cos.shape:
        _count("rotary_write_kv", "reference:layout")
        return reference.rotary_write_kv(*args)
    b, t, heads, d = qkv.shape
    hq, hkv = num_heads, (heads - num_heads) // 2
    if k_cache is not None and (k_cache.dtype != v_cache.dtype or k_cache.stride() != v_cache.stride()
                                or k_cache.stride(-1) != 1 or k_cache.shape != v_cache.shape
                                or k_cache.shape[:2] != (b, hkv) or k_cache.shape[3] != d
                                or (isinstance(col, torch.Tensor) and (t != 1 or col.numel() != 1))):
        _count("rotary_write_kv", "reference:cache")
        return reference.rotary_write_kv(*args)
    if k_cache is not None and not isinstance(col, torch.Tensor) and not 0 <= col <= k_cache.shape[2] - t:
        raise ValueError(f"rotary_write_kv: columns [{col}, {col + t}) outside the cache's {k_cache.shape[2]}")
    from lightning_dsinfer.kernels.rotary import rotary_qkv
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    if q_norm is not None:   # Qwen3: per-head RMSNorm of q and k first
        from lightning_dsinfer.kernels.rms_norm import rms_norm as norm_kernel
        q, k = norm_kernel(q, q_norm, eps), norm_kernel(k, k_norm, eps)
    _count("rotary_write_kv", "triton")
    cos_t, sin_t, pos = _rotary_tables(cos, sin_signed)
    r = cos.shape[-1]
    if k_cache is None:
        q, k, _ = rotary_qkv(q, k, cos_t, sin_t, pos, v, rotary_dim=r)
        return q, k, v
    start = (col if isinstance(col, torch.Tensor) else _column(qkv.device, col)).expand(b)   # no copy, no fill
    q, k, _ = rotary_qkv(q, k, cos_t, sin_t, pos, v, rotary_dim=r, k_cache=k_cache, v_cache=v_cache,
                         cache_start=start)
    return q, k, v


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`reference.linear`: ``x @ weight.T (+ bias) (+ residual)``, weight [N, K] (torch layout).

    Small-batch (SBI) GEMM for decode; which calls take the kernel is in the module docstring.
    """
    if not _triton(x):
        return reference.linear(x, weight, bias, residual)
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        why = "torch:dtype"
    elif not 0 < m <= SMALL_GEMM_MAX_M:
        why = "torch:large_m"
    elif weight.dim() != 2 or weight.stride(-1) != 1 or (bias is not None and bias.dtype != x.dtype) \
            or (residual is not None and residual.dtype != x.dtype):
        why = "torch:layout"
    else:
        from lightning_dsinfer.kernels.small_gemm import small_gemm
        _count("linear", "triton")
        return small_gemm(x, weight, bias, residual)
    _count("linear", why)
    return reference.linear(x, weight, bias, residual)


def norm_linear(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                gated: bool = False):
    """``(linear(rms_norm(h + delta)), h + delta)`` (delta None: h as it is), silu-gated when ``gated`` (weight
    [2N, K] = gate rows then up rows: ``silu_and_mul`` of the product), in one small-GEMM kernel
    (``kernels/small_gemm.py``'s norm prologue and gated epilogue): float weights in x's dtype or int8 with its
    per-row ``scale``, decode-sized rows (M <= SMALL_GEMM_MAX_M) on the Triton path. Returns None where the kernel
    does not take the call (then the caller runs the norm, the linear and the activation as separate ops). The
    GEMV kernel (M <= 8) multiplies the normalised input in fp32, unrounded; the tensor-core kernel rounds it to the
    dtype once, as the unfused norm does."""
    x = h if delta is None else delta
    if not _triton(x):
        return None
    if not _GEMM_FUSION:
        _count("norm_linear", "torch:off")
        return None
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not 0 < m <= SMALL_GEMM_MAX_M:
        why = "torch:large_m"
    elif x.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or weight.dtype != (torch.int8 if scale is not None else x.dtype):
        why = "torch:dtype"
    elif weight.dim() != 2 or weight.stride(-1) != 1 or norm_weight.shape != (k,) \
            or (bias is not None and bias.dtype != x.dtype) \
            or (delta is not None and (delta.shape != h.shape or delta.dtype != h.dtype)):
        why = "reference:layout"
    else:
        from lightning_dsinfer.kernels.small_gemm import small_gemm, small_gemm_int8
        _count("norm_linear", "triton")
        kw = dict(add=None if delta is None else h, norm=(norm_weight, eps), gated=gated)
        out = small_gemm_int8(x, weight, scale, bias, **kw) if scale is not None else small_gemm(x, weight, bias, **kw)
        return out if delta is not None else (out, h)
    _count("norm_linear", why)
    return None


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T (+ bias) (+ residual)``: int8 [N, K] weight, fp32 per-row scale. The
    Triton small-batch int8 GEMM (dequantisation fused in) for M <= 32 bf16 / fp16 rows; else the weight is
    dequantised in x's dtype for the call."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if _triton(x) and x.dtype in (torch.bfloat16, torch.float16) and 0 < m <= SMALL_GEMM_MAX_M \
            and (bias is None or bias.dtype == x.dtype) and (residual is None or residual.dtype == x.dtype):
        from lightning_dsinfer.kernels.small_gemm import small_gemm_int8
        _count("linear_int8", "triton")
        return small_gemm_int8(x, qweight, scale, bias, residual)
    _count("linear_int8", "torch:dequantise")
    weight = reference.dequantize_int8(qweight, scale)
    return reference.linear(x, weight if x.dtype == torch.float32 else weight.to(x.dtype), bias, residual)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                dequantise: bool = False) -> torch.Tensor:
    """``x @ reference.dequantize_int4(packed, scale, group_size).T (+ bias) (+ residual)``: packed uint8 [N, K / 2],
    fp32 group scales [N, K / group_size]. The Triton small-batch int4 GEMM (dequantisation fused into the tile load)
    for M <= 32 rows (fp32 / bf16 / fp16) with a power-of-two group of at least 32; else (or ``dequantise``) the
    weight is dequantised in torch, in x's dtype, for the call."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not _triton(x):
        why = None
    elif dequantise:
        why = "torch:dequantise"
    elif x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        why = "torch:dtype"
    elif not 0 < m <= SMALL_GEMM_MAX_M:
        why = "torch:large_m"
    elif group_size < 32 or group_size & (group_size - 1) or (bias is not None and bias.dtype != x.dtype) \
            or (residual is not None and residual.dtype != x.dtype):
        why = "torch:layout"
    else:
        from lightning_dsinfer.kernels.small_gemm import small_gemm_int4
        _count("linear_int4", "triton")
        return small_gemm_int4(x, packed, scale, group_size, bias, residual)
    if why is not None:
        _count("linear_int4", why)
    weight = reference.dequantize_int4(packed, scale, group_size)
    return reference.linear(x, weight if x.dtype == torch.float32 else weight.to(x.dtype), bias, residual)


def _decode_ranges(mask: torch.Tensor, b: int, length: int):
    """kv_start [B] int32 when every row of mask [B|1, 1, 1, L] is one run [kv_start, L), else None."""
    hit = _mask_memo.get(mask)
    if hit is not None:
        return hit
    m = mask.reshape(mask.shape[0], length)
    start = m.int().argmax(-1)                                                 # first visible column
    cols = torch.arange(length, device=m.device)
    ok = torch.equal(cols[None, :] >= start[:, None], m)                       # host sync
    res = ("ok", start.to(torch.int32).expand(b).contiguous()) if ok else ("holes", None)
    _mask_memo.put(mask, res)
    return res


def _prefill_ranges(mask: torch.Tensor, b: int, t: int, length: int):
    """(kv_start [B] int32, window, pad rows [B, T] bool or None) when mask [B|1, 1, T, L] is the engine's
    left-padding mask with query i at column c = L - T + i; else None. See the module docstring."""
    hit = _mask_memo.get(mask)
    if hit is not None:
        return hit
    m = mask.reshape(mask.shape[0], t, length)
    c = torch.arange(length - t, length, device=m.device)[:, None]             # [T, 1] query columns
    j = torch.arange(length, device=m.device)[None, :]                         # [1, L]
    own = c == j                                                               # [T, L]
    seen = (m & ~own).any(dim=1)                                               # key j seen by another query
    p = torch.where(seen.any(-1), seen.int().argmax(-1), length - 1)           # [B|1]
    last_row = m[:, t - 1].sum(-1)                                             # keys the last query sees
    p_list, cnt = torch.stack((p, last_row)).tolist()                          # host sync
    cut = [n for pb, n in zip(p_list, cnt) if n < length - pb]
    window = min(cut) if cut else None
    keep = (j[None] >= p[:, None, None]) & (j <= c)[None]
    if window is not None:
        keep &= (j > c - window)[None]
    if not torch.equal(keep | own, m):                                         # host sync
        res = ("holes", None)
    else:
        start = p.to(torch.int32).expand(b).contiguous()
        pad = (c[:, 0][None, :] < start[:, None]) if max(p_list) > length - t else None
        res = ("ok", (start, window, pad))
    _mask_memo.put(mask, res)
    return res


# The decode kernel's limits: kernels/decode_attention's MAX_GROUP, NARROW_HEAD_DIM, MAX_HEAD_DIM, MAX_VALUE_DIM (not
# imported: that module imports Triton)
_DECODE_MAX_GROUP, _DECODE_NARROW_D, _DECODE_MAX_D, _DECODE_MAX_DV = 128, 256, 1024, 512


def _decode_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q [B, Hq, T, D] over k [B, Hkv, L, D], v [B, Hkv, L, DV] is a call the decode kernel takes."""
    hq, t, d = q.shape[1:]
    hkv, dv = k.shape[1], v.shape[-1]
    return (t == 1 and d <= _DECODE_MAX_D and dv <= d and (d <= _DECODE_NARROW_D or dv <= _DECODE_MAX_DV)
            and hq % hkv == 0 and hq // hkv <= _DECODE_MAX_GROUP and q.dtype == k.dtype and q.dtype == v.dtype)


def _key_prefix(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether v is a view of k's first columns, ``k[..., :dv]`` (the latent attention's values)."""
    return v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and v.shape[:-1] == k.shape[:-1]


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, softcap: float | None = None, alibi: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`reference.attention`; which masks the kernels take is in the module docstring. Soft-capped
    scores (Gemma 2) and ALiBi (BLOOM) go to the decode kernel, else to the reference (the prefill kernel has neither;
    the C decode attention takes both: bf16 CPU decode steps). Attention sinks (gpt-oss) go where the call would go
    without them: the decode and prefill kernels and the C decode attention take them; the CPU path's other calls
    (prompts, fp32) run the reference, counted ``reference:sinks``. Values narrower than the keys: the prefill kernel
    and the decode kernel take them; on the CPU path a view of the keys' first columns runs as the whole keys."""
    if v.shape[-1] < k.shape[-1] and not _triton(q) and _key_prefix(k, v):
        return attention(q, k, k, mask, scale, softcap, alibi, sinks)[..., :v.shape[-1]]
    if softcap is not None or alibi is not None:
        b, t = q.shape[0], q.shape[2]
        if _triton(q) and _decode_fits(q, k, v):
            return _decode(q, k, v, mask, scale, b, k.shape[2], softcap, alibi, sinks)
        if not _triton(q) and t == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            out = cpu_gemv.decode_attention(q, k, v, mask, scale, softcap, sinks, alibi)   # bf16 decode: one C call
            if out is not None:
                return out
        _count("attention", "reference:softcap" if alibi is None else "reference:alibi")
        return reference.attention(q, k, v, mask, scale, softcap, alibi, sinks)
    if not _triton(q):
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[2] == 1:
            out = cpu_gemv.decode_attention(q, k, v, mask, scale, sinks=sinks)   # bf16 decode: one C call
            if out is not None:
                return out
        if sinks is not None:
            _count("attention", "reference:sinks")
        elif v.shape[-1] < q.shape[-1]:   # (torch's CPU flash attention takes one head width; else its math path,
            dv = v.shape[-1]              # ~5x slower: values zero-padded to the keys' width, the output cut back)
            return reference.attention(q, k, torch.nn.functional.pad(v, (0, q.shape[-1] - dv)), mask, scale)[..., :dv]
        return reference.attention(q, k, v, mask, scale, sinks=sinks)
    b, hq, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    dv = v.shape[-1]       # (the prefill kernel takes values of another width: DeepSeek's expanded form)
    if t == 1 and _decode_fits(q, k, v):
        return _decode(q, k, v, mask, scale, b, length, sinks=sinks)
    if (t == 1 or max(d, dv) > 256 or hq % hkv or hq // hkv > 128 or q.dtype != k.dtype
            or q.dtype != v.dtype):
        _count("attention", "reference:shape")
        return reference.attention(q, k, v, mask, scale, sinks=sinks)
    if mask is None or mask.dtype != torch.bool or length < t:
        _count("attention", "reference:mask")
        return reference.attention(q, k, v, mask, scale, sinks=sinks)
    kind, ranges = _prefill_ranges(mask, b, t, length)
    if kind != "ok":      # (Llama 4's chunked layers' prompts; masks with holes)
        _count("attention", "reference:mask")
        return _reference_by_query_blocks(q, k, v, mask, scale, sinks)
    from lightning_dsinfer.kernels.prefill_attention import prefill_attention
    _count("attention", "triton")
    start, window, pad = ranges
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # [B, T, H, D] views
    out = prefill_attention(qt, kt, vt, scale, kv_start=start, window=window, sinks=sinks)
    if pad is not None:   # padding queries see only themselves: their output is their own V row
        own_v = vt[:, length - t:].repeat_interleave(hq // hkv, dim=2)
        if sinks is not None:   # ... weighted by sigmoid(own score - sink), the sink's column taking the rest
            own_k = kt[:, length - t:].repeat_interleave(hq // hkv, dim=2)
            own_s = (qt * own_k).sum(-1, dtype=torch.float32) * scale                      # [B, T, Hq]
            own_v = (own_v.float() * torch.sigmoid(own_s - sinks.float())[..., None]).to(v.dtype)
        out = torch.where(pad[:, :, None, None], own_v, out)
    return out.transpose(1, 2)


# What the Triton path's reference fallback for a prompt may hold at once: the scores (or the float mask the fused
# SDPA kernels take) of one block of queries over its keys, fp32
FALLBACK_SCORE_BYTES = 1 << 28


def _reference_by_query_blocks(q, k, v, mask, scale, sinks=None):
    """:func:`reference.attention` over blocks of queries, each over the keys up to its last query's column (the later
    ones are masked for all of them: causal) or, where the mask lets a query see later keys (a vision-language
    prompt's image blocks), up to the last one it sees, so the fallback's temporaries stay within
    ``FALLBACK_SCORE_BYTES`` for any prompt length (one call over a prompt of T queries and L keys would hold
    B x H x T x L of them)."""
    b, h, t, _ = q.shape
    length = k.shape[2]
    rows = max(1, FALLBACK_SCORE_BYTES // max(1, b * h * length * 4))
    if rows >= t:
        return reference.attention(q, k, v, mask, scale, sinks=sinks)
    outs = []
    for a in range(0, t, rows):
        e = min(t, a + rows)
        end = length - t + e                   # (query i sits at column length - t + i)
        later = mask[:, :, a:e, end:].any(2).any(1).any(0)       # [length - end]: keys past the causal end seen
        if bool(later.any()):
            end += int(later.nonzero()[-1]) + 1
        outs.append(reference.attention(q[:, :, a:e], k[:, :, :end], v[:, :, :end], mask[:, :, a:e, :end], scale,
                                        sinks=sinks))
    return torch.cat(outs, dim=2)


def _decode(q, k, v, mask, scale, b, length, softcap=None, alibi=None, sinks=None):
    from lightning_dsinfer.kernels.decode_attention import decode_attention

    window = None
    if mask is None:
        kv_start, seq_lens = None, _column(q.device, length).expand(b)
    elif mask.dtype != torch.bool:
        _count("attention", "reference:mask")
        return reference.attention(q, k, v, mask, scale, softcap, alibi, sinks)
    elif id(mask) in _RANGES and _RANGES[id(mask)][0] is mask:
        _, kv_start, seq_lens, window = _RANGES[id(mask)]
    else:
        kind, kv_start = _decode_ranges(mask, b, length)
        if kind != "ok":
            _count("attention", "reference:mask")
            return reference.attention(q, k, v, mask, scale, softcap, alibi, sinks)
        seq_lens = _column(q.device, length).expand(b)
    _count("attention", "triton")
    out = decode_attention(q[:, :, 0], _unit_stride(k), _unit_stride(v), seq_lens, scale, kv_start=kv_start,
                           window=window, softcap=softcap, alibi_slopes=alibi, sinks=sinks)
    return out.unsqueeze(2)


__all__ = ["rms_norm", "add_rms_norm", "layer_norm", "act", "norm_linear", "fuses_residual", "uses_triton", "rotary_half", "rotary_write_kv",
           "silu_and_mul", "gated_act", "clamped_swiglu", "moe_mlp", "attention", "linear", "linear_int8",
           "linear_int4", "SMALL_GEMM_MAX_M", "force_triton", "gemm_fusion", "kv_ranges", "dispatch_counts"]
