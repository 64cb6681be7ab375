"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek, gpt-oss, Llama 4): router, top-k experts,
optional shared expert (Qwen2-MoE's behind a sigmoid gate, DeepSeek's and Llama 4's plain); gpt-oss's experts have
biases and a clamped SwiGLU (``act``); Llama 4's router weights scale the experts' inputs (``Routing.input_scaled``).

On CUDA the experts stay in transformers' 3D layout (gate|up [E, 2I, H], down [E, H, I]; int8: the same layout with
a scale per expert row; int4: packed [E, N, K / 2] with a scale per expert row and group of inputs) and a call is
:func:`kernels.ops.moe_mlp` (mapping tables and grouped GEMMs). On the CPU each expert is a pair of
:class:`~lightning_dsinfer.modules.linear.Linear` (the CPU linear kernels: AMX tiles or the row-major bf16 kernel;
int8 / int4 as the dense blocks' Linears), and a call runs the experts that got tokens, in ascending expert order,
summed into x's dtype as transformers does.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lightning_dsinfer.kernels import ops, reference
from lightning_dsinfer.modules.linear import Linear, quantize_int4_rows, quantize_rows


class MoEMLP(nn.Module):
    def __init__(self, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
                 renormalize: bool, weights_in_dtype: bool, shared=None, shared_gate: Linear | None = None,
                 reduce=None, quantize: str | None = None, row_max=None, pack: bool = True, first_expert: int = 0,
                 routing: reference.Routing | None = None, router_bias: torch.Tensor | None = None, streamed=None,
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, act=None,
                 group_size: int = 128, gate_up_scale: torch.Tensor | None = None,
                 down_scale: torch.Tensor | None = None, latent_in: Linear | None = None,
                 latent_out: Linear | None = None, expert_scale: torch.Tensor | None = None):
        super().__init__()
        if expert_scale is not None:      # (Gemma 4: the chosen experts' weights times their learned scale)
            routing = dataclasses.replace(routing, expert_scale=expert_scale)
        # NemotronH's latent experts: the router reads x, the experts latent_in(x) [T, L], and their sum goes through
        # latent_out back to H (its bias on one rank of a group: the partial sums are reduced after it)
        self.latent_in, self.latent_out = latent_in, latent_out
        self.router, self.experts_gate_up, self.experts_down = router, gate_up, down
        self.routing, self.router_bias = routing, router_bias     # DeepSeek's grouped routers (None: softmax top-k)
        # offload (disk tier, CPU): the routed experts are read when routed to (offload.experts.LayerExperts); then
        # gate_up / down are None
        self.streamed = streamed
        # gpt-oss: the experts' biases [E, 2I] / [E, H] (down's: None on all but one rank of a sliced group) and their
        # activation (reference.ClampedSwiGLU; None: SwiGLU)
        self.gate_up_bias, self.down_bias, self.act = gate_up_bias, down_bias, act
        # expert parallelism: this rank holds experts [first_expert, first_expert + local); the router is whole
        self.first_expert = first_expert
        self.local_experts = gate_up.shape[0] if streamed is None else streamed.local_experts
        self.top_k, self.renormalize, self.weights_in_dtype = top_k, renormalize, weights_in_dtype
        self.shared, self.shared_gate = shared, shared_gate      # GatedMLP, Linear [1, H] (Qwen2-MoE; DeepSeek: None)
        self.reduce = reduce       # tensor parallelism: experts sliced over the group, partial outputs summed here
        self.cpu_experts = None
        self.gate_up_scale = self.down_scale = None
        if streamed is not None:
            pass
        elif gate_up.device.type != "cpu" or ops.uses_triton(gate_up):      # the grouped GEMMs (CUDA)
            if gate_up_scale is not None:   # quantised already (views into an offload unit: quantize_experts's)
                self.gate_up_scale, self.down_scale = gate_up_scale, down_scale
            elif quantize:  # int8: a scale per expert row (row_max: a row-parallel down's whole-row scales); int4
                self.experts_gate_up, self.gate_up_scale = quantize_experts(gate_up, quantize, group_size)
                self.experts_down, self.down_scale = quantize_experts(down, quantize, group_size, row_max)
        elif not pack:   # CPU, views into a streamed unit: each expert's pair made on use (quantised: used in place)
            self.cpu_experts = _LazyExperts(gate_up, down, gate_up_bias, down_bias, gate_up_scale, down_scale)
        elif gate_up.device.type == "cpu":   # int8: per-row scales (row_max: a row-parallel down's); int4: per group
            self.cpu_experts = [(Linear(gate_up[e], _row(gate_up_bias, e), quantize=quantize, group_size=group_size),
                                 Linear(down[e], _row(down_bias, e), quantize=quantize, row_max=row_max,
                                        group_size=group_size))
                                for e in range(gate_up.shape[0])]
            views = not quantize and all(lin.layout == "plain" and lin.weight.data_ptr() == w[e].data_ptr()
                                         for e, pair in enumerate(self.cpu_experts) for lin, w in zip(pair, (gate_up, down)))
            if not views:   # the Linears hold re-laid-out copies (AMX tiles, oneDNN, int8, int4): free the 3D tensors
                self.experts_gate_up = self.experts_down = None

    @property
    def nbytes_per_token(self) -> int:
        """Weight bytes one token reads: the router, its top-k experts and the shared expert (expert parallelism: the
        top-k experts counted on every rank, as if each held them all: the rank that holds both reads that much)."""
        if self.streamed is not None:
            per_expert = self.streamed.expert_bytes
        elif self.cpu_experts is not None:
            per_expert = self.cpu_experts[0][0].nbytes + self.cpu_experts[0][1].nbytes
        else:
            per_expert = (self.experts_gate_up[0].numel() + self.experts_down[0].numel()) * self.experts_down.element_size()
            if self.gate_up_scale is not None:
                per_expert += (self.gate_up_scale[0].numel() + self.down_scale[0].numel()) * 4
        n = self.router.numel() * self.router.element_size() + self.top_k * per_expert
        if self.latent_in is not None:
            n += self.latent_in.nbytes + self.latent_out.nbytes
        if self.shared is not None:
            n += self.shared.gate_up.nbytes + self.shared.down.nbytes
            n += self.shared_gate.nbytes if self.shared_gate is not None else 0
        return n

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output for x [..., H] (+ ``residual``); ``route``: what the router reads instead of x (Gemma 4:
        the residual stream, its experts reading its own norm of it)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xe = x2 if self.latent_in is None else self.latent_in(x2)       # what the experts read
        r2 = x2 if route is None else route.reshape(-1, route.shape[-1])    # what the router reads
        streamed = self.streamed is not None
        if streamed:                      # the experts hit are read while the shared expert computes
            w, ids = reference.moe_topk(r2, self.router, self.top_k, self.renormalize, self.weights_in_dtype,
                                        self.routing, self.router_bias)
            self.streamed.prefetch(ids)
            s = self._shared_out(x2)
            y = self._latent_out(self.streamed.run(xe, w, ids, self.act, reference.input_scaled(self.routing)))
            y = y if s is None else y + s
        elif self.cpu_experts is not None and (self.experts_gate_up is None or not ops.uses_triton(x2)):
            y = self._latent_out(self._run_cpu_experts(r2, xe))
        else:
            y = self._latent_out(ops.moe_mlp(
                r2, self.router, self.experts_gate_up, self.experts_down, self.top_k, self.renormalize,
                self.weights_in_dtype, self.gate_up_scale, self.down_scale, self.first_expert, self.routing,
                self.router_bias, self.gate_up_bias, self.down_bias, self.act,
                None if xe is r2 else xe))
        if not streamed:
            s = self._shared_out(x2)
            y = y if s is None else y + s
        if self.reduce is not None:
            y = self.reduce(y)
        y = y.view(*lead, -1)
        return y if residual is None else y + residual

    def _latent_out(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.latent_out is None else self.latent_out(y)

    def _shared_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output, behind its gate where it has one (None: no shared expert)."""
        if self.shared is None:
            return None
        s = self.shared(x)
        # (the gate is whole: it scales each partial sum)
        return s if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * s

    def _run_cpu_experts(self, x: torch.Tensor, xe: torch.Tensor) -> torch.Tensor:
        """:func:`kernels.reference.moe_mlp` with each expert's GEMMs on its :class:`Linear` pair (x routes, the
        experts read xe)."""
        def expert(e, rows):
            e -= self.first_expert
            if not 0 <= e < self.local_experts:       # expert parallelism: another rank's expert
                return None
            gate_up, down = self.cpu_experts[e]
            return down(act(gate_up(rows)))

        act = self.act or ops.silu_and_mul

        w, ids = reference.moe_topk(x, self.router, self.top_k, self.renormalize, self.weights_in_dtype, self.routing,
                                    self.router_bias)
        return reference.moe_experts(xe, w, ids, expert, input_scaled=reference.input_scaled(self.routing))


class _LazyExperts:
    """``pairs[e]``: expert e's (gate|up, down) Linears over views of the 3D tensors (``pack=False``), made when a
    call first routes a token to e (an offloaded layer is rebuilt over its streamed unit at every use). Quantised
    units (``gate_up_scale`` / ``down_scale``, :func:`quantize_experts`'s): the int8 / int4 views used in place."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias=None, down_bias=None,
                 gate_up_scale=None, down_scale=None):
        self.gate_up, self.down, self.pairs = gate_up, down, {}
        self.gate_up_bias, self.down_bias = gate_up_bias, down_bias
        self.gate_up_scale, self.down_scale = gate_up_scale, down_scale

    def __getitem__(self, e: int):
        pair = self.pairs.get(e)
        if pair is None:
            pair = self.pairs[e] = (Linear(self.gate_up[e], _row(self.gate_up_bias, e), pack=False,
                                           scale=_row(self.gate_up_scale, e)),
                                    Linear(self.down[e], _row(self.down_bias, e), pack=False,
                                           scale=_row(self.down_scale, e)))
        return pair


def quantize_experts(w: torch.Tensor, quantize: str, group_size: int = 128, row_max=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """3D experts [E, N, K] as the grouped GEMMs and the offload units hold them: int8 [E, N, K] with an fp32 scale
    per expert row [E, N] (``quantize_rows``; ``row_max``: a row-parallel down's whole-row scales), or int4 packed
    uint8 [E, N, K / 2] with fp32 scales [E, N, K / group_size] (``quantize_int4_rows``). Meta tensors give the
    layout."""
    e, rows, cols = w.shape
    if w.is_meta:
        int4 = quantize == "int4"
        return (torch.empty(e, rows, cols // 2 if int4 else cols, dtype=torch.uint8 if int4 else torch.int8,
                            device="meta"),
                torch.empty(e, rows, *((cols // group_size,) if int4 else ()), dtype=torch.float32, device="meta"))
    if quantize == "int4":      # each expert row as a dense int4 Linear's row
        q, sc = quantize_int4_rows(w.reshape(e * rows, cols), group_size)
        return q.view(e, rows, cols // 2), sc.view(e, rows, -1)
    q, sc = quantize_rows(w.reshape(e * rows, cols), row_max)
    return q.view(e, rows, cols), sc.view(e, rows)


def _row(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    """Expert e's row of a per-expert tensor (gpt-oss's biases; a quantised unit's scales), or None."""
    return None if t is None else t[e]
