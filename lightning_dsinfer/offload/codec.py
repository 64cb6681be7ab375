"""Lossless weight frames for the disk tier: a unit file holds its tensors packed, 12 bits per bf16 weight
(28 per fp32), so a decode step reads ~25% fewer bytes from disk and gets bit-identical weights back.

A unit's bytes are cut into frames (one tensor, or ``frame_bytes`` of it); each frame sits at a page-aligned
offset of the unit file, is read with one ``O_DIRECT`` request into a staging buffer and decoded from there into
the unit's slot by the reader thread that read it (``kernels/weight_codec.cpp``: exponent coded in 4 bits against
the frame's 16 most frequent exponents, sign and mantissa as they are, the rare other elements stored whole;
AVX512, AVX2 or scalar).
Frames that do not pay (small tensors, other dtypes, exponents spread over too many values) are stored raw and
copied. Needs the C library of :mod:`~lightning_dsinfer.kernels.cpu_gemv`; without it units are written raw.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from lightning_dsinfer.offload.layout import PAGE, UnitLayout, round_up

# Raw bytes per frame (and per read request; 3/4 of it on disk for bf16): large frames cost fewer requests (~0.1 ms of
# Python and syscall each), small ones less staging memory. frame_bytes_for picks between the two.
MAX_FRAME_BYTES = 4 << 20
MIN_FRAME_BYTES = 1 << 20
MIN_PACKED_ELEMENTS = 1024        # smaller tensors (biases, small norm weights) stay raw
_WIDTH = {torch.bfloat16: 2, torch.float32: 4}


def _lib():
    from lightning_dsinfer.kernels import cpu_gemv

    return cpu_gemv._load()


def available() -> bool:
    """True when units can be written packed (the C library builds and loads here)."""
    return _lib() is not None


@dataclass(frozen=True)
class Frame:
    raw_offset: int           # where the decoded bytes go in the unit's buffer
    raw_bytes: int
    width: int                # 2 (bf16) / 4 (fp32): packed; 0: stored raw
    n_exc: int
    table: bytes              # the 16 exponents of the packed frame
    file_offset: int          # page-aligned
    file_bytes: int           # payload; the read covers it rounded up to a page

    @property
    def read_bytes(self) -> int:
        return round_up(self.file_bytes, PAGE)

    def to_json(self) -> list:
        return [self.raw_offset, self.raw_bytes, self.width, self.n_exc, self.table.hex(), self.file_offset,
                self.file_bytes]

    @classmethod
    def from_json(cls, d: list) -> "Frame":
        return cls(d[0], d[1], d[2], d[3], bytes.fromhex(d[4]), d[5], d[6])


def frame_bytes_for(layouts: list[UnitLayout], max_memory: int) -> int:
    """Frame size for these units and budget: an eighth of the largest unit and a 32nd of ``max_memory`` (the four
    staging buffers stay under an eighth of it), as a power of two in [MIN_FRAME_BYTES, MAX_FRAME_BYTES]. Measured
    on the 2-core VM (unrecorded runs of benchmarks/offload.py): a 956 MiB model (36 MiB units, 239 MiB budget) read
    0.79-0.92 of the disk with 4 MiB frames and 0.71 with 1 MiB; a 166 MiB one (9 MiB units, 41 MiB budget) decoded
    1.55x faster than raw with 1 MiB frames, 1.11x with 512 KiB (more requests) and 0.88x with 4 MiB (16 MiB of
    staging left fewer units resident)."""
    target = min(max((l.nbytes for l in layouts), default=0) // 8, max_memory // 32)
    size = MIN_FRAME_BYTES
    while size * 2 <= min(target, MAX_FRAME_BYTES):
        size *= 2
    return size


def raw_frames(layout: UnitLayout, frame_bytes: int = MAX_FRAME_BYTES) -> list[tuple[int, int, int]]:
    """(raw offset, raw bytes, width to try) of each frame of ``layout``: tensors cut at ``frame_bytes``."""
    out = []
    for e in layout.entries:
        numel = e.nbytes // e.dtype.itemsize
        width = _WIDTH.get(e.dtype, 0) if numel >= MIN_PACKED_ELEMENTS else 0
        step = frame_bytes if width == 0 else frame_bytes // width * width
        out += [(e.offset + a, min(step, e.nbytes - a), width) for a in range(0, e.nbytes, step)]
    return out


def staging_bytes(layouts: list[UnitLayout], frame_bytes: int = MAX_FRAME_BYTES) -> int:
    """Size of one staging buffer: the largest read of any frame (a packed frame is never larger than raw)."""
    return max((round_up(n, PAGE) for layout in layouts for _, n, _ in raw_frames(layout, frame_bytes)), default=PAGE)


def encode(raw: torch.Tensor, width: int, out: torch.Tensor) -> tuple[int, int, bytes] | None:
    """Pack the uint8 CPU tensor ``raw`` (elements of ``width`` bytes) into ``out``: (bytes, exceptions, table),
    or None when it does not pay (more than 1/64 of the elements outside the 16-exponent table)."""
    n = raw.numel() // width
    if out.numel() < packed_capacity(raw.numel(), width):
        raise ValueError("encode: output buffer too small")
    table = (ctypes.c_uint8 * 16)()
    n_exc = ctypes.c_int64()
    size = _lib().pack_weights(raw.data_ptr(), n, width, _max_exceptions(n), table, ctypes.byref(n_exc),
                               out.data_ptr())
    if size < 0:
        return None
    return size, n_exc.value, bytes(table)


def _max_exceptions(n: int) -> int:
    """Elements outside the 16-exponent table a frame of ``n`` may have and still be packed."""
    return n // 64


def packed_capacity(raw_bytes: int, width: int) -> int:
    """The most bytes a frame of ``raw_bytes`` packs to (when it packs at all)."""
    n = raw_bytes // width
    return _lib().packed_bytes(n, width, _max_exceptions(n))


def max_file_bytes(layout: UnitLayout, frame_bytes: int = MAX_FRAME_BYTES) -> int:
    """The most bytes the packed file of ``layout`` can take (each frame packed at its worst, or raw)."""
    return sum(round_up(packed_capacity(n, w) if w else n, PAGE) for _, n, w in raw_frames(layout, frame_bytes))


def decode(frame: Frame, payload: torch.Tensor, buffer: torch.Tensor, simd: int = 2) -> None:
    """Decode ``frame`` from the uint8 ``payload`` (its file bytes) into the unit's uint8 ``buffer``. ``simd``:
    the widest path to take (2 AVX512, 1 AVX2, 0 scalar), where the CPU has it."""
    out = buffer[frame.raw_offset:frame.raw_offset + frame.raw_bytes]
    if frame.width == 0:
        out.copy_(payload[:frame.raw_bytes])
        return
    table = (ctypes.c_uint8 * 16).from_buffer_copy(frame.table)
    if _lib().unpack_weights(payload.data_ptr(), frame.raw_bytes // frame.width, frame.width, table, frame.n_exc,
                             out.data_ptr(), simd):
        raise OSError(f"dsinfer: a packed weight frame (file offset {frame.file_offset}) is damaged: an exception "
                      f"index lies outside it. Delete the offload folder to have it written again.")
