"""Lazy weight references: a policy names each weight; the engine reads only the slice a rank owns.

A :class:`WeightRef` is a named tensor that has not been read yet. ``load(dim, start, length)`` returns
that slice: a ``narrow`` of an in-memory parameter, or a ranged read from a safetensors file (so a
model built on the ``meta`` device is never materialised whole on any rank, nor mapped into its memory).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch
from torch import nn

from lightning_dsinfer.fileio import pread_exactly


class WeightSource:
    """Where weights come from, by their ``state_dict`` name."""

    def ref(self, name: str) -> "WeightRef":
        return WeightRef(self, name, self.shape(name))

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        raise NotImplementedError

    def release(self, names=()) -> None:
        """The named weights were copied elsewhere; memory held for them may be given back."""

    def reads_rows_into(self, name: str, dtype: torch.dtype) -> bool:
        """Whether :meth:`read_rows_into` can fill a ``dtype`` buffer with rows of ``name`` directly."""
        return False

    def read_rows_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Rows [start, start + len(out)) of ``name`` straight into the contiguous tensor ``out``."""
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


def load_fused(parts, dtype: torch.dtype) -> torch.Tensor:
    """Row slices ``[(ref, (start, n)), ...]`` of several weights, concatenated along dim 0, as ``dtype``.

    When every part can be read straight into its rows of the result (same-dtype safetensors tensors), no
    per-part tensors are made: during a sharded load those transient copies fragmented the heap, and peak
    resident memory of a rank varied by up to 28 MiB between runs (TP=2, 200 MiB model).
    """
    if not all(ref.source.reads_rows_into(ref.name, dtype) for ref, _ in parts):
        return torch.cat([ref.load(0, *rows).to(dtype) for ref, rows in parts])
    out = torch.empty(sum(n for _, (_, n) in parts), *parts[0][0].shape[1:], dtype=dtype)
    at = 0
    for ref, (start, n) in parts:
        if start < 0 or start + n > ref.shape[0]:
            raise ValueError(f"rows [{start}, {start + n}) are outside {ref.name} {ref.shape}")
        ref.source.read_rows_into(ref.name, start, out[at:at + n])
        at += n
    return out


class MetaSource(WeightSource):
    """Shapes only: every read is an empty ``meta`` tensor of the slice's shape (for planning layouts). Refs moved
    here by :func:`with_source` keep their own shapes (names a wrapping source made up, e.g. :class:`RowSlices`)."""

    def __init__(self, inner: WeightSource):
        self.inner = inner
        self.known: dict[str, tuple[int, ...]] = {}

    def shape(self, name):
        return self.known[name] if name in self.known else self.inner.shape(name)

    def read(self, name, dim, start, length):
        shape = list(self.shape(name))
        if dim is not None:
            shape[dim] = length
        return torch.empty(shape, device="meta")


def with_source(obj, source: WeightSource):
    """A copy of a dataclass of WeightRefs (LayerWeights, ModelWeights) whose refs read from ``source``."""
    import dataclasses

    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, WeightRef):
            if isinstance(source, MetaSource):
                source.known[v.name] = v.shape
            changes[f.name] = WeightRef(source, v.name, v.shape)
        elif dataclasses.is_dataclass(v):          # a nested group of refs (a layer's MoEWeights)
            changes[f.name] = with_source(v, source)
    return dataclasses.replace(obj, **changes)


def tied_embeddings(model) -> bool:
    """Whether the model's output head is its input embedding (one tensor, or ``tie_word_embeddings`` in its config;
    a vision-language model's language model (multimodal.py): the one tensor only, since the wrapper's config, not
    its text config, decided the tying)."""
    same = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if model.__dict__.get("_dsinfer_language_model", False):
        return same
    return same or bool(getattr(model.config, "tie_word_embeddings", False))


def lookups(source: WeightSource, names: set[str]):
    """A policy's (ref, opt): ``ref(name)`` the lazy ref of a weight the model has; ``opt(name)`` the same, or None
    where ``names`` (the model's parameter names, plus any slices a policy adds) lack it."""
    return source.ref, (lambda name: source.ref(name) if name in names else None)


