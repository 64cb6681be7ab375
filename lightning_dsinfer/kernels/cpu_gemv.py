"""CPU bf16 linear kernels: ``y = x @ W.T (+ bias) (+ residual)``, rounded once to bf16, for decode and prompts.

Decode reads every weight once per token; a oneDNN primitive per weight shape reads each shape fast on its
own, but alternating a layer's four shapes costs ~0.1 ms per switch. ``cpu_gemv.cpp`` has two kernels:

- :func:`linear_packed` (AMX-BF16 machines): the weight is re-laid out once by :func:`pack` into AMX tiles
  stored in the order they are read, so a call streams one contiguous run of memory per thread; any number of
  rows (x is the tile A operand straight from memory; large M goes in L2-sized chunks of rows).
- :func:`linear` (row-major weight, views allowed): 4 rows of W side by side with the next 4 prefetched, up to
  4 rows of x per pass; paths AVX512-BF16 (``_mm512_dpbf16_ps``), AVX512F and AVX2+FMA (bf16 widened to
  fp32 by a shift). For few rows (:func:`row_kernel_max_m`), or any number without bf16 instructions.

Weight-only quantised weights: :func:`linear_int8` / :func:`linear_packed_int8` (int8, a scale per row, row-major or
AMX tiles) and :func:`linear_int4` / :func:`linear_int4_amx` (int4 group-wise, ``reference.quantize_int4_groupwise``'s
packed layout used as it is: a row kernel for a few rows, AMX tile products for more), with :func:`dequantize_int8` /
:func:`dequantize_int4` for prompts' GEMMs where those do not apply.

The library is compiled on first use with the system C++ compiler (one translation unit, plain C ABI called
through ``ctypes``, no torch headers: about 2 s), cached under ``DSINFER_CACHE_DIR`` (default
``$XDG_CACHE_HOME/lightning_dsinfer`` or ``~/.cache/lightning_dsinfer``, else the temp dir) keyed by source and
compiler, and picks at run time the best path the CPU has (``__builtin_cpu_supports``; AMX also needs the
tile-state permission from the kernel, asked for with ``arch_prctl``). Threads: OpenMP, which resolves to the
``libgomp`` torch has loaded, so kernel and torch share one pool of ``torch.get_num_threads()`` threads;
small calls stay on the calling thread (the work thresholds live in cpu_gemv.cpp).

The same library has one-call forms of a decode step's small ops (bf16, a few rows; the torch composites cost
~20-50 us of dispatch each): :func:`rms_norm` (bf16 or Gemma's fp32 weights), :func:`layer_norm`,
:func:`silu_and_mul`, :func:`gated_act` (GeGLU), :func:`act` (GeLU erf / tanh, ReLU, SiLU), :func:`rotary_write_kv`
(full or partial rotary, q / k head norms), :func:`decode_attention` (fp32 scores / softmax / sum over the KV cache,
GQA, masks, soft-capped scores, attention sinks, ALiBi), and the shared-memory all-reduce exchange
(:func:`shm_exchange`).

:func:`available` is False, after one logged warning, when there is no compiler, the build or load fails,
the CPU has none of the paths, or ``DSINFER_CPU_GEMV=0``; callers then use oneDNN / ``F.linear``.
Reference: :func:`~lightning_dsinfer.kernels.reference.small_gemm`.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ISA_NAMES = {4: "amx_bf16", 3: "avx512_bf16", 2: "avx512", 1: "avx2"}
_ISA_CODES = {v: c for c, v in ISA_NAMES.items()}
# Rows up to which the row-major kernel beats F.linear, by best path (measured on the 2-core AVX512-BF16/AMX
# machine, with oneDNN held to each ISA by ONEDNN_MAX_CPU_ISA; one decoder layer's four shapes alternating):
# with AMX, F.linear (oneDNN on AMX) is as fast at M = 8 and 1.6x faster at 16; with AVX512-BF16 alone the
# kernel takes 0.81x of F.linear's time at M = 16 (as fast as oneDNN's pre-packed weights) and 0.90x at 32;
# without bf16 instructions oneDNN has no fast bf16 path and the kernel is 1.4-3.6x faster at every M tried
# (1 to 256).
_ROW_KERNEL_MAX_M = {4: 8, 3: 16, 2: None, 1: None}
# One library from two translation units: the kernels, and the offload tier's lossless weight codec.
_SOURCES = [Path(__file__).with_name("cpu_gemv.cpp"), Path(__file__).with_name("weight_codec.cpp")]
# -fopenmp: the kernel splits output rows over OpenMP threads; the library it links (libgomp.so.1) is the one
# torch has already loaded, so both share one thread pool. No -march: each path carries its own target attribute.
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-w", "-std=c++17"]


class _Kernel:
    def __init__(self, path: Path, build_s: float):
        lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self.fn = lib.dsi_gemv_bf16
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [p, i64, p, i64, p, p, i64, p, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
        self.amx = lib.dsi_gemm_amx
        self.amx.restype = ctypes.c_int
        self.amx.argtypes = [p, i64, p, p, p, i64, p, i64, i64, i64, i64, ctypes.c_int]
        self.pack = lib.dsi_pack_amx
        self.pack.restype = None
        self.pack.argtypes = [p, i64, i64, i64, p, ctypes.c_int]
        self.packed_numel = lib.dsi_packed_numel
        self.packed_numel.restype = i64
        self.packed_numel.argtypes = [i64, i64]
        self.rms_norm = lib.dsi_rms_norm_bf16
        self.rms_norm.restype = None
        self.rms_norm.argtypes = [p, i64, p, ctypes.c_int, p, i64, i64, i64, ctypes.c_float]
        self.rotary = lib.dsi_rotary_write_kv_bf16
        self.rotary.restype = None
        self.rotary.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, p, p, p, p, i64, i64, i64]
        self.layer_norm = lib.dsi_layer_norm_bf16
        self.layer_norm.restype = ctypes.c_int
        self.layer_norm.argtypes = [p, i64, p, p, p, i64, i64, i64, ctypes.c_float]
        self.act = lib.dsi_act_bf16
        self.act.restype = ctypes.c_int
        self.act.argtypes = [p, i64, i64, i64, p, i64, ctypes.c_int, ctypes.c_int]
        self.stream_read = lib.dsi_stream_read
        self.stream_read.restype = ctypes.c_uint64
        self.stream_read.argtypes = [p, i64, ctypes.c_int]
        self.head_norms = lib.dsi_head_norms_bf16
        self.head_norms.restype = None
        self.head_norms.argtypes = [p, i64, i64, i64, i64, p, p, ctypes.c_int, ctypes.c_float]
        self.silu_mul = lib.dsi_silu_mul_bf16
        self.silu_mul.restype = ctypes.c_int
        self.silu_mul.argtypes = [p, i64, i64, i64, p, i64]
        self.gated_act = lib.dsi_gated_act_bf16
        self.gated_act.restype = ctypes.c_int
        self.gated_act.argtypes = [p, i64, i64, i64, p, i64, ctypes.c_int, ctypes.c_int]
        self.attention = lib.dsi_decode_attention_bf16
        self.attention.restype = ctypes.c_int
        self.attention.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, i64, i64, p, i64, i64, i64, i64, i64,
                                   ctypes.c_float, ctypes.c_float, p, p, ctypes.c_int]
        self.gated_delta = lib.dsi_gated_delta_step_bf16
        self.gated_delta.restype = ctypes.c_int
        self.gated_delta.argtypes = [p, i64, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                     ctypes.c_float, ctypes.c_int]
        self.mamba1_conv = lib.dsi_mamba1_conv_bf16
        self.mamba1_conv.restype = ctypes.c_int
        self.mamba1_conv.argtypes = [p, i64, p, p, p, p, i64, i64, i64, ctypes.c_int]
        self.mamba1_scan = lib.dsi_mamba1_scan_bf16
        self.mamba1_scan.restype = ctypes.c_int
        self.mamba1_scan.argtypes = [p, p, i64, i64, p, p, i64, i64, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int]
        self.mamba2 = lib.dsi_mamba2_step_bf16
        self.mamba2.restype = ctypes.c_int
        self.mamba2.argtypes = [p, i64, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
        self.short_conv = lib.dsi_short_conv_step_bf16
        self.short_conv.restype = ctypes.c_int
        self.short_conv.argtypes = [p, i64, p, p, p, i64, i64, i64, i64, ctypes.c_int]
        self.decode_stack = lib.dsi_decode_stack
        self.decode_stack.restype = ctypes.c_int
        self.decode_stack.argtypes = [p, p, p, i64, p, p, p, p, i64, p, i64, i64, p, i64, i64, p, p]
        self.shm_exchange = lib.dsi_shm_exchange
        self.shm_exchange.restype = ctypes.c_int
        self.shm_exchange.argtypes = [p, ctypes.c_int, i64, p, i64, p, ctypes.c_int, ctypes.c_int, i64, ctypes.c_double,
                                      ctypes.c_int]
        self.amx_int8 = lib.dsi_gemm_amx_int8
        self.amx_int8.restype = ctypes.c_int
        self.amx_int8.argtypes = [p, i64, p, p, p, p, i64, p, i64, i64, i64, i64, ctypes.c_int]
        self.pack_int8 = lib.dsi_pack_amx_int8
        self.pack_int8.restype = None
        self.pack_int8.argtypes = [p, i64, i64, i64, p, ctypes.c_int]
        self.int8 = lib.dsi_gemv_int8
        self.int8.restype = ctypes.c_int
        self.int8.argtypes = [p, i64, p, i64, p, p, p, i64, p, i64, i64, i64, i64, ctypes.c_int]
        self.dequant_int8 = lib.dsi_dequant_int8_bf16
        self.dequant_int8.restype = ctypes.c_int
        self.dequant_int8.argtypes = [p, i64, p, i64, i64, p, ctypes.c_int]
        self.int4 = lib.dsi_gemv_int4
        self.int4.restype = ctypes.c_int
        self.int4.argtypes = [p, i64, p, i64, p, i64, i64, p, p, i64, p, i64, i64, i64, i64, ctypes.c_int,
                              ctypes.c_int]
        self.amx_int4 = lib.dsi_gemm_amx_int4
        self.amx_int4.restype = ctypes.c_int
        self.amx_int4.argtypes = [p, i64, p, i64, p, i64, i64, p, p, i64, p, i64, i64, i64, i64, ctypes.c_int]
        self.dequant_int4 = lib.dsi_dequant_int4
        self.dequant_int4.restype = ctypes.c_int
        self.dequant_int4.argtypes = [p, i64, p, i64, i64, i64, i64, p, ctypes.c_int, ctypes.c_int]
        self.packed_bytes = lib.dsi_packed_bytes
        self.packed_bytes.restype = i64
        self.packed_bytes.argtypes = [i64, ctypes.c_int, i64]
        self.pack_weights = lib.dsi_pack_weights
        self.pack_weights.restype = i64
        self.pack_weights.argtypes = [p, i64, ctypes.c_int, i64, p, p, p]
        self.unpack_weights = lib.dsi_unpack_weights
        self.unpack_weights.restype = ctypes.c_int
        self.unpack_weights.argtypes = [p, i64, ctypes.c_int, p, i64, p, ctypes.c_int]
        lib.dsi_gemv_best_isa.restype = ctypes.c_int
        self.cpu_isa = lib.dsi_gemv_best_isa()   # best path of this CPU
        self.best_isa = self.cpu_isa              # the path calls take (lower inside use_path)
        self.path, self.build_s = path, build_s


_lock = threading.Lock()
_kernel: _Kernel | None = None
_tried = False
_off = 0                      # depth of active disabled() blocks


def _cache_dir() -> Path:
    root = os.environ.get("DSINFER_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_dsinfer"


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _build() -> tuple[Path, float]:
    """Compile the kernel (or find it in the cache); returns the library path and the seconds spent."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, g++, c++, clang++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    source = b"".join(src.read_bytes() for src in _SOURCES)
    key = hashlib.sha256(source + version.encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    name = f"cpu_gemv_{key}.so"
    for out_dir in (_cache_dir(), Path(tempfile.gettempdir()) / "lightning_dsinfer"):
        if (out_dir / name).exists():
            return out_dir / name, 0.0
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if os.access(out_dir, os.W_OK):
                break
        except OSError:
            continue
    else:
        raise RuntimeError(f"no writable cache directory for the kernel ({_cache_dir()} or the temp dir)")
    lib = out_dir / name
    t = time.perf_counter()
    # Build under a private name and rename: processes compiling at the same time (ranks) never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *_FLAGS, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib, time.perf_counter() - t


def _load() -> _Kernel | None:
    global _kernel, _tried
    with _lock:
        if _tried:
            return _kernel
        _tried = True
        if os.environ.get("DSINFER_CPU_GEMV", "1") in ("0", "false", "False"):
            log.info("lightning_dsinfer: CPU GEMV kernel disabled (DSINFER_CPU_GEMV=0)")
            return None
        try:
            k = _Kernel(*_build())
        except Exception as e:  # no compiler, failed build, unloadable library: use the oneDNN path
            log.warning("lightning_dsinfer: CPU GEMV kernel unavailable, using oneDNN for bf16 linears (%s)", e)
            return None
        if k.best_isa == 0:
            log.warning("lightning_dsinfer: CPU GEMV kernel needs AVX2+FMA or AVX512; using oneDNN for bf16 linears")
            return None
        log.info("lightning_dsinfer: CPU GEMV kernel %s path (%s, built in %.1f s)", ISA_NAMES[k.best_isa],
                 k.path, k.build_s)
        _kernel = k
        return k


def available() -> bool:
    """True when the kernel is built and the CPU runs one of its paths (builds it on the first call)."""
    return not _off and _load() is not None


@contextlib.contextmanager
def disabled():
    """Within the block :func:`available` is False: modules built there take their oneDNN / F.linear path
    (benchmarks compare both in one process; tests check the fallback)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def isa() -> str | None:
    """Name of the path this CPU runs (``avx512_bf16``, ``avx512``, ``avx2``), or None when unavailable."""
    k = _load()
    return None if k is None else ISA_NAMES[k.best_isa]


def supported_isas() -> list[str]:
    """Every path this CPU can run (the best first); tests check each of them."""
    k = _load()
    return [] if k is None else [ISA_NAMES[i] for i in range(k.cpu_isa, 0, -1)]


def build_seconds() -> float | None:
    """Seconds this process spent compiling the kernel (0.0: found in the cache); None when unavailable."""
    k = _load()
    return None if k is None else k.build_s


@contextlib.contextmanager
def use_path(name: str):
    """Within the block calls and newly built modules take path ``name`` (one of :func:`supported_isas`) as if
    it were the best one here: tests and benchmarks check the paths of smaller CPUs on this one."""
    k = _load()
    if k is None or name not in supported_isas():
        raise ValueError(f"path {name!r} does not run here (supported: {supported_isas()})")
    old, k.best_isa = k.best_isa, _ISA_CODES[name]
    try:
        yield
    finally:
        k.best_isa = old


def has_amx() -> bool:
    """True when the AMX path runs here (then :func:`pack` / :func:`linear_packed` are usable)."""
    return available() and _kernel.best_isa >= 4


def row_kernel_max_m() -> float:
    """Rows (x.numel() / K) up to which :func:`linear` beats ``F.linear`` here (inf: always; 0: unavailable)."""
    k = _load()
    if k is None:
        return 0
    limit = _ROW_KERNEL_MAX_M[k.best_isa]
    return float("inf") if limit is None else limit


def supports(weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes this weight: bf16 [N, K] on the CPU with unit stride along K."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.stride(1) == 1 and available())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The AMX layout of a bf16 [N, K] weight (1-D, ``ceil32(N) * ceil32(K)`` elements; see cpu_gemv.cpp):
    tiles of 16 rows x 32 columns in k-pair order, zero-padded. Requires :func:`has_amx`."""
    if not has_amx():
        raise RuntimeError("the AMX path is not available on this CPU")
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"bf16 [N, K] CPU weight expected, got {weight.dtype} {tuple(weight.shape)} "
                         f"on {weight.device}")
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    n, kdim = w.shape
    out = torch.empty(_kernel.packed_numel(n, kdim), dtype=torch.bfloat16)
    _kernel.pack(w.data_ptr(), w.stride(0), n, kdim, out.data_ptr(), torch.get_num_threads())
    return out


