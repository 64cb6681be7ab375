"""Where offloaded units live: host memory (the CPU tier) or per-unit files on disk (the NVMe tier).

Both are written once, one unit at a time (so the model is never whole in memory while it is
written), and read back with ``read(unit, buffer, pool)``, which returns the futures of the reads.

The disk tier reads with ``O_DIRECT`` (page-aligned buffers, offsets and lengths), so the page cache
is bypassed: what is resident is what the streamer holds, and a benchmark measures the disk. Where
the file system refuses ``O_DIRECT`` (tmpfs), reads are buffered and the pages are dropped from the
cache right after (``posix_fadvise(DONTNEED)``). Reads are queued on a thread pool (several requests in
flight keep the device busy; ``os.preadv`` and the decoder release the GIL).

Packed units (the default, :mod:`~lightning_dsinfer.offload.codec`): a unit file is a row of frames, each
read whole into one of a few staging buffers and decoded from there into the unit's buffer by the thread
that read it; bf16 weights take 12 bits on disk instead of 16 and come back bit for bit. Raw units
(``compress=False``, or no C library): the file is the unit's buffer, read straight into it in
``chunk_bytes`` requests.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lightning_dsinfer.fileio import pread_exactly
from lightning_dsinfer.offload import codec
from lightning_dsinfer.offload.layout import PAGE, UnitLayout, aligned_empty, round_up

_MANIFEST = "manifest.json"
_FORMAT = 2
STAGING_BUFFERS = 4               # packed frames being read or decoded at once (one per reader thread)


class HostStore:
    """The CPU tier: every unit in its own (pinned, when the compute device is a GPU) host buffer."""

    zero_copy_on_cpu = True
    staging_bytes = 0

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

    def stored_bytes(self, unit: int) -> int:
        return self.layouts[unit].nbytes

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


def staging_bytes(layouts: list[UnitLayout], compress: bool, frame_bytes: int = codec.MAX_FRAME_BYTES) -> int:
    """Memory of a disk store's staging buffers, which packed frames are read into (0 for raw units)."""
    return STAGING_BUFFERS * codec.staging_bytes(layouts, frame_bytes) if compress and codec.available() else 0