def attention_refs(ref, opt, a: str) -> dict:
    """The q / k / v / o weights of the attention module ``a`` (``{a}.{q,k,v,o}_proj``) and their biases where the
    model has them: LayerWeights' fields, from a policy's (ref, opt) (:func:`lookups`)."""
    return dict(q=ref(f"{a}.q_proj.weight"), k=ref(f"{a}.k_proj.weight"), v=ref(f"{a}.v_proj.weight"),
                o=ref(f"{a}.o_proj.weight"), q_bias=opt(f"{a}.q_proj.bias"), k_bias=opt(f"{a}.k_proj.bias"),
                v_bias=opt(f"{a}.v_proj.bias"), o_bias=opt(f"{a}.o_proj.bias"))


def refs(obj) -> list[WeightRef]:
    """Every WeightRef of a dataclass of refs (LayerWeights, ModelWeights), nested groups (MoEWeights) included."""
    import dataclasses

    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, WeightRef):
            out.append(v)
        elif dataclasses.is_dataclass(v):
            out += refs(v)
    return out


def release_refs(obj) -> None:
    """Tell each ref's own source (a wrapper such as :class:`RowSlices` included) that its weights were copied."""
    by_source: dict[int, tuple[WeightSource, list[str]]] = {}
    for r in refs(obj):
        by_source.setdefault(id(r.source), (r.source, []))[1].append(r.name)
    for source, names in by_source.values():
        source.release(names)


class ExpertStack(WeightSource):
    """Experts that a checkpoint stores one by one (transformers merges them on load) seen as the model's 3D
    tensors: ``stacks[name][e]`` lists expert e's part names, whose rows, in order, are that expert's rows (gate then
    up for ``gate_up_proj``). A slice reads only the parts and rows it covers, from ``inner``."""

    def __init__(self, inner: WeightSource, stacks: dict[str, list[list[str]]]):
        self.inner, self.stacks = inner, stacks

    def shape(self, name):
        parts = [self.inner.shape(p) for p in self.stacks[name][0]]
        return (len(self.stacks[name]), sum(s[0] for s in parts), parts[0][1])

    def read(self, name, dim, start, length):
        experts = self.stacks[name]
        if dim == 0:
            experts, dim = experts[start:start + length], None
        mats = []
        for parts in experts:
            if dim is None:
                pieces = [self.inner.read(p, None, 0, 0) for p in parts]
            elif dim == 2:
                pieces = [self.inner.read(p, 1, start, length) for p in parts]
            else:                               # rows of the expert: the parts they fall in
                pieces, at = [], 0
                for p in parts:
                    rows = self.inner.shape(p)[0]
                    a, b = max(start, at), min(start + length, at + rows)
                    if a < b:
                        pieces.append(self.inner.read(p, 0, a - at, b - a))
                    at += rows
            mats.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        return torch.stack(mats)


