"""The decoder over streamed weights: same interface as :class:`DecoderModel`, blocks pulled from the ring.

Per forward pass each block is acquired from the :class:`UnitStreamer` as two units, its attention half
(with both norms) and its MLP half, each wrapped in a :class:`DecoderLayer` (views, no copy), run, and
released; the lm_head is streamed in row slices the size of the larger half. Two units per block make the
ring's slots (the larger half, not the whole block) smaller, and leave more of ``max_memory`` to resident
units. Prompts are run through each resident block in chunks of ``prefill_tokens`` tokens
(the K/V of earlier chunks are already in the cache), so prefill activations stay bounded however
long the prompt batch; a block is still read once per pass. A plain forward without a cache is chunked
the same way, its K/V kept in a one-block scratch buffer (:class:`ScratchKV`) reused by every block.

Embedding rows come from a :class:`RowTable`: resident (host tier) or read row by row from a file
(disk tier), so the embedding matrix is never resident either.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import queue
import threading
import warnings
import weakref
from typing import Callable

import torch
from torch import nn

from lightning_dsinfer.fileio import pread_exactly
from lightning_dsinfer.modules.linear import Linear
from lightning_dsinfer.modules.transformer import DecoderLayer, DecoderModel, Step, add_deepstack
from lightning_dsinfer.offload.streamer import UnitStreamer


class ResidentRows:
    def __init__(self, table: torch.Tensor):
        self.table = table
        self.rows = table.shape[0]

    def lookup(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        return nn.functional.embedding(ids.to(self.table.device), self.table).to(device)


class FileRows:
    """A [rows, hidden] matrix in a file; ``lookup`` reads only the rows asked for (positioned reads)."""

    def __init__(self, path: str, rows: int, hidden: int, dtype: torch.dtype):
        self.path, self.rows, self.hidden, self.dtype = path, rows, hidden, dtype
        self.row_bytes = hidden * dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    @staticmethod
    def write(path: str, chunks) -> None:
        """Write the matrix from an iterable of [n, hidden] CPU tensors (never whole in memory)."""
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(memoryview(chunk.contiguous().view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def lookup(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty(len(unique), self.row_bytes, dtype=torch.uint8)
        for i, r in enumerate(unique.tolist()):
            pread_exactly(self.fd, memoryview(rows[i].numpy()), r * self.row_bytes)
        out = rows.view(self.dtype)[inverse]
        return out.view(*ids.shape, self.hidden).to(device)

    def close(self) -> None:
        os.close(self.fd)


class ScratchKV:
    """The cache of a plain forward's chunks: K/V [B, Hkv, T, D] of the block being run, shared by all blocks
    (the blocks run one after the other, and a block's chunks only attend to its own K/V). Same interface as
    :class:`~lightning_dsinfer.modules.kv_cache.StaticKVCache`'s ``slots`` / ``read``."""

    def __init__(self, b: int, kv_heads: int, t: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.empty(b, kv_heads, t, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self._linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def linear_buffers(self, layer: int, b: int, conv: tuple, state: tuple):
        """A linear-attention block's convolution history and state across its chunks (:meth:`StaticKVCache.
        linear_buffers`), made on the block's first chunk."""
        if layer not in self._linear:
            self._linear[layer] = (self.k.new_zeros(b, *conv), torch.zeros(b, *state, device=self.k.device))
        return self._linear[layer]

    def slots(self, layer: int, b: int, start: int):
        return self.k[:b], self.v[:b], start

    def read(self, layer: int, b: int, end: int):
        return self.k[:b, :, :end], self.v[:b, :, :end]


class StreamedDecoderModel(DecoderModel):
    def __init__(self, streamer: UnitStreamer, layer_units: list[tuple[int, int]], head_units: list[int],
                 make_layer: Callable[[int, dict], DecoderLayer], rows, final_norm: torch.Tensor, eps: float,
                 vocab_size: int, vocab_start: int, prefill_tokens: int, comm=None, device: torch.device | None = None,
                 experts=None, kv_heads: int = 1, head_dim: int = 1, scratch: bool = True, **ends):
        nn.Module.__init__(self)
        self.set_ends(**ends)
        self.streamer = streamer
        self.experts = experts          # routed experts read when routed to (offload/experts.py), or None
        self.layer_units, self.head_units = layer_units, head_units
        self.make_layer = make_layer
        self.rows = rows
        self.final_norm, self.eps = final_norm, eps
        self.vocab_size, self.vocab_start = vocab_size, vocab_start
        self.prefill_tokens = prefill_tokens
        self.kv_heads, self.head_dim = kv_heads, head_dim   # (a chunked plain forward's K/V scratch: this rank's;
        self.scratch = scratch      # False: blocks of several shapes, or reading another's K/V: a plain forward whole)
        self.comm = comm
        self.sharded_vocab = comm is not None and comm.size > 1
        self.device = device if device is not None else final_norm.device
        tables = (rows, getattr(self.per_layer, "table", None))     # (Gemma 4's per-layer table's rows too)
        _closer_started()           # (started here, never by a finalizer)
        self._finalizer = weakref.finalize(self, _close, streamer, tables, experts)   # threads and files go with us

    @property
    def embed_rows(self) -> int:
        return self.rows.rows

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.lookup(ids, self.device)

    def _chunks(self, b: int, t: int) -> list[tuple[int, int]]:
        """Query chunks for one block: whole when short."""
        n = max(self.prefill_tokens // b, 1)
        if t <= n:
            return [(0, t)]
        return [(a, min(a + n, t)) for a in range(0, t, n)]

    def hidden(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        h = self.stream_in(h, step)
        chunks = self._chunks(h.shape[0], h.shape[1])
        scratch = len(chunks) > 1 and step.cache is None and step.hf_cache is None   # a plain forward, chunked
        if (scratch and (step.q_start != 0 or not self.scratch)) or step.lookahead:   # (a plain forward has no earlier
            chunks, scratch = [(0, h.shape[1])], False     # columns; image blocks see later keys: never chunk what it cannot)
        steps = None
        for i, (attention_unit, mlp_unit) in enumerate(self.layer_units):
            half = self.make_layer(i, self.streamer.acquire(attention_unit))
            try:
                if steps is None:
                    if scratch:   # its chunks' K/V go to a one-block buffer (the decoder knows the local KV heads)
                        kv = ScratchKV(h.shape[0], self.kv_heads, h.shape[1], self.head_dim, h.dtype, h.device)
                        step = dataclasses.replace(step, cache=kv, start=step.q_start)
                    steps = [step if len(chunks) == 1 else step.rows(a, b) for a, b in chunks]
                if len(chunks) == 1:
                    x, h = half.attend(h, None, step)
                else:     # (a block without an MLP hands on no MLP input: x stays None)
                    x, out = None, torch.empty_like(h)
                    for (a, b), sub in zip(chunks, steps):
                        mlp_in, out[:, a:b] = half.attend(h[:, a:b], None, sub)
                        if mlp_in is not None:
                            x = torch.empty_like(h) if x is None else x
                            x[:, a:b] = mlp_in
                    h = out
            finally:
                del half
                self.streamer.release()
            half = self.make_layer(i, self.streamer.acquire(mlp_unit))
            try:
                if len(chunks) == 1 or x is None:
                    h = half.mlp_residual(x, h, step)
                else:
                    out = torch.empty_like(h)
                    for (a, b), sub in zip(chunks, steps):   # contiguous rows: F.linear on a strided 3-D input copies
                        out[:, a:b] = half.mlp_residual(x[:, a:b].contiguous(), h[:, a:b].contiguous(), sub)
                    h = out
            finally:
                del half, x
                self.streamer.release()
            if step.deepstack is not None and i < len(step.deepstack[1]):     # (Qwen3-VL: the whole stream is here)
                h = add_deepstack(h, step.deepstack, i)
        return self.final(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        parts = []
        for unit in self.head_units:
            t = self.streamer.acquire(unit)
            try:
                parts.append(Linear(t["weight"], t.get("bias"), pack=False)(h))
            finally:
                self.streamer.release()
        logits = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if self.sharded_vocab:
            logits = self.comm.all_gather_last(logits)
        return self.finish_logits(logits[..., :self.vocab_size])

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (every streamed unit; routed experts read on demand: a token's
        top-k of each sparse layer)."""
        units = [u for pair in self.layer_units for u in pair] + self.head_units
        experts = self.experts.bytes_per_token if self.experts is not None else 0
        return sum(self.streamer.layouts[u].nbytes for u in units) + experts

    def close(self) -> None:
        """Stop the reader threads and close the files, now (also done when the decoder is dropped or collected)."""
        info = self._finalizer.detach()
        if info is not None:
            _close_now(*info[2])


_CLOSE_JOBS: queue.SimpleQueue = queue.SimpleQueue()
_CLOSER: threading.Thread | None = None
_CLOSER_LOCK = threading.Lock()


def _closer_started() -> None:
    """The process's closer thread (one, a daemon: a service for the process's life, not a run's), which closes the
    decoders the collector dropped. Cut off at the interpreter's exit in the middle of a close (freeing tensors:
    torch's C++) it would abort the process ("terminate called without an active exception"), so threading's exit
    hook, which runs before the interpreter is torn down (as concurrent.futures stops its workers there), lets it
    finish the closes queued so far and stop."""
    global _CLOSER
    with _CLOSER_LOCK:
        if _CLOSER is None or not _CLOSER.is_alive():
            _CLOSER = threading.Thread(target=_closer_loop, name="close-offload", daemon=True)
            _CLOSER.start()
            threading._register_atexit(_closer_stop, _CLOSER)


def _closer_stop(closer: threading.Thread) -> None:
    _CLOSE_JOBS.put(None)
    closer.join(timeout=60)


def _closer_loop() -> None:
    while True:
        job = _CLOSE_JOBS.get()
        if job is None:           # (the interpreter is exiting)
            return
        try:
            _close_now(*job)
        except Exception as exc:      # (the loop goes on for the next decoders; this one's files go at exit)
            warnings.warn(f"dsinfer: closing a dropped offload decoder failed: {exc!r}", stacklevel=1)
        del job


_IN_COLLECTION = threading.local()


def _collection_phase(phase: str, info: dict) -> None:
    _IN_COLLECTION.on = phase == "start"


gc.callbacks.append(_collection_phase)


def _close(streamer: UnitStreamer, tables, experts=None) -> None:
    """The decoder's finalizer. Run by a garbage collection (on any thread, at any allocation: on one of our own
    reader threads, where closing would wait for the reads a dropped decoder queued, that thread's own task among
    them; or inside threading's own bookkeeping, where a thread starting holds the lock that joining a thread takes)
    it must neither wait for a thread nor start one: the close goes to the closer thread (a SimpleQueue's put is safe
    there). Run otherwise (the last reference dropped, or the interpreter's exit, when a daemon closer would be cut
    off inside C code) it closes here, unless this is one of our reader threads."""
    if getattr(_IN_COLLECTION, "on", False) or threading.current_thread().name.startswith("dsinfer-"):
        _CLOSE_JOBS.put((streamer, tables, experts))
    else:
        _close_now(streamer, tables, experts)


def _close_now(streamer: UnitStreamer, tables, experts=None) -> None:
    if experts is not None:     # (its reads use the store the streamer closes)
        experts.close()
    streamer.close()
    for rows in tables:
        if hasattr(rows, "close"):
            rows.close()
