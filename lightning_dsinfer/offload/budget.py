"""How many ring slots, which batch size and how long a prefill chunk fit in ``max_memory``.

Working set on the compute device (RAM on a CPU, device memory on a GPU):

    ring bytes                                   the prefetch ring (current unit + the ones in flight)
  + batch x per-sequence bytes                   KV cache for max_seq_len, hidden states, logits
  + prefill_tokens x per-token activation bytes  one block's temporaries on one prefill chunk
  + staging bytes                                packed frames being read / decoded (disk tier, packed units)
  + expert slots                                 routed experts read when routed to (disk tier, CPU; MoE)

The ring, deepest that fits: while one unit computes, two are read or ready, so the disk keeps
reading while a large unit computes after a small one has arrived (attention half, then MLP half):
slots for each size class of units (:func:`slot_classes`: two each for alternating attention and
MLP halves), or three shared slots where that is less memory; taken when it fits beside the batch
and a full prefill chunk (and, for an automatic batch, keeps ``DEEP_RING_BATCH`` of it). Else two
shared slots (one unit in flight: the disk idles whenever the unit in flight arrives before the
current one is done; ~10% of a pass at batch 16 in benchmarks/offload.py), else one (no overlap). The batch size is the user's ``max_batch_size`` when
given (checked), else the largest that fits up to ``max_auto_batch`` (throughput: the weights are read
once per step whatever the batch). Whatever the budget leaves after that holds units that are then
never streamed (``spare``): at a small batch, memory the KV cache does not need cuts the bytes read per
token.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

MAX_AUTO_BATCH = 256              # a GPU; a CPU's compute saturates far earlier (see MAX_AUTO_BATCH_CPU)
MAX_AUTO_BATCH_CPU = 32
DEFAULT_PREFILL_TOKENS = 256
MIN_PREFILL_TOKENS = 16
DEEP_RING_BATCH = 0.95            # an automatic batch may give up this much of itself for the deeper ring


def parse_bytes(value: int | float | str) -> int:
    """``200 * 2**20``, ``"200MiB"``, ``"1.5GB"`` -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"max_memory={value!r} is not a size; use bytes or a string like '512MiB' or '2GB'.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _size(n: int) -> str:
    """Bytes for an error message: whole MiB as such, else one decimal, KiB below a MiB."""
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.0f} MiB" if n % 2**20 == 0 else f"{n / 2**20:.1f} MiB"


def available_memory(device) -> int:
    """Free memory of the compute device: free device memory on a GPU, available RAM on a CPU."""
    import torch

    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    return host_available_memory()


