"""Pipeline parallelism across processes (gloo on CPU), against the single-process HF model (tests/pp_worker.py):
fp32 logits of a left-padded batch (atol 2e-4), greedy tokens identical through the pipelined schedule (row groups,
prompt chunks, a group stopping at EOS before the others, min_new_tokens), beam search and a streamer through HF's
loop, sampling agreeing across ranks; with tensor parallelism inside the stages, int8, bf16 (= the engine without a
pipeline), from a checkpoint on meta; through the Lightning launcher; a dead stage; the errors.

The pp_worker.py runs (``worker_runs``) go into the session's shared launches of the ranks (tests/conftest.py
``shared_runs``: a rank's start-up costs more than a run of the tiny models); each test checks its own run's output."""

import pytest
import torch

from helpers import tiny_model
from lightning_dsinfer.generation.pipeline import prompt_chunks, row_groups
from lightning_dsinfer.parallel import Topology
from lightning_dsinfer.parallel.pipeline import stage_layers
from multiproc import run_ranks

REFUSED = "pipeline_parallel_size=2 is larger than the model's 1 layers"
GEMMA4_REFUSED = "which pipeline stages do not pass on; use tensor parallelism"


def worker_runs(tmp, selected):
    """This module's pp_worker.py runs by world size (tests/conftest.py ``shared_runs``: the session's runs of a world
    size share one launch of the ranks), the refused one after the others."""
    if "test_pipeline_from_checkpoint_on_meta" in selected:
        for family in ("llama", "mixtral"):
            tiny_model(family, num_hidden_layers=3).save_pretrained(tmp / "ckpt" / family)
    pp = ["pp_worker.py", "--pp", "2"]
    two = {
        "test_pipeline_two_stages_matches_hf": [*pp, "--families", "llama", "qwen2", "qwen3", "phi3", "mixtral",
                                                "qwen2_moe"],
        "test_pipeline_int8_and_bf16/int8": [*pp, "--quantize", "int8", "--families", "llama", "qwen2_moe"],
        "test_pipeline_int8_and_bf16/bf16": [*pp, "--dtype", "bfloat16", "--families", "llama", "qwen3"],
        **{f"test_pipeline_with_offload[{tier}]": [*pp, "--offload", tier, "--offload-path", str(tmp / tier),
                                                   "--families", "llama", "qwen2_moe"] for tier in ("cpu", "nvme")},
        "test_pipeline_from_checkpoint_on_meta": [*pp, "--layers", "3", "--checkpoint", str(tmp / "ckpt"),
                                                  "--families", "llama", "mixtral"],
        "test_pipeline_without_room_in_dev_shm_talks_through_gloo": [*pp, "--full-shm", "--families", "llama"],
        "test_more_stages_than_layers_is_refused": ["--expect-error", REFUSED, *pp, "--layers", "1",
                                                    "--families", "llama"],
        "test_gemma4_stages_are_refused": ["--expect-error", GEMMA4_REFUSED, *pp, "--families", "gemma4_text"],
    }
    four = {"test_pipeline_four_stages_matches_hf": ["pp_worker.py", "--pp", "4", "--layers", "5", "--families",
                                                     "mistral", "qwen3_moe"],
            "test_pipeline_with_tensor_parallel_stages": ["pp_worker.py", "--pp", "2", "--tp", "2", "--families",
                                                          "qwen3", "mixtral"]}
    return {2: two, 4: four}


def _check(runs, world, key):
    """Every rank ran every family of run ``key`` to its OK line; returns the ranks' outputs."""
    args = runs.argv(world, key)
    outs = runs.outputs(world, key)
    families = args[args.index("--families") + 1:]
    families = families[:next((i for i, a in enumerate(families) if a.startswith("--")), len(families))]
    assert all(out.count(" OK") == len(families) for out in outs), outs
    return outs


def test_pipeline_two_stages_matches_hf(shared_runs):
    """PP=2, a dense family of each kind and two MoE families (qwen2 and qwen2_moe: 3 layers, 2 + 1)."""
    _check(shared_runs, 2, "test_pipeline_two_stages_matches_hf")


def test_pipeline_four_stages_matches_hf(shared_runs):
    """PP=4 on 5-layer models: the first stage holds two blocks, the others one."""
    outs = _check(shared_runs, 4, "test_pipeline_four_stages_matches_hf")
    assert "layers=0..1" in outs[0] and "layers=4..4" in outs[3]


