"""Tensor parallelism across processes (gloo on CPU), against the single-process HF model in fp32."""
import pytest
import torch

from helpers import FAMILIES
from lightning_dsinfer.parallel import TensorShardPlan, Topology


def worker_runs(tmp, selected):
    """TP over 2 and over 4 ranks, in the session's shared launches of those world sizes (tests/conftest.py
    ``shared_runs``: a rank's start-up costs more than the runs)."""
    return {tp: {f"test_tensor_parallel_matches_hf[{tp}]": ["tp_worker.py", "--tp", str(tp), "--families", *FAMILIES]}
            for tp in (2, 4)}


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_hf(tp, shared_runs):
    outs = shared_runs.outputs(tp, f"test_tensor_parallel_matches_hf[{tp}]")
    assert outs[0].count(" OK") == len(FAMILIES), outs[0]


def test_topology_layout():
    t = Topology(world_size=8, rank=6, tp=2, pp=2)
    assert (t.dp, t.dp_rank, t.pp_rank, t.tp_rank) == (2, 1, 1, 0)
    assert t.tp_group_ranks == [6, 7]
    assert t.dp_groups()[2] == [2, 6]
    with pytest.raises(ValueError, match="world size 6 is not divisible by tensor_parallel_size=4"):
        Topology(world_size=6, rank=0, tp=4)


def test_shard_plan_splits_and_replicates():
    plan = TensorShardPlan(tp_rank=3, tp=4, num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=97)
    assert plan.local_heads == 2 and plan.local_kv_heads == 1
    assert plan.q_rows == (96, 32)                 # q heads 6, 7
    assert plan.kv_rows == (16, 16)                # KV head 1 (shared by q heads 4..7), replicated on ranks 2, 3
    assert plan.mlp_rows == (72, 24)
    assert plan.vocab_rows == (75, 22) and plan.vocab_shard == 25
    # every q head's KV head is on the same rank as the q head
    for r in range(4):
        p = TensorShardPlan(r, 4, 8, 2, 16, 96, 97)
        q_heads = range(p.q_rows[0] // 16, (p.q_rows[0] + p.q_rows[1]) // 16)
        assert {h // (8 // 2) for h in q_heads} == {p.kv_rows[0] // 16}


@pytest.mark.parametrize("kw,msg", [
    (dict(tp=3, num_heads=16), "tensor_parallel_size=3 does not divide 16 attention heads"),
    (dict(tp=2, intermediate_size=97), "does not divide intermediate_size=97"),
    (dict(tp=8, num_kv_heads=3, num_heads=24), "not a multiple"),
])
def test_shard_plan_errors_name_the_numbers(kw, msg):
    args = dict(tp_rank=0, tp=2, num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=97)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        TensorShardPlan(**args)


def test_tensor_parallel_without_launcher_says_how_to_launch(monkeypatch):
    import lightning_dsinfer as dsi
    from helpers import tiny_model

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        dsi.init_inference(tiny_model("llama"), tensor_parallel_size=2)
    assert not torch.distributed.is_initialized()