def _pwrite_all(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.numpy())
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


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
    """The NVMe tier: unit ``i`` in ``<folder>/unit_<i>.bin``; ``manifest.json`` holds the layouts, the frames
    of packed units and a fingerprint of what was written, so a folder written by an earlier run with the same
    fingerprint (and packing) is reused instead of rewritten."""

    zero_copy_on_cpu = False

    def __init__(self, folder: str, layouts: list[UnitLayout], fingerprint: dict, chunk_bytes: int = 4 << 20,
                 compress: bool = True, frame_bytes: int = codec.MAX_FRAME_BYTES, reuse: bool = True):
        self.folder, self.layouts, self.fingerprint = folder, layouts, fingerprint
        self.frame_bytes = frame_bytes
        self.compress = compress and codec.available()
        self.chunk_bytes = round_up(chunk_bytes, PAGE)
        self.frames: list[list[codec.Frame]] | None = [[] for _ in layouts] if self.compress else None
        self._fds: list[tuple[int, bool]] = []
        self._staging: queue.Queue | None = None
        self._groups: list[list[list[codec.Frame]]] = []      # per unit: its read requests (packed units, finish())
        self.reused = reuse and self._manifest_matches()
        if not self.reused:
            stale = [os.path.join(folder, n) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                     if n.startswith("unit_") and n.endswith(".bin") or n == _MANIFEST]   # of another model / layout
            need = sum(codec.max_file_bytes(l, frame_bytes) for l in layouts) if self.compress else self.nbytes
            _check_folder(folder, need - sum(os.path.getsize(f) for f in stale))   # their space comes back first
            for path in stale:
                os.remove(path)
        self._scratch: torch.Tensor | None = None
        self._pages: list[torch.Tensor] | None = None       # packing buffers of the write path
        self._encoder: ThreadPoolExecutor | None = None
        self._in_flight, self._busy_since, self.busy_s = 0, 0.0, 0.0     # time with a read outstanding
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for l in self.layouts)

    @property
    def staging_bytes(self) -> int:
        return staging_bytes(self.layouts, self.compress, self.frame_bytes)

    def path(self, unit: int) -> str:
        return os.path.join(self.folder, f"unit_{unit:05d}.bin")

    def stored_bytes(self, unit: int) -> int:
        """Bytes one pass reads from disk for ``unit``."""
        if self.frames is None:
            return self.layouts[unit].nbytes
        return sum(f.read_bytes for f in self.frames[unit])

    def _file_bytes(self, unit: int) -> int:
        if self.frames is None:
            return self.layouts[unit].nbytes
        return max((f.file_offset + f.read_bytes for f in self.frames[unit]), default=0)

    def _manifest_matches(self) -> bool:
        if self.fingerprint is None:                # weights from memory: nothing tells they are the same
            return False
        try:
            with open(os.path.join(self.folder, _MANIFEST)) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return False
        if not (m.get("format") == _FORMAT and m.get("fingerprint") == self.fingerprint
                and m.get("layouts") == [l.to_json() for l in self.layouts]
                and m.get("packed") == self.compress and m.get("frame_bytes") == self.frame_bytes
                and len(m.get("frames") or []) == len(self.layouts)):
            return False
        if self.compress:
            self.frames = [[codec.Frame.from_json(f) for f in unit] for unit in m["frames"]]
        if all(os.path.exists(self.path(i)) and os.path.getsize(self.path(i)) == self._file_bytes(i)
               for i in range(len(self.layouts))):
            return True
        self.frames = [[] for _ in self.layouts] if self.compress else None
        return False

    def write(self, unit: int, tensors: dict[str, torch.Tensor]) -> None:
        layout = self.layouts[unit]
        if self._scratch is None:
            self._scratch = aligned_empty(max(l.nbytes for l in self.layouts))
        buf = self._scratch[:layout.nbytes]
        buf[-PAGE:].zero_()                              # padding bytes are written too: keep them defined
        layout.pack(tensors, buf)
        fd = os.open(self.path(unit), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if self.frames is None:
                _pwrite_all(fd, buf, 0)
            else:
                self.frames[unit] = self._write_frames(fd, layout, buf)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # written pages are not a cache to keep
        finally:
            os.close(fd)

    def _write_frames(self, fd: int, layout: UnitLayout, buf: torch.Tensor) -> list[codec.Frame]:
        """Pack each frame of the unit's bytes ``buf`` (raw where packing does not pay) and write it at the next
        page-aligned offset, zero-padded to a page; returns the frames. Frames are packed a few at a time on
        threads (the C encoder releases the GIL), one page-sized buffer each."""
        if self._pages is None:
            threads = max(1, min(4, os.cpu_count() or 1))
            self._pages = [torch.empty(codec.staging_bytes(self.layouts, self.frame_bytes), dtype=torch.uint8)
                           for _ in range(threads)]
            self._encoder = ThreadPoolExecutor(threads, thread_name_prefix="dsinfer-pack")

        def pack(job):
            (raw_offset, raw_bytes, width), page = job
            raw = buf[raw_offset:raw_offset + raw_bytes]
            got = codec.encode(raw, width, page) if width else None
            if got is None:
                page[:raw_bytes].copy_(raw)
                return raw_offset, raw_bytes, 0, raw_bytes, 0, b""
            return (raw_offset, raw_bytes, width) + got

        frames, offset, todo = [], 0, codec.raw_frames(layout, self.frame_bytes)
        for start in range(0, len(todo), len(self._pages)):
            window = list(zip(todo[start:start + len(self._pages)], self._pages))
            for (raw_offset, raw_bytes, width, size, n_exc, table), page in zip(self._encoder.map(pack, window),
                                                                                  self._pages):
                frame = codec.Frame(raw_offset, raw_bytes, width, n_exc, table, offset, size)
                page[size:frame.read_bytes].zero_()
                _pwrite_all(fd, page[:frame.read_bytes], offset)
                frames.append(frame)
                offset += frame.read_bytes
        return frames

    def finish(self) -> None:
        """Write the manifest (last, so an interrupted write is never taken for a complete one)."""
        self._scratch = self._pages = None
        if self._encoder is not None:
            self._encoder.shutdown()
            self._encoder = None
        if not self.reused:
            tmp = os.path.join(self.folder, _MANIFEST + ".tmp")
            frames = self.frames if self.frames is not None else [[] for _ in self.layouts]
            with open(tmp, "w") as f:
                json.dump({"format": _FORMAT, "fingerprint": self.fingerprint, "packed": self.compress,
                           "frame_bytes": self.frame_bytes,
                           "layouts": [l.to_json() for l in self.layouts],
                           "frames": [[fr.to_json() for fr in unit] for unit in frames]}, f)
            os.replace(tmp, os.path.join(self.folder, _MANIFEST))
        self._fds = [_open_direct(self.path(i)) for i in range(len(self.layouts))]
        if self.compress:
            cap = self._staging_cap()
            self._groups = [self._read_groups(u, cap) for u in range(len(self.layouts))]
            self._staging = queue.SimpleQueue()
            for _ in range(STAGING_BUFFERS):
                self._staging.put(aligned_empty(cap))

    def busy_time(self) -> float:
        """Seconds so far during which at least one read was outstanding (the difference of two calls is the
        disk's busy time in between: the overlap a benchmark reports)."""
        with self._lock:
            return self.busy_s + (time.perf_counter() - self._busy_since if self._in_flight else 0.0)

    def _timed_read(self, fd: int, direct: bool, view: memoryview, offset: int) -> None:
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

    def _read_frames(self, fd: int, direct: bool, frames: list[codec.Frame], buffer: torch.Tensor) -> None:
        """One read of consecutive frames into a staging buffer, then each decoded into ``buffer``."""
        staging = self._staging.get()
        start = frames[0].file_offset
        try:
            end = frames[-1].file_offset + frames[-1].read_bytes
            self._timed_read(fd, direct, memoryview(staging[:end - start].numpy()), start)
            for f in frames:
                codec.decode(f, staging[f.file_offset - start:], buffer)
        finally:
            self._staging.put(staging)

    def _staging_cap(self) -> int:
        """One staging buffer: the planned size, or the largest frame written if one is larger (never a short read)."""
        largest = max((f.read_bytes for unit in self.frames for f in unit), default=PAGE)
        return max(codec.staging_bytes(self.layouts, self.frame_bytes), largest)

    def _read_groups(self, unit: int, cap: int) -> list[list[codec.Frame]]:
        """The frames of ``unit`` in runs of consecutive frames of at most ``cap`` bytes (one staging buffer) each:
        small frames (norm weights, a small model's tensors) share one read request instead of one each."""
        groups: list[list[codec.Frame]] = []
        for f in self.frames[unit]:
            if groups and f.file_offset + f.read_bytes - groups[-1][0].file_offset <= cap:
                groups[-1].append(f)
            else:
                groups.append([f])
        return groups

    def read(self, unit: int, buffer: torch.Tensor, pool: ThreadPoolExecutor) -> list[Future]:
        """Queue the reads of ``unit`` into the page-aligned uint8 ``buffer``; returns their futures."""
        fd, direct = self._fds[unit]
        if self.frames is not None:
            return [pool.submit(self._read_frames, fd, direct, g, buffer) for g in self._groups[unit]]
        n = self.layouts[unit].nbytes
        view = memoryview(buffer[:n].numpy())
        return [pool.submit(self._timed_read, fd, direct, view[o:o + self.chunk_bytes], o)
                for o in range(0, n, self.chunk_bytes)]

    def close(self) -> None:
        for fd, _ in self._fds:
            os.close(fd)
        self._fds = []
        self._staging = None