def _rows(x: torch.Tensor, kdim: int) -> torch.Tensor:
    if x.dtype != torch.bfloat16:
        raise ValueError(f"bf16 activations expected, got {x.dtype}")
    if x.shape[-1] != kdim:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {kdim}")
    x2 = x.reshape(-1, kdim)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _operands(x: torch.Tensor, n: int, kdim: int, bias: torch.Tensor | None, residual: torch.Tensor | None):
    """What every row-kernel call takes: (x as rows [M, K], y [..., n] bf16, the bias pointer, the residual
    as [M, N] rows with unit inner stride or None: pass ``*_residual_args(r2)``, keeping r2 alive over the call),
    bias and residual checked. With no rows there is nothing to run (nor to check)."""
    x2 = _rows(x, kdim)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    if x2.shape[0] == 0:
        return x2, y, None, None
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous() or bias.numel() != n):
        raise ValueError(f"bias must be contiguous bf16 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    bias_ptr = None if bias is None else bias.data_ptr()
    if residual is None:
        return x2, y, bias_ptr, None
    r2 = residual.reshape(-1, n)
    if r2.shape[0] != x2.shape[0] or residual.dtype != torch.bfloat16:
        raise ValueError(f"residual must be bf16 [{x2.shape[0]}, {n}], got {residual.dtype} {tuple(residual.shape)}")
    return x2, y, bias_ptr, (r2 if r2.stride(-1) == 1 else r2.contiguous())


def _residual_args(r2: torch.Tensor | None) -> tuple[int | None, int]:
    """(pointer, row stride) of a residual from :func:`_operands`, (None, 0) without one."""
    return (None, 0) if r2 is None else (r2.data_ptr(), r2.stride(0))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)`` rounded once to bf16, weight row-major. x [..., K] bf16, weight
    [N, K] bf16 with unit stride along K (views are fine: nothing is copied), bias [N], residual [..., N].
    ``isa`` forces a path (tests): ``avx512_bf16`` / ``avx512`` / ``avx2`` (``amx_bf16`` means ``avx512_bf16``
    here: AMX needs :func:`pack`). Requires :func:`available`."""
    k = _kernel if _kernel is not None else _load()
    if k is None:
        raise RuntimeError("CPU GEMV kernel is not available (see the warning logged when it was loaded)")
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"bf16 [N, K] weight with unit inner stride expected, got {weight.dtype} "
                         f"{tuple(weight.shape)} stride {tuple(weight.stride())}")
    n, kdim = weight.shape
    x2, y, bias_ptr, r2 = _operands(x, n, kdim, bias, residual)
    if x2.shape[0] == 0:
        return y
    code = k.best_isa if isa is None else _ISA_CODES[isa]
    rc = k.fn(x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0), bias_ptr,
              *_residual_args(r2), y.data_ptr(), n,
              x2.shape[0], n, kdim, torch.get_num_threads(), code)
    if rc != 0:
        raise RuntimeError(f"cpu_gemv: path {isa} is not runnable on this CPU (best: {ISA_NAMES[k.best_isa]})")
    return y


def has_int8() -> bool:
    """True when :func:`linear_int8` runs here (AVX512)."""
    return available() and _kernel.cpu_isa >= 2


def _int8_call(fn, x: torch.Tensor, weight_args: tuple, scale: torch.Tensor, n: int, kdim: int,
               bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """One call of an int8 kernel (``dsi_gemv_int8``: weight args (ptr, row stride); ``dsi_gemm_amx_int8``: (ptr,)):
    checks the scale, lays out x / bias / residual and returns y [..., n] bf16."""
    if scale.dtype != torch.float32 or not scale.is_contiguous() or scale.numel() != n:
        raise ValueError(f"scale must be contiguous fp32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    x2, y, bias_ptr, r2 = _operands(x, n, kdim, bias, residual)
    if x2.shape[0] == 0:
        return y
    rc = fn(x2.data_ptr(), x2.stride(0), *weight_args, scale.data_ptr(), bias_ptr,
            *_residual_args(r2), y.data_ptr(), n,
            x2.shape[0], n, kdim, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("cpu_gemv: the int8 kernel refused the call (needs AVX512; the tile layout needs AMX)")
    return y


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ qweight.T) * scale (+ bias) (+ residual)`` rounded once to bf16: x [..., K] bf16, qweight int8 [N, K]
    (unit inner stride), scale fp32 [N] (per output row), bias [N] / residual [..., N] bf16. Requires
    :func:`has_int8`. Reference: ``reference.small_gemm(x, reference.dequantize_int8(qweight, scale), ...)``."""
    k = _kernel if _kernel is not None else _load()
    if k is None or k.cpu_isa < 2:
        raise RuntimeError("the int8 CPU kernel needs the C library and AVX512")
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.stride(1) != 1:
        raise ValueError(f"int8 [N, K] weight with unit inner stride expected, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, kdim = qweight.shape
    return _int8_call(k.int8, x, (qweight.data_ptr(), qweight.stride(0)), scale, n, kdim, bias, residual)


def packed_numel(n: int, kdim: int) -> int:
    """Elements of :func:`pack` / :func:`pack_int8`'s output for an [n, kdim] weight."""
    k = _load()
    if k is None:
        raise RuntimeError("CPU GEMV kernel is not available")
    return int(k.packed_numel(n, kdim))


def pack_int8(qweight: torch.Tensor) -> torch.Tensor:
    """The AMX layout of an int8 [N, K] weight (as :func:`pack`, one byte per element), for
    :func:`linear_packed_int8`. Requires :func:`has_amx`."""
    k = _load()
    if k is None or qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.stride(1) != 1:
        raise ValueError("pack_int8 needs the C library and an int8 [N, K] weight with unit inner stride")
    n, kdim = qweight.shape
    out = torch.empty(k.packed_numel(n, kdim), dtype=torch.int8)
    k.pack_int8(qweight.data_ptr(), qweight.stride(0), n, kdim, out.data_ptr(), torch.get_num_threads())
    return out


def linear_packed_int8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int,
                       in_features: int, bias: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ q.T) * scale (+ bias) (+ residual)`` rounded once to bf16, q in the layout of :func:`pack_int8`, any
    number of rows (1-2: tiles widened to fp32; more: widened to bf16, exact, for AMX tile products). Requires
    :func:`has_amx`."""
    k = _kernel if _kernel is not None else _load()
    if k is None:
        raise RuntimeError("CPU GEMV kernel is not available")
    return _int8_call(k.amx_int8, x, (packed.data_ptr(),), scale, out_features, in_features, bias, residual)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``bf16(qweight * scale[:, None])`` (round to nearest even), [N, K]: an int8 weight for a prompt's GEMM.
    Requires :func:`has_int8`."""
    k = _kernel if _kernel is not None else _load()
    n, kdim = qweight.shape
    out = torch.empty(n, kdim, dtype=torch.bfloat16)
    if k is None or qweight.dtype != torch.int8 or qweight.stride(1) != 1 or scale.dtype != torch.float32 \
            or k.dequant_int8(qweight.data_ptr(), qweight.stride(0), scale.contiguous().data_ptr(), n, kdim,
                              out.data_ptr(), torch.get_num_threads()) != 0:
        raise RuntimeError("cpu_gemv.dequantize_int8 needs the C library, AVX512, int8 [N, K] and fp32 scales")
    return out