class RowSlices(WeightSource):
    """Row ranges of packed tensors seen as tensors of their own: ``slices[name] = (packed name, first row, rows)``
    (Phi-3's ``qkv_proj`` read as q, k, v and its ``gate_up_proj`` as gate, up) or ``(packed name, [(first, rows),
    ...])``, pieces taken in order (GPT-NeoX's per-head q | k | v rows; GPT-J's rotary dims reordered); other names
    pass through to ``inner``. A slice reads only its rows from ``inner``; a packed tensor is released once every
    slice of it was."""

    def __init__(self, inner: WeightSource, slices: dict[str, tuple]):
        self.inner = inner
        self.slices: dict[str, tuple[str, list[tuple[int, int]]]] = {
            name: (packed, [tuple(rest)] if len(rest) == 2 and isinstance(rest[0], int) else list(rest[0]))
            for name, (packed, *rest) in slices.items()}
        self._unreleased: dict[str, set[str]] = {}
        for name, (packed, _) in self.slices.items():
            self._unreleased.setdefault(packed, set()).add(name)

    @property
    def entries(self):
        """The checkpoint's tensors where ``inner`` reads one (None for a module's own), as the names that pass through
        see them (a policy asks whether a checkpoint stores e.g. experts one by one)."""
        return getattr(self.inner, "entries", None)

    def shape(self, name):
        if name not in self.slices:          # every other weight: as ``inner`` holds it
            return self.inner.shape(name)
        packed, pieces = self.slices[name]
        return (sum(n for _, n in pieces), *self.inner.shape(packed)[1:])

    def _pieces(self, name: str, start: int, length: int) -> list[tuple[int, int]]:
        """Rows [start, start + length) of slice ``name`` as (first row, rows) runs of its packed tensor."""
        out, at = [], 0
        for first, n in self.slices[name][1]:
            a, b = max(start, at), min(start + length, at + n)
            if a < b:
                out.append((first + a - at, b - a))
            at += n
        return out

    def read(self, name, dim, start, length):
        if name not in self.slices:
            return self.inner.read(name, dim, start, length)
        packed = self.slices[name][0]
        if dim is None or dim == 0:
            runs = self._pieces(name, 0, self.shape(name)[0]) if dim is None else self._pieces(name, start, length)
            parts = [self.inner.read(packed, 0, a, n) for a, n in runs]
        else:
            whole = self.inner.read(packed, dim, start, length)
            parts = [whole.narrow(0, a, n) for a, n in self.slices[name][1]]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def reads_rows_into(self, name, dtype):
        return self.inner.reads_rows_into(self.slices[name][0] if name in self.slices else name, dtype)

    def read_rows_into(self, name, start, out):
        if name not in self.slices:
            self.inner.read_rows_into(name, start, out)
            return
        at = 0
        for a, n in self._pieces(name, start, out.shape[0]):
            self.inner.read_rows_into(self.slices[name][0], a, out[at:at + n])
            at += n

    def release(self, names=()) -> None:
        done = []
        for name in names:
            if name not in self.slices:
                done.append(name)
                continue
            left = self._unreleased[self.slices[name][0]]
            left.discard(name)
            if not left:
                done.append(self.slices[name][0])
        self.inner.release(done)


def rotate_half_pieces(heads: int, head_dim: int, rotary_dim: int, rotary_from: int = 0) -> list[tuple[int, int]]:
    """Row pieces (first row, rows) that read ``heads`` heads of ``head_dim`` rows, whose rows [rotary_from,
    rotary_from + rotary_dim) hold interleaved rotary pairs (GPT-J, Cohere, GLM, ERNIE 4.5, DeepSeek), with those rows
    in rotate-half order (0, 2, 4, ..., 1, 3, 5, ...) and every other row where it was: q and k read this way give the
    engine's rotate-half rotary the same scores (:class:`RowSlices` takes the pieces)."""
    order = list(range(0, rotary_dim, 2)) + list(range(1, rotary_dim, 2))
    rest = head_dim - rotary_from - rotary_dim
    return [piece for h in range(heads) for piece in
            [(h * head_dim, rotary_from)] + [(h * head_dim + rotary_from + o, 1) for o in order]
            + [(h * head_dim + rotary_from + rotary_dim, rest)] if piece[1] > 0]


class Rewritten(WeightSource):
    """A source that reads some names (:meth:`rewrites`) its own way and passes every other name, direct row reads
    into a fused buffer (:func:`load_fused`) included, through to ``inner``."""

    def __init__(self, inner: WeightSource):
        self.inner = inner

    def rewrites(self, name: str) -> bool:
        raise NotImplementedError

    @property
    def entries(self):
        """The checkpoint's tensors by name where ``inner`` reads one (what :func:`policies.llama._experts` looks
        up), else None."""
        return getattr(self.inner, "entries", None)

    def shape(self, name):
        return self.inner.shape(name)

    def read(self, name, dim, start, length):
        return self.inner.read(name, dim, start, length)

    def reads_rows_into(self, name, dtype):
        return not self.rewrites(name) and self.inner.reads_rows_into(name, dtype)

    def read_rows_into(self, name, start, out):
        self.inner.read_rows_into(name, start, out)

    def release(self, names=()) -> None:
        self.inner.release(names)