def host_available_memory() -> int:
    """RAM that can be had without swapping: MemAvailable (free + reclaimable page cache), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def slot_classes(sizes: list[int], ratio: float = 0.7, window: int = 3,
                 coverage: float = 0.75) -> tuple[list[int], list[tuple[int, int]]]:
    """Group the units of a pass (``sizes``, in the order a pass uses them) by size: the class of each unit,
    and per class (largest first) its slot bytes (its largest unit) and how many slots (at most
    ``window - 1``) let ``window`` consecutive units of the cycle be in the ring at once: the one computing
    and ``window - 1`` read ahead. Where that holds at fewer than ``coverage`` of the positions (units of
    one size in long runs), one class (a shared ring) instead.

    A block streams as an attention half and an MLP half of very different sizes (12.6 and 36 MiB in
    benchmarks/offload.py); two slots of each cost 2 x (36 + 12.6) MiB against 3 x 36 for one shared
    ring of the same depth (the run of lm_head slices at the end of a pass gets one unit less ahead).
    """
    bounds: list[int] = []
    of: dict[int, int] = {}
    for size in sorted(set(sizes), reverse=True):
        if not bounds or size < ratio * bounds[-1]:
            bounds.append(size)
        of[size] = len(bounds) - 1
    unit_class = [of[size] for size in sizes]
    for c in range(len(bounds) - 1, 0, -1):        # a size met less than `window` times (the last lm_head slice)
        if unit_class.count(c) < window:           # uses the slots of the next larger class
            unit_class = [k - 1 if k >= c else k for k in unit_class]
            bounds.pop(c)
    n, w = len(sizes), min(window, len(sizes))
    counts = [[sum(unit_class[(i + k) % n] == c for k in range(w)) for c in range(len(bounds))] for i in range(n)]
    slots = [min(max((cs[c] for cs in counts), default=0), window - 1) for c in range(len(bounds))]
    covered = sum(all(k <= m for k, m in zip(cs, slots)) for cs in counts)
    if len(bounds) < 2 or covered < coverage * n:
        return [0] * n, [(max(sizes, default=0), w)]
    return unit_class, list(zip(bounds, slots))


@dataclass(frozen=True)
class WorkingSet:
    max_memory: int
    n_slots: int                 # ring slots in all
    slot_bytes: int              # the largest slot
    batch_size: int
    per_sequence_bytes: int
    prefill_tokens: int
    per_token_bytes: int
    staging_bytes: int = 0
    ring_bytes: int = 0          # all slots (n_slots x slot_bytes for a shared ring)
    class_slots: tuple[int, ...] = ()    # slots per size class of units (slot_classes), or () for one shared ring
    expert_slot_bytes: int = 0   # a slot of the routed experts read on demand (offload/experts.py; MoE, disk tier)
    expert_slots: int = 0        # the fewest slots (a token's top-k)
    expert_cache_slots: int = 0  # more, from what the budget leaves: experts kept between uses

    @property
    def expert_bytes(self) -> int:
        return (self.expert_slots + self.expert_cache_slots) * self.expert_slot_bytes

    @property
    def total(self) -> int:
        return (self.ring_bytes + self.batch_size * self.per_sequence_bytes
                + self.prefill_tokens * self.per_token_bytes + self.staging_bytes + self.expert_bytes)

    @property
    def spare(self) -> int:
        return self.max_memory - self.total

    @property
    def ring(self) -> str:
        if self.class_slots:
            return f"{'+'.join(map(str, self.class_slots))} slots by unit size ({_size(self.ring_bytes)})"
        return f"{self.n_slots} x {_size(self.slot_bytes)}"


def plan_working_set(max_memory: int, slot_bytes: int, per_sequence_bytes: int, per_token_bytes: int,
                     batch_size: int | None, max_auto_batch: int = MAX_AUTO_BATCH, staging_bytes: int = 0,
                     classes: list[tuple[int, int]] | None = None, expert_slot_bytes: int = 0,
                     expert_slots: int = 0) -> WorkingSet:
    """``classes``: (slot bytes, slots) per size class of the units (:func:`slot_classes`); ``expert_slots`` of
    ``expert_slot_bytes``: the fewest slots of routed experts read on demand (a token's top-k). Rings tried,
    deepest first: two units read ahead (in slots per class where that is smaller than three shared
    slots), only with a full prefill chunk and, for an automatic batch, when that keeps ``DEEP_RING_BATCH``
    of the batch (the deeper ring took 5-10% off a step at batch 16 and 32 in benchmarks/offload.py); then
    two shared slots; then one (no overlap)."""
    experts = expert_slots * expert_slot_bytes
    staging_bytes += experts       # (a fixed cost like the staging; kept apart in the WorkingSet and the error)

    def fits(ring, b, t):
        return ring + b * per_sequence_bytes + t * per_token_bytes + staging_bytes <= max_memory

    def auto_batch(ring, t):
        return max(1, min((max_memory - ring - t * per_token_bytes - staging_bytes) // per_sequence_bytes,
                          max_auto_batch))

    by_class = sum(b * n for b, n in classes) if classes and len(classes) > 1 else None
    class_slots = tuple(n for _, n in classes) if by_class is not None and by_class < 3 * slot_bytes else ()
    deep = by_class if class_slots else 3 * slot_bytes
    need_b, t0 = batch_size or 1, DEFAULT_PREFILL_TOKENS
    if fits(deep, need_b, t0) and (batch_size is not None
                                   or auto_batch(deep, t0) >= DEEP_RING_BATCH * auto_batch(2 * slot_bytes, t0)):
        n, ring, t = sum(class_slots) or 3, deep, t0
    else:
        class_slots = ()
        for n in (2, 1):
            ring, t = n * slot_bytes, t0
            while t > MIN_PREFILL_TOKENS and not fits(ring, need_b, t):
                t //= 2
            if fits(ring, need_b, t):
                break
        else:
            least = slot_bytes + need_b * per_sequence_bytes + MIN_PREFILL_TOKENS * per_token_bytes + staging_bytes
            staging = f" + {_size(staging_bytes - experts)} of read staging buffers" if staging_bytes > experts else ""
            if experts:
                staging += (f" + {expert_slots} x {_size(expert_slot_bytes)} for the routed experts (a token's top-k, "
                            f"read when routed to)")
            raise ValueError(
                f"dsinfer: max_memory={_size(max_memory)} is smaller than one layer's working set: "
                f"{_size(slot_bytes)} for the largest layer + {need_b} x {_size(per_sequence_bytes)} per "
                f"sequence (KV cache for max_seq_len, hidden states, logits) + {MIN_PREFILL_TOKENS} x "
                f"{_size(per_token_bytes)} of prefill activations{staging} = {_size(least)}. "
                f"Raise max_memory to at least that, or lower max_seq_len / max_batch_size.")
    if batch_size is None:
        batch_size = auto_batch(ring, t)
    return WorkingSet(max_memory, n, slot_bytes, batch_size, per_sequence_bytes, t, per_token_bytes,
                      staging_bytes - experts, ring, class_slots, expert_slot_bytes, expert_slots)


def spread_order(n: int) -> list[int]:
    """``range(n)`` in the order that keeps every prefix spread evenly over the cycle, away from its start:
    positions 1/2, 1/4, 3/4, 1/8, 3/8, ... of it (bit-reversed), then whatever is left in order.

    Units the leftover budget keeps resident are picked in this order. While the consumer computes a
    resident unit the ring is full and the disk has nothing to read; spread out, each such pause is one
    unit long and the read in flight covers it. Taken from the front (the old order) they formed one
    block at the start of every pass, right after the sampling step: 25-40 ms of an idle disk per
    ~420 ms pass at batch 16 in benchmarks/offload.py.
    """
    if n <= 0:
        return []
    order, seen = [], set()
    levels = max(1, (n - 1).bit_length()) + 1
    for level in range(1, levels + 1):
        for k in range(1, 2 ** level, 2):
            u = (k * n) // 2 ** level
            if u not in seen:
                seen.add(u)
                order.append(u)
    return order + [u for u in range(n) if u not in seen]


def release_freed_memory_promptly() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned to the system on
    free. By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, after
    which per-layer tensors come from the heap and freed ones stay resident: the process's memory would
    creep above the working set while an offloaded model is written and streamed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return                                    # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_trim_threshold, 4 << 20)
