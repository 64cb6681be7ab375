"""From a policy's weight refs to this rank's tensors to fused modules.

Two steps, kept apart so offload can sit between them:

- :func:`shard_layer` reads one block's weights (only this rank's slices), fuses QKV and gate/up and
  casts them: a flat ``{name: tensor}`` dict on the CPU. The offload tier writes these dicts to disk
  or host memory one block at a time.
- :func:`make_layer` turns such a dict (resident tensors, or views into a streamed buffer) into a
  :class:`DecoderLayer`.

:func:`build_decoder` does both for every block and returns a resident :class:`DecoderModel`.
"""
from __future__ import annotations

import torch

from lightning_dsinfer.modules.linear import Linear
from lightning_dsinfer.modules.transformer import Attention, DecoderLayer, DecoderModel, GatedMLP, LayerSpec
from lightning_dsinfer.parallel import TensorParallelComm, TensorShardPlan
from lightning_dsinfer.policies import ModelWeights
from lightning_dsinfer.policies.base import LayerWeights
from lightning_dsinfer.policies.weights import load_fused


def shard_plan(w: ModelWeights, comm: TensorParallelComm) -> TensorShardPlan:
    return TensorShardPlan(comm.rank, comm.size, w.num_heads, w.num_kv_heads, w.head_dim, w.intermediate_size,
                           w.vocab_size)


def _fused(parts, dtype) -> torch.Tensor:
    return load_fused(parts, dtype)        # slices read straight into one buffer where the source allows


def _fused_bias(parts, dtype) -> torch.Tensor | None:
    """cat of the (ref, rows) biases of a fused projection; None when none of the parts has a bias."""
    if all(ref is None for ref, _ in parts):
        return None
    return torch.cat([torch.zeros(rows[1], dtype=dtype) if ref is None else ref.load(0, *rows).to(dtype)
                      for ref, rows in parts])


