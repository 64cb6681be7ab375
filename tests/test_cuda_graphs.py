"""The CUDA-graph decode step (``generation/cuda_graphs.py``) on the CPU: ``cuda_graphs.emulate()`` runs its
fixed-shape step eagerly (everything but capture and replay, which ``benchmarks/gpu_check.py`` checks on a
GPU). It must give the eager step's tokens, and its logits within fp32 rounding (atol 1e-5: attention runs
over all cache columns with the unused ones masked, so only the summation order differs)."""
import pytest
import torch

from helpers import FAMILIES, optimised_copy, padded_batch, tiny_model
from lightning_dsinfer.generation import cuda_graphs
from lightning_dsinfer.generation import decode as decode_mod


def _generate_recording(model, monkeypatch, **kw):
    """generate(), also returning the logits of every step the loop chose a token from."""
    seen = []
    real = decode_mod.next_tokens

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(decode_mod, "next_tokens", recording)
    out = model.generate(**kw)
    monkeypatch.setattr(decode_mod, "next_tokens", real)
    return out, seen


# + LayerNorms, learned positions, ALiBi; latent attention (its cache write at a tensor column) and grouped routing;
# linear attention (its states in the cache's rows, updated in place; a dummy row's too); Llama 4's chunked layers
# (each row's chunk start from its device pad start) and temperature-tuned queries (by the device column; Ministral
# 3's by the device positions) (Falcon-H1: K/V and Mamba-2 states in one block; Mamba: no attention at all)
# Gemma 4: the sliding layers' own rotary table (Gemma 3's too), layers of two shapes, layers reading another's K/V,
# per-layer inputs looked up at the device tokens, experts beside the MLP
@pytest.mark.parametrize("family", FAMILIES + ["gpt_neox", "opt", "bloom", "deepseek_v3", "qwen3_5_text", "llama4",
                                    "falcon_h1", "mamba", "ministral3", "gemma4_moe"])
def test_graph_step_equals_eager_step(family, monkeypatch):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=40, max_batch_size=4)
    for lengths in ([12, 5, 9], [4], [3, 11, 6, 8]):     # 3 rows run in bucket 4 with a dummy row
        ids, mask = padded_batch(lengths, seed=len(lengths))
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        eager, eager_logits = _generate_recording(opt, monkeypatch, **kw)
        with cuda_graphs.emulate():
            graph, graph_logits = _generate_recording(opt, monkeypatch, **kw)
        assert torch.equal(graph, eager)
        assert len(graph_logits) == len(eager_logits) == 12
        for g, e in zip(graph_logits, eager_logits):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            assert torch.equal(graph, hf.generate(**kw))
    assert sorted(opt._dsinfer_engine._decode_graphs.buckets) == [1, 4]


def test_graphs_only_when_they_apply(monkeypatch):
    hf = tiny_model("llama")
    opt = optimised_copy(hf, max_seq_len=40, max_batch_size=2)
    engine = opt._dsinfer_engine
    valid = torch.ones(2, 10, dtype=torch.bool)
    assert cuda_graphs.decode_graphs(engine, 2, valid, 6) is None          # CPU, not emulating
    with cuda_graphs.emulate():
        runner = cuda_graphs.decode_graphs(engine, 2, valid, 6)
        assert runner is not None and runner.bucket_size(2) == 2
        holes = valid.clone()
        holes[0, 3] = False                                                 # a zero inside the prompt
        assert cuda_graphs.decode_graphs(engine, 2, holes, 6) is None
        monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
        assert cuda_graphs.decode_graphs(engine, 2, valid, 6) is None
        monkeypatch.delenv("DSINFER_CUDA_GRAPHS")
        with pytest.warns(UserWarning, match="max_batch_size=2"):
            engine.cache.ensure_batch(3)                                     # re-allocated: new runner
        assert cuda_graphs.decode_graphs(engine, 3, None, 6) is not runner


def test_generate_with_holes_in_mask_falls_back_to_eager():
    hf = tiny_model("mistral")
    opt = optimised_copy(hf, max_seq_len=40)
    ids, mask = padded_batch([9, 7], seed=3)
    mask[0, 4] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with cuda_graphs.emulate():
        got = opt.generate(**kw)
    assert getattr(opt._dsinfer_engine, "_decode_graphs", None) is None
    with torch.no_grad():
        assert torch.equal(got, hf.generate(**kw))
