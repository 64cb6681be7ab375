"""Lazy weight references: a policy names each weight; the engine reads only the slice a rank owns.

A :class:`WeightRef` is a named tensor that has not been read yet. ``load(dim, start, length)`` returns
that slice: a ``narrow`` of an in-memory parameter, or a ranged read from a safetensors file (so a
model built on the ``meta`` device is never materialised whole on any rank).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn


class WeightSource:
    """Where weights come from, by their ``state_dict`` name."""

    def ref(self, name: str) -> "WeightRef":
        return WeightRef(self, name, self.shape(name))

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class WeightRef:
    source: WeightSource
    name: str
    shape: tuple[int, ...]

    def load(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        if dim is None:
            return self.source.read(self.name, None, 0, 0)
        if length is None:
            length = self.shape[dim] - start
        if start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"slice [{start}, {start + length}) of dim {dim} is outside {self.name} {self.shape}")
        return self.source.read(self.name, dim, start, length)


class ModuleSource(WeightSource):
    """Weights of an in-memory module (parameters and buffers)."""

    def __init__(self, module: nn.Module):
        self.tensors = dict(module.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(module.named_buffers(remove_duplicate=False)))

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, dim, start, length):
        t = self.tensors[name].detach()
        if t.device.type == "meta":
            raise ValueError(f"weight {name} is on the meta device; pass checkpoint=<folder of safetensors> so "
                             f"dsinfer can load it.")
        return t if dim is None else t.narrow(dim, start, length)


class SafetensorsSource(WeightSource):
    """A folder of ``*.safetensors`` files (with or without ``model.safetensors.index.json``).

    Names missing from the files (non-persistent buffers, tied weights) fall back to ``fallback``.
    """

    def __init__(self, folder: str, fallback: WeightSource | None = None):
        from safetensors import safe_open

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in checkpoint folder {folder!r}")
        index = os.path.join(folder, "model.safetensors.index.json")
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            with open(index) as f:
                self.where = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            for fname in files:
                path = os.path.join(folder, fname)
                with safe_open(path, framework="pt") as f:
                    self.where.update({k: path for k in f.keys()})
        self._open = {}
        self._safe_open = safe_open
        self.fallback = fallback

    def _file(self, name):
        path = self.where[name]
        if path not in self._open:
            self._open[path] = self._safe_open(path, framework="pt")
        return self._open[path]

    def shape(self, name):
        if name not in self.where:
            if self.fallback is None:
                raise KeyError(f"{name} is not in the checkpoint")
            return self.fallback.shape(name)
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name, dim, start, length):
        if name not in self.where:
            return self.fallback.read(name, dim, start, length)
        sl = self._file(name).get_slice(name)
        if dim is None:
            return sl[:]
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, start + length)
        return sl[tuple(index)]
