"""Tensor parallelism for families without a fused policy (lightning_dsinfer/parallel/generic.py): the model's
own nn.Linear layers are split in place, against the single-process HF model in fp32."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import GENERIC_FAMILIES, tiny_config, tiny_model
from lightning_dsinfer.parallel.generic import GenericTensorParallelError, plan_generic_tensor_parallel
from multiproc import clean_env

HERE = os.path.dirname(os.path.abspath(__file__))


def _meta(family, **overrides):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family, **overrides))


def worker_runs(tmp, selected):
    """The TP=2 run (generic_tp_worker.py), in the session's shared launch of two ranks (tests/conftest.py
    ``shared_runs``: a rank's start-up costs more than the run)."""
    if "test_generic_tensor_parallel_matches_hf" in selected:
        for family in GENERIC_FAMILIES:
            tiny_model(family).save_pretrained(tmp / family, safe_serialization=True)
    return {2: {"test_generic_tensor_parallel_matches_hf": ["generic_tp_worker.py", "--tp", "2", "--families",
                                                            *GENERIC_FAMILIES, "--checkpoints", str(tmp)]}}


def test_generic_tensor_parallel_matches_hf(shared_runs):
    """TP=2, every generic family: fp32 logits of a left-padded batch within 2e-4 and greedy tokens identical
    to HF, sampling agrees across ranks, weights really split; the same model built on meta and read from a
    safetensors folder gives the same logits."""
    outs = shared_runs.outputs(2, "test_generic_tensor_parallel_matches_hf")
    assert outs[0].count(" OK") == len(GENERIC_FAMILIES), outs[0]


def test_plan_comes_from_the_model_or_the_rule():
    phi3 = plan_generic_tensor_parallel(_meta("phi3", num_key_value_heads=1), tp=2, tp_rank=1)
    neox = plan_generic_tensor_parallel(_meta("gpt_neox"), tp=2, tp_rank=1)
    opt = plan_generic_tensor_parallel(_meta("opt"), tp=2, tp_rank=1)
    assert (phi3.origin, neox.origin, opt.origin) == ("tp_plan", "tp_plan", "generic rule")
    by_name = {s.name: s for s in phi3.linears}
    # packed q|k|v (4 heads, 1 KV head, head_dim 16): q heads 2, 3 and the one KV head, replicated
    assert by_name["model.layers.0.self_attn.qkv_proj"].ranges == ((32, 32), (64, 16), (80, 16))
    assert by_name["model.layers.0.mlp.gate_up_proj"].ranges == ((48, 48), (144, 48))       # gate | up halves
    assert by_name["model.layers.0.self_attn.o_proj"].ranges == ((32, 32),)
    assert not any(s.gather or s.split_input for s in phi3.linears)                          # nothing gathered
    assert phi3.heads[0].local_heads == 2 and phi3.heads[0].local_kv_heads == 1
    # GPT-NeoX fuses q, k, v per head: whole heads are a contiguous block of rows
    qkv = next(s for s in neox.linears if s.name.endswith("query_key_value"))
    assert qkv.ranges == ((96, 96),)
    assert {s.name.rsplit(".", 1)[1]: s.kind for s in opt.linears if ".layers.0." in s.name} == {
        "q_proj": "col", "k_proj": "col", "v_proj": "col", "out_proj": "row", "fc1": "col", "fc2": "row"}


def test_olmo_hybrid_gathers_where_its_plan_says_and_bloom_keeps_fused_qkv_whole():
    olmo = plan_generic_tensor_parallel(_meta("olmo_hybrid"), tp=2, tp_rank=0)
    q = next(s for s in olmo.linears if s.name.endswith("layers.1.self_attn.q_proj"))     # (its full-attention layer)
    o = next(s for s in olmo.linears if s.name.endswith("layers.1.self_attn.o_proj"))
    assert q.gather and o.split_input and not olmo.heads         # q/k norms span all heads: attention stays whole
    bloom = plan_generic_tensor_parallel(_meta("bloom"), tp=2, tp_rank=0)
    assert bloom.origin == "generic rule" and len(bloom.whole) == 2
    assert all("self_attention" in w for w in bloom.whole)
    assert {s.name.rsplit(".", 1)[1] for s in bloom.linears} == {"dense_h_to_4h", "dense_4h_to_h"}


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide 4 attention heads of phi3"):
        plan_generic_tensor_parallel(_meta("phi3", num_key_value_heads=1), tp=3, tp_rank=0)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide 4 attention heads of gpt_neox"):
        plan_generic_tensor_parallel(_meta("gpt_neox"), tp=3, tp_rank=0)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide 3 key/value heads of stablelm"):
        plan_generic_tensor_parallel(_meta("stablelm", hidden_size=96, num_attention_heads=12, num_key_value_heads=3),
                                     tp=4, tp_rank=0)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide the 30 features of .*dense_h_to_4h"):
        plan_generic_tensor_parallel(_meta("gpt_neox", intermediate_size=30), tp=4, tp_rank=0)


def test_model_without_linear_layers_is_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(GenericTensorParallelError, match="gpt2.*found no nn.Linear"):       # GPT-2 uses Conv1D
        plan_generic_tensor_parallel(gpt2, tp=2, tp_rank=0)


def test_lightning_strategy_runs_a_family_without_policy(tmp_path):
    """Trainer(devices=2, strategy="dsinfer") with cohere_compass_text (a family without a policy): TP=2 through the
    generic path, predictions = HF's."""
    out = tmp_path / "r.json"
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "lightning_worker.py"), "--devices", "2", "--out",
                           str(out), "--family", "cohere_compass_text"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("r.json.result*"))]
    assert len(results) == 2 and all(r["match"] and r["tp"] == 2 for r in results), results
