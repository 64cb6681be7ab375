"""CUDA graphs for the decode step: one captured step per batch-size bucket, replayed for every token.

The eager decode step (``decode.py``) cannot be replayed: its mask and K/V views grow by one column per
token and it writes the cache at a host-int column. The graph step runs the same modules on fixed shapes:

- K/V are written at a device-tensor column (the rotary kernel's ``cache_start``; ``index_copy_`` on the
  reference ops) into cache rows [:B]; attention reads all S cache columns;
- visibility is per-row key ranges [kv_start, col] held in device tensors: a bool mask [B, 1, 1, S] for the
  reference ops, and the same ranges registered with ``kernels.ops.kv_ranges`` for the Triton decode kernel
  (no host sync; its split count then depends only on S);
- rotary rows are gathered at device positions; token ids, positions and the column are static input
  buffers filled before each replay; the logits are a static output.

Only attention differs from eager decode, and only in summation order (it runs over S columns with the
rest masked out instead of the first L); tokens are compared against the eager step in
``benchmarks/gpu_check.py``. Buckets: 1, 2, 4, ... up to the KV cache's rows. A batch of b runs in the
smallest bucket >= b; the extra rows are dummies (token 0 at position 0 that see only their own column;
their cache rows are scratch). A bucket is captured on its first decode step, after one eager run of the
same step (which also compiles the Triton kernels), and reused by later ``generate`` calls until the cache
is re-allocated. Used only for CUDA engines with one tensor-parallel rank, resident weights (no offload)
and a left-padded attention mask; ``DSINFER_CUDA_GRAPHS=0`` turns it off. :func:`emulate` runs the same
fixed-shape step eagerly on any device, so its logic is tested on the CPU.
"""
from __future__ import annotations

import contextlib
import os

import torch

from lightning_dsinfer.kernels import ops
from lightning_dsinfer.modules.masks import chunk_start
from lightning_dsinfer.modules.transformer import Step

_EMULATE = False


@contextlib.contextmanager
def emulate(enabled: bool = True):
    """Within the block, :func:`decode_graphs` also serves non-CUDA engines, running the fixed-shape step
    eagerly (no capture): the CPU test of everything here except capture and replay themselves."""
    global _EMULATE
    old, _EMULATE = _EMULATE, enabled
    try:
        yield
    finally:
        _EMULATE = old


def _enabled(engine) -> bool:
    if os.environ.get("DSINFER_CUDA_GRAPHS", "1") in ("0", "false", "False"):
        return False
    if not engine.config.cuda_graphs or engine.offload is not None:
        return False
    return engine.comm.size == 1 and engine.pipe.size == 1


def decode_graphs(engine, batch: int, key_valid: torch.Tensor | None, prompt_len: int):
    """The graph runner for one ``generate`` call, or None (then the loop runs the eager step).

    key_valid: bool [B, total] (the loop's key mask) or None (no padding). Returns None off CUDA (unless
    emulating), when disabled, or when the prompt mask is not left padding (one host sync checks it).
    """
    capture = engine.device.type == "cuda"
    if not (capture or _EMULATE) or not _enabled(engine):
        return None
    if key_valid is None:
        pad_start = torch.zeros(batch, dtype=torch.int32, device=engine.device)
    else:
        prompt = key_valid[:, :prompt_len]
        pad_start = (prompt_len - prompt.sum(-1)).to(torch.int32)
        cols = torch.arange(prompt_len, device=prompt.device)
        if not torch.equal(cols[None, :] >= pad_start[:, None], prompt):
            return None      # zeros inside a prompt: not a key range
    runner = getattr(engine, "_decode_graphs", None)
    if runner is None or not runner.valid_for(engine.cache, capture):
        runner = engine._decode_graphs = DecodeGraphs(engine, capture)
    runner.begin(batch, pad_start)
    return runner


class _ColumnWriter:
    """Stands in for the StaticKVCache in a graph step's ``Step`` (its ``slots`` / ``read``): K/V
    go to the device column (``kernels.ops.rotary_write_kv`` takes it as a LongTensor [1]) and attention reads
    the full cache rows [:B] (all S columns)."""

    def __init__(self, cache, col: torch.Tensor, rows: int):
        self.cache, self.col, self.rows = cache, col, rows

    def slots(self, layer: int, b: int, start: int):
        return self.cache.k[layer][:self.rows], self.cache.v[layer][:self.rows], self.col

    def read(self, layer: int, b: int, end: int):
        return self.cache.k[layer][:self.rows], self.cache.v[layer][:self.rows]

    def linear_buffers(self, layer: int, b: int, conv: tuple, state: tuple):
        return self.cache.linear_buffers(layer, self.rows, conv, state)     # (linear attention's, in place)


