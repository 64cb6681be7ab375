"""Small-batch GEMM / GEMV ("SBI-GeMM"): y = x @ W.T (+ bias) (+ residual) for M = 1..32 rows.

At decode the weights dominate the bytes moved, so both kernels stream W once: a program owns a
BLOCK_N slice of outputs and one split of K (split-K keeps every SM busy when N / BLOCK_N is small).
Two kernels: ``_gemv_kernel`` for M <= 8 (no tensor cores: each weight tile, widened to fp32, is multiplied into
an fp32 accumulator the shape of the tile and reduced once at the end, so a program is only loads and FMAs) and
``_small_gemm_kernel`` for M <= 32 (``tl.dot`` on one BLOCK_M tile of rows). Which kernel and which tile sizes a
call uses comes from a table measured on the device (``kernels/configs/<device>.json``, written by
``benchmarks/tune_gemm.py``) when it has the shape, else from :func:`heuristic_config`. Weights: fp32 / fp16 / bf16
[N, K] (torch Linear layout), int8 per output channel (scale [N]), or int4 group-wise (two nibbles per byte,
scale [N, K / group]) with the dequantisation fused into the tile load (integer tile -> activation dtype, scale applied per
tile / at the end). Split-K partials go to an fp32 workspace; the split that finishes a tile last (a semaphore per
tile, left at zero for the next launch) sums them and runs the epilogue, so a call is one kernel.

Deep-Fusion forms (float / int8 weights, both kernels):

- norm prologue (``norm=(weight, eps)``, optionally ``add=``): the input is RMSNorm(x (+ add)); with ``add`` the
  sum is rounded to x's dtype and returned as the new residual stream (written once). The GEMV kernel gathers the
  row's sum of squares while K streams by and scales the finished fp32 product by 1 / rms (it is linear in x), so
  the norm costs no pass of its own; the tensor-core kernel, whose input is rounded to x's dtype, first reads the
  rows once (M x K, from L2) for 1 / rms and normalises each tile before that rounding (as the unfused norm's
  output is rounded; u * w alone can overflow fp16). Either way the norm kernel before the QKV and gate/up GEMMs
  disappears.
- gated epilogue (``gated=True``, weight [2N, K] = gate rows then up rows): out = silu(gate) * up, each program
  reading its gate rows and the matching up rows, so the [M, 2N] product is never stored.

References: :func:`~lightning_dsinfer.kernels.reference.small_gemm` / ``reference.norm_small_gemm`` with
``reference.dequantize_int8`` / ``reference.dequantize_int4``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels._common import dot, ieee_dot, interpreting, semaphores

_FLOAT, _INT8, _INT4 = 0, 1, 2
GEMV_MAX_M = 8          # rows up to which _gemv_kernel can be used (its fp32 accumulator is ROWS x BLOCK_N x BLOCK_K)
_ACC_PER_THREAD = 64    # fp32 accumulator registers per thread the GEMV tiles are sized to
GEMV_MAX_N = {0: 4096, 1: 8192}   # float / int8 weights: outputs up to which the heuristic picks the GEMV kernel


@triton.jit
def _input_tile(xt, a_ptrs, h_ptrs, nw, mask, store_h, ss, HAS_ADD: tl.constexpr, NORM: tl.constexpr):
    """The norm prologue on one K tile xt (fp32) of the GEMM input. HAS_ADD: u = x + add, rounded to the stream's
    dtype (what an unfused model stores as its residual stream; the programs with ``store_h`` write it to h).
    NORM: u's squares added to ``ss`` (same shape as the tile; the row's rstd is applied to the finished
    product, which is linear in x) and u times the norm weight tile ``nw`` returned."""
    if HAS_ADD:
        u = (xt + tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)).to(h_ptrs.dtype.element_ty)
        if store_h:
            tl.store(h_ptrs, u, mask=mask)
        xt = u.to(tl.float32)
    if NORM:
        ss += xt * xt
        xt = xt * nw
    return xt, ss


@triton.jit
def _finish(y, y2, ss, rm, mm, rn, mn, s_ptr, b_ptr, r_ptr, r_sm, out_ptr, M, N, K, eps,
            WMODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr,
            GATED: tl.constexpr):
    """The epilogue of a whole (all of K) fp32 tile y [rows rm, outputs rn]: the norm's rstd per row (NORM: ss is
    the row's sum of squares), int8 row scales, bias, SwiGLU (GATED: y holds gate rows rn, y2 up rows N + rn of
    the weight and its scale / bias), residual; stored in the output's dtype."""
    if NORM:
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        y *= rstd[:, None]
        if GATED:
            y2 *= rstd[:, None]
    if WMODE == 1:
        y *= tl.load(s_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        if GATED:
            y2 *= tl.load(s_ptr + N + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        if GATED:
            y2 += tl.load(b_ptr + N + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    if GATED:
        y = y * tl.sigmoid(y) * y2
    om = mm[:, None] & mn[None, :]
    if HAS_RESIDUAL:
        y += tl.load(r_ptr + rm[:, None].to(tl.int64) * r_sm + rn[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def _epilogue(y, y2, ss, rm, mm, rn, mn, pid_k, tile, s_ptr, b_ptr, r_ptr, r_sm, out_ptr, ws_ptr, ss_ptr, lock_ptr,
              M, N, K, eps, SPLIT_K,
              WMODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr,
              GATED: tl.constexpr):
    """Both kernels' end. SPLIT_K == 1: :func:`_finish`. Else split pid_k stores its fp32 partial sums (y at
    columns rn of the workspace [SPLIT_K, M, NW], y2 at N + rn; the row sums of squares at [SPLIT_K, M]) and counts
    itself in the tile's semaphore; the split that arrives last sums every split's partials, finishes the tile and
    resets the semaphore to 0 for the next launch (so no second kernel, and no zero-fill before each launch)."""
    if SPLIT_K == 1:
        _finish(y, y2, ss, rm, mm, rn, mn, s_ptr, b_ptr, r_ptr, r_sm, out_ptr, M, N, K, eps,
                WMODE, HAS_BIAS, HAS_RESIDUAL, NORM, GATED)
    else:
        nw = 2 * N if GATED else N
        om = mm[:, None] & mn[None, :]
        part = ws_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * nw + rn[None, :]
        tl.store(part, y, mask=om, cache_modifier=".cg")
        if GATED:
            tl.store(part + N, y2, mask=om, cache_modifier=".cg")
        if NORM:   # every program of split pid_k stores the same sums of squares
            tl.store(ss_ptr + pid_k * M + rm, ss, mask=mm, cache_modifier=".cg")
        tl.debug_barrier()      # all of this program's stores issued before its arrival is counted
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            y = tl.zeros_like(y)
            y2 = tl.zeros_like(y2)
            ss = tl.zeros_like(ss)
            for s in range(SPLIT_K):
                part = ws_ptr + (s * M + rm[:, None]).to(tl.int64) * nw + rn[None, :]
                y += tl.load(part, mask=om, other=0.0, cache_modifier=".cg")
                if GATED:
                    y2 += tl.load(part + N, mask=om, other=0.0, cache_modifier=".cg")
                if NORM:
                    ss += tl.load(ss_ptr + s * M + rm, mask=mm, other=0.0, cache_modifier=".cg")
            _finish(y, y2, ss, rm, mm, rn, mn, s_ptr, b_ptr, r_ptr, r_sm, out_ptr, M, N, K, eps,
                    WMODE, HAS_BIAS, HAS_RESIDUAL, NORM, GATED)
            tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def _gemv_kernel(
    x_ptr, x_sm, w_ptr, w_sn, s_ptr, b_ptr, r_ptr, r_sm, out_ptr,   # as _small_gemm_kernel (scale: int8 [N])
    a_ptr, a_sm, nw_ptr, h_ptr, eps,                                 # norm prologue (see _small_gemm_kernel)
    ws_ptr, ss_ptr, lock_ptr,                                        # split-K workspace and semaphores
    M, N, K, k_per_split,
    SPLIT_K,                        # runtime: 1 stores the output, more reduce through the workspace (one compile)
    WMODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr,
    GATED: tl.constexpr,
    ROWS: tl.constexpr,             # power of two >= M
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    rk = tl.arange(0, BLOCK_K)
    store_h = pid_n == 0            # the stream x + add is written once, by the first column of programs
    if ROWS == 1:
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        ssv = tl.zeros([1, BLOCK_K], tl.float32)
        w_rows = w_ptr + rn[:, None].to(tl.int64) * w_sn
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            mk = kk < k_hi
            xt = tl.load(x_ptr + kk, mask=mk, other=0.0).to(tl.float32)
            if HAS_ADD or NORM:
                nw = tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32) if NORM else xt
                xt, ssv = _input_tile(xt, a_ptr + kk, h_ptr + kk, nw, mk, store_h, ssv, HAS_ADD, NORM)
            wm = mn[:, None] & mk[None, :]
            acc1 += tl.load(w_rows + kk[None, :], mask=wm, other=0).to(tl.float32) * xt[None, :]
            if GATED:
                acc2 += tl.load(w_rows + N * w_sn + kk[None, :], mask=wm, other=0).to(tl.float32) * xt[None, :]
        y = tl.sum(acc1, axis=1)[None, :]                       # [1, BLOCK_N]
        y2 = tl.sum(acc2, axis=1)[None, :]
        ss = tl.sum(ssv, axis=1)                                # [1]
    else:
        rm3 = tl.arange(0, ROWS)[:, None, None]
        rn3 = rn[None, :, None]
        acc3 = tl.zeros([ROWS, BLOCK_N, BLOCK_K], tl.float32)
        acc4 = tl.zeros([ROWS, BLOCK_N, BLOCK_K], tl.float32)
        ssv = tl.zeros([ROWS, 1, BLOCK_K], tl.float32)
        x_rows = x_ptr + rm3.to(tl.int64) * x_sm
        w_rows = w_ptr + rn3.to(tl.int64) * w_sn
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = (k0 + rk)[None, None, :]
            mk = kk < k_hi
            xm = (rm3 < M) & mk
            xt = tl.load(x_rows + kk, mask=xm, other=0.0).to(tl.float32)                 # [ROWS, 1, BLOCK_K]
            if HAS_ADD or NORM:
                nw = tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32) if NORM else xt
                xt, ssv = _input_tile(xt, a_ptr + rm3.to(tl.int64) * a_sm + kk, h_ptr + rm3.to(tl.int64) * K + kk,
                                      nw, xm, store_h, ssv, HAS_ADD, NORM)
            wm = (rn3 < N) & mk
            acc3 += xt * tl.load(w_rows + kk, mask=wm, other=0).to(tl.float32)           # [1, BLOCK_N, BLOCK_K]
            if GATED:
                acc4 += xt * tl.load(w_rows + N * w_sn + kk, mask=wm, other=0).to(tl.float32)
        y = tl.sum(acc3, axis=2)                                # [ROWS, BLOCK_N]
        y2 = tl.sum(acc4, axis=2)
        ss = tl.sum(tl.sum(ssv, axis=2), axis=1)                # [ROWS]
    rm = tl.arange(0, ROWS)
    _epilogue(y, y2, ss, rm, rm < M, rn, mn, pid_k, pid_n, s_ptr, b_ptr, r_ptr, r_sm, out_ptr, ws_ptr, ss_ptr,
              lock_ptr, M, N, K, eps, SPLIT_K, WMODE, HAS_BIAS, HAS_RESIDUAL, NORM, GATED)


@triton.jit
def _small_gemm_kernel(
    x_ptr, x_sm,                    # activations [M, K]: row stride (K contiguous)
    w_ptr, w_sn,                    # weight [N, K] ([2N, K]: gate rows then up rows, GATED) (float / int8) or
                                    # packed [N, K / 2] uint8: row stride
    s_ptr, s_sn,                    # scales: [N] (int8) or [N, K / GROUP] (int4): row stride
    b_ptr, r_ptr, r_sm,             # bias [N] (HAS_BIAS), residual [M, N] + row stride (HAS_RESIDUAL)
    out_ptr,                        # [M, N] contiguous
    a_ptr, a_sm,                    # HAS_ADD: the GEMM input is x + add [M, K] (rounded to x's dtype) ...
    nw_ptr, h_ptr, eps,             # ... stored to h [M, K] contiguous; NORM: then RMSNorm'd by weight nw [K], eps
    ws_ptr, ss_ptr, lock_ptr,       # SPLIT_K > 1: fp32 workspace [SPLIT_K, M, N (2N)], sums of squares
                                    # [SPLIT_K, M], one int32 semaphore per output tile (zero between launches)
    M, N, K,                        # sizes (K counts logical input dims, also for int4)
    k_per_split,                    # K range of one split (multiple of BLOCK_K)
    SPLIT_K,                        # runtime (see _gemv_kernel)
    WMODE: tl.constexpr,            # 0 float weight, 1 int8 per-channel, 2 int4 group-wise
    GROUP: tl.constexpr,            # int4 group size (multiple of BLOCK_K)
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr,
    GATED: tl.constexpr,            # out = silu(x @ W[:N].T) * (x @ W[N:].T), biases / scales per weight row
    IEEE_DOT: tl.constexpr,         # dot in fp32 (fp32 activations; bf16 under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * x_sm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * w_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    rstd = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORM:
        # The tensor cores take the input in x's dtype, so it is normalised before that rounding (as the unfused
        # norm stores it; u * w alone can overflow fp16): a first pass over all of K gathers each row's sum of
        # squares (from L2: M x K elements) and stores the new stream x + add once (program (0, 0) of the M tile).
        ssv = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        first = (pid_n == 0) & (pid_k == 0)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xm = mm[:, None] & (kk < K)[None, :]
            u, ssv = _input_tile(tl.load(x_rows + kk[None, :], mask=xm, other=0.0).to(tl.float32),
                                 a_ptr + rm[:, None].to(tl.int64) * a_sm + kk[None, :],
                                 h_ptr + rm[:, None].to(tl.int64) * K + kk[None, :], 1.0, xm, first, ssv, HAS_ADD,
                                 False)
            ssv += u * u
        rstd = 1.0 / tl.sqrt(tl.sum(ssv, axis=1) / K + eps)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if WMODE == 2:
            # Packed byte j of the tile holds input dims k0 + 2j (low nibble) and k0 + 2j + 1 (high).
            j = tl.arange(0, BLOCK_K // 2)
            kk = k0 + 2 * j
            mk = kk < k_hi
            xe = tl.load(x_rows + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            xo = tl.load(x_rows + kk[None, :] + 1, mask=mm[:, None] & mk[None, :], other=0.0)
            pk = tl.load(w_rows + (kk // 2)[None, :], mask=mn[:, None] & mk[None, :], other=0).to(tl.int32)
            lo = (pk & 0xF) - 8
            hi = (pk >> 4) - 8
            # |q| <= 8: exact in fp16 / bf16 (and in fp32 with IEEE_DOT)
            part = dot(xe, tl.trans(lo), IEEE_DOT) + dot(xo, tl.trans(hi), IEEE_DOT)
            sc = tl.load(s_ptr + rn.to(tl.int64) * s_sn + k0 // GROUP, mask=mn, other=0.0).to(tl.float32)
            acc += part * sc[None, :]
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < k_hi
            xm = mm[:, None] & mk[None, :]
            xt = tl.load(x_rows + kk[None, :], mask=xm, other=0.0)
            if HAS_ADD or NORM:     # (with NORM the stream was stored by the first pass)
                if NORM:
                    store_h = pid_n < 0         # never: the first pass stored it
                else:
                    store_h = pid_n == 0
                xf, _ = _input_tile(xt.to(tl.float32), a_ptr + rm[:, None].to(tl.int64) * a_sm + kk[None, :],
                                    h_ptr + rm[:, None].to(tl.int64) * K + kk[None, :], 1.0, xm, store_h, rstd,
                                    HAS_ADD, False)
                if NORM:
                    xf = xf * rstd[:, None] * tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)[None, :]
                xt = xf.to(x_ptr.dtype.element_ty)
            wm = mn[:, None] & mk[None, :]
            acc += dot(xt, tl.trans(tl.load(w_rows + kk[None, :], mask=wm, other=0)), IEEE_DOT)  # int8: exact
            if GATED:
                acc2 += dot(xt, tl.trans(tl.load(w_rows + N * w_sn + kk[None, :], mask=wm, other=0)), IEEE_DOT)
    _epilogue(acc, acc2, rstd, rm, mm, rn, mn, pid_k, pid_m * tl.num_programs(0) + pid_n, s_ptr,
              b_ptr, r_ptr, r_sm, out_ptr, ws_ptr, ss_ptr, lock_ptr, M, N, K, eps, SPLIT_K,
              WMODE, HAS_BIAS, HAS_RESIDUAL, False, GATED)       # the norm is in the input already


_WNAME = {_FLOAT: "float", _INT8: "int8", _INT4: "int4"}
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_tables: dict[str, dict] = {}      # device name -> {config_key: config}
_memo: dict[tuple, dict] = {}       # (device, n, k, rows bucket, wmode) -> config, for the per-call lookup


def rows_bucket(m: int) -> int:
    """The M bucket a tuned config covers: 1, 2, 4, 8, 16 or 32."""
    return min(32, triton.next_power_of_2(max(1, m)))


VARIANTS = ("", "norm", "gated")   # a plain call, the norm prologue, the norm prologue + gated epilogue


def config_key(n: int, k: int, m: int, wmode: str, variant: str = "") -> str:
    """Key of a tuned config: weight kind (float / int8 / int4), M bucket, N (weight rows), K, and the Deep-Fusion
    variant ("norm": the norm prologue; "gated": with the gated epilogue too, its block_n counting outputs)."""
    return f"{wmode} m{rows_bucket(m)} n{n} k{k}" + (f" {variant}" if variant else "")


def table_path(device_name: str) -> Path:
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def tuned_table(device: torch.device) -> dict:
    """The configs measured on this device kind (``configs/<device name>.json``), {} when there are none."""
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device)
    if name not in _tables:
        path = table_path(name)
        _tables[name] = json.loads(path.read_text()) if path.exists() else {}
    return _tables[name]


def install_table(device: torch.device, table: dict) -> None:
    """Use ``table`` for this device kind from now on (the tuner's result, before it is written to a file)."""
    _tables[torch.cuda.get_device_name(device) if device.type == "cuda" else device.type] = dict(table)
    _memo.clear()


def heuristic_config(n: int, k: int, m: int, wmode: int, sms: int, interp: bool = False) -> dict:
    """Kernel and tiles for a shape no table has. GEMV (M <= 8, float / int8 weights, N <= GEMV_MAX_N of the
    weight kind): an fp32 accumulator of about 64 registers per thread, K tiles of 512 (256 from 4 rows), N tiles
    small enough for 4 programs per SM; split-K only when there are fewer N tiles than SMs. Else the tensor-core
    kernel: 64 x 128 tiles, split-K up to two programs per SM. The N limits follow the H200 table
    (``configs/NVIDIA_H200.json``): at one row the GEMV kernel won every bf16 shape up to N = 4096 and the
    tensor-core kernel every larger one (int8: the GEMV kernel up to N = 6144)."""
    if interp:                      # small tiles: the interpreter's cost is per element of a tile
        if m <= GEMV_MAX_M and wmode != _INT4:
            return {"kernel": "gemv", "block_n": 4, "block_k": 32, "split_k": None, "warps": 4}
        return {"kernel": "dot", "block_n": 16, "block_k": 32, "split_k": None, "warps": 4}
    if m <= GEMV_MAX_M and wmode != _INT4 and n <= GEMV_MAX_N[wmode]:
        rows = triton.next_power_of_2(m)
        block_k = min(512 if rows <= 2 else 256, max(64, triton.next_power_of_2(k)))
        block_n = max(1, min(16, _ACC_PER_THREAD * 128 // (rows * block_k)))
        while block_n > 1 and triton.cdiv(n, block_n) < 4 * sms:
            block_n //= 2
        return {"kernel": "gemv", "block_n": block_n, "block_k": block_k, "split_k": None, "warps": 4}
    return {"kernel": "dot", "block_n": 64, "block_k": 128, "split_k": None, "warps": 4}


def _config(device: torch.device, n: int, k: int, m: int, wmode: int, interp: bool, variant: str = "") -> dict:
    """The config of a call: the table's entry for the variant, else the plain call's (a gated call then halves its
    block_n: the same weight rows per program), else :func:`heuristic_config` (halved the same way)."""
    key = (device, n, k, rows_bucket(m), wmode, variant)
    cfg = _memo.get(key)
    if cfg is None:
        table = tuned_table(device) if not interp else {}

        def entry(v):       # a table entry this call can use (a bucket's GEMV tiles do not serve M > 8)
            cfg = table.get(config_key(n, k, m, _WNAME[wmode], v))
            return None if cfg is None or (cfg["kernel"] == "gemv" and m > GEMV_MAX_M) else cfg

        cfg = entry(variant) if variant else None
        if cfg is None:
            cfg = entry("")
            if cfg is None:
                sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
                cfg = heuristic_config(n, k, m, wmode, sms, interp)
            if variant == "gated":
                cfg = {**cfg, "block_n": max(1 if cfg["kernel"] == "gemv" else 16, cfg["block_n"] // 2)}
        _memo[key] = cfg
    return cfg


def _auto_split(n_tiles: int, k_tiles: int, m_tiles: int, target: int, gemv: bool) -> int:
    if gemv:    # split only when the N tiles cannot fill the SMs (target = 2 per SM)
        return 1 if n_tiles * 2 >= target else max(1, min(triton.cdiv(target, n_tiles), k_tiles, 16))
    return max(1, min(triton.cdiv(target, n_tiles * m_tiles), k_tiles // 4 or 1, 16))


def _launch(x, w, scale, wmode, group, n, k, bias, residual, split_k, block_n, block_k, kernel=None, warps=None,
            add=None, norm=None, gated=False):
    """n: output features (the weight has 2n rows when ``gated``)."""
    if x.shape[-1] != k:
        raise ValueError(f"x last dim {x.shape[-1]} does not match the weight's K = {k}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"activation dtype {x.dtype} not supported (fp32 / fp16 / bf16)")
    nw_rows = 2 * n if gated else n
    if bias is not None and bias.shape != (nw_rows,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({nw_rows},)")
    if (add is not None or norm is not None or gated) and wmode == _INT4:
        raise ValueError("the norm prologue and the gated epilogue take float / int8 weights, not int4")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    a2 = None
    if add is not None:
        if add.shape != x.shape or add.dtype != x.dtype:
            raise ValueError(f"add {tuple(add.shape)} {add.dtype} must match x {tuple(x.shape)} {x.dtype}")
        a2 = add.reshape(-1, k)
        if a2.stride(-1) != 1:
            a2 = a2.contiguous()
    if norm is not None and norm[0].shape != (k,):
        raise ValueError(f"norm weight shape {tuple(norm[0].shape)} must be ({k},)")
    r2 = None
    if residual is not None:
        if residual.shape != (*lead, n):
            raise ValueError(f"residual shape {tuple(residual.shape)} must be {(*lead, n)}")
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    out = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    h = torch.empty((*lead, k), dtype=x.dtype, device=x.device) if add is not None else None
    if k == 0 and (add is not None or norm is not None or gated):
        raise ValueError("the norm prologue and the gated epilogue need K > 0")
    if m == 0 or n == 0 or k == 0:
        if m and n:      # K = 0: an empty sum, bias / residual only
            out.copy_((torch.zeros_like(out) if residual is None else residual) + (0 if bias is None else bias))
        return out if h is None else (out, h)
    interp = interpreting()
    cfg = _config(x.device, nw_rows, k, m, wmode, interp, "gated" if gated else "norm" if norm is not None else "")
    kernel = kernel or cfg["kernel"]
    if kernel not in ("gemv", "dot"):
        raise ValueError(f"kernel {kernel!r}: 'gemv' or 'dot'")
    gemv = kernel == "gemv"
    if gemv and (m > GEMV_MAX_M or wmode == _INT4):
        raise ValueError(f"the GEMV kernel takes float / int8 weights and up to {GEMV_MAX_M} rows, got {m} rows of "
                         f"{_WNAME[wmode]}; use kernel='dot'")
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    warps = warps or cfg["warps"]
    split_k = split_k or cfg["split_k"]
    if wmode == _INT4:
        block_k = min(block_k, group)
        if group % block_k:
            raise ValueError(f"group_size {group} must be a multiple of the K tile {block_k}")
    block_m = triton.next_power_of_2(m) if gemv else (16 if m <= 16 else 32)
    n_tiles = triton.cdiv(n, block_n)
    m_tiles = 1 if gemv else triton.cdiv(m, block_m)
    k_tiles = triton.cdiv(k, block_k)
    if split_k is None:
        target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count \
            if x.device.type == "cuda" else 4
        split_k = _auto_split(n_tiles, k_tiles, m_tiles, target, gemv)
    split_k = max(1, min(split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    dummy = x2
    if split_k > 1:
        ws = torch.empty((split_k, m, nw_rows), dtype=torch.float32, device=x.device)
        # row sums of squares of the splits: the GEMV kernel's norm (the tensor-core kernel normalises its input)
        ss = torch.empty((split_k, m), dtype=torch.float32, device=x.device) if norm is not None and gemv else ws
        locks = semaphores(x.device, n_tiles * m_tiles)
    else:
        ws = ss = locks = dummy
    s_arg = scale if scale is not None else dummy
    b_arg = bias if bias is not None else dummy
    r_arg, r_sm = (r2, r2.stride(0)) if r2 is not None else (dummy, 0)
    a_arg, a_sm = (a2, a2.stride(0)) if a2 is not None else (dummy, 0)
    nw_arg, eps = norm if norm is not None else (dummy, 0.0)
    h_arg = h if h is not None else dummy
    flags = dict(WMODE=wmode, HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, HAS_ADD=a2 is not None,
                 NORM=norm is not None, GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    if gemv:
        _gemv_kernel[(n_tiles, split_k)](
            x2, x2.stride(0), w, w.stride(0), s_arg, b_arg, r_arg, r_sm, out, a_arg, a_sm, nw_arg, h_arg, eps,
            ws, ss, locks, m, n, k, k_per_split, split_k, ROWS=block_m, **flags)
    else:
        _small_gemm_kernel[(n_tiles, split_k, m_tiles)](
            x2, x2.stride(0), w, w.stride(0), s_arg, scale.stride(0) if scale is not None else 0, b_arg,
            r_arg, r_sm, out, a_arg, a_sm, nw_arg, h_arg, eps, ws, ss, locks, m, n, k, k_per_split, split_k,
            GROUP=group, IEEE_DOT=ieee_dot(x.dtype), BLOCK_M=block_m, **flags)
    return out if h is None else (out, h)


def small_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, *, add: torch.Tensor | None = None,
               norm: tuple[torch.Tensor, float] | None = None, gated: bool = False, split_k: int | None = None,
               block_n: int | None = None, block_k: int | None = None, kernel: str | None = None,
               warps: int | None = None):
    """x [..., K] @ weight[N, K].T (+ bias [N]) (+ residual [..., N]) in x's dtype, fp32 accumulation.

    ``norm=(w [K], eps)``: the input is RMSNorm(x (+ add)) with weight w; ``add`` [..., K]: x + add (rounded to
    x's dtype) is the input, and (out, x + add) is returned. ``gated``: weight [2N, K] (gate rows, then up rows;
    bias [2N]) and out = silu(x @ gate.T) * (x @ up.T) [..., N]. ``kernel`` ('gemv' / 'dot'), ``split_k``,
    ``block_n`` (outputs per program), ``block_k``, ``warps`` override the table / heuristic (tests and the tuner)."""
    if weight.dim() != 2 or weight.stride(-1) != 1:
        raise ValueError(f"weight must be [N, K] with contiguous K, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight dtype {weight.dtype}: use small_gemm_int8 / small_gemm_int4 for integers")
    n, k = _out_features(weight.shape[0], gated), weight.shape[1]
    return _launch(x, weight, None, _FLOAT, 1, n, k, bias, residual, split_k, block_n, block_k, kernel, warps,
                   add, norm, gated)


def _out_features(rows: int, gated: bool) -> int:
    if gated and rows % 2:
        raise ValueError(f"a gated weight holds gate and up rows: {rows} rows is odd")
    return rows // 2 if gated else rows


def small_gemm_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, *, add: torch.Tensor | None = None,
                    norm: tuple[torch.Tensor, float] | None = None, gated: bool = False,
                    split_k: int | None = None, block_n: int | None = None, block_k: int | None = None,
                    kernel: str | None = None, warps: int | None = None):
    """Weight-only int8: x @ (qweight [N, K] int8 * scale [N]).T (+ bias) (+ residual); ``add``, ``norm``,
    ``gated`` as in :func:`small_gemm` (gated: qweight [2N, K], scale [2N]).

    Produce qweight / scale with ``reference.quantize_int8_per_channel``.
    """
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.stride(-1) != 1:
        raise ValueError(f"qweight must be int8 [N, K] with contiguous K, got {qweight.dtype} {tuple(qweight.shape)}")
    rows, k = qweight.shape
    if scale.shape != (rows,):
        raise ValueError(f"scale shape {tuple(scale.shape)} must be ({rows},)")
    return _launch(x, qweight, scale.contiguous(), _INT8, 1, _out_features(rows, gated), k, bias, residual, split_k,
                   block_n, block_k, kernel, warps, add, norm, gated)


def small_gemm_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, *,
                    split_k: int | None = None, block_n: int | None = None,
                    block_k: int | None = None) -> torch.Tensor:
    """Weight-only int4, group-wise: packed uint8 [N, K / 2] (low nibble = even input dim, value + 8),
    scale [N, K / group_size]. Produce them with ``reference.quantize_int4_groupwise``.

    group_size must be a power of two >= 32 (a K tile never straddles two groups).
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(-1) != 1:
        raise ValueError(f"packed must be uint8 [N, K / 2] with contiguous rows, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size {group_size} must be a power of two >= 32")
    n, k = packed.shape[0], 2 * packed.shape[1]
    if k % group_size:
        raise ValueError(f"K = {k} must be a multiple of group_size {group_size}")
    if scale.shape != (n, k // group_size):
        raise ValueError(f"scale shape {tuple(scale.shape)} must be ({n}, {k // group_size})")
    return _launch(x, packed, scale if scale.stride(-1) == 1 else scale.contiguous(), _INT4, group_size, n, k,
                   bias, residual, split_k, block_n, block_k)