class Joined(Rewritten):
    """Tensors a checkpoint stores in parts read as the parts' concatenation along dim 0 (transformers'
    ``Concatenate(dim=0)`` converter on load; OLMo Hybrid's q / k / v convolutions): ``joined[name]`` = the parts'
    names in order. Other names pass through."""

    def __init__(self, inner: WeightSource, joined: dict[str, list[str]]):
        super().__init__(inner)
        self.joined = joined

    def rewrites(self, name):
        return name in self.joined

    def shape(self, name):
        if name not in self.joined:
            return self.inner.shape(name)
        shapes = [self.inner.shape(part) for part in self.joined[name]]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def read(self, name, dim, start, length):
        if name not in self.joined:
            return self.inner.read(name, dim, start, length)
        t = torch.cat([self.inner.read(part, None, 0, 0) for part in self.joined[name]])
        return t if dim is None else t.narrow(dim, start, length)


class Transposed(Rewritten):
    """Weights stored with their last two dims swapped seen as torch's [out, in]: GPT-2's ``Conv1D`` [in, out], Llama
    4's experts [E, in, out]; other names pass through."""

    def __init__(self, inner: WeightSource, names):
        super().__init__(inner)
        self.names = set(names)

    def rewrites(self, name):
        return name in self.names

    def shape(self, name):
        shape = self.inner.shape(name)
        return (*shape[:-2], shape[-1], shape[-2]) if name in self.names else shape

    def read(self, name, dim, start, length):
        if name not in self.names:
            return self.inner.read(name, dim, start, length)
        n = len(self.inner.shape(name))
        if dim is not None and dim >= n - 2:
            dim = 2 * n - 3 - dim                                  # (the last two swap)
        t = self.inner.read(name, dim, start, length)
        return t.t() if n == 2 else t.transpose(-1, -2).contiguous()


class Scaled(Rewritten):
    """Weights read times constants (muP multipliers folded into the weights they follow: Falcon-H1), in fp32:
    ``factors[name]`` is one factor, or a list of (end row, factor) segments of a weight read by rows (a factor per
    row range: Falcon-H1's in_proj z | x | B | C | dt rows); other names pass through."""

    def __init__(self, inner: WeightSource, factors: dict):
        super().__init__(inner)
        self.factors = factors

    def rewrites(self, name):
        return name in self.factors

    def read(self, name, dim, start, length):
        t = self.inner.read(name, dim, start, length)
        f = self.factors.get(name)
        if f is None:
            return t
        if isinstance(f, (int, float)):
            return t.float() * f
        if dim not in (None, 0):
            raise ValueError(f"{name} has a factor per row range: read it by rows")
        rows = torch.arange(start if dim == 0 else 0, (start + length) if dim == 0 else t.shape[0])
        ends = torch.tensor([end for end, _ in f])
        scale = torch.tensor([float(v) for _, v in f])[torch.searchsorted(ends, rows, right=True)]
        return t.float() * scale.view(-1, *([1] * (t.dim() - 1)))


class Zeros(WeightSource):
    """Tensors of one value by shape (``ref((n,))``): zeros, the bias of a LayerNorm that has none (Cohere), for a norm
    that takes one; :class:`Ones`."""
    value = 0.0

    def ref(self, shape) -> "WeightRef":
        return WeightRef(self, f"fill{self.value}{tuple(shape)}", tuple(shape))

    def shape(self, name):
        return tuple(int(n) for n in name[name.index("(") + 1:-1].split(",") if n.strip())

    def read(self, name, dim, start, length):
        shape = list(self.shape(name))
        if dim is not None:
            shape[dim] = length
        return torch.full(shape, self.value)


class Ones(Zeros):
    """Ones by shape: the unit scale of a norm without a weight (Llama 4's L2 norm of q and k)."""
    value = 1.0


