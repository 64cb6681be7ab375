"""The prefetch ring: units stream through ``n_slots`` buffers while the current one computes.

A forward pass consumes the units in a fixed cyclic order (blocks 0..L-1, then the lm_head slices, then
block 0 of the next pass...). Each unit belongs to a size class (``classes``; default one class) with
``n`` slots of its own (``n_slots``: one count, or one per class): the ``o``-th use of a class (counted
over the endless cycle) lives in slot ``o % n`` of that class, and when the consumer releases it, the
read of that class's use ``o + n`` into the freed slot is queued. With one class that is position ``p``
in slot ``p % n_slots`` and ``n_slots - 1`` units always in flight; with an attention class and an MLP
class of two slots each, two or three units are read ahead of the one computing. Reads cross the boundary
between two forward passes too (the first blocks of the next token load while the lm_head of this one
computes).

- CPU compute, disk tier: reads go straight into the slot buffers (host RAM); the working set is
  the slots.
- CPU compute, host tier: nothing to move; units are used in place.
- GPU compute: slots are device buffers; host tier units (pinned) are copied on a side stream; disk
  tier units are read into pinned staging slots first, then copied. The compute stream waits for a unit's
  copy with an event and a copy for the slot's previous unit's compute with another, so the host never waits for
  the transfer of the unit it is about to use: it queues the kernels of the next units while the copies run (on
  the disk tier a staging slot's next read waits, on the host, for the copy out of it, queued units earlier).

Units named ``resident`` (memory the budget leaves after the ring and the batch) are read once and
never streamed; the cycle skips them. A consumer that asks for another unit than the next one in the
cycle (a pass that failed half way) restarts the cycle there after draining the reads in flight.
"""
from __future__ import annotations

import bisect
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lightning_dsinfer.offload.layout import UnitLayout, aligned_empty


