"""A whole bf16 decode step through every block in one C call (``dsi_decode_stack`` in kernels/cpu_gemv.cpp).

On the CPU path a decode step of a block is nine ops (two norms, four linears, rotary + K/V append, attention,
SwiGLU), each a C kernel behind some Python: ~100 us of dispatch per block, 5-10% of a 200M model's step
and twice that share of a tensor-parallel rank's step, whose GEMMs are half as long while the dispatch is not.
For a decode step (one token per row, the engine's static KV cache, bf16, up to :data:`MAX_ROWS` rows, AMX or
row-major kernel linears, bf16, int8 or int4, a CPU with AVX512) :class:`DecoderModel` hands the block loop to C: the
same kernels in the same order with the same roundings, so the hidden states are bit-identical to the per-op path
(tests/test_cpu_stack.py), and the tensor-parallel all-reduces go through the same shared-memory exchange
(parallel/shm.py) from C.

The blocks it runs: Llama's (:class:`DecoderLayer`: RMSNorms, SwiGLU, rotary; Qwen3's q / k norms, sliding
windows), the GPT families' (:class:`GPTDecoderLayer`: LayerNorms with biases, a plain MLP with gelu / gelu_tanh /
relu / silu or SwiGLU, the sequential or the parallel residual with one or two norms, full, partial or no rotary:
learned positions are added before the blocks) and Gemma's (Gemma 1's :class:`DecoderLayer` and Gemma 2 / 3's
:class:`SandwichDecoderLayer`: (1 + w) RMSNorms with fp32 weights, scaled in fp32 and rounded once; GeGLU; the norms of
the attention's and the MLP's outputs before their residual adds; Gemma 2's soft-capped scores; Gemma 3's q / k norms
and the sliding-window layers' own rope table; Gemma 4's :class:`PerLayerInputLayer` with :class:`SharedKVAttention`:
each layer's own head dim, KV heads and MLP width, v RMS-normed, the full layers' 512-wide heads, the shared layers'
queries over an earlier layer's cache, the per-layer input and the layer scalar; not 26B-A4B's experts). The per-op
path takes the same C kernels for those pieces (ops.py:
``rms_norm`` with fp32 weights, ``gated_act``, ``attention`` with a cap or ALiBi slopes), so the two agree bit for
bit. BLOOM's ALiBi goes through C too (each block's fp32 slopes of this rank's heads, no rotary); MoE layers keep the
per-op path.

Anything else (prompts, fp32, the Triton path, HF caches, the oneDNN fallback, gloo all-reduces) keeps the
per-op path: :meth:`CpuDecodeStack.applies` says which.
"""
from __future__ import annotations

import ctypes

import torch

from lightning_dsinfer.kernels import cpu_gemv, ops
from lightning_dsinfer.modules.linear import int4_kernel_max_rows, int8_kernel_max_rows

MAX_ROWS = 64     # = the one-call norm / activation / rotary row limits of kernels/cpu_gemv.py


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bf16_vector(t: torch.Tensor | None, n: int) -> bool:
    return t is None or (t.dtype == torch.bfloat16 and t.is_contiguous() and t.numel() == n and t.device.type == "cpu")


def _norm_vector(t: torch.Tensor | None, n: int, f32: bool) -> bool:
    """A norm's weight as the C step reads it: bf16, or (``f32``: Gemma's (1 + w), builder.norm_weight) fp32."""
    if not f32:
        return _bf16_vector(t, n)
    return t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n and t.device.type == "cpu")


