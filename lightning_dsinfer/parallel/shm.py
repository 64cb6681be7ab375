"""Shared-memory all-reduce for the CPU ranks of one host (what gloo's TCP loopback is too slow for).

Decode all-reduces are small (batch x hidden) and there are two per layer, so latency is what counts:
gloo over loopback costs about a millisecond per call on a 2-core machine, more than a layer's GEMMs.
Here the ranks of a tensor-parallel group share one mapped file in /dev/shm:

    [parity 0 | parity 1] x [tp slots of `capacity` fp32]      data, double-buffered by call parity
    [tp int64]                                                 flags: last call each rank published
    [tp int64]                                                 each rank's pid

Call ``s``: write my partial into slot (s % 2, rank) as fp32, publish flag = s, wait until every flag is
>= s, then sum the tp slots in fp32 into the output (all-reduce) or concatenate them (all-gather of the
vocab-parallel logits). A rank can only reach call s + 2 (same parity) after
every rank published s + 1, which each does after it finished reading call s: no second barrier.
x86 keeps stores in order, and each step is a separate torch op, so the flag is seen after the data.
Waiting gives up with a :class:`PeerFailureError` when the rank waited for has exited (its pid is looked up every
50 ms of waiting) or after the collective timeout.
"""
from __future__ import annotations

import os
import platform
import socket
import time
import uuid
import warnings

import torch
import torch.distributed as dist

# Largest all-reduce (elements) that goes through shared memory; larger ones (prefill) use the backend.
DEFAULT_CAPACITY = 1 << 18
# The torch / numpy paths order data before flags by x86's store order only (the C exchange uses atomics).
X86 = platform.machine().lower() in ("x86_64", "amd64")


class SharedMemoryUnavailable(RuntimeError):
    """/dev/shm cannot hold the buffer (every rank of the group gets this, so they all fall back together)."""


def _shared_buffer(group, src: int, is_root: bool, total: int, what: str) -> torch.Tensor:
    """``total`` bytes of a file in /dev/shm mapped by every rank of ``group``. The root reserves the space first
    (``posix_fallocate``: a sparse file on a full tmpfs would kill the ranks with SIGBUS at their first write) and
    tells the group whether it could; :class:`SharedMemoryUnavailable` on every rank if not. The file is unlinked
    once every rank mapped it (the mappings stay valid; nothing is left behind)."""
    info = [None]
    if is_root:
        path = f"/dev/shm/dsinfer-{what}-{uuid.uuid4().hex}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, total)
            finally:
                os.close(fd)
            info[0] = path
        except OSError as err:
            info[0] = ("", f"{err}")
            _unlink(path)
    dist.broadcast_object_list(info, src=src, group=group)
    if not isinstance(info[0], str):
        raise SharedMemoryUnavailable(f"/dev/shm could not hold {total / 2**20:.1f} MiB for the {what} buffer "
                                      f"({info[0][1]})")
    try:
        buf = torch.from_file(info[0], shared=True, size=total, dtype=torch.uint8)
        dist.barrier(group=group)
    finally:
        if is_root:
            _unlink(info[0])
    return buf


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _visible_pids(group, size: int) -> list[int]:
    """Every rank's pid, or zeros (no liveness checks) when some rank cannot see another's /proc entry (ranks in
    separate pid namespaces that share /dev/shm)."""
    pids = [None] * size
    dist.all_gather_object(pids, os.getpid(), group=group)
    seen = [None] * size
    dist.all_gather_object(seen, all(_alive(p) for p in pids), group=group)
    return pids if all(seen) else [0] * size


def warn_unavailable(err: Exception, what: str) -> None:
    warnings.warn(f"dsinfer: {err}; the {what} go through the process group instead (slower on one host). Give "
                  f"/dev/shm more room (docker: --shm-size) to use shared memory.", stacklevel=3)