class _Bucket:
    """Static buffers and (on CUDA) the captured graph of the decode step for B rows."""

    def __init__(self, engine, rows: int, capture: bool):
        dev = engine.device
        self.engine, self.rows, self.capture = engine, rows, capture
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.pad_start = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.real = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.cols = torch.arange(engine.cache.max_seq_len, device=dev)
        self.graph = None
        self.logits = None

    def _run(self) -> None:
        """The decode step on fixed shapes; everything it allocates is the graph's while capturing."""
        e, b = self.engine, self.rows
        col, cols, w = self.col, self.cols, e.sliding_window
        seq_lens = (col + 1).to(torch.int32).expand(b).contiguous()
        start = torch.where(self.real, self.pad_start, col.to(torch.int32))          # dummies: own column only
        upto = cols[None, :] <= col
        mask = ((cols[None, :] >= start[:, None]) & upto).view(b, 1, 1, -1)
        window_mask, window_start, c = None, start, e.attention_chunk
        if w is not None:
            window_mask = (mask & (cols > col - w).view(1, 1, 1, -1))
        elif c is not None:     # (Llama 4: the keys of the row's chunk, counted from its first real token)
            window_start = chunk_start(start, col, c)                                        # (dummies: col)
            window_mask = ((cols[None, :] >= window_start[:, None]) & upto).view(b, 1, 1, -1)
        def rows(table):        # (the step's rotary rows, gathered at the device positions)
            return None if table is None else [t.index_select(0, self.pos).view(b, 1, 1, t.shape[-1])
                                               for t in (table.cos, table.sin)]

        (cos, sin), sliding = rows(e.rotary), rows(e.rotary.sliding)     # (Gemma 3 / 4: the sliding layers' own)
        step = Step(cos=cos, sin=sin, mask=mask, window_mask=window_mask,
                    cache=_ColumnWriter(e.cache, col, b), start=0, positions=self.pos.view(b, 1), decoding=True,
                    q_col=col, ids=self.tok.view(b, 1), sliding_cos=sliding and sliding[0],
                    sliding_sin=sliding and sliding[1])
        with ops.kv_ranges((mask, start, seq_lens, None), (window_mask, window_start.to(torch.int32), seq_lens, w)):
            h = e.decoder.hidden(e.decoder.embed_tokens(self.tok.view(b, 1)), step)
            self.logits = e.decoder.logits(h[:, -1])

    def replay(self) -> torch.Tensor:
        if not self.capture:
            self._run()
        elif self.graph is None:
            side = torch.cuda.Stream(device=self.engine.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()          # warm-up: compiles kernels, sets up cuBLAS; computes this very step
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run()
            self.graph = graph
            graph.replay()           # the same step again: writes the same cache column, same logits
        else:
            self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Per engine: one :class:`_Bucket` per batch-size bucket, made on first use."""

    def __init__(self, engine, capture: bool):
        self.engine, self.capture = engine, capture
        self.cache_key = self._cache_key(engine.cache)
        self.buckets: dict[int, _Bucket] = {}
        self.current: _Bucket | None = None
        self.batch = 0

    @staticmethod
    def _cache_key(cache):
        return cache.k[0].data_ptr(), cache.max_batch_size

    def valid_for(self, cache, capture: bool) -> bool:
        """False once the cache was re-allocated (the graphs point at the old tensors)."""
        return capture == self.capture and self._cache_key(cache) == self.cache_key

    def bucket_size(self, batch: int) -> int:
        rows = self.engine.cache.max_batch_size
        size = 1
        while size < batch:
            size *= 2
        return min(size, rows)

    def begin(self, batch: int, pad_start: torch.Tensor) -> None:
        size = self.bucket_size(batch)
        bucket = self.buckets.get(size)
        if bucket is None:
            bucket = self.buckets[size] = _Bucket(self.engine, size, self.capture)
        bucket.tok.zero_()
        bucket.pos.zero_()
        bucket.real.zero_()
        bucket.real[:batch] = True
        bucket.pad_start[:batch].copy_(pad_start)
        self.current, self.batch = bucket, batch

    def step(self, tok: torch.Tensor, pos: torch.Tensor, col: int) -> torch.Tensor:
        """Logits [b, V] of one decode step: tokens tok [b] at positions pos [b, 1], written at cache column
        ``col``. The result is the bucket's static output: use it before the next step."""
        bucket, b = self.current, self.batch
        bucket.tok[:b].copy_(tok)
        bucket.pos[:b].copy_(pos[:, 0])
        bucket.col.fill_(col)
        return bucket.replay()[:b]


__all__ = ["decode_graphs", "emulate", "DecodeGraphs"]