def shard_layer(lw: LayerWeights, plan: TensorShardPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This rank's tensors of one block, fused and cast, contiguous, on the CPU.

    Keys: ``qkv.weight``, ``o.weight``, ``gate_up.weight``, ``down.weight``, ``input_norm``, ``post_norm`` and,
    where the model has them, ``qkv.bias``, ``o.bias``, ``gate_up.bias``, ``down.bias``, ``q_norm``, ``k_norm``.
    Row-parallel biases (o, down) are held by tp rank 0 only, so they are added once.
    """
    q_rows, kv_rows, mlp_rows = plan.q_rows, plan.kv_rows, plan.mlp_rows
    first = plan.adds_bias_once
    qkv_parts = [(lw.q, q_rows), (lw.k, kv_rows), (lw.v, kv_rows)]
    mlp_parts = [(lw.gate, mlp_rows), (lw.up, mlp_rows)]
    out = {
        "qkv.weight": _fused(qkv_parts, dtype),
        "qkv.bias": _fused_bias([(lw.q_bias, q_rows), (lw.k_bias, kv_rows), (lw.v_bias, kv_rows)], dtype),
        "o.weight": lw.o.load(1, *q_rows).to(dtype),
        "o.bias": lw.o_bias.load().to(dtype) if (lw.o_bias is not None and first) else None,
        "gate_up.weight": _fused(mlp_parts, dtype),
        "gate_up.bias": _fused_bias([(lw.gate_bias, mlp_rows), (lw.up_bias, mlp_rows)], dtype),
        "down.weight": lw.down.load(1, *mlp_rows).to(dtype),
        "down.bias": lw.down_bias.load().to(dtype) if (lw.down_bias is not None and first) else None,
        "input_norm": lw.input_norm.load().to(dtype),
        "post_norm": lw.post_norm.load().to(dtype),
        "q_norm": None if lw.q_norm is None else lw.q_norm.load().to(dtype),
        "k_norm": None if lw.k_norm is None else lw.k_norm.load().to(dtype),
    }
    return {k: v.contiguous() for k, v in out.items() if v is not None}


def layer_spec(w: ModelWeights, plan: TensorShardPlan, lw: LayerWeights) -> LayerSpec:
    return LayerSpec(hidden_size=w.hidden_size, num_heads=plan.local_heads, num_kv_heads=plan.local_kv_heads,
                     head_dim=w.head_dim, intermediate_size=plan.mlp_rows[1], rms_norm_eps=w.rms_norm_eps,
                     scaling=w.scaling, sliding_window=lw.sliding_window)


def make_layer(index: int, t: dict[str, torch.Tensor], spec: LayerSpec, comm: TensorParallelComm,
               pack: bool = True) -> DecoderLayer:
    """A block over the tensors of :func:`shard_layer` (already on the compute device and dtype).

    ``pack=False`` keeps the tensors as they are (views into a streamed buffer stay views)."""
    reduce = comm.all_reduce if comm.size > 1 else None
    first = comm.rank == 0

    def linear(name, **kw):
        return Linear(t[f"{name}.weight"], t.get(f"{name}.bias"), pack=pack, **kw)

    attn = Attention(spec, index, linear("qkv"), linear("o", reduce=reduce, owns_residual=first),
                     q_norm=t.get("q_norm"), k_norm=t.get("k_norm"))
    mlp = GatedMLP(linear("gate_up"), linear("down", reduce=reduce, owns_residual=first))
    return DecoderLayer(attn, mlp, t["input_norm"], t["post_norm"], spec.rms_norm_eps)


def vocab_rows(w: ModelWeights, plan: TensorShardPlan) -> tuple[int, int, int]:
    """(start, real rows, padded rows) of this rank's vocabulary shard (padded rows are zero)."""
    if plan.tp == 1:
        return 0, w.vocab_size, w.vocab_size
    start, rows = plan.vocab_rows
    return start, rows, plan.vocab_shard


def head_rows(w: ModelWeights, plan: TensorShardPlan, dtype: torch.dtype, first: int, n: int
              ) -> dict[str, torch.Tensor]:
    """Rows [first, first + n) of this rank's (padded) lm_head shard: ``weight`` and maybe ``bias``."""
    start, real, _ = vocab_rows(w, plan)
    take = max(min(n, real - first), 0)                    # rows past the real vocabulary are zero padding
    weight = w.lm_head.load(0, start + first, take).to(dtype) if take else torch.empty(0, w.hidden_size, dtype=dtype)
    out = {"weight": torch.cat([weight, weight.new_zeros(n - take, w.hidden_size)]) if take < n else weight}
    if w.lm_head_bias is not None:
        bias = w.lm_head_bias.load(0, start + first, take).to(dtype) if take else torch.empty(0, dtype=dtype)
        out["bias"] = torch.cat([bias, bias.new_zeros(n - take)]) if take < n else bias
    return {k: v.contiguous() for k, v in out.items()}


def build_decoder(w: ModelWeights, dtype: torch.dtype, device: torch.device | str = "cpu",
                  comm: TensorParallelComm | None = None) -> DecoderModel:
    """Resident fused modules from a policy's weight refs, reading only this rank's shards.

    QKV and gate/up are fused into one GEMM each; o and down are row-parallel with the residual add
    fused in (tp rank 0 adds residual and bias; the all-reduce sums the partial products).
    """
    comm = comm or TensorParallelComm()
    plan = shard_plan(w, comm)

    def dev(t):
        return t.to(device=device, dtype=dtype).contiguous()

    layers = []
    for i, lw in enumerate(w.layers):
        tensors = {k: dev(v) for k, v in shard_layer(lw, plan, dtype).items()}
        layers.append(make_layer(i, tensors, layer_spec(w, plan, lw), comm))
    start, real, padded = vocab_rows(w, plan)
    embed = dev(w.embed.load(0, start, real))
    head = {k: dev(v) for k, v in head_rows(w, plan, dtype, 0, padded).items()}
    return DecoderModel(embed, layers, dev(w.final_norm.load()), w.rms_norm_eps, Linear(head["weight"], head.get("bias")),
                        vocab_size=w.vocab_size, vocab_start=start, comm=comm)
