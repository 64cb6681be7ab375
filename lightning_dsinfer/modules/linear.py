"""Inference linear layer: one weight, optional bias, optional residual add fused into the GEMM.

bf16 weights on the CPU take the first of these that the machine has (``Linear.layout`` says which):

- ``"amx"``: the weight is re-laid out once into AMX tiles (``kernels/cpu_gemv.pack``) and every call, any
  number of rows, runs the AMX kernel of ``kernels/cpu_gemv.cpp``, which streams the tiles front to back. Unlike a
  oneDNN primitive per weight shape, it costs nothing to alternate shapes (a decoder layer has four), so decode
  reads weights at close to streaming bandwidth; prompts run at about oneDNN's speed.
- ``"plain"`` with the C++ kernel (no AMX, but AVX512-BF16 / AVX512 / AVX2): row-major weight; up to
  ``cpu_gemv.row_kernel_max_m()`` rows (16 with AVX512-BF16, any number without bf16 instructions, where
  oneDNN has no fast bf16 path) go through the row-major kernel, more rows through ``F.linear``.
- ``"onednn"`` (the kernel could not be built, or ``DSINFER_CPU_GEMV=0``): pre-packed once for oneDNN
  (``_reorder_linear_weight``), every call through ``_linear_pointwise``.

``quantize="int8"``: the weight is stored int8 with one fp32 scale per output row (symmetric, ``w ~= q * scale``,
``reference.quantize_int8_per_channel``), half the bytes of bf16. On AMX machines (``"int8_amx"``) the int8 weight
is laid out in AMX tile order (``dsi_gemm_amx_int8``, any rows: one or two rows multiply the tiles widened to fp32,
more widen each 32 rows' tiles to bf16 once, exactly, for the AMX tile products). Elsewhere (``"int8"``): bf16 rows
on an AVX512 CPU go through the row-major int8 kernel up to ``INT8_KERNEL_MAX_ROWS`` rows (every row count where bf16
has no fast GEMM: :func:`int8_kernel_max_rows`), more rows dequantise the weight to bf16 in C, a chunk of rows at a
time, for bf16 GEMMs; on CUDA the Triton small-batch int8 GEMM for M <= 32; anything else dequantises the weight a
chunk of rows at a time for the call (``ops.linear_int8``).

``quantize="int4"``: the weight is stored int4, group-wise (``reference.quantize_int4_groupwise``: packed uint8
[N, K / 2], one fp32 scale per output row and group of ``group_size`` inputs, symmetric), a quarter of bf16's
bytes (+ 4 / group_size per weight for the scales). Layout ``"int4"`` (row-major on every CPU: offload units are
used in place): bf16 rows on an AVX512 CPU go through the int4 row kernel (``cpu_gemv.linear_int4``: nibbles to
values through table lookups, bf16 dot products for one row and fp32 FMAs for more, each group's sum times its
scale) for a few rows (every row count where bf16 has no fast GEMM: :func:`int4_kernel_max_rows`); on AMX machines
(groups of a multiple of 128) more rows, prompts included, go through AMX tile products over the weight decoded 32
rows x 128 inputs at a time (``cpu_gemv.linear_int4_amx``, ``amx_rows``: ``INT4_AMX_ROWS``); elsewhere more than
``INT4_KERNEL_MAX_ROWS`` rows, and fp32 rows, dequantise the weight in C a chunk of rows at a time (bf16 for bf16
rows, fp32 for fp32 rows) for the GEMM of x's dtype. On CUDA (or the forced Triton path) the Triton small-batch
int4 GEMM for M <= 32, else the same dequantised GEMM (in torch).

``pack=False`` keeps the tensor as given (offload passes views into a streamed buffer): ``"plain"``, with the
row-major kernel for few rows where it is available. Everything else goes through ``ops.linear``: the small-batch
Triton GEMM on CUDA for M <= 32 (bf16 / fp16), ``F.linear`` otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels import cpu_gemv, ops, reference

# The M the oneDNN weight layout is tuned for. Measured on a 2-core AVX512-BF16/AMX machine: 16 is
# within 5% of the best layout for M=1 decode and within 2% of the best for M=2048 prefill.
_PACK_BATCH_HINT = 16
# The row-major int8 layout (AVX512 without AMX): rows up to which its kernel (fp32 FMAs, weight read once) beats
# dequantising the weight to bf16 in C and one bf16 GEMM. Measured on the 2-core machine (its AMX path held off),
# 5632 x 2048 weight, kernel vs dequantise + GEMM: 0.4 vs ~2 ms at 1 row, 1.3 vs 2.2 at 8, 2.7 vs 2.3 at 16, 5.1 vs
# 2.7 at 32 (bf16 tiles on AMX: 0.5-0.6 ms at every row count up to 32, which is why AMX machines use int8 tiles).
# The one-call decode step takes row-major int8 blocks up to the same row count (same kernel: bit-identical).
INT8_KERNEL_MAX_ROWS = 12
# The int4 layout without AMX: rows up to which its row kernel beats dequantising the weight in C and one bf16 GEMM.
# Measured on the 2-core machine with oneDNN held to AVX512-BF16 (ONEDNN_MAX_CPU_ISA), 4096 x 11008 weight: 8 rows
# 4.1 ms against 14.7, 16 rows 8.9 against 18.3, 32 rows 17.2 against 25.5. The one-call decode step takes int4
# blocks up to the same row count (same kernel: bit-identical).
INT4_KERNEL_MAX_ROWS = 32
# With AMX (groups of a multiple of 128 inputs): rows [first, last] go through the AMX int4 path (cpu_gemv.
# linear_int4_amx), fewer through the row kernel (more would dequantise for oneDNN's GEMM). Measured on the 2-core
# machine, 4096 x 11008 / 11008 x 4096 weights: 1-2 rows 1.05-1.6 ms on the row kernel against 1.6-1.9 on AMX; 3
# rows 1.7 / 1.9 against 1.9 / 2.0; 16 rows 1.7 / 2.0 against 8.1 / 8.5 (int8 tiles 2.6 / 2.7, bf16 tiles 3.9 /
# 3.5); prompts too: 2048 rows 114 ms against 147 dequantised for oneDNN (int8 tiles 129, bf16 tiles 171).
INT4_AMX_ROWS = (3, 1 << 30)
# A prompt's int8 / int4 GEMM dequantises this many bytes of weight rows at a time (bounded scratch).
DEQUANT_CHUNK_BYTES = 8 << 20
DEQUANT_BYTES_PER_WEIGHT = {True: 2, False: 10}   # C dequantise to bf16; torch: int8 -> fp32, x scale, cast
# int4: C dequantises to bf16 (2 bytes a weight) or fp32 (4); torch (reference.dequantize_int4 per chunk, then the
# cast to x's dtype): the int16 bytes, both nibble planes, their stack, the fp32 values, the repeated scales, the
# product and the cast: at most 24 bytes a weight at once.
DEQUANT_INT4_BYTES_PER_WEIGHT = {"bf16": 2, "fp32": 4, "torch": 24}
QUANTIZE_CHUNK_BYTES = 16 << 20      # fp32 temporaries of quantising a weight, a chunk of rows at a time


def int8_kernel_max_rows() -> float:
    """Rows up to which bf16 rows take the row-major int8 kernel here: :data:`INT8_KERNEL_MAX_ROWS` where the bf16 GEMM
    after a dequantisation has a fast path (AVX512-BF16 / AMX), else every row count: without bf16 instructions the
    bf16 row kernel itself takes every row count (``cpu_gemv.row_kernel_max_m``), and the int8 kernel keeps its pace
    while dequantising + GEMM is ~4x slower (2-core AVX512 machine, 5632 x 2048 weight: 2.35 vs 9.67 ms at 16 rows,
    9.39 vs 27.4 at 64; the bf16 row kernel 2.33 / 9.58)."""
    return float("inf") if cpu_gemv.row_kernel_max_m() == float("inf") else INT8_KERNEL_MAX_ROWS


def int4_kernel_max_rows() -> float:
    """The same for the int4 row kernel (without bf16 instructions, 5632 x 2048 weight: 1.94 vs 10.0 ms at 16 rows,
    17.4 vs 52.1 at 128)."""
    return float("inf") if cpu_gemv.row_kernel_max_m() == float("inf") else INT4_KERNEL_MAX_ROWS


def quantize_rows(w: torch.Tensor, row_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.quantize_int8_per_channel(w)`` a chunk of rows at a time (the same numbers: each row's scale
    is its own), so quantising a large weight holds a few MiB of fp32 temporaries, not several copies of it.
    ``row_max``: a max over the tensor-parallel group of the rows' |w| maxima (a row-parallel shard takes the
    scales of its whole rows)."""
    step = max(1, QUANTIZE_CHUNK_BYTES // (4 * max(w.shape[1], 1)))
    amax = torch.cat([w[a:a + step].float().abs().amax(dim=1) for a in range(0, w.shape[0], step)])
    if row_max is not None:
        amax = row_max(amax)
    q, scales = torch.empty(w.shape, dtype=torch.int8, device=w.device), []
    for a in range(0, w.shape[0], step):
        q[a:a + step], scale = reference.quantize_int8_per_channel(w[a:a + step], amax[a:a + step])
        scales.append(scale)
    return q, torch.cat(scales)


def quantize_int4_rows(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.quantize_int4_groupwise(w, group_size)`` a chunk of rows at a time (the same numbers: each row's
    groups have their own scales), so quantising a large weight holds a few MiB of fp32 temporaries."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4: a weight's K={k} (input dims) is not a multiple of quantize_group_size={group_size}; "
                         f"use a group size that divides it.")
    step = max(1, QUANTIZE_CHUNK_BYTES // (4 * max(k, 1)))
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, k // group_size, dtype=torch.float32, device=w.device)
    for a in range(0, n, step):
        packed[a:a + step], scale[a:a + step] = reference.quantize_int4_groupwise(w[a:a + step], group_size)
    return packed, scale


def _bf16_cpu(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16


def _can_pack_onednn(weight: torch.Tensor) -> bool:
    return (_bf16_cpu(weight) and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear(nn.Module):
    """``y = x @ W^T + b (+ residual)``. ``weight`` is [out, in] and owned by this module.

    Row-parallel use: ``reduce`` (an all-reduce) sums the partial products of the tensor-parallel group;
    only the rank with ``owns_residual`` adds the residual (and only it holds the bias), so both are
    added once; with ``quantize``, ``row_max`` (a max over the group) gives each row of the shard the scale of
    the whole row, so the group holds the same int8 weights as one process would.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True,
                 reduce=None, owns_residual: bool = True, quantize: str | None = None, row_max=None,
                 scale: torch.Tensor | None = None, in_features: int | None = None, group_size: int = 128):
        super().__init__()
        self.reduce, self.owns_residual = reduce, owns_residual
        self.group_size = self.amx_rows = 0     # int4: inputs per scale; rows from which the AMX int4 path runs
        if scale is not None:              # quantised already (an offload unit, used in place)
            self._quantised(weight, bias, scale, in_features)
            return
        self.out_features, self.in_features = weight.shape
        self.scale = None
        kernel = _bf16_cpu(weight) and cpu_gemv.available()
        if quantize == "int4":             # row-major packed nibbles + group scales (no AMX layout)
            self.bias = None if bias is None else bias.to(dtype=weight.dtype).contiguous()
            self.dtype = weight.dtype
            self.weight, self.scale = quantize_int4_rows(weight, group_size)
            self.group_size, self.layout = group_size, "int4"
            self.row_kernel, self.row_kernel_rows = False, 0
            self._int4_amx_from(pack)
            return
        if quantize == "int8":
            self.bias = None if bias is None else bias.to(dtype=weight.dtype).contiguous()
            self.dtype = weight.dtype
            self.weight, self.scale = quantize_rows(weight, row_max)     # row_max: a row-parallel shard
            self.layout = "int8"
            if pack and kernel and cpu_gemv.has_amx():      # int8 tiles in the AMX order, any number of rows
                self.layout = "int8_amx"
                self.weight = cpu_gemv.pack_int8(self.weight)
            self.row_kernel, self.row_kernel_rows = False, 0
            return
        if quantize is not None:
            raise ValueError(f"quantize={quantize!r} is not one of None, 'int8', 'int4'.")
        if pack and kernel and cpu_gemv.has_amx():
            self.layout = "amx"
            weight = cpu_gemv.pack(weight)
        elif pack and not kernel and _can_pack_onednn(weight):
            self.layout = "onednn"
            weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        else:
            self.layout = "plain"
            weight = weight.contiguous()  # pack=False: a view with unit inner stride stays that view
        # The row-major kernel: any plain bf16 weight with unit inner stride (row stride free).
        self.row_kernel = self.layout == "plain" and kernel and weight.stride(1) == 1
        self.row_kernel_rows = cpu_gemv.row_kernel_max_m() if self.row_kernel else 0
        self.weight = weight
        self.bias = None if bias is None else bias.to(dtype=weight.dtype).contiguous()

    def _quantised(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                   in_features: int | None) -> None:
        """An int8 weight with its fp32 per-row ``scale``: row-major [N, K], or flat in the AMX tile order of
        ``cpu_gemv.pack_int8`` (then ``in_features`` gives K); or an int4 weight (packed uint8 [N, K / 2]) with its
        fp32 group scales [N, K / group_size] (the group size is K over the scales' columns)."""
        if weight.dtype == torch.uint8:
            n, half = weight.shape if weight.dim() == 2 else (0, 0)
            k = 2 * half
            if (weight.dim() != 2 or scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != n
                    or scale.shape[1] == 0 or k % scale.shape[1] or (in_features is not None and in_features != k)):
                raise ValueError(f"a quantised int4 weight is uint8 [N, K / 2] with fp32 scales [N, K / group_size]; "
                                 f"got {tuple(weight.shape)}, scales {scale.dtype} {tuple(scale.shape)}, "
                                 f"in_features={in_features}")
            self.out_features, self.in_features, self.group_size = n, k, k // scale.shape[1]
            self.dtype = bias.dtype if bias is not None else None
            self.weight, self.scale, self.bias = weight, scale, bias
            self.layout = "int4"
            self.row_kernel, self.row_kernel_rows = False, 0
            self._int4_amx_from(True)
            return
        n = scale.numel()
        flat = weight.dim() == 1
        ok = weight.dtype == torch.int8 and scale.dtype == torch.float32 and scale.dim() == 1 and (
            weight.shape[0] == n if not flat else in_features is not None
            and weight.numel() == cpu_gemv.packed_numel(n, in_features))
        if not ok:
            raise ValueError(f"a quantised weight is int8 [N, K] (or AMX tiles of one, with in_features) and fp32 "
                             f"scales [N]; got {weight.dtype} {tuple(weight.shape)}, scales {scale.dtype} "
                             f"{tuple(scale.shape)}, in_features={in_features}")
        self.out_features, self.in_features = n, (in_features if flat else weight.shape[1])
        self.dtype = bias.dtype if bias is not None else None     # (only the resident decode stack reads it)
        self.weight, self.scale, self.bias = weight, scale, bias
        self.layout = "int8_amx" if flat else "int8"
        self.row_kernel, self.row_kernel_rows = False, 0

    def _int4_amx_from(self, allowed: bool) -> None:
        """``self.amx_rows``: the rows from which bf16 calls take the AMX int4 path (``INT4_AMX_ROWS``; 0: never): an
        AMX machine (decided here, at build time, as the int8 tile layout is), groups of a multiple of 128."""
        ok = (allowed and self.weight.device.type == "cpu" and self.group_size % 128 == 0 and cpu_gemv.has_amx()
              and self.weight.stride(1) == 1)
        self.amx_rows = INT4_AMX_ROWS[0] if ok else 0

    @property
    def packed(self) -> bool:
        """True when the weight is not a plain [out, in] tensor (AMX tiles, int8 or bf16, or a oneDNN layout)."""
        return self.layout in ("amx", "onednn", "int8_amx")

    @property
    def nbytes(self) -> int:
        """Bytes read from memory by one call (weight + bias)."""
        n = self.out_features * self.in_features * self.weight.element_size()
        n = n // 2 if self.layout == "int4" else n            # two weights a byte
        n += 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self._matmul(x, residual if self.owns_residual else None)
        if self.reduce is not None:
            y = self.reduce(y)
        return y

    def norm_forward(self, h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     gated: bool = False):
        """``(self(rms_norm(h + delta)), h + delta)`` (delta None: nothing pending), the product silu-gated
        (``ops.silu_and_mul``) when ``gated``: one kernel where ``ops.norm_linear`` takes it (the Triton path,
        decode-sized rows, a plain or int8 weight of one rank's column shard), else the separate ops."""
        if self.layout in ("plain", "int8") and self.reduce is None:
            out = ops.norm_linear(h, delta, norm_weight, eps, self.weight, self.bias, self.scale, gated)
            if out is not None:
                return out
        x, h = (ops.rms_norm(h, norm_weight, eps), h) if delta is None else ops.add_rms_norm(delta, h, norm_weight, eps)
        y = self(x)
        return (ops.silu_and_mul(y) if gated else y), h

    def _matmul(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.layout == "int4":
            return self._int4(x, residual)
        if self.layout == "int8_amx":
            return cpu_gemv.linear_packed_int8(x, self.weight, self.scale, self.out_features, self.in_features,
                                               self.bias, residual)
        if self.layout == "int8":
            rows = x.numel() // self.in_features if self.in_features else 0
            if x.device.type != "cpu":
                if x.dtype in (torch.bfloat16, torch.float16) and rows <= ops.SMALL_GEMM_MAX_M:
                    return ops.linear_int8(x, self.weight, self.scale, self.bias, residual)   # Triton, fused
                return self._dequantised_gemm(x, residual, False)
            fast = x.dtype == torch.bfloat16 and cpu_gemv.has_int8()
            if fast and rows <= int8_kernel_max_rows():
                return cpu_gemv.linear_int8(x, self.weight, self.scale, self.bias, residual)
            return self._dequantised_gemm(x, residual, fast)        # a prompt (or no AVX512): dequantise + GEMM
        if self.layout == "amx":
            return cpu_gemv.linear_packed(x, self.weight, self.out_features, self.in_features, self.bias, residual)
        if self.layout == "onednn":
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if residual is None:
                y = torch.ops.mkldnn._linear_pointwise(x2, self.weight, self.bias, "none", [], "")
            else:
                y = torch.ops.mkldnn._linear_pointwise.binary(
                    x2, residual.reshape(-1, self.out_features), self.weight, self.bias, "add")
            return y.view(*shape[:-1], self.out_features)
        if self.row_kernel and x.dtype == torch.bfloat16 and x.numel() <= self.row_kernel_rows * self.in_features:
            return cpu_gemv.linear(x, self.weight, self.bias, residual)
        return ops.linear(x, self.weight, self.bias, residual)   # small-batch Triton GEMM on CUDA, else F.linear

    def _dequantised_gemm(self, x: torch.Tensor, residual: torch.Tensor | None, fast) -> torch.Tensor:
        """x @ dequantise(weight).T, the weight dequantised a chunk of rows at a time, at most ``DEQUANT_CHUNK_BYTES``
        of temporaries (the scratch an offloaded model's working set counts). int8 (``fast`` a bool): to bf16 in C
        (``fast``, CPU) for a bf16 GEMM (AMX / oneDNN), else in torch (``ops.linear_int8``: the int8 rows in fp32, their
        product with the scales, that cast to x's dtype: up to 10 bytes per weight) for the GEMM of x's device. int4
        (``fast`` one of ``DEQUANT_INT4_BYTES_PER_WEIGHT``): "bf16" / "fp32" in C into one scratch reused by every
        chunk (bf16 rows / fp32 rows on the CPU), or "torch" (``ops.linear_int4``'s dequantisation)."""
        int4 = self.layout == "int4"
        per_weight = DEQUANT_INT4_BYTES_PER_WEIGHT[fast] if int4 else DEQUANT_BYTES_PER_WEIGHT[fast]
        n = self.out_features
        rows = max(1, DEQUANT_CHUNK_BYTES // (per_weight * self.in_features))
        scratch = None
        if int4 and fast != "torch":
            scratch = torch.empty(min(rows, n) * self.in_features,
                                  dtype=torch.bfloat16 if fast == "bf16" else torch.float32)

        def part(a, b):
            bias = None if self.bias is None else self.bias[a:b]
            res = None if residual is None else residual[..., a:b]
            if scratch is not None:
                w = scratch[:(b - a) * self.in_features].view(b - a, self.in_features)
                cpu_gemv.dequantize_int4(self.weight[a:b], self.scale[a:b], self.group_size, out=w)
                return ops.linear(x, w, bias, res)
            if int4:
                return ops.linear_int4(x, self.weight[a:b], self.scale[a:b], self.group_size, bias, res,
                                       dequantise=True)
            if fast:
                return ops.linear(x, cpu_gemv.dequantize_int8(self.weight[a:b], self.scale[a:b]), bias, res)
            return ops.linear_int8(x, self.weight[a:b], self.scale[a:b], bias, res)

        if rows >= n:
            return part(0, n)
        y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
        for a in range(0, n, rows):
            y[..., a:a + rows] = part(a, min(a + rows, n))
        return y

    def _int4(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if x.device.type != "cpu" or ops.uses_triton(x):       # CUDA, or the forced Triton path
            if rows <= ops.SMALL_GEMM_MAX_M:
                return ops.linear_int4(x, self.weight, self.scale, self.group_size, self.bias, residual)
            return self._dequantised_gemm(x, residual, "torch")
        c = cpu_gemv.has_int4() and cpu_gemv.int4_group_ok(self.group_size) and self.weight.stride(1) == 1
        if c and x.dtype == torch.bfloat16:
            if self.amx_rows and self.amx_rows <= rows <= INT4_AMX_ROWS[1]:
                return cpu_gemv.linear_int4_amx(x, self.weight, self.scale, self.group_size, self.bias, residual)
            if rows <= (self.amx_rows - 1 if self.amx_rows else int4_kernel_max_rows()):
                return cpu_gemv.linear_int4(x, self.weight, self.scale, self.group_size, self.bias, residual)
        fmt = "bf16" if c and x.dtype == torch.bfloat16 else "fp32" if c and x.dtype == torch.float32 else "torch"
        return self._dequantised_gemm(x, residual, fmt)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, layout={self.layout}"