def int4_group_ok(group_size: int) -> bool:
    """Group sizes the int4 kernels take: 8, 16, 32, 64 or a multiple of 128 (a group's inputs fill whole fp32 lanes
    of a 128-input chunk, or whole chunks; see cpu_gemv.cpp)."""
    return group_size in (8, 16, 32, 64) or (group_size > 0 and group_size % 128 == 0)


def has_int4() -> bool:
    """True when :func:`linear_int4` / :func:`dequantize_int4` run here (AVX512; AVX512-BF16 for the fast path)."""
    return available() and _kernel.cpu_isa >= 2


def _int4_operands(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> tuple[int, int]:
    """(N, K) of a packed int4 weight after checking it against its scales and group size."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1 or packed.device.type != "cpu":
        raise ValueError(f"packed int4 weight must be uint8 [N, K / 2] on the CPU with unit inner stride, got "
                         f"{packed.dtype} {tuple(packed.shape)} on {packed.device}")
    n, kdim = packed.shape[0], 2 * packed.shape[1]
    if not int4_group_ok(group_size) or kdim % group_size:
        raise ValueError(f"group_size={group_size}: the int4 kernels take 8, 16, 32, 64 or a multiple of 128, "
                         f"dividing K={kdim}")
    if scale.dtype != torch.float32 or scale.shape != (n, kdim // group_size) or scale.stride(1) != 1:
        raise ValueError(f"scales must be fp32 [{n}, {kdim // group_size}] with unit inner stride, got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    return n, kdim


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                isa: str | None = None) -> torch.Tensor:
    """``x @ dequantize_int4(packed, scale, group_size).T (+ bias) (+ residual)`` rounded once to bf16: x [..., K]
    bf16, packed uint8 [N, K / 2] (``reference.quantize_int4_groupwise``'s layout, views with a row stride are
    fine), scale fp32 [N, K / group_size], bias [N] / residual [..., N] bf16. fp32 sums per 128-input chunk times the
    groups' scales (not the bf16-rounded weights). ``isa`` forces a path (tests): ``avx512_bf16`` (``amx_bf16``
    means the same) or ``avx512``. Requires :func:`has_int4`; for decode-sized row counts (time grows with rows)."""
    k = _kernel if _kernel is not None else _load()
    if k is None or k.cpu_isa < 2:
        raise RuntimeError("the int4 CPU kernel needs the C library and AVX512")
    n, kdim = _int4_operands(packed, scale, group_size)
    x2, y, bias_ptr, r2 = _operands(x, n, kdim, bias, residual)
    if x2.shape[0] == 0:
        return y
    code = k.best_isa if isa is None else _ISA_CODES[isa]
    rc = k.int4(x2.data_ptr(), x2.stride(0), packed.data_ptr(), packed.stride(0), scale.data_ptr(), scale.stride(0),
                group_size, bias_ptr, *_residual_args(r2),
                y.data_ptr(), n, x2.shape[0], n, kdim, torch.get_num_threads(), code)
    if rc != 0:
        raise RuntimeError(f"cpu_gemv: the int4 kernel refused path {ISA_NAMES.get(code)} (best here: "
                           f"{ISA_NAMES[k.cpu_isa]})")
    return y


def linear_int4_amx(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_int4` through AMX tile products (the packed weight decoded 32 rows x 128 inputs at a time to
    unscaled bf16 tiles, each group's products times its scales), for more than a couple of rows, prompts included;
    ``group_size`` a multiple of 128. Requires :func:`has_amx`."""
    k = _kernel if _kernel is not None else _load()
    if k is None or k.best_isa < 4:
        raise RuntimeError("the AMX path is not available on this CPU")
    n, kdim = _int4_operands(packed, scale, group_size)
    if group_size % 128:
        raise ValueError(f"the AMX int4 path takes groups of a multiple of 128 inputs, got {group_size}")
    x2, y, bias_ptr, r2 = _operands(x, n, kdim, bias, residual)
    if x2.shape[0] == 0:
        return y
    rc = k.amx_int4(x2.data_ptr(), x2.stride(0), packed.data_ptr(), packed.stride(0), scale.data_ptr(),
                    scale.stride(0), group_size, bias_ptr, *_residual_args(r2), y.data_ptr(), n, x2.shape[0], n, kdim,
                    torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"cpu_gemv: the AMX int4 call failed for M={x2.shape[0]} N={n} K={kdim}")
    return y


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """``reference.dequantize_int4(packed, scale, group_size)`` [N, K] in fp32, or rounded to bf16 (nearest even):
    an int4 weight for a prompt's GEMM; into ``out`` (contiguous [N, K] bf16 / fp32: its dtype wins) when given.
    Requires :func:`has_int4`."""
    k = _kernel if _kernel is not None else _load()
    dtype = dtype if out is None else out.dtype
    if k is None or k.cpu_isa < 2 or dtype not in (torch.bfloat16, torch.float32):
        raise RuntimeError("cpu_gemv.dequantize_int4 needs the C library, AVX512 and a bf16 / fp32 output")
    n, kdim = _int4_operands(packed, scale, group_size)
    if out is None:
        out = torch.empty(n, kdim, dtype=dtype)
    elif out.shape != (n, kdim) or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous CPU [{n}, {kdim}] tensor, got {tuple(out.shape)}")
    if k.dequant_int4(packed.data_ptr(), packed.stride(0), scale.data_ptr(), scale.stride(0), group_size, n, kdim,
                      out.data_ptr(), int(dtype == torch.float32), torch.get_num_threads()) != 0:
        raise RuntimeError(f"cpu_gemv.dequantize_int4 failed for [{n}, {kdim}], group_size={group_size}")
    return out


