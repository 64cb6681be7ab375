"""Where offloaded units live: host memory (the CPU tier) or per-unit files on disk (the NVMe tier).

Both are written once, one unit at a time (so the model is never whole in memory while it is
written), and read back with ``read(unit, buffer, pool)``, which returns the futures of the reads.

The disk tier reads with ``O_DIRECT`` (page-aligned buffers, offsets and lengths), so the page cache
is bypassed: what is resident is what the streamer holds, and a benchmark measures the disk. Each
unit is split into ``chunk_bytes`` reads queued on a thread pool (several requests in flight keep
the device busy; ``os.preadv`` releases the GIL). Where the file system refuses ``O_DIRECT``
(tmpfs), reads are buffered and the pages are dropped from the cache right after
(``posix_fadvise(DONTNEED)``).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lightning_dsinfer.fileio import pread_exactly
from lightning_dsinfer.offload.layout import PAGE, UnitLayout, aligned_empty, round_up

_MANIFEST = "manifest.json"
_FORMAT = 1


class HostStore:
    """The CPU tier: every unit in its own (pinned, when the compute device is a GPU) host buffer."""

    zero_copy_on_cpu = True

    def __init__(self, layouts: list[UnitLayout], pin: bool):
        self.layouts = layouts
        self.pin = pin
        self.buffers: list[torch.Tensor | None] = [None] * len(layouts)

    def write(self, unit: int, tensors: dict[str, torch.Tensor]) -> None:
        buf = aligned_empty(self.layouts[unit].nbytes, pin=self.pin)
        self.layouts[unit].pack(tensors, buf)
        self.buffers[unit] = buf

    def finish(self) -> None:
        """Every unit is written."""

    def host_buffer(self, unit: int) -> torch.Tensor:
        return self.buffers[unit]

    def read(self, unit: int, buffer: torch.Tensor, pool: ThreadPoolExecutor) -> list[Future]:
        return [pool.submit(buffer[:self.layouts[unit].nbytes].copy_, self.buffers[unit])]


def _check_folder(path: str, need: int) -> None:
    """Bad offload folders fail before anything is written: not creatable, not writable, too small."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"dsinfer: offload_path={path!r} cannot be created ({e.strerror}); pass a writable folder "
                         f"on a local disk.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"dsinfer: offload_path={path!r} is not writable; pass a folder this process can write.")
    free = shutil.disk_usage(path).free
    if free < need:
        raise ValueError(f"dsinfer: offload_path={path!r} has {free / 2**20:.0f} MiB free but the offloaded weights "
                         f"need {need / 2**20:.0f} MiB; free space there or pass another offload_path.")


def _open_direct(path: str) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


class DiskStore:
    """The NVMe tier: unit ``i`` in ``<folder>/unit_<i>.bin``; ``manifest.json`` holds the layouts and a
    fingerprint of what was written, so a folder written by an earlier run with the same fingerprint is
    reused instead of rewritten."""

    zero_copy_on_cpu = False

    def __init__(self, folder: str, layouts: list[UnitLayout], fingerprint: dict, chunk_bytes: int = 4 << 20):
        self.folder, self.layouts, self.fingerprint = folder, layouts, fingerprint
        self.chunk_bytes = round_up(chunk_bytes, PAGE)
        self._fds: list[tuple[int, bool]] = []
        self.reused = self._manifest_matches()
        if not self.reused:
            _check_folder(folder, self.nbytes)
            for name in os.listdir(folder):         # stale units of another model / shard layout
                if name.startswith("unit_") and name.endswith(".bin") or name == _MANIFEST:
                    os.remove(os.path.join(folder, name))
        self._scratch: torch.Tensor | None = None
        self._in_flight, self._busy_since, self.busy_s = 0, 0.0, 0.0     # time with a read outstanding
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for l in self.layouts)

    def path(self, unit: int) -> str:
        return os.path.join(self.folder, f"unit_{unit:05d}.bin")

    def _manifest_matches(self) -> bool:
        if self.fingerprint is None:                # weights from memory: nothing tells they are the same
            return False
        try:
            with open(os.path.join(self.folder, _MANIFEST)) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return False
        return (m.get("format") == _FORMAT and m.get("fingerprint") == self.fingerprint
                and m.get("layouts") == [l.to_json() for l in self.layouts]
                and all(os.path.exists(self.path(i)) and os.path.getsize(self.path(i)) == l.nbytes
                        for i, l in enumerate(self.layouts)))

    def write(self, unit: int, tensors: dict[str, torch.Tensor]) -> None:
        layout = self.layouts[unit]
        if self._scratch is None or self._scratch.numel() < layout.nbytes:
            self._scratch = aligned_empty(max(l.nbytes for l in self.layouts))
        buf = self._scratch[:layout.nbytes]
        buf[-PAGE:].zero_()                              # padding bytes are written too: keep them defined
        layout.pack(tensors, buf)
        fd = os.open(self.path(unit), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(buf.numpy())
            done = 0
            while done < layout.nbytes:
                done += os.pwrite(fd, view[done:], done)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # written pages are not a cache to keep
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Write the manifest (last, so an interrupted write is never taken for a complete one)."""
        self._scratch = None
        if not self.reused:
            tmp = os.path.join(self.folder, _MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"format": _FORMAT, "fingerprint": self.fingerprint,
                           "layouts": [l.to_json() for l in self.layouts]}, f)
            os.replace(tmp, os.path.join(self.folder, _MANIFEST))
        self._fds = [_open_direct(self.path(i)) for i in range(len(self.layouts))]

    def busy_time(self) -> float:
        """Seconds so far during which at least one read was outstanding (the difference of two calls is the
        disk's busy time in between: the overlap a benchmark reports)."""
        with self._lock:
            return self.busy_s + (time.perf_counter() - self._busy_since if self._in_flight else 0.0)

    def _read_chunk(self, fd: int, direct: bool, view: memoryview, offset: int) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            pread_exactly(fd, view, offset)
            if not direct:
                os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self.busy_s += time.perf_counter() - self._busy_since

    def read(self, unit: int, buffer: torch.Tensor, pool: ThreadPoolExecutor) -> list[Future]:
        """Queue the reads of ``unit`` into the page-aligned uint8 ``buffer``; returns their futures."""
        fd, direct = self._fds[unit]
        n = self.layouts[unit].nbytes
        view = memoryview(buffer[:n].numpy())
        return [pool.submit(self._read_chunk, fd, direct, view[o:o + self.chunk_bytes], o)
                for o in range(0, n, self.chunk_bytes)]

    def close(self) -> None:
        for fd, _ in self._fds:
            os.close(fd)
        self._fds = []