class UnitStreamer:
    def __init__(self, store, layouts: list[UnitLayout], order: list[int], device: torch.device,
                 n_slots: int | list[int], io_threads: int = 4, resident: tuple[int, ...] = (),
                 classes: list[int] | None = None):
        self.store, self.layouts = store, layouts
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.zero_copy = store.zero_copy_on_cpu and not self.cuda
        if self.zero_copy:
            resident = ()
        self.order = [u for u in order if u not in resident]
        kind = [classes[u] if classes else 0 for u in self.order]
        self._members: dict[int, list[int]] = {}         # class -> its positions in the cycle
        for i, c in enumerate(kind):
            self._members.setdefault(c, []).append(i)
        self._kind = kind
        self._rank = [self._members[c].index(i) for i, c in enumerate(kind)]
        self._slots: dict[int, tuple[int, int]] = {}     # class -> (first slot, slots)
        slot_sizes = []
        for c, members in self._members.items():
            n = min(n_slots[c] if isinstance(n_slots, (list, tuple)) else n_slots, len(members))
            self._slots[c] = (len(slot_sizes), n)
            slot_sizes += [max(layouts[self.order[i]].nbytes for i in members)] * n
        self.n_slots = len(slot_sizes)
        self.slot_bytes = max(slot_sizes, default=0)
        self.ring_bytes = sum(slot_sizes)
        self.pos = 0
        self.pending: dict[int, list[Future]] = {}
        self.resident: dict[int, torch.Tensor] = {}
        self._holding_resident = False
        if self.zero_copy:
            return
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="dsinfer-io")
        for u in resident:                # read once, kept for good: budget left over after the ring and the batch
            host = aligned_empty(layouts[u].nbytes, pin=self.cuda) if not store.zero_copy_on_cpu else None
            if host is not None:
                for f in store.read(u, host, self.io):
                    f.result()
            src = host if host is not None else store.host_buffer(u)
            self.resident[u] = src.to(self.device) if self.cuda else src
        host_staging = not (self.cuda and store.zero_copy_on_cpu)     # GPU + host tier copies from the store
        self.host_slots = [aligned_empty(n, pin=self.cuda) for n in slot_sizes] if host_staging else []
        if self.cuda:
            self.dev_slots = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in slot_sizes]
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copier = ThreadPoolExecutor(1, thread_name_prefix="dsinfer-h2d")
            self.free_events: list[torch.cuda.Event | None] = [None] * self.n_slots
            self.staged_events: list[torch.cuda.Event | None] = [None] * self.n_slots   # copies out of staging
        self._start(0)

    # ---------------------------------------------------------------- the cycle
    def _use(self, p: int) -> tuple[int, int]:
        """(class, how many uses of that class come before position ``p`` of the endless cycle)."""
        i = p % len(self.order)
        c = self._kind[i]
        return c, (p // len(self.order)) * len(self._members[c]) + self._rank[i]

    def _position(self, c: int, use: int) -> int:
        members = self._members[c]
        return (use // len(members)) * len(self.order) + members[use % len(members)]

    def _slot(self, p: int) -> int:
        c, use = self._use(p)
        first, n = self._slots[c]
        return first + use % n

    def _start(self, pos: int) -> None:
        """Queue the reads that fill every slot with the first uses at or after position ``pos``."""
        if self.cuda:   # the slots may still be read by kernels queued before (a failed pass; a fresh allocation)
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        first = []
        for c, members in self._members.items():
            use = (pos // len(self.order)) * len(members) + bisect.bisect_left(members, pos % len(self.order))
            first += [self._position(c, use + k) for k in range(self._slots[c][1])]
        for p in sorted(first):
            self._submit(p)

    # ---------------------------------------------------------------- producer side
    def _submit(self, p: int) -> None:
        unit = self.order[p % len(self.order)]
        slot = self._slot(p)
        if not self.cuda:
            self.pending[p] = self.store.read(unit, self.host_slots[slot], self.io)
            return
        n = self.layouts[unit].nbytes
        if not self.host_slots:     # host tier: the pinned unit is copied now; every wait is on the GPU
            done = Future()
            done.set_result(self._copy(self.store.host_buffer(unit), self.dev_slots[slot], n, self.free_events[slot]))
            self.pending[p] = [done]
            return
        if self.staged_events[slot] is not None:   # the staging slot's last copy (units ago: done by now, mostly)
            self.staged_events[slot].synchronize()
        reads = self.store.read(unit, self.host_slots[slot], self.io)
        self.pending[p] = [self.copier.submit(self._to_device, reads, slot, n, self.free_events[slot])]

    def _copy(self, src, dst, n, free_event) -> torch.cuda.Event:
        """Queue the copy of ``src[:n]`` into the device slot ``dst`` on the copy stream, after the slot's previous
        unit is done computing (``free_event``); returns the event the compute stream waits for."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            if free_event is not None:
                self.copy_stream.wait_event(free_event)
            dst[:n].copy_(src[:n], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def _to_device(self, reads, slot, n, free_event) -> torch.cuda.Event:
        """Disk tier: once the reads have filled the pinned staging slot, queue its copy (the compute stream waits
        for the returned event; the staging slot's next read waits for it on the host, in :meth:`_submit`)."""
        for f in reads:
            f.result()
        done = self._copy(self.host_slots[slot], self.dev_slots[slot], n, free_event)
        self.staged_events[slot] = done
        return done

    # ---------------------------------------------------------------- consumer side
    def acquire(self, unit: int) -> dict[str, torch.Tensor]:
        """The tensors of ``unit`` (views), valid until :meth:`release`."""
        if self.zero_copy:
            return self.layouts[unit].views(self.store.host_buffer(unit))
        if unit in self.resident:
            self._holding_resident = True
            return self.layouts[unit].views(self.resident[unit])
        if self.order[self.pos % len(self.order)] != unit:
            self._restart(unit)
        futures = self.pending.pop(self.pos)
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:             # the unit's other reads may still be landing in the slot
                f.exception()
            self._restart(unit)
            raise
        slot = self._slot(self.pos)
        if self.cuda:   # the compute stream waits for the copy on the GPU: the host does not block on it and
            # queues this unit's kernels while the copy (and the compute before it) still runs
            torch.cuda.current_stream(self.device).wait_event(futures[-1].result())
        buffer = self.dev_slots[slot] if self.cuda else self.host_slots[slot]
        return self.layouts[unit].views(buffer)

    def release(self) -> None:
        """The unit from the last :meth:`acquire` is no longer used: its slot takes the next read."""
        if self.zero_copy:
            return
        if self._holding_resident:
            self._holding_resident = False
            return
        slot = self._slot(self.pos)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.free_events[slot] = event
        c, use = self._use(self.pos)
        self._submit(self._position(c, use + self._slots[c][1]))       # the next use of the freed slot
        self.pos += 1

    def _drain(self) -> None:
        for futures in self.pending.values():
            for f in futures:
                try:
                    f.result()
                except BaseException:     # the pass that queued it failed already; its error was raised there
                    pass
        self.pending.clear()

    def _restart(self, unit: int) -> None:
        self._drain()
        self._holding_resident = False
        self.pos = self.order.index(unit)
        self._start(self.pos)

    def close(self) -> None:
        if self.zero_copy:
            return
        self._drain()
        self.io.shutdown(wait=True)
        if self.cuda:
            self.copier.shutdown(wait=True)
            self.copy_stream.synchronize()      # copies still in flight write into the slots about to be freed
        if hasattr(self.store, "close"):
            self.store.close()