def test_pipeline_with_tensor_parallel_stages(shared_runs):
    """PP=2 x TP=2: each stage's blocks split over two ranks; tp rank r of stage 0 talks to tp rank r of stage 1."""
    _check(shared_runs, 4, "test_pipeline_with_tensor_parallel_stages")


def test_pipeline_int8_and_bf16(shared_runs):
    """int8 weights (HF over the same quantise-dequantised weights), and bf16 (the CPU kernels, the one-call decode
    step on the micro-batches' cache rows) against the same engine without a pipeline."""
    _check(shared_runs, 2, "test_pipeline_int8_and_bf16/int8")
    _check(shared_runs, 2, "test_pipeline_int8_and_bf16/bf16")


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_pipeline_with_offload(tier, shared_runs):
    """Each stage streams its own blocks within its max_memory (the first stage the embedding rows, the last the
    lm_head slices): fp32 logits, greedy (row groups, prompt chunks, EOS), beam search as HF's."""
    _check(shared_runs, 2, f"test_pipeline_with_offload[{tier}]")


def test_pipeline_without_room_in_dev_shm_talks_through_gloo(shared_runs):
    """/dev/shm cannot hold the rings (posix_fallocate fails, as on a docker default of 64 MiB with many groups): a
    warning naming the fix, and the stages talk through gloo with the same results."""
    _check(shared_runs, 2, "test_pipeline_without_room_in_dev_shm_talks_through_gloo")


def test_pipeline_from_checkpoint_on_meta(shared_runs):
    """A model built on meta: each stage reads its own blocks from the safetensors folder (peak memory per stage:
    tests/test_sharded_loading_memory.py)."""
    _check(shared_runs, 2, "test_pipeline_from_checkpoint_on_meta")


def test_dp2_x_pp2_via_lightning_launcher(tmp_path):
    """Trainer(devices=4, strategy=DSInferStrategy(tensor_parallel_size=1, pipeline_parallel_size=2)): two replicas
    of two stages; predictions = HF's, in dataset order, on every rank; prediction writers write each sample once
    (from the last stage)."""
    from test_multiprocess_lightning import _finish, _results, _run_script

    out = tmp_path / "r.json"
    codes, outs = _finish([_run_script(["--devices", "4", "--tp", "1", "--pp", "2", "--out", str(out)])], 300)
    assert codes == [0], outs[0][-3000:]
    results = _results(out)
    assert len(results) == 4 and all(r["rows"] == 7 and r["match"] and (r["dp"], r["pp"], r["tp"]) == (2, 2, 1)
                                     for r in results), results
    assert [r["stage_layers"] for r in results] == [[0, 1], [1, 2], [0, 1], [1, 2]]
    written = []
    for f in tmp_path.glob("r.json.rank*"):
        written += [int(x) for x in f.read_text().split()]
    assert sorted(written) == list(range(7))


def test_dead_stage_makes_peer_fail_fast():
    """Stage 1 is killed while stage 0 waits for its tokens: stage 0 fails with the peer named within seconds (its
    pid is looked up every 50 ms of waiting), not after the collective timeout (120 s here)."""
    timeout_s, kill_after = 120, 3
    codes, outs, elapsed = run_ranks("fault_worker.py", 2, [str(timeout_s), "float32", "pp"], timeout=100,
                                     kill_rank_after=(1, kill_after, "READY"))
    assert "READY" in outs[0], outs[0][-3000:]
    assert codes[0] not in (0, None) and codes[1] != 0
    assert elapsed < 10, f"peer took {elapsed:.0f}s to give up"
    assert "peer rank of pipeline group" in outs[0], outs[0][-3000:]


def test_stage_layers_cover_every_block_once():
    for layers in range(1, 12):
        for stages in range(1, layers + 1):
            ranges = [stage_layers([1] * layers, stages, s) for s in range(stages)]
            assert [i for a, b in ranges for i in range(a, b)] == list(range(layers))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True) and min(sizes) >= 1
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is larger than the model's 2 layers"):
        stage_layers([1, 1], 3, 0)