class ModuleSource(WeightSource):
    """Weights of an in-memory module (parameters and buffers)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.tensors = dict(module.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(module.named_buffers(remove_duplicate=False)))

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, dim, start, length):
        t = self.tensors[name].detach()
        if t.device.type == "meta":
            raise ValueError(f"weight {name} is on the meta device and not in a checkpoint; pass checkpoint=<folder of "
                             f"safetensors holding it> so "
                             f"dsinfer can load it.")
        return t if dim is None else t.narrow(dim, start, length)

    def release(self, names=()) -> None:
        """Turn the named parameters of the module into meta tensors (their memory is freed)."""
        for name in names:
            module_name, _, attr = name.rpartition(".")
            sub = self.module.get_submodule(module_name)
            p = sub._parameters.get(attr)
            if p is not None and p.device.type != "meta":
                sub._parameters[attr] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            self.tensors.pop(name, None)


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format section)
_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Largest scratch buffer (bytes) of whole rows read to cut a column slice out of them.
_ROW_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class _Entry:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int                  # absolute byte offset of the tensor's data in the file


def _read_header(path: str) -> dict[str, _Entry]:
    """The tensors of one ``.safetensors`` file: 8-byte little-endian header size, JSON header, then data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which dsinfer cannot read "
                             f"(known: {', '.join(_ST_DTYPES)}).")
        out[name] = _Entry(path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + info["data_offsets"][0])
    return out


def _read_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Fill the uint8 tensor ``buf`` with the file's bytes at ``offset`` (plain reads, no mmap)."""
    pread_exactly(fd, memoryview(buf.numpy()).cast("B"), offset)


