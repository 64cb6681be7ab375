"""MoE gating with mapping tables instead of one-hot einsums (the paper's MoE kernel design).

1. ``_moe_topk_kernel`` (one program per token): softmax or sigmoid scores over E experts, top-k by
   repeated argmax, optional renormalisation -> weights [T, k], expert ids [T, k].
2. ``_moe_count_kernel`` (one program per expert): tokens routed to it -> counts [E].
3. ``_moe_permute_kernel`` (one program per expert): offsets [E + 1] (exclusive prefix sum of counts)
   and the permutation: ``sorted_ids`` lists assignments a = t * k + j grouped by expert, in
   assignment order within an expert (stable, deterministic); ``inverse[a]`` is a's place in it.
Reference: :func:`lightning_dsinfer.kernels.reference.moe_route`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 4096


@triton.jit
def _moe_topk_kernel(
    logits_ptr, l_st,               # router logits [T, E]: token stride (E contiguous)
    w_ptr, ids_ptr,                 # outputs [T, TOP_K] fp32 weights, int32 expert ids (contiguous)
    E,                              # experts
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,          # sigmoid scores instead of softmax
    RENORMALIZE: tl.constexpr,      # divide the k weights by their sum
):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    me = e < E
    x = tl.load(logits_ptr + t * l_st + e, mask=me, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = tl.where(me, tl.sigmoid(x), float("-inf"))
    else:
        p = tl.exp(x - tl.max(x, axis=0))
        s = tl.where(me, p / tl.sum(p, axis=0), float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    wk = tl.zeros([BLOCK_K], tl.float32)
    ik = tl.zeros([BLOCK_K], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(s, axis=0)
        idx = tl.min(tl.where(s == best, e, BLOCK_E), axis=0)   # lowest index among ties
        wk = tl.where(kk == j, best, wk)
        ik = tl.where(kk == j, idx, ik)
        s = tl.where(e == idx, float("-inf"), s)
    if RENORMALIZE:
        wk = wk / tl.sum(tl.where(kk < TOP_K, wk, 0.0), axis=0)
    tl.store(w_ptr + t * TOP_K + kk, wk, mask=kk < TOP_K)
    tl.store(ids_ptr + t * TOP_K + kk, ik, mask=kk < TOP_K)


@triton.jit
def _moe_count_kernel(
    ids_ptr,                        # expert ids [A] int32 (A = T * k assignments)
    counts_ptr,                     # out: counts [E] int32
    A,                              # assignments
    BLOCK_A: tl.constexpr,
):
    ex = tl.program_id(0)
    total = 0
    for a0 in range(0, A, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        ids = tl.load(ids_ptr + a, mask=a < A, other=-1)
        total += tl.sum((ids == ex).to(tl.int32), axis=0)
    tl.store(counts_ptr + ex, total)


@triton.jit
def _moe_permute_kernel(
    ids_ptr,                        # expert ids [A] int32
    counts_ptr,                     # counts [E] int32
    offsets_ptr,                    # out: offsets [E + 1] int32
    sorted_ptr, inverse_ptr,        # out: sorted_ids [A], inverse [A] int32
    A, E,                           # assignments, experts
    BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
):
    ex = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    off = tl.sum(tl.where(e < ex, counts, 0), axis=0)
    tl.store(offsets_ptr + ex, off)
    if ex == E - 1:
        tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
    run = off
    for a0 in range(0, A, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        hit = (tl.load(ids_ptr + a, mask=a < A, other=-1) == ex).to(tl.int32)
        slot = run + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_ptr + slot, a, mask=hit > 0)
        tl.store(inverse_ptr + a, slot, mask=hit > 0)
        run += tl.sum(hit, axis=0)


def moe_route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True):
    """Route tokens: logits [T, E] -> (weights fp32 [T, k], ids int32 [T, k], counts int32 [E],
    offsets int32 [E + 1], sorted_ids int32 [T * k], inverse int32 [T * k]).

    scoring: "softmax" | "sigmoid". Feed ``sorted_ids`` / ``offsets`` to ``moe_gemm.moe_gemm``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got {tuple(logits.shape)}")
    t, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k {top_k} must be in [1, experts={e}]")
    if e > MAX_EXPERTS:
        raise ValueError(f"experts {e} exceeds {MAX_EXPERTS}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring {scoring!r} must be 'softmax' or 'sigmoid'")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(e)
    if t:
        _moe_topk_kernel[(t,)](logits, logits.stride(0), weights, ids, e, TOP_K=top_k, BLOCK_E=block_e,
                               BLOCK_K=triton.next_power_of_2(top_k), SIGMOID=scoring == "sigmoid",
                               RENORMALIZE=renormalize, num_warps=1 if block_e <= 256 else 4)
    return (weights, ids, *moe_tables(ids, e))


def moe_tables(ids: torch.Tensor, experts: int):
    """The mapping tables of a routing decided elsewhere (DeepSeek's grouped routers, in torch): expert ids int32
    [T, k] -> (counts int32 [E], offsets int32 [E + 1], sorted_ids int32 [T * k], inverse int32 [T * k]), as
    :func:`moe_route` returns them."""
    if experts > MAX_EXPERTS:
        raise ValueError(f"experts {experts} exceeds {MAX_EXPERTS}")
    ids = ids.to(torch.int32).contiguous()
    dev, a, e = ids.device, ids.numel(), experts
    counts = torch.empty(e, dtype=torch.int32, device=dev)
    offsets = torch.empty(e + 1, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(a, dtype=torch.int32, device=dev)
    inverse = torch.empty(a, dtype=torch.int32, device=dev)
    block_a = min(max(triton.next_power_of_2(a), 16), 1024)
    _moe_count_kernel[(e,)](ids, counts, a, BLOCK_A=block_a, num_warps=4)
    _moe_permute_kernel[(e,)](ids, counts, offsets, sorted_ids, inverse, a, e,
                              BLOCK_A=block_a, BLOCK_E=triton.next_power_of_2(e), num_warps=4)
    return counts, offsets, sorted_ids, inverse