class CpuDecodeStack:
    """The C tables of one :class:`~lightning_dsinfer.modules.transformer.DecoderModel`'s blocks; built by
    :meth:`build` (None when a block cannot go through C), refreshed when the KV cache is re-allocated."""

    def __init__(self, decoder, layers, row_limit: float, shm, layer_norm: bool = False, parallel: bool = False,
                 mlp_act: int = cpu_gemv.ACT_KINDS["silu"], rotary: bool = True, gated: bool = True,
                 norm_f32: bool = False, softcap: float | None = None, per_layer: tuple[int, str] | None = None):
        from lightning_dsinfer.modules.transformer import PerLayerInputLayer, SandwichDecoderLayer

        first = layers[0]
        # self.layers keeps the modules, and so every tensor the tables point into, alive with the tables
        self.decoder, self.layers, self.row_limit, self.shm = decoder, layers, row_limit, shm
        self.hidden = first.attn.o.out_features
        self.rotary = rotary       # cos / sin of a step are read (their width R is the step's: partial rotary)
        self.n_reduce = sum((ly.attn.o.reduce is not None) + (ly.mlp.down.reduce is not None) for ly in layers)
        # the narrowest head of the layers rotating by the step's cos / sin, with the sliding layers' own table or
        # without one (a table wider than a head is refused in applies), and of the sliding layers
        self.min_head = {own: min((ly.attn.d for ly in layers if not (own and ly.attn.sliding)), default=None)
                         for own in (False, True)}
        self.min_sliding_head = min((ly.attn.d for ly in layers if ly.attn.sliding), default=None)
        # Gemma 4's per-layer inputs: (their width, the gate's activation), one for every gated layer (build), or None
        self.per_layer_dim, per_layer_act = per_layer if per_layer is not None else (0, "gelu_tanh")
        # the cache layer each block attends over: its own, or (Gemma 4's shared-K/V layers) the one it reads
        self.kv_layers = [a.layer_idx if getattr(a, "kv_source", None) is None else a.kv_source
                          for a in (ly.attn for ly in layers)]
        self.shape = cpu_gemv.StackShape(
            num_layers=len(layers), hidden=self.hidden, hq=first.attn.hq,
            hkv=max(ly.attn.hkv for ly in layers), head_dim=max(ly.attn.d for ly in layers),
            inter=max(ly.mlp.down.in_features for ly in layers), eps=first.eps, scale=first.attn.scaling,
            slots=None if shm is None else shm.data.data_ptr(), capacity=0 if shm is None else shm.capacity,
            flags=None if shm is None else shm.flags.data_ptr(), tp_size=1 if shm is None else shm.size,
            tp_rank=0 if shm is None else shm.rank, timeout_s=0.0 if shm is None else shm.timeout_s,
            layer_norm=int(layer_norm), parallel=int(parallel), mlp_act=mlp_act, rotary_dim=0, gated=int(gated),
            norm_f32=int(norm_f32), softcap=softcap or 0.0, pl_dim=self.per_layer_dim,
            pl_act=cpu_gemv.ACT_KINDS[per_layer_act])
        self.table = (cpu_gemv.StackLayer * len(layers))()
        for i, ly in enumerate(layers):
            t = self.table[i]
            sandwich = type(ly) in (SandwichDecoderLayer, PerLayerInputLayer)
            gated_input = isinstance(ly, PerLayerInputLayer) and ly.gate is not None
            # (name, linear, whether the block passes it the residual stream: o and down, as in transformer.py; a
            # sandwich block adds it after the output's norm; Gemma 4's per-layer gate and projection: never)
            for name, lin, residual in (("qkv", ly.attn.qkv, False), ("o", ly.attn.o, not sandwich),
                                        ("gate_up", ly.mlp.gate_up, False), ("down", ly.mlp.down, not sandwich),
                                        *((("pl_gate", ly.gate, False), ("pl_proj", ly.proj, False))
                                          if gated_input else ())):
                setattr(t, name, cpu_gemv.StackLinear(
                    w=lin.weight.data_ptr(), bias=_ptr(lin.bias), ldw=lin.weight.stride(0) if not lin.packed else 0,
                    N=lin.out_features, K=lin.in_features,
                    packed={"amx": 1, "int8": 2, "int8_amx": 3, "int4": 4}.get(lin.layout, 0),
                    add_residual=int(residual and lin.owns_residual), reduce=int(lin.reduce is not None),
                    scale=_ptr(lin.scale), group=lin.group_size, amx_rows=lin.amx_rows))
            t.hkv, t.head_dim, t.inter = ly.attn.hkv, ly.attn.d, ly.mlp.down.in_features
            t.v_norm = _ptr(getattr(ly.attn, "v_norm", None))
            t.shared_kv = int(getattr(ly.attn, "kv_source", None) is not None)
            if gated_input:
                t.pl_norm, t.pl_index = ly.norm.data_ptr(), ly.index
            t.scalar = _ptr(getattr(ly, "scalar", None))
            t.input_norm, t.post_norm = ly.input_norm.data_ptr(), _ptr(ly.post_norm)
            if layer_norm:
                t.input_bias, t.post_bias = ly.input_bias.data_ptr(), _ptr(ly.post_bias)
            t.q_norm, t.k_norm = _ptr(ly.attn.q_norm), _ptr(ly.attn.k_norm)
            t.sliding = int(ly.attn.sliding)
            t.alibi = _ptr(ly.attn.alibi)     # fp32 [hq] (build checks), kept alive by the module
            if sandwich:
                t.attn_out_norm, t.mlp_out_norm = ly.attn_out_norm.data_ptr(), ly.mlp_out_norm.data_ptr()
        self._bound: dict[tuple, ctypes.Array] = {}   # the table with each KV cache's pointers filled in
        # Ministral 3's query scale by position is 1 exactly below its floor_scale (the original context): the C loop,
        # which does not scale, runs the steps whose positions are all below it
        self.unscaled_below = min((ly.attn.floor_scale for ly in layers if hasattr(ly.attn, "floor_scale")),
                                  default=None)
        self._fn = cpu_gemv.decode_stack_fn()

    @classmethod
    def build(cls, decoder) -> "CpuDecodeStack | None":
        """The stack for ``decoder``'s blocks, or None when one of them has something the C loop does not run."""
        from lightning_dsinfer.modules.transformer import (MLP, Attention, DecoderLayer, GatedMLP, GPTDecoderLayer,
                                                           PerLayerInputLayer, SandwichDecoderLayer, SharedKVAttention,
                                                           TemperatureTunedAttention)

        if cpu_gemv.decode_stack_fn() is None or not cpu_gemv.has_wide_ops() or len(decoder.layers) == 0:
            return None
        layers = list(decoder.layers)
        first = layers[0]
        comm = decoder.comm
        shm = None
        row_limit = float("inf")
        # (LayerNorms, parallel residual, MLP activation, rotary, gated MLP, fp32 norm weights, score cap): one for
        # every block; sandwich norms (Gemma 2 / 3) are per block
        form = None
        per_layer_inputs = set()     # Gemma 4: (width, gate activation) of the gated layers: one, or none
        for ly in layers:
            tuned = type(ly.attn) is TemperatureTunedAttention and ly.attn.at == "position"     # (Ministral 3: see
            if (type(ly) not in (DecoderLayer, GPTDecoderLayer, SandwichDecoderLayer, PerLayerInputLayer)  # applies)
                    or not (type(ly.attn) in (Attention, SharedKVAttention) or tuned)
                    or type(ly.mlp) not in (GatedMLP, MLP)):
                return None
            a, m = ly.attn, ly.mlp
            shared = type(a) is SharedKVAttention and a.kv_source is not None      # (Gemma 4: queries only)
            if shared:          # (attends over its source's cache with its own head count and width: the same)
                source = next((s.attn for s in layers if s.attn.layer_idx == a.kv_source), None)
                if source is None or (source.hkv, source.d) != (a.hkv, a.d):
                    return None
            extra = []       # Gemma 4's per-layer gate and projection
            if type(ly) is PerLayerInputLayer:
                if ly.beside is not None or not (ly.scalar is None or _bf16_vector(ly.scalar, 1)):   # (26B-A4B: MoE)
                    return None
                if ly.gate is not None:
                    p = ly.gate.out_features
                    if (ly.act not in cpu_gemv.ACT_KINDS or ly.gate.in_features != a.o.out_features
                            or ly.proj.in_features != p or ly.proj.out_features != a.o.out_features
                            or ly.norm is None or not _norm_vector(ly.norm, a.o.out_features, True)):
                        return None
                    per_layer_inputs.add((p, ly.act))
                    extra = [ly.gate, ly.proj]
            gated = type(m) is GatedMLP
            acts = ("silu", "gelu", "gelu_tanh") if gated else cpu_gemv.ACT_KINDS    # SwiGLU / GeGLU, or a plain one
            if m.act not in acts:
                return None
            if (a.sinks is not None or (a.softcap is not None and not a.softcap > 0)     # no sinks (gpt-oss)
                    or not (a.alibi is None or (a.alibi.dtype == torch.float32 and a.alibi.is_contiguous()
                                                and a.alibi.shape == (a.hq,) and a.alibi.device.type == "cpu"))):
                return None
            layer_norm = type(ly) is GPTDecoderLayer
            parallel = layer_norm and ly.parallel
            norm_f32 = (not layer_norm and ly.input_norm is not None                        # Gemma's (1 + w)
                        and ly.input_norm.dtype == torch.float32)
            this = (layer_norm, parallel, cpu_gemv.ACT_KINDS[m.act], bool(a.rotary), gated, norm_f32, a.softcap)
            if form not in (None, this):
                return None
            form = this
            # (KV heads, head dim and MLP width are each layer's own: Gemma 4)
            if (a.hq, a.scaling, ly.eps, a.o.out_features) != (
                    first.attn.hq, first.attn.scaling, first.eps, first.attn.o.out_features):
                return None
            h, d = a.o.out_features, a.d
            if ((a.qkv.out_features != (a.hq if shared else a.hq + 2 * a.hkv) * d) or a.qkv.in_features != h
                    or a.o.in_features != a.hq * d
                    or m.gate_up.out_features != (2 if gated else 1) * m.down.in_features or m.gate_up.in_features != h
                    or m.down.out_features != h or d > cpu_gemv.DECODE_ATTENTION_MAX_HEAD_DIM):
                return None
            # norms: two, or (parallel residual only) one shared; a LayerNorm's bias with each
            biases = (ly.input_bias, ly.post_bias) if layer_norm else (None, None)
            if (ly.input_norm is None or (ly.post_norm is None and not parallel)
                    or (layer_norm and (biases[0] is None or (biases[1] is None) != (ly.post_norm is None)))):
                return None
            sandwich = type(ly) in (SandwichDecoderLayer, PerLayerInputLayer)
            outs = (ly.attn_out_norm, ly.mlp_out_norm) if sandwich else ()
            if any(v is None for v in outs):
                return None
            v_norm = getattr(a, "v_norm", None)
            if ((a.q_norm is None) != (a.k_norm is None) and not (shared and a.q_norm is not None)) or not all(
                    _norm_vector(v, n, norm_f32) for v, n in (
                        (ly.input_norm, h), (ly.post_norm, h), (a.q_norm, d), (a.k_norm, d), (v_norm, d),
                        *((v, h) for v in outs))) \
                    or not all(_bf16_vector(v, h) for v in biases):
                return None
            for lin in (a.qkv, a.o, m.gate_up, m.down, *extra):
                if lin.weight.device.type != "cpu":
                    return None
                if lin.layout == "int8":     # the kernel the per-op path takes for bf16 rows (Linear._matmul)
                    if lin.dtype != torch.bfloat16 or not cpu_gemv.has_int8():
                        return None
                    row_limit = min(row_limit, int8_kernel_max_rows())
                elif lin.layout == "int8_amx":
                    if lin.dtype != torch.bfloat16:
                        return None
                elif lin.layout == "int4":   # likewise: the row kernel, from amx_rows rows on the AMX int4 path
                    if (lin.dtype != torch.bfloat16 or not cpu_gemv.has_int4() or lin.weight.stride(1) != 1
                            or not cpu_gemv.int4_group_ok(lin.group_size)):
                        return None
                    if not lin.amx_rows:
                        row_limit = min(row_limit, int4_kernel_max_rows())
                elif lin.weight.dtype != torch.bfloat16:
                    return None
                elif lin.layout == "plain" and lin.row_kernel:
                    row_limit = min(row_limit, lin.row_kernel_rows)
                elif lin.layout != "amx":
                    return None
                if not _bf16_vector(lin.bias, lin.out_features):
                    return None
                if lin.reduce is not None:
                    if comm is None or lin.reduce != comm.all_reduce or comm.shm is None or comm.shm._c is None:
                        return None
                    shm = comm.shm
        if len(per_layer_inputs) > 1:
            return None
        layer_norm, parallel, mlp_act, rotary, gated, norm_f32, softcap = form
        return cls(decoder, layers, row_limit, shm, layer_norm, parallel, mlp_act, rotary, gated, norm_f32, softcap,
                   next(iter(per_layer_inputs), None))

    def applies(self, h: torch.Tensor, step) -> bool:
        """Whether this forward is a decode step the C loop runs (else the per-op path runs it)."""
        if h.dtype != torch.bfloat16 or h.device.type != "cpu" or h.dim() != 3 or h.shape[1] != 1:
            return False
        b = h.shape[0]
        cache = step.cache
        if (b > MAX_ROWS or b > self.row_limit or cache is None or step.hf_cache is not None or ops.fuses_residual(h)
                or not h.is_contiguous() or h.shape[2] != self.hidden):
            return False
        if self.shm is not None and b * self.hidden > self.shm.capacity:
            return False
        if step.deepstack is not None:       # (a one-token prompt of Qwen3-VL: its image features after early blocks)
            return False
        if self.unscaled_below is not None and (step.positions is None
                                                or float(step.positions.max()) >= self.unscaled_below):
            return False
        if self.rotary:     # rows [B, R]: the first R (even) dims of each head rotate (R < D: partial rotary)
            own = self.own_tables(step)
            for cos, sin, widest in ((step.cos, step.sin, self.min_head[own]),
                                     *(((step.sliding_cos, step.sliding_sin, self.min_sliding_head),) if own else ())):
                r = cos.shape[-1]
                if widest is None:      # (no layer reads this table)
                    continue
                if r % 2 or not 0 < r <= widest or not all(t.shape == (b, 1, 1, r) and t.dtype == torch.bfloat16
                                                            and t.is_contiguous() for t in (cos, sin)):
                    return False
        elif step.sliding_cos is not None:
            return False
        if self.per_layer_dim:      # Gemma 4's per-layer inputs [B, 1, L, P], rows of P contiguous
            p = step.per_layer
            if (p is None or p.dtype != torch.bfloat16 or p.dim() != 4 or p.shape[0] != b or p.shape[1] != 1
                    or p.shape[2] < len(self.layers) or p.shape[3] != self.per_layer_dim or p.stride(3) != 1):
                return False
        if cache.dtype != torch.bfloat16 or b > cache.max_batch_size or step.start >= cache.max_seq_len:
            return False
        length = step.start + 1
        return all(m is None or (m.dtype == torch.bool and m.dim() == 4 and m.shape[1:] == (1, 1, length)
                                 and m.shape[0] in (1, b)) for m in (step.mask, step.window_mask))

    def own_tables(self, step) -> bool:
        """Whether the sliding-window layers rotate by rope rows of their own this step (Gemma 3's sliding_cos)."""
        return step.sliding_cos is not None and self.min_sliding_head is not None

    MAX_BOUND = 8      # tables kept (a pipeline's row groups each bring their view of the cache)

    def _bind_cache(self, cache) -> ctypes.Array:
        """The table pointing at ``cache``'s K/V tensors (every layer's pointers and strides are the key, so a cache
        re-allocated in place, or another row view of it, gets its own)."""
        kv = [(cache.k[i], cache.v[i]) for i in self.kv_layers]
        key = tuple((k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1)) for k, v in kv)
        table = self._bound.get(key)
        if table is not None:
            return table
        table = type(self.table)()
        ctypes.memmove(ctypes.addressof(table), ctypes.addressof(self.table), ctypes.sizeof(table))
        for i, (k, v) in enumerate(kv):
            if k.stride() != v.stride() or k.stride(2) != self.layers[i].attn.d or k.stride(3) != 1:
                raise RuntimeError("dsinfer: KV cache layout is not [B, Hkv, S, D] contiguous")
            t = table[i]
            t.k_cache, t.v_cache, t.cb, t.ch = k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1)
        if len(self._bound) >= self.MAX_BOUND:
            self._bound.pop(next(iter(self._bound)))
        self._bound[key] = table
        return table

    def __call__(self, h: torch.Tensor, step) -> torch.Tensor:
        """The residual stream after every block (the final norm is the caller's), for a step :meth:`applies`
        accepted. ``h`` is not modified."""
        table = self._bind_cache(step.cache)
        b = h.shape[0]
        out = h.clone()

        def mask_args(m):
            if m is None:
                return None, 0, 0
            return m.data_ptr(), (m.stride(0) if m.shape[0] == b else 0), m.stride(3)

        self.shape.threads = torch.get_num_threads()
        self.shape.isa = cpu_gemv.best_isa_code()
        self.shape.rotary_dim = step.cos.shape[-1] if self.rotary else 0
        own = self.rotary and self.own_tables(step)
        self.shape.srotary_dim = step.sliding_cos.shape[-1] if own else 0
        pl = step.per_layer if self.per_layer_dim else None
        self.shape.per_layer = _ptr(pl)
        self.shape.plb, self.shape.pll = (pl.stride(0), pl.stride(2)) if pl is not None else (0, 0)
        shm_step = ctypes.c_int64(0 if self.shm is None else self.shm.step)
        seconds = ctypes.c_double(0.0)
        rc = self._fn(ctypes.byref(self.shape), ctypes.byref(table), out.data_ptr(), b, step.cos.data_ptr(),
                      step.sin.data_ptr(), step.sliding_cos.data_ptr() if own else None,
                      step.sliding_sin.data_ptr() if own else None, step.start, *mask_args(step.mask),
                      *mask_args(step.window_mask), ctypes.byref(shm_step), ctypes.byref(seconds))
        if self.shm is not None:
            self.shm.step = shm_step.value
            self.shm.seconds += seconds.value
            self.decoder.comm.count_all_reduces(self.n_reduce, self.n_reduce * b * self.hidden * out.element_size())
        if rc == 1:
            self.shm._timed_out()
        if rc:
            raise RuntimeError(f"dsinfer: the C decode step failed (code {rc}) for {b} rows")
        return out