def linear_packed(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int,
                  bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear` for a weight [out_features, in_features] in the AMX layout (``packed = pack(weight)``);
    any number of rows. Requires :func:`has_amx`."""
    k = _kernel if _kernel is not None else _load()
    if k is None or k.best_isa < 4:
        raise RuntimeError("the AMX path is not available on this CPU")
    n, kdim = out_features, in_features
    if packed.numel() != k.packed_numel(n, kdim) or packed.dtype != torch.bfloat16:
        raise ValueError(f"packed weight has {packed.numel()} {packed.dtype} elements, bf16 [{n}, {kdim}] packs to "
                         f"{k.packed_numel(n, kdim)}")
    x2, y, bias_ptr, r2 = _operands(x, n, kdim, bias, residual)
    if x2.shape[0] == 0:
        return y
    rc = k.amx(x2.data_ptr(), x2.stride(0), packed.data_ptr(), bias_ptr, *_residual_args(r2), y.data_ptr(), n,
               x2.shape[0], n, kdim, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"cpu_gemv: AMX call failed for M={x2.shape[0]} N={n} K={kdim}")
    return y


RMS_NORM_MAX_ROWS = 64        # decode-sized calls; prompts keep torch's multi-threaded composite


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`reference.rms_norm` for a few contiguous bf16 rows in one C call (the composite is ~6 torch ops,
    ~45 us at decode sizes): a bf16 weight in HF's order (normalise in fp32, round, scale, round), an fp32 one
    (Gemma's (1 + w)) in Gemma's (normalise and scale in fp32, round once). None where it does not apply (the caller
    runs the reference)."""
    k = _kernel if _kernel is not None else _load()
    n = x.shape[-1]
    if (k is None or _off or x.dtype != torch.bfloat16 or weight.dtype not in (torch.bfloat16, torch.float32)
            or not x.is_contiguous() or not weight.is_contiguous() or weight.numel() != n or x.device.type != "cpu"
            or weight.device.type != "cpu" or x.numel() > RMS_NORM_MAX_ROWS * n):
        return None
    y = torch.empty_like(x)
    k.rms_norm(x.data_ptr(), n, weight.data_ptr(), int(weight.dtype == torch.float32), y.data_ptr(), n,
               x.numel() // n, n, eps)
    return y


def shm_exchange():
    """The C shared-memory exchange (see ``dsi_shm_exchange``), or None (no kernel: parallel/shm.py's torch path)."""
    k = _kernel if _kernel is not None else _load()
    return None if k is None or _off else k.shm_exchange


ROTARY_MAX_TOKENS = 64        # B x T of a decode step; prompts keep torch's vectorised composite


def rotary_write_kv(qkv, num_heads, cos, sin_signed, k_cache=None, v_cache=None, col=0, q_norm=None, k_norm=None,
                    eps=0.0):
    """:func:`reference.rotary_write_kv` for a few contiguous bf16 tokens in C (the q / k head norms, where given, in
    one more call, on a copy of qkv: bf16 weights as :func:`rms_norm`'s, fp32 ones (Gemma 3's (1 + w)) scaled in fp32
    and rounded once), or None where it does not apply (the caller runs the reference). cos / sin
    [B, T, 1, R] with R even, R <= D: the first R dims of each head rotate, the rest pass through (partial rotary)."""
    k = _kernel if _kernel is not None else _load()
    if k is None or _off or qkv.dtype != torch.bfloat16 or qkv.dim() != 4 or not qkv.is_contiguous():
        return None
    b, t, heads, d = qkv.shape
    hq, hkv = num_heads, (heads - num_heads) // 2
    if q_norm is not None and not all(n is not None and n.dtype == q_norm.dtype and n.is_contiguous()
                                      and n.dtype in (torch.bfloat16, torch.float32) and n.numel() == d
                                      for n in (q_norm, k_norm)):
        return None
    r = cos.shape[-1]
    if (b * t > ROTARY_MAX_TOKENS or r % 2 or not 0 < r <= d or cos.shape != (b, t, 1, r)
            or sin_signed.shape != cos.shape or not cos.is_contiguous() or not sin_signed.is_contiguous()
            or cos.dtype != torch.bfloat16 or sin_signed.dtype != torch.bfloat16 or isinstance(col, torch.Tensor)):
        return None
    if k_cache is not None:
        if (k_cache.dtype != torch.bfloat16 or k_cache.stride() != v_cache.stride() or k_cache.shape != v_cache.shape
                or k_cache.shape[:2] != (b, hkv) or k_cache.shape[3] != d or k_cache.stride(3) != 1
                or k_cache.stride(2) != d or not 0 <= col <= k_cache.shape[2] - t):
            return None
    if q_norm is not None:
        qkv = qkv.clone()
        k.head_norms(qkv.data_ptr(), b * t, hq, hkv, d, q_norm.data_ptr(), k_norm.data_ptr(),
                     int(q_norm.dtype == torch.float32), eps)
    q = torch.empty(b, t, hq, d, dtype=torch.bfloat16)
    kk = torch.empty(b, t, hkv, d, dtype=torch.bfloat16)
    k.rotary(qkv.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), b, t, hq, hkv, d, r, q.data_ptr(), kk.data_ptr(),
             None if k_cache is None else k_cache.data_ptr(), None if v_cache is None else v_cache.data_ptr(),
             0 if k_cache is None else k_cache.stride(0), 0 if k_cache is None else k_cache.stride(1), col)
    return q, kk, qkv[:, :, hq + hkv:]


SILU_MUL_MAX_ROWS = 64        # decode-sized calls; prompts keep torch's multi-threaded composite


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """:func:`reference.silu_and_mul` (SwiGLU) for a few bf16 rows in one C call (the composite is 3 torch ops,
    ~50 us at decode sizes); None where it does not apply (the caller runs the reference), also on CPUs without
    AVX512 (:func:`has_wide_ops`)."""
    k = _kernel if _kernel is not None else _load()
    n2 = gate_up.shape[-1]
    if (k is None or _off or k.best_isa < 2 or gate_up.dtype != torch.bfloat16 or not gate_up.is_contiguous() or n2 % 2
            or gate_up.device.type != "cpu" or gate_up.numel() > SILU_MUL_MAX_ROWS * n2):
        return None
    inter = n2 // 2
    y = torch.empty(*gate_up.shape[:-1], inter, dtype=torch.bfloat16)
    k.silu_mul(gate_up.data_ptr(), n2, gate_up.numel() // n2, inter, y.data_ptr(), inter)
    return y


LAYER_NORM_MAX_ROWS = 64      # decode-sized calls; prompts keep torch's multi-threaded kernel


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """LayerNorm over the last dim with weight and bias for a few contiguous bf16 rows in one C call: fp32 mean and
    variance, ``(x * rstd - mean * rstd) * w + b`` (torch's CPU order), one rounding; torch's own kernel sums in
    another order, so a rare element lands one bf16 ulp away (tests/test_cpu_gemv.py). None where it does not apply
    (the caller runs torch's), also on CPUs without AVX512 (:func:`has_wide_ops`)."""
    k = _kernel if _kernel is not None else _load()
    n = x.shape[-1]
    if (k is None or _off or k.best_isa < 2 or bias is None or x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or not x.is_contiguous() or x.numel() > LAYER_NORM_MAX_ROWS * n or n == 0
            or weight.dtype != torch.bfloat16 or bias.dtype != torch.bfloat16 or weight.numel() != n
            or bias.numel() != n or not weight.is_contiguous() or not bias.is_contiguous()):
        return None
    y = torch.empty_like(x)
    k.layer_norm(x.data_ptr(), n, weight.data_ptr(), bias.data_ptr(), y.data_ptr(), n, x.numel() // n, n, eps)
    return y


ACT_MAX_ROWS = 64             # decode-sized calls; prompts keep torch's multi-threaded ops
ACT_KINDS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "relu2": 4}   # dsi_act_bf16's kinds (reference.act's
#                                                                            names; relu2 plain only, not gated)


def act(x: torch.Tensor, name: str) -> torch.Tensor | None:
    """:func:`reference.act` (a plain MLP's activation: gelu | gelu_tanh | relu | silu | relu2) for a few contiguous bf16
    rows in one C call, fp32 inside, one rounding, in torch's order of operations. erf and tanh are vectorised
    approximations within ~1 fp32 ulp (torch's erf GeLU is oneDNN's own approximation, which loses accuracy below
    x = -3), so a bf16 result may sit one ulp from torch's, mostly in that tail (tests/test_cpu_gemv.py). None where
    it does not apply (the caller runs the reference), also on CPUs without AVX512 (:func:`has_wide_ops`)."""
    k = _kernel if _kernel is not None else _load()
    n = x.shape[-1]
    kind = ACT_KINDS.get(name)
    if (k is None or _off or k.best_isa < 2 or kind is None or x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or not x.is_contiguous() or x.numel() > ACT_MAX_ROWS * n or n == 0):
        return None
    y = torch.empty_like(x)
    k.act(x.data_ptr(), n, x.numel() // n, n, y.data_ptr(), n, kind, torch.get_num_threads())
    return y


def gated_act(gate_up: torch.Tensor, name: str) -> torch.Tensor | None:
    """A gated MLP's activation ``act(gate) * up`` for a few contiguous bf16 rows of gate | up in one C call, as
    :func:`reference.gelu_and_mul` rounds (act(gate) rounded to bf16, then the product rounded; fp32 inside each,
    :func:`act`'s vectorised erf / tanh, so a rare element sits one bf16 ulp from torch's): GeGLU (``name`` gelu_tanh
    or gelu; silu gives :func:`silu_and_mul`'s SwiGLU). None where it does not apply (the caller runs the reference),
    also on CPUs without AVX512 (:func:`has_wide_ops`)."""
    k = _kernel if _kernel is not None else _load()
    n2 = gate_up.shape[-1]
    kind = ACT_KINDS.get(name) if name != "relu2" else None
    if (k is None or _off or k.best_isa < 2 or kind is None or gate_up.dtype != torch.bfloat16
            or not gate_up.is_contiguous() or n2 % 2 or n2 == 0 or gate_up.device.type != "cpu"
            or gate_up.numel() > ACT_MAX_ROWS * n2):
        return None
    inter = n2 // 2
    y = torch.empty(*gate_up.shape[:-1], inter, dtype=torch.bfloat16)
    k.gated_act(gate_up.data_ptr(), n2, gate_up.numel() // n2, inter, y.data_ptr(), inter, kind,
                torch.get_num_threads())
    return y


DECODE_ATTENTION_MAX_HEAD_DIM = 512      # (Gemma 4 full layers: 512)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, softcap: float | None = None,
                     sinks: torch.Tensor | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`reference.attention` for one query per row (decode) in one C call: q [B, Hq, 1, D], k / v
    [B, Hkv, L, D] bf16 views (the cache; unit stride along D, same strides for both), mask bool broadcastable to
    [B, 1, 1, L] or None. fp32 scores (``softcap``: soft-capped, Gemma 2, with :func:`act`'s vectorised tanh), softmax
    (``sinks`` [Hq], gpt-oss: a logit per query head in its denominator, with no value; ``alibi`` [Hq], BLOOM: slopes,
    slope * (j - (L - 1)) added to key j's fp32 score after the cap, before the mask) and sum, one rounding (the
    reference multiplies in bf16 where scores are capped, as HF's eager attention).
    Returns [B, Hq, 1, D], or None where it does not apply (the caller runs the reference), also on CPUs without
    AVX512 (:func:`has_wide_ops`)."""
    kern = _kernel if _kernel is not None else _load()
    if kern is None or _off or kern.best_isa < 2 or q.dim() != 4 or k_cache.dim() != 4:
        return None
    b, hq, t, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    if (t != 1 or q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16 or v_cache.dtype != torch.bfloat16
            or q.device.type != "cpu" or k_cache.device.type != "cpu" or q.stride(3) != 1 or k_cache.stride(3) != 1
            or k_cache.stride() != v_cache.stride() or k_cache.shape != v_cache.shape or k_cache.shape[0] != b
            or k_cache.shape[3] != d or hq % hkv or d > DECODE_ATTENTION_MAX_HEAD_DIM or length < 1
            or (softcap is not None and not softcap > 0) or (sinks is not None and sinks.shape != (hq,))
            or (alibi is not None and alibi.shape != (hq,))):
        return None
    if sinks is not None:
        sinks = sinks.to(device="cpu", dtype=torch.float32).contiguous()    # read by the C code (kept alive here)
    if alibi is not None:
        alibi = alibi.to(device="cpu", dtype=torch.float32).contiguous()    # likewise
    mask_ptr, mb, ml = None, 0, 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != length \
                or mask.shape[0] not in (1, b):
            return None
        mask_ptr, mb, ml = mask.data_ptr(), (mask.stride(0) if mask.shape[0] == b else 0), mask.stride(3)
    out = torch.empty(b, hq, 1, d, dtype=torch.bfloat16)
    kern.attention(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                   k_cache.stride(1), k_cache.stride(2), mask_ptr, mb, ml, out.data_ptr(), b, hq, hkv, length, d,
                   scale, softcap or 0.0, None if sinks is None else sinks.data_ptr(),
                   None if alibi is None else alibi.data_ptr(), torch.get_num_threads())
    return out


# ------------------------------------------------------------------- a decode step through every block in one call
class StackLinear(ctypes.Structure):
    """``DsiLinear`` of cpu_gemv.cpp: one linear of a block (weight in the AMX layout, row-major, int8 or int4)."""
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("ldw", ctypes.c_int64), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64), ("packed", ctypes.c_int64), ("add_residual", ctypes.c_int64),
                ("reduce", ctypes.c_int64), ("scale", ctypes.c_void_p), ("group", ctypes.c_int64),
                ("amx_rows", ctypes.c_int64)]


class StackLayer(ctypes.Structure):
    """``DsiLayer`` of cpu_gemv.cpp: one block's linears, norms (LayerNorms: with their biases; post_norm null: one
    shared norm; a sandwich block's norms of attention's and the MLP's outputs), KV-cache tensors and ALiBi slopes
    (fp32 [hq], BLOOM; null: none); its own KV heads, head dim and MLP width; Gemma 4's v norm, K/V read from an
    earlier layer's cache (``shared_kv``), per-layer input (gate, projection, norm, row index) and layer scalar."""
    _fields_ = [("qkv", StackLinear), ("o", StackLinear), ("gate_up", StackLinear), ("down", StackLinear),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("input_bias", ctypes.c_void_p),
                ("post_bias", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("cb", ctypes.c_int64),
                ("ch", ctypes.c_int64), ("sliding", ctypes.c_int64), ("attn_out_norm", ctypes.c_void_p),
                ("mlp_out_norm", ctypes.c_void_p), ("alibi", ctypes.c_void_p),
                # Gemma 4: the layer's own shape, v's norm, K/V of an earlier layer, the per-layer input, the scalar
                ("hkv", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64),
                ("v_norm", ctypes.c_void_p), ("shared_kv", ctypes.c_int64), ("pl_gate", StackLinear),
                ("pl_proj", StackLinear), ("pl_norm", ctypes.c_void_p), ("pl_index", ctypes.c_int64),
                ("scalar", ctypes.c_void_p)]


class StackShape(ctypes.Structure):
    """``DsiStack`` of cpu_gemv.cpp: sizes, threads, the shared-memory all-reduce (slots null: none), and the block's
    form: norm kind (0 RMSNorm, 1 LayerNorm with biases), parallel residual, MLP activation (an :data:`ACT_KINDS`
    value: of gate times up when ``gated``, SwiGLU / GeGLU, else of up), rotary width (0: none), fp32 RMSNorm weights
    (Gemma's (1 + w)), the attention's score cap (0: none); the sliding layers' own rotary width; Gemma 4's per-layer
    inputs of the step (pointer, row and layer strides in elements, width, the gate's activation kind)."""
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("hq", ctypes.c_int64),
                ("hkv", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64),
                ("eps", ctypes.c_double), ("scale", ctypes.c_double), ("threads", ctypes.c_int64),
                ("isa", ctypes.c_int64), ("slots", ctypes.c_void_p), ("capacity", ctypes.c_int64),
                ("flags", ctypes.c_void_p), ("tp_size", ctypes.c_int64), ("tp_rank", ctypes.c_int64),
                ("timeout_s", ctypes.c_double), ("layer_norm", ctypes.c_int64), ("parallel", ctypes.c_int64),
                ("mlp_act", ctypes.c_int64), ("rotary_dim", ctypes.c_int64), ("gated", ctypes.c_int64),
                ("norm_f32", ctypes.c_int64), ("softcap", ctypes.c_double), ("srotary_dim", ctypes.c_int64),
                ("per_layer", ctypes.c_void_p), ("plb", ctypes.c_int64), ("pll", ctypes.c_int64),
                ("pl_dim", ctypes.c_int64), ("pl_act", ctypes.c_int64)]


def gated_delta_step(proj: torch.Tensor, history: torch.Tensor, conv: torch.Tensor, a_log: torch.Tensor,
                     dt_bias: torch.Tensor, norm: torch.Tensor, state: torch.Tensor, key_heads: int, value_heads: int,
                     key_dim: int, value_dim: int, eps: float, beta_scale: float = 1.0) -> torch.Tensor | None:
    """A Gated DeltaNet decode step (``modules/gated_deltanet.py``) for bf16 rows in one C call, after in_proj: proj
    [B, 1, W] (q | k | v | z | b | a), the convolution history [B, C, K - 1] bf16 and the state [B, Hv, Dk, Dv] fp32
    (both updated in place), conv [C, K], a_log / dt_bias [Hv], norm [Dv] bf16; beta = sigmoid(b) x ``beta_scale``.
    Returns the gated norm's output [B, 1, Hv Dv] bf16 (the torch path's roundings; fp32 sums in another order), or
    None where it does not apply (the caller runs the torch ops), also on CPUs without AVX512 (:func:`has_wide_ops`)."""
    k = _kernel if _kernel is not None else _load()
    if k is None or _off or k.best_isa < 2:
        return None
    b, kern = proj.shape[0], conv.shape[-1]
    c = 2 * key_heads * key_dim + value_heads * value_dim
    tensors = (proj, history, conv, a_log, dt_bias, norm)
    if (proj.dim() != 3 or proj.shape[1] != 1 or any(t.dtype != torch.bfloat16 or t.device.type != "cpu"
                                                       or not t.is_contiguous() for t in tensors)
            or state.dtype != torch.float32 or not state.is_contiguous()
            or history.shape != (b, c, kern - 1) or state.shape != (b, value_heads, key_dim, value_dim)
            or proj.shape[2] != c + value_heads * (value_dim + 2) or conv.shape != (c, kern)):
        return None
    out = torch.empty(b, 1, value_heads * value_dim, dtype=torch.bfloat16)
    rc = k.gated_delta(proj.data_ptr(), proj.stride(0), history.data_ptr(), conv.data_ptr(), a_log.data_ptr(),
                       dt_bias.data_ptr(), norm.data_ptr(), state.data_ptr(), out.data_ptr(), out.stride(0), b,
                       key_heads, value_heads, key_dim, value_dim, kern, eps, beta_scale, torch.get_num_threads())
    return out if rc == 0 else None


def short_conv_step(proj: torch.Tensor, history: torch.Tensor, conv: torch.Tensor) -> torch.Tensor | None:
    """LFM2's gated short convolution (``modules/gated_deltanet.ShortConv``) for a decode step of bf16 rows in one C
    call, after in_proj: proj [B, 1, 3C] (B | C | x), the history [B, C, K - 1] of B * x (updated in place), conv
    [C, K]. Returns C * conv(B * x) [B, 1, C] bf16 (the torch ops' roundings), or None where it does not apply (the
    caller runs the torch ops), also on CPUs without AVX512 (:func:`has_wide_ops`)."""
    k = _kernel if _kernel is not None else _load()
    if k is None or _off or k.best_isa < 2:
        return None
    b, (c, kern) = proj.shape[0], conv.shape
    if (proj.dim() != 3 or proj.shape[1] != 1 or proj.shape[2] != 3 * c or history.shape != (b, c, kern - 1)
            or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous()
                   for t in (proj, history, conv))):
        return None
    out = torch.empty(b, 1, c, dtype=torch.bfloat16)
    rc = k.short_conv(proj.data_ptr(), proj.stride(0), history.data_ptr(), conv.data_ptr(), out.data_ptr(),
                      out.stride(0), b, c, kern, torch.get_num_threads())
    return out if rc == 0 else None


def mamba1_conv(proj: torch.Tensor, history: torch.Tensor, conv: torch.Tensor,
                conv_bias: torch.Tensor | None) -> torch.Tensor | None:
    """Mamba-1's convolution for a decode step of bf16 rows in one C call (``modules/gated_deltanet.Mamba1Mixer``):
    proj [B, 1, 2I] (x | z), the history [B, I, K - 1] (updated in place), conv [I, K] (+ bias [I]). Returns
    silu(conv(x)) [B, 1, I] bf16 (the torch ops' roundings), or None where it does not apply (the torch ops run)."""
    k = _kernel if _kernel is not None else _load()
    if k is None or _off or k.best_isa < 2:
        return None
    if conv.dim() != 2 or (conv_bias is not None and conv_bias.numel() != conv.shape[0]):
        return None
    b, (i, kern) = proj.shape[0], conv.shape
    tensors = [proj, history, conv] + ([conv_bias] if conv_bias is not None else [])
    if (proj.dim() != 3 or proj.shape[1] != 1 or proj.shape[2] != 2 * i or history.shape != (b, i, kern - 1)
            or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors)):
        return None
    out = torch.empty(b, 1, i, dtype=torch.bfloat16)
    rc = k.mamba1_conv(proj.data_ptr(), proj.stride(0), history.data_ptr(), conv.data_ptr(),
                       None if conv_bias is None else conv_bias.data_ptr(), out.data_ptr(), b, i, kern,
                       torch.get_num_threads())
    return out if rc == 0 else None


def mamba1_scan(x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, bc: torch.Tensor, dt_bias: torch.Tensor,
                a_log: torch.Tensor, d: torch.Tensor, state: torch.Tensor) -> torch.Tensor | None:
    """Mamba-1's selective scan for bf16 rows in one C call, over T tokens in order (a decode step: T = 1; a prompt:
    all of it): x, dt (dt_proj's output) [B, T, I] contiguous, z [B, T, I] and bc [B, T, 2N] (B | C) views with unit
    inner stride, dt_bias / D [I], a_log [I, N], the state [B, I, N] fp32 (updated in place). Returns (y + D x) silu(z)
    [B, T, I] bf16 (the torch ops' roundings), or None."""
    k = _kernel if _kernel is not None else _load()
    if k is None or _off or k.best_isa < 2:
        return None
    if a_log.dim() != 2 or x.dim() != 3 or dt_bias.numel() != a_log.shape[0] or d.numel() != a_log.shape[0]:
        return None
    b, t, i, n = x.shape[0], x.shape[1], a_log.shape[0], a_log.shape[1]
    if (any(v.dtype != torch.bfloat16 or v.device.type != "cpu" for v in (x, z, dt, bc, dt_bias, a_log, d))
            or not all(v.is_contiguous() for v in (x, dt, dt_bias, a_log, d)) or z.stride(-1) != 1
            or bc.stride(-1) != 1 or x.shape != (b, t, i) or dt.shape != (b, t, i) or z.shape != (b, t, i)
            or bc.shape != (b, t, 2 * n) or state.dtype != torch.float32 or not state.is_contiguous()
            or state.shape != (b, i, n)):
        return None
    out = torch.empty(b, t, i, dtype=torch.bfloat16)
    rc = k.mamba1_scan(x.data_ptr(), z.data_ptr(), z.stride(0), z.stride(1), dt.data_ptr(), bc.data_ptr(),
                       bc.stride(0), bc.stride(1), dt_bias.data_ptr(), a_log.data_ptr(), d.data_ptr(),
                       state.data_ptr(), out.data_ptr(), b, t, i, n, torch.get_num_threads())
    return out if rc == 0 else None


def mamba2_step(proj: torch.Tensor, history: torch.Tensor, conv: torch.Tensor, conv_bias: torch.Tensor | None,
                dt_bias: torch.Tensor, a_log: torch.Tensor, d: torch.Tensor, norm: torch.Tensor | None,
                state: torch.Tensor, heads: int, head_dim: int, groups: int, state_size: int, eps: float,
                dt_limit: tuple[float, float], gating: str = "norm_after_gate") -> torch.Tensor | None:
    """A Mamba-2 decode step (``modules/gated_deltanet.Mamba2Mixer``) for bf16 rows in one C call, after in_proj: proj
    [B, 1, W] (z | x B C | dt), the convolution history [B, C, K - 1] bf16 and the state [B, H, P, N] fp32 (both
    updated in place), conv [C, K] (+ bias [C]), dt_bias / a_log / D [H], the gated norm's weight [H P] bf16 (None:
    ``gating`` "gate", no norm). Returns the read-out by ``gating`` (``policies.base.Mamba2Weights``) [B, 1, H P] bf16
    (the torch path's roundings), or None where it does not apply (the caller runs the torch ops), also on CPUs
    without AVX512 (:func:`has_wide_ops`)."""
    k = _kernel if _kernel is not None else _load()
    if k is None or _off or k.best_isa < 2:
        return None
    b, kern = proj.shape[0], conv.shape[-1]
    inner = heads * head_dim
    c = inner + 2 * groups * state_size
    mode = {"norm_after_gate": 0, "gate": 1, "norm_before_gate": 2}.get(gating)
    if mode is None or (norm is None) != (mode == 1):
        return None
    tensors = [proj, history, conv, dt_bias, a_log, d] + [t for t in (norm, conv_bias) if t is not None]
    if (proj.dim() != 3 or proj.shape[1] != 1 or any(t.dtype != torch.bfloat16 or t.device.type != "cpu"
                                                       or not t.is_contiguous() for t in tensors)
            or state.dtype != torch.float32 or not state.is_contiguous()
            or history.shape != (b, c, kern - 1) or state.shape != (b, heads, head_dim, state_size)
            or proj.shape[2] != inner + c + heads or conv.shape != (c, kern)
            or (norm is not None and norm.numel() != inner)):
        return None
    out = torch.empty(b, 1, inner, dtype=torch.bfloat16)
    rc = k.mamba2(proj.data_ptr(), proj.stride(0), history.data_ptr(), conv.data_ptr(),
                  None if conv_bias is None else conv_bias.data_ptr(), dt_bias.data_ptr(), a_log.data_ptr(),
                  d.data_ptr(), None if norm is None else norm.data_ptr(), state.data_ptr(), out.data_ptr(),
                  out.stride(0), b, heads, head_dim, groups, state_size, kern, eps, float(dt_limit[0]),
                  min(float(dt_limit[1]), 3.0e38), mode, torch.get_num_threads())
    return out if rc == 0 else None


def has_wide_ops() -> bool:
    """Whether the calls take the AVX512 paths of the decode-step ops (SwiGLU, decode attention, the one-call step):
    the best path here (or the one :func:`use_path` chose) is AVX512 or better. Without AVX512 torch's vectorised
    ops beat a scalar loop, so those stay on torch."""
    k = _kernel if _kernel is not None else _load()
    return k is not None and not _off and k.best_isa >= 2


def decode_stack_fn():
    """The C entry ``dsi_decode_stack`` (see cpu_gemv.cpp), or None when the kernel is unavailable; the model
    side (which blocks it takes, the tables) is :mod:`lightning_dsinfer.modules.cpu_stack`."""
    k = _kernel if _kernel is not None else _load()
    return None if k is None or _off else k.decode_stack


def best_isa_code() -> int:
    """The path code calls take now (4 AMX, 3 AVX512-BF16, 2 AVX512, 1 AVX2; lowered inside :func:`use_path`)."""
    k = _kernel if _kernel is not None else _load()
    return 0 if k is None else k.best_isa


def stream_read_seconds(x: torch.Tensor, threads: int | None = None) -> float | None:
    """Seconds to read the bytes of contiguous CPU tensor ``x`` front to back once with the kernel's streaming
    loop on ``threads`` threads (default torch's): the read-bandwidth probe of the benchmarks. None when the
    kernel is unavailable."""
    k = _kernel if _kernel is not None else _load()
    if k is None or not x.is_contiguous() or x.device.type != "cpu":
        return None
    t = time.perf_counter()
    k.stream_read(x.data_ptr(), x.numel() * x.element_size(), threads or torch.get_num_threads())
    return time.perf_counter() - t
