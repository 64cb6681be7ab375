"""One streamed unit (a decoder block, or a slice of the lm_head) as one flat, aligned byte buffer.

Every tensor of a unit sits at a 256-byte aligned offset of the buffer and the buffer is padded to
4 KiB, so a unit is one ``O_DIRECT`` read from disk, or one host-to-device copy, and its tensors are
views into whichever buffer holds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAGE = 4096                  # file offsets, lengths and buffer addresses for O_DIRECT
_TENSOR_ALIGN = 256

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8)}


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class TensorEntry:
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class UnitLayout:
    entries: tuple[TensorEntry, ...]
    nbytes: int                                  # padded to PAGE

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "UnitLayout":
        """Layout of ``tensors`` (real or meta) in insertion order."""
        entries, offset = [], 0
        for name, t in tensors.items():
            entry = TensorEntry(name, offset, tuple(t.shape), t.dtype)
            entries.append(entry)
            offset = round_up(offset + entry.nbytes, _TENSOR_ALIGN)
        return cls(tuple(entries), round_up(max(offset, 1), PAGE))

    def pack(self, tensors: dict[str, torch.Tensor], buffer: torch.Tensor) -> None:
        """Copy ``tensors`` into the uint8 ``buffer`` (at least ``nbytes`` long)."""
        views = self.views(buffer)
        for name, view in views.items():
            view.copy_(tensors[name])

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unit's tensors as views into the uint8 ``buffer``."""
        out = {}
        for e in self.entries:
            out[e.name] = buffer[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
        return out

    def to_json(self) -> dict:
        return {"nbytes": self.nbytes,
                "entries": [[e.name, e.offset, list(e.shape), str(e.dtype)] for e in self.entries]}

    @classmethod
    def from_json(cls, d: dict) -> "UnitLayout":
        return cls(tuple(TensorEntry(n, o, tuple(s), _DTYPES[t]) for n, o, s, t in d["entries"]), d["nbytes"])


def aligned_empty(nbytes: int, device: torch.device | str = "cpu", pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` whose address is PAGE-aligned (for ``O_DIRECT`` reads into it)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % PAGE
    return raw[skip:skip + nbytes]