class ShmAllReduce:
    def __init__(self, group, size: int, rank: int, timeout_s: float, capacity: int = DEFAULT_CAPACITY):
        self.size, self.rank, self.capacity, self.timeout_s = size, rank, capacity, timeout_s
        data_bytes = 2 * size * capacity * 4
        total = data_bytes + 2 * size * 8
        buf = _shared_buffer(group, dist.get_global_rank(group, 0), rank == 0, total, "all-reduce")
        self.pids = _visible_pids(group, size)    # (the same list on every rank, each writes it: no barrier needed)
        self.data = buf[:data_bytes].view(torch.float32).view(2, size, capacity)
        self.flags = buf[data_bytes:].view(torch.int64)       # [flags | pids] (the C exchange finds the pids there)
        self.flags[size:] = torch.tensor(self.pids, dtype=torch.int64)
        self._flags = self.flags[:size].numpy()   # numpy view: a flag store / check costs ~1 us, a torch op ~5 us
        self.step = 0
        self.seconds = 0.0                        # time inside all-reduces (waiting for peers included)
        from lightning_dsinfer.kernels import cpu_gemv

        self._c = cpu_gemv.shm_exchange()         # the whole call in C when the CPU kernels built (~2 us vs ~18 us)

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() <= self.capacity and x.device.type == "cpu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``x`` in place."""
        t = time.perf_counter()
        if self._c_ok(x):
            self._c_exchange(x, sum_into_x=True)
        else:
            slots = self._exchange(x)
            x.copy_(slots.sum(dim=0).view(x.shape))
        self.seconds += time.perf_counter() - t
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dim, in rank order (vocab-parallel logits)."""
        slots = self._c_exchange(x, sum_into_x=False) if self._c_ok(x) else self._exchange(x)
        return torch.cat([slots[r].view(x.shape) for r in range(self.size)], dim=-1).to(x.dtype)

    def _c_ok(self, x: torch.Tensor) -> bool:
        return self._c is not None and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32)

    def _c_exchange(self, x: torch.Tensor, sum_into_x: bool) -> torch.Tensor:
        """:meth:`_exchange` (and the sum) in one C call (kernels/cpu_gemv.cpp ``dsi_shm_exchange``)."""
        self.step += 1
        n = x.numel()
        slots = self.data[self.step % 2]
        if self._c(x.data_ptr(), x.dtype == torch.bfloat16, n, slots.data_ptr(), self.capacity, self.flags.data_ptr(),
                   self.size, self.rank, self.step, self.timeout_s, sum_into_x):
            self._timed_out()
        return slots[:, :n]

    def _timed_out(self):
        from lightning_dsinfer.parallel.comm import PeerFailureError

        gone = [r for r, pid in enumerate(self.pids) if not _alive(pid)]
        if gone:
            raise PeerFailureError(f"dsinfer: a peer rank of the tensor-parallel group (tp rank {gone[0]}, pid "
                                   f"{self.pids[gone[0]]}) exited before all-reduce #{self.step}; this rank stops too.")
        raise PeerFailureError(
            f"dsinfer: a peer rank of the tensor-parallel group did not reach all-reduce #{self.step} "
            f"within {self.timeout_s:.0f}s (collective_timeout_s); it probably died.")

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Publish ``x`` and wait for every rank's: the [size, numel] fp32 slots of this call (valid until the
        call after next)."""
        self.step += 1
        n = x.numel()
        slots = self.data[self.step % 2]
        slots[self.rank, :n].copy_(x.reshape(-1))
        self._flags[self.rank] = self.step
        if not spin_until(lambda: self._flags.min() >= self.step, self.pids, self.timeout_s):
            self._timed_out()
        return slots[:, :n]


def same_host(group) -> bool:
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1


def spin_until(ready, pids: list[int], timeout_s: float, sleep_after_s: float | None = None) -> bool:
    """Wait until ``ready()``: spin, giving the core up every 64 spins (``sched_yield``; past ``sleep_after_s`` of
    waiting, 50 us sleeps), and look the ``pids`` up every 50 ms. True when ready; False when one of them exited or
    ``timeout_s`` passed (the caller tells which with :func:`_alive`). The C exchange does the same in C."""
    if ready():
        return True
    start = checked = time.monotonic()
    spins = 0
    while not ready():
        spins += 1
        if spins % 64:
            continue
        now = time.monotonic()
        if sleep_after_s is not None and now - start >= sleep_after_s:
            time.sleep(5e-5)
        else:
            os.sched_yield()
        if now - start > timeout_s:
            return False
        if now - checked > 0.05:
            checked = now
            if not all(_alive(p) for p in pids):
                return False
    return True


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs: not gone, not a zombie. pid 0: not known, taken as
    running; so is a /proc entry that cannot be read for another reason than its absence."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True