def test_stage_layers_balance_the_bytes():
    """The lm_head weighs on the last stage (a ~200M Llama's is ~3 blocks: 12 blocks split 8 + 4, not 6 + 6), and
    blocks of different sizes (dense and MoE layers) are balanced by their bytes, not their count."""
    assert [stage_layers([10] * 12, 2, s, head_cost=29) for s in range(2)] == [(0, 7), (7, 12)]
    assert [stage_layers([10] * 12, 2, s, head_cost=31) for s in range(2)] == [(0, 8), (8, 12)]
    costs = [1, 9, 1, 1, 1, 9, 1, 1]       # max stage cost 12 at best: [1, 9, 1, 1] | [1, 9, 1, 1]
    assert [stage_layers(costs, 2, s) for s in range(2)] == [(0, 4), (4, 8)]
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):                    # the least max stage cost, against every partition
        n, stages, head = rng.randint(1, 9), rng.randint(1, 4), rng.randint(0, 20)
        if stages > n:
            continue
        costs = [rng.randint(1, 10) for _ in range(n)]
        ranges = [stage_layers(costs, stages, s, head_cost=head) for s in range(stages)]
        assert [i for a, b in ranges for i in range(a, b)] == list(range(n)) and all(b > a for a, b in ranges)

        def worst(bounds):
            parts = [sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
            return max(parts[:-1] + [parts[-1] + head])

        best = min(worst([0, *cuts, n]) for cuts in itertools.combinations(range(1, n), stages - 1))
        assert worst([a for a, _ in ranges] + [n]) == best, (costs, stages, head, ranges)


def test_micro_batches():
    assert row_groups(5, 2) == [(0, 3), (3, 5)] and row_groups(1, 4) == [(0, 1)] and row_groups(8, 4)[-1] == (6, 8)
    assert prompt_chunks(10, 1, 2) == [(0, 10)]                  # short prompts are not cut
    assert prompt_chunks(128, 2, 2) == [(0, 64), (64, 128)]      # none shorter than 64 tokens
    assert prompt_chunks(1000, 1, 2) == [(0, 125), (125, 250), (250, 375), (375, 500), (500, 625), (625, 750),
                                         (750, 875), (875, 1000)]    # 4 prompt micro-batches per stage
    assert prompt_chunks(1000, 4, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert prompt_chunks(127, 1, 2) == [(0, 127)]


def test_pipeline_groups_in_topology():
    t = Topology(world_size=8, rank=5, tp=2, pp=2)
    assert t.pp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t.pp_group_ranks == [5, 7] and t.pp_rank == 0 and t.tp_rank == 1


def test_pipeline_errors_before_work(monkeypatch):
    import lightning_dsinfer as dsi

    with pytest.raises(ValueError, match="pipeline_parallel_size=0 must be >= 1"):
        dsi.init_inference(tiny_model("llama"), pipeline_parallel_size=0)
    with pytest.raises(NotImplementedError, match="pipeline_parallel_size=2 needs a fused policy"):
        dsi.init_inference(tiny_model("cohere_compass_text"), pipeline_parallel_size=2)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        dsi.init_inference(tiny_model("llama"), pipeline_parallel_size=2)
    assert not torch.distributed.is_initialized()


def test_more_stages_than_layers_is_refused(shared_runs):
    """Checked in each rank before any weight is read (a world of 2 ranks, a 1-layer model): the ValueError from
    init_inference in every rank."""
    outs = shared_runs.outputs(2, "test_more_stages_than_layers_is_refused")
    assert all(f"refused: ValueError: {REFUSED}" in o for o in outs), outs


def test_gemma4_stages_are_refused(shared_runs):
    """Gemma 4's per-layer inputs (looked up on the first stage) and shared K/V: refused on pipeline stages in each
    rank, with the fix (tensor parallelism), before any weight is read."""
    outs = shared_runs.outputs(2, "test_gemma4_stages_are_refused")
    assert all("refused: UnsupportedModelError: dsinfer: gemma4_text's blocks" in o for o in outs), outs


def test_strategy_world_must_divide():
    import lightning_dsinfer as dsi

    strategy = dsi.DSInferStrategy(pipeline_parallel_size=3)
    assert strategy.inference_config.pipeline_parallel_size == 3
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 does not divide the 2 devices per node"):
        strategy._parallel_devices = [torch.device("cpu")] * 2
        strategy.num_nodes = 1
        strategy.setup_environment()