class SafetensorsSource(WeightSource):
    """A folder of ``*.safetensors`` files (with or without ``model.safetensors.index.json``).

    Slices are read with plain positioned reads of exactly the bytes a rank needs (a column slice reads
    whole rows in blocks of at most 4 MiB and keeps its columns), not through ``mmap``: pages of a mapped
    file that a read touches count toward the process's resident memory for as long as the file stays
    mapped, so mmap slicing made each rank hold most of the checkpoint resident (measured with TP=2 on a
    200 MiB model: +135 MiB of file pages per rank; tests/test_sharded_loading_memory.py).

    Names missing from the files (non-persistent buffers, tied weights) fall back to ``fallback``.
    """

    def __init__(self, folder: str, fallback: WeightSource | None = None):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in checkpoint folder {folder!r}")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        self.entries: dict[str, _Entry] = {}
        for fname in files:
            self.entries.update(_read_header(os.path.join(folder, fname)))
        fp8 = [n for n, e in self.entries.items() if e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
        if fp8:       # (DeepSeek-V3's released files: fp8 weights with block scales ``*_scale_inv``)
            raise ValueError(
                f"checkpoint {folder!r} stores {len(fp8)} float8 tensor{'s' if len(fp8) > 1 else ''} (e.g. {fp8[0]}): "
                f"a quantised checkpoint, whose weights need their block scales applied. dsinfer reads float "
                f"checkpoints: convert it to bf16 first (dequantise each weight by its scales), then pass "
                f"quantize='int8' or 'int4' for smaller weights.")
        self._fds: dict[str, int] = {}
        self._scratch_buf: torch.Tensor | None = None
        self.fallback = fallback

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """One reused buffer for whole-row blocks (a fresh one per read fragments the heap: measured +24 MiB
        resident on one rank of the TP=2 loading test)."""
        if self._scratch_buf is None or self._scratch_buf.numel() < nbytes:
            self._scratch_buf = torch.empty(max(nbytes, _ROW_BLOCK_BYTES), dtype=torch.uint8)
        return self._scratch_buf

    def reads_rows_into(self, name, dtype):
        return name in self.entries and self.entries[name].dtype == dtype

    def read_rows_into(self, name, start, out):
        e = self.entries[name]
        row = math.prod(e.shape[1:]) * out.element_size()
        _read_into(self._fd(e.path), out.view(torch.uint8), e.offset + start * row)

    def shape(self, name):
        if name not in self.entries:
            if self.fallback is None:
                raise KeyError(f"{name} is not in the checkpoint")
            return self.fallback.shape(name)
        return self.entries[name].shape

    def read(self, name, dim, start, length):
        if name not in self.entries:
            return self.fallback.read(name, dim, start, length)
        e = self.entries[name]
        fd = self._fd(e.path)
        item = torch.empty((), dtype=e.dtype).element_size()
        shape = list(e.shape)
        if dim is None or (start == 0 and length == shape[dim]):
            out = torch.empty(math.prod(shape) * item, dtype=torch.uint8)
            _read_into(fd, out, e.offset)
            return out.view(e.dtype).view(shape)
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1:]) * item              # bytes of one index along `dim`
        row = shape[dim] * inner
        out = torch.empty(outer, length * inner, dtype=torch.uint8)
        if outer == 1:
            _read_into(fd, out, e.offset + start * inner)
        else:
            per_block = max(1, _ROW_BLOCK_BYTES // row)
            scratch = self._scratch(min(per_block, outer) * row)
            for first in range(0, outer, per_block):
                n = min(per_block, outer - first)
                block = scratch[:n * row].view(n, row)
                _read_into(fd, block, e.offset + first * row)
                out[first:first + n] = block[:, start * inner:(start + length) * inner]
        shape[dim] = length
        return out.view(e.dtype).view(shape)


def alias_checkpoint_names(source: SafetensorsSource, model: nn.Module) -> None:
    """Make a checkpoint's tensors reachable under the model's parameter names where transformers renames
    keys on load (GPT-NeoX saves ``lm_head.weight`` as ``embed_out.weight``; legacy ``gamma`` / ``beta``), and where
    a checkpoint saved from the base model lacks its ``base_model_prefix`` (the hub's GPT-2, BLOOM and OPT files:
    ``h.0.attn.c_attn.weight`` for ``transformer.h.0.attn.c_attn.weight``), as transformers adds it on load, or has it
    where the model does not (Llama 4's multimodal checkpoints: ``language_model.model.layers.0...`` for the text
    model's ``model.layers.0...``; the vision tower's tensors stay unread).

    Only renamings: keys that transformers would merge or split on load (``WeightConverter``, e.g. per-expert
    MoE tensors) keep their names, and a model parameter they feed is reported missing by the caller.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except ImportError:                     # older / newer transformers without these: no renamings
        renamings = []
    expected = set(dict(model.named_parameters(remove_duplicate=False)))
    prefix = getattr(model, "base_model_prefix", "")
    for key in list(source.entries):
        name = key
        for renaming in renamings:          # each in turn, as transformers' loader does (5.17 and later)
            name, _ = renaming.rename_source_key(name)
        if prefix and name not in expected and f"{prefix}.{name}" in expected:
            name = f"{prefix}.{name}"
        elif prefix and name not in expected and name.startswith(f"{prefix}.") and name[len(prefix) + 1:] in expected:
            name = name[len(prefix) + 1:]       # (a multimodal checkpoint's language model: Llama 4's language_model.*)
        if name != key and name not in source.entries:
            source.entries[name] = source.entries[key]


def checkpoint_source(folder: str, model: nn.Module, outer: nn.Module | None = None) -> SafetensorsSource:
    """The safetensors folder ``folder`` read for ``model``: names missing from the files fall back to the model's own
    tensors, and transformers' renamings of checkpoint keys are applied (:func:`alias_checkpoint_names`). ``outer``:
    the vision-language model whose language model ``model`` is (multimodal.py), which saved the checkpoint: its names
    (``model.language_model.layers.0...``) are read as the language model's (``model.layers.0...``)."""
    from lightning_dsinfer.multimodal import view_names

    source = SafetensorsSource(folder, fallback=ModuleSource(model))
    alias_checkpoint_names(source, model if outer is None else outer)
    if outer is not None:
        for name, inner in view_names(outer, model).items():
            if name in source.entries and inner not in source.entries:
                source.entries[inner] = source.entries[name]
    return source