class ShmChannels:
    """One-way message channels between the stages of a pipeline on one host (``edges``: (from stage, to stage)),
    in one mapped file in /dev/shm; used for the p2p messages of :class:`~lightning_dsinfer.parallel.pipeline.
    PipelineComm` instead of gloo, whose TCP loopback needs its own I/O thread to be scheduled on a busy core
    (a ping-pong on the 2-core machine: 0.05 ms per round trip here, 0.22 ms through gloo on idle cores and ~0.9 ms
    more per message through gloo when both cores compute; a token's messages are on the schedule's critical path).

    Each channel is a ring of :data:`SLOTS` slots of :data:`SLOT_BYTES` and two counters, pieces written (by the
    sender) and pieces read (by the receiver), on cache lines of their own. A message is cut into slot-sized pieces;
    the sender waits only when the ring is full, so it runs ahead of the receiver by up to the ring. Both sides know
    every message's size (the schedule is the same on every stage). x86 keeps stores in order, and the copy and the
    counter store are separate ops, so a counter is seen after the data it announces. A wait spins briefly, then
    sleeps in short steps; it fails when the peer process is gone (checked every 50 ms) or after the collective
    timeout, with a :class:`PeerFailureError`.
    """

    SLOTS = 8
    SLOT_BYTES = 1 << 20
    HEADER = 128                   # written counter at byte 0, read counter at byte 64

    def __init__(self, group, rank: int, ranks: list[int], edges: list[tuple[int, int]], timeout_s: float):
        self.timeout_s, self.ranks = timeout_s, ranks
        region = self.HEADER + self.SLOTS * self.SLOT_BYTES
        buf = _shared_buffer(group, ranks[0], rank == 0, region * len(edges), "pipeline")
        pids = _visible_pids(group, len(ranks))
        self._buf = buf
        self.channels = {}
        for i, (a, b) in enumerate(edges):
            if rank in (a, b):
                part = buf[i * region:(i + 1) * region]
                self.channels[(a, b)] = (part[:self.HEADER].view(torch.int64).numpy(),
                                         part[self.HEADER:].view(self.SLOTS, self.SLOT_BYTES), pids[b if rank == a else a])

    def _wait(self, ready, peer_pid: int, what: str) -> None:
        """Spin briefly, then sleep in short steps (a stage may wait a whole stage's compute for its peer)."""
        if spin_until(ready, [peer_pid], self.timeout_s, sleep_after_s=2e-4):
            return
        from lightning_dsinfer.parallel.comm import PeerFailureError

        gone = not _alive(peer_pid)
        raise PeerFailureError(
            f"dsinfer: a peer rank of pipeline group {self.ranks} (pid {peer_pid}) "
            f"{'exited' if gone else f'did not answer within {self.timeout_s:.0f}s (collective_timeout_s)'} "
            f"while this rank waited to {what}; this rank stops too.")

    def send(self, x: torch.Tensor, src: int, dst: int) -> None:
        counters, slots, pid = self.channels[(src, dst)]
        raw = x.contiguous().view(-1).view(torch.uint8)
        for a in range(0, raw.numel(), self.SLOT_BYTES):
            piece = raw[a:a + self.SLOT_BYTES]
            self._wait(lambda: counters[0] - counters[8] < self.SLOTS, pid, f"send to stage {dst}")
            slots[counters[0] % self.SLOTS, :piece.numel()].copy_(piece)
            counters[0] += 1

    def recv_into(self, out: torch.Tensor, src: int, dst: int) -> torch.Tensor:
        counters, slots, pid = self.channels[(src, dst)]
        raw = out.view(-1).view(torch.uint8)
        for a in range(0, raw.numel(), self.SLOT_BYTES):
            piece = raw[a:a + self.SLOT_BYTES]
            self._wait(lambda: counters[0] > counters[8], pid, f"receive from stage {src}")
            piece.copy_(slots[counters[8] % self.SLOTS, :piece.numel()])
            counters[8] += 1
        return out
