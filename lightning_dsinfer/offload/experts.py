"""Routed experts read on demand (disk tier, CPU compute): a decode step reads only the experts the router picks.

A sparse layer's MLP half streams through the ring without its routed experts: the ring unit holds the router
(DeepSeek's fp32 correction bias too) and the shared expert (Qwen's shared gate too). Each routed expert, its gate|up
and down rows on this rank (tensor parallelism: its slice; expert parallelism: this rank's experts only), is a unit
of its own outside the ring's fixed cycle. Once the router has run on the rows, the layer asks the
:class:`ExpertPool` for the experts hit: their reads are queued together (the reader threads overlap them) into
the pool's slots while the shared expert computes, then the experts run in ascending order (transformers' order and
rounding, :func:`~lightning_dsinfer.kernels.reference.moe_experts`), each as soon as its own read is done. More
experts hit than slots (a batch, a prefill chunk): they go in groups of at most ``n_slots``, in ascending order,
summed into one output, so the result is the same bit for bit.

The slots are a cache: an expert stays in its slot after use, and the next use of it (a later token of that layer
routed to it) reads nothing. The slot given up is the one whose layer comes back last in the pass (the layer just
computed, then the one before it, ...), least recently used among those: with fewer slots than the experts one pass
touches, plain LRU would evict every expert just before it is asked for again.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lightning_dsinfer.kernels import ops, reference
from lightning_dsinfer.modules.linear import Linear
from lightning_dsinfer.offload.layout import UnitLayout, aligned_empty

EXPERT_KEYS = ("moe.gate_up", "moe.down", "moe.gate_up_bias", "moe.down_bias", "moe.gate_up_scale", "moe.down_scale")


def split_experts(mlp: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """An MLP half without its routed experts, and one unit per expert: ``gate_up`` [2I, H], ``down`` [H, I] (this
    rank's rows) and, gpt-oss, ``gate_up_bias`` / ``down_bias`` where this rank holds them; quantised units
    (``builder.quantize_linears``) ``gate_up_scale`` / ``down_scale`` too (the expert's int8 / int4 rows' scales). A
    dense half comes back as it is, with no expert units."""
    if "moe.gate_up" not in mlp:
        return mlp, []
    rest = {k: v for k, v in mlp.items() if k not in EXPERT_KEYS}
    units = [{"gate_up": g, "down": d} for g, d in zip(mlp["moe.gate_up"], mlp["moe.down"])]
    for key in ("gate_up_bias", "down_bias", "gate_up_scale", "down_scale"):
        if f"moe.{key}" in mlp:
            for unit, b in zip(units, mlp[f"moe.{key}"]):
                unit[key] = b
    return rest, units


class ExpertPool:
    """``units[layer]``: the store's units of that layer's local experts (local expert e is ``units[layer][e]``);
    ``n_slots`` buffers of the largest expert unit; ``layers``: blocks in a pass (for the choice of slot to reuse)."""

    def __init__(self, store, layouts: list[UnitLayout], units: dict[int, list[int]], n_slots: int, layers: int,
                 io_threads: int = 4):
        if n_slots < 1:
            raise ValueError(f"an expert pool needs at least one slot, got {n_slots}")
        self.store, self.layouts, self.units, self.layers = store, layouts, units, layers
        self.slot_bytes = max(layouts[u].nbytes for us in units.values() for u in us)
        self.slots = [aligned_empty(self.slot_bytes) for _ in range(n_slots)]
        self.owner: list[int | None] = [None] * n_slots          # slot -> unit it holds (or is reading)
        self.held: dict[int, int] = {}                           # unit -> slot
        self.pending: dict[int, list[Future]] = {}               # unit -> its reads in flight
        self.last_use = [0] * n_slots
        self.clock = 0
        self.layer_of = {u: i for i, us in units.items() for u in us}
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="dsinfer-experts")
        self.reads = self.read_bytes = 0                          # units / stored bytes read so far (benchmarks)

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def layer(self, index: int, first_expert: int = 0) -> "LayerExperts":
        return LayerExperts(self, index, first_expert)

    def load(self, layer: int, units: list[int]) -> None:
        """Have every unit of ``units`` (at most ``n_slots``) held or being read; the misses' reads are queued
        together, in the order given, into the slots given up (see the module's docstring)."""
        misses = [u for u in units if u not in self.held]
        if not misses:
            return
        want = set(units)

        def give_up_first(slot):          # free slots, then the layer whose next use is farthest, then the oldest
            u = self.owner[slot]
            if u is None:
                return (self.layers + 1, 0)
            return ((self.layer_of[u] - layer - 1) % self.layers, -self.last_use[slot])

        free = sorted((s for s in range(self.n_slots) if self.owner[s] not in want), key=give_up_first, reverse=True)
        if len(free) < len(misses):
            raise ValueError(f"{len(units)} experts asked for at once, the pool has {self.n_slots} slots")
        for u, s in zip(misses, free):
            old = self.owner[s]
            if old is not None:
                self._forget(old)
            self.pending[u] = self.store.read(u, self.slots[s], self.io)     # (held once queued: a read that
            self.owner[s], self.held[u] = u, s                               # raises here leaves the slot free)
            self.reads += 1
            self.read_bytes += self.store.stored_bytes(u)

    def acquire(self, unit: int) -> dict[str, torch.Tensor]:
        """The tensors of a loaded ``unit`` (views into its slot, valid until the next :meth:`load`), once read."""
        futures = self.pending.pop(unit, ())
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:            # its other reads may still be landing in the slot
                f.exception()
            self._forget(unit)
            raise
        slot = self.held[unit]
        self.clock += 1
        self.last_use[slot] = self.clock
        return self.layouts[unit].views(self.slots[slot])

    def _forget(self, unit: int) -> None:
        for f in self.pending.pop(unit, ()):     # (a pass that failed half way left it in flight)
            f.exception()
        self.owner[self.held.pop(unit)] = None

    def close(self) -> None:
        for u in list(self.pending):
            for f in self.pending.pop(u):
                f.exception()
        self.io.shutdown(wait=True)


class LayerExperts:
    """One sparse layer's routed experts in an :class:`ExpertPool` (what :class:`~lightning_dsinfer.modules.moe.MoEMLP`
    takes as ``streamed``): :meth:`prefetch` once the router has run, :meth:`run` for the experts' sum."""

    def __init__(self, pool: ExpertPool, layer: int, first_expert: int):
        self.pool, self.layer, self.first_expert = pool, layer, first_expert
        self.units = pool.units[layer]
        self.local_experts = len(self.units)
        self.expert_bytes = pool.layouts[self.units[0]].nbytes
        self._hit: list[int] | None = None

    def _experts_hit(self, ids: torch.Tensor) -> list[int]:
        """This rank's experts routed to (router's numbering), ascending."""
        hit = torch.unique(ids).tolist()
        return [e for e in hit if 0 <= e - self.first_expert < self.local_experts]

    def prefetch(self, ids: torch.Tensor) -> None:
        """Queue the reads of the first group of experts hit (``ids`` [T, k] from the router)."""
        self._hit = self._experts_hit(ids)
        self.pool.load(self.layer, [self.units[e - self.first_expert] for e in self._hit[:self.pool.n_slots]])

    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, act=None,
            input_scaled: bool = False) -> torch.Tensor:
        """:func:`reference.moe_experts` over this rank's experts, a group of at most ``n_slots`` at a time (``act``:
        the experts' activation, gpt-oss's; None: SwiGLU; ``input_scaled``: Llama 4's weights on the inputs)."""
        act = act or ops.silu_and_mul

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            t = self.pool.acquire(self.units[e - self.first_expert])
            h = act(Linear(t["gate_up"], t.get("gate_up_bias"), pack=False, scale=t.get("gate_up_scale"))(rows))
            return Linear(t["down"], t.get("down_bias"), pack=False, scale=t.get("down_scale"))(h)

        hit = self._hit if self._hit is not None else self._experts_hit(ids)
        self._hit = None
        out = torch.zeros_like(x)
        n = self.pool.n_slots
        for g in range(0, len(hit), n):
            group = hit[g:g + n]
            self.pool.load(self.layer, [self.units[e - self.first_expert] for e in group])
            reference.moe_experts(x, weights, ids, expert, out=out, only=set(group), input_scaled=input_scaled)
        return out
