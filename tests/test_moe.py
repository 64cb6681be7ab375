"""Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe) against the unmodified HF model: fp32 logits on a
left-padded batch, greedy tokens, bf16, HF's own loop (beam search), Lightning, and the options refused before work.

The tensor-parallel tp_worker.py runs (``worker_runs``) go into the session's shared launch of two ranks
(tests/conftest.py ``shared_runs``: a rank's start-up costs more than a run of the tiny models); each test checks its
own run's output."""
import contextlib
import copy

import pytest
import torch
from helpers import assert_matches_hf, optimised_copy, padded_batch, routing_margins, tiny_model

import lightning_dsinfer as dsi
from lightning_dsinfer.kernels import reference

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
ATOL, RTOL = 2e-4, 1e-4


def worker_runs(tmp, selected):
    """This module's TP=2 runs (tp_worker.py; tests/conftest.py ``shared_runs``: the session's 2-rank runs share one
    launch of the ranks)."""
    if selected & {"test_moe_expert_parallel_matches_hf[checkpoint_nvme]", "test_moe_tensor_parallel_from_checkpoint",
                   "test_moe_offload_from_checkpoint_tensor_parallel"}:
        for family in MOE:      # the per-expert checkpoints save_pretrained writes
            tiny_model(family).save_pretrained(tmp / "ckpt" / family)
    tp = ["tp_worker.py", "--tp", "2", "--families", *MOE]
    streamed = ["--offload", "nvme", "--max-memory", "streaming"]
    return {2: {
        "test_moe_tensor_parallel_matches_hf[None]": tp,
        "test_moe_tensor_parallel_matches_hf[int8]": [*tp, "--quantize", "int8"],
        "test_moe_expert_parallel_matches_hf[memory]": [*tp, "--expert-parallel"],
        "test_moe_expert_parallel_matches_hf[int8]": [*tp, "--expert-parallel", "--quantize", "int8"],
        "test_moe_expert_parallel_matches_hf[checkpoint_nvme]": [*tp, "--expert-parallel", "--checkpoint",
                                                                 str(tmp / "ckpt"), *streamed, "--offload-path",
                                                                 str(tmp / "ep_off")],
        "test_moe_tensor_parallel_from_checkpoint": [*tp, "--checkpoint", str(tmp / "ckpt")],
        "test_moe_offload_from_checkpoint_tensor_parallel": [*tp, "--checkpoint", str(tmp / "ckpt"), *streamed,
                                                             "--offload-path", str(tmp / "units")],
        **{f"test_moe_disk_tier_tensor_parallel_with_experts_on_demand[{q}]": [
            "tp_worker.py", "--tp", "2", "--families", *ON_DEMAND, *streamed, "--offload-path", str(tmp / f"on_demand_{q}"),
            *(["--quantize", q] if q else [])] for q in (None, "int8")},
    }}


def _check_tp(shared_runs, key, families=MOE):
    outs = shared_runs.outputs(2, key)
    assert outs[0].count(" OK") == len(families), outs[0]


@pytest.mark.parametrize("family", MOE)
def test_moe_logits_and_greedy_match_hf(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    layers = opt._dsinfer_engine.decoder.layers
    kinds = [type(layer.mlp).__name__ for layer in layers]
    assert "MoEMLP" in kinds
    if family != "mixtral":
        assert "GatedMLP" in kinds          # qwen: dense layers between the sparse ones
    assert_matches_hf(hf, opt, *padded_batch([12, 5, 9]))
    assert_matches_hf(hf, opt, *padded_batch([3, 11, 6, 8], seed=1), new_tokens=12)


def test_moe_beam_search_through_hf_loop():
    hf = tiny_model("qwen2_moe", seed=3)
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([7, 4], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        want = hf.generate(**kw)
    assert torch.equal(opt.generate(**kw), want)


@pytest.mark.parametrize("onednn", [False, True], ids=["cpu-kernels", "onednn"])
@pytest.mark.parametrize("family", MOE)
def test_moe_bf16_follows_hf_bf16(family, onednn):
    """bf16: the engine's logits within bf16 rounding of HF's bf16 model (max error <= 2% of the logits' scale at
    every valid position). Premise, checked: no near-tie routing decision in HF's bf16 run (top-k margin >= 2e-3),
    since bf16 rounding differences in the router's input (fused norms and kernels) can flip a near tie and move
    that token's logits (and later ones, through attention) by more: seed 4 of qwen2_moe has a 3e-4 margin and
    flips."""
    from lightning_dsinfer.kernels import cpu_gemv

    hf = tiny_model(family).to(torch.bfloat16)
    with cpu_gemv.disabled() if onednn else contextlib.nullcontext():   # onednn: the experts' oneDNN-packed Linears
        opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([8, 5], seed=2)
    assert routing_margins(hf, input_ids=ids, attention_mask=mask)[:, mask.flatten().bool()].min() >= 2e-3
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits.float()
    got = opt(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    err = (got[valid] - ref[valid]).abs().amax(-1) / ref[valid].abs().max()
    assert err.max() <= 0.02, err


def test_moe_reference_is_hf_block():
    """reference.moe_mlp equals transformers' sparse block on the same weights (Mixtral: fp32 routing weights)."""
    hf = tiny_model("mixtral")
    block = hf.model.layers[0].mlp
    x = torch.randn(11, hf.config.hidden_size)
    with torch.no_grad():
        want = block(x[None])[0]
        got = reference.moe_mlp(x, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, 2, True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_one_row_experts_sum_as_the_index_tables_do():
    """``reference.moe_experts`` on a one-row decode step (no index tables) gives the tables' sum bit for bit: bf16
    rows, fp32 weights (so each product is fp32 and rounded once), experts in ascending order whatever the top-k
    order, an expert of another rank (None) adding nothing."""
    from lightning_dsinfer.kernels import reference

    torch.manual_seed(0)
    x = torch.randn(1, 16).to(torch.bfloat16)
    scale = torch.randn(6, 16).to(torch.bfloat16)

    def expert(e, rows):      # elementwise, so a row's output cannot depend on how many rows come with it
        return None if e == 4 else rows * scale[e] + e

    for ids in ([[3, 0, 5]], [[5, 4, 1]], [[2, 1, 0]]):
        ids, w = torch.tensor(ids), torch.rand(1, 3)
        one = reference.moe_experts(x, w, ids, expert)
        tables = reference.moe_experts(x, w, ids, expert, out=torch.zeros_like(x), only=set(range(6)))
        assert one.dtype == torch.bfloat16 and torch.equal(one, tables)


def test_moe_through_lightning_predict():
    import lightning as L
    from helpers import collate_left_padded, generating_module, random_prompts
    from torch.utils.data import DataLoader

    hf = tiny_model("mixtral", seed=5)
    prompts = random_prompts(5, seed=5)
    loader = DataLoader(prompts, batch_size=2, collate_fn=collate_left_padded)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="dsinfer", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    preds = trainer.predict(generating_module(copy.deepcopy(hf), new_tokens=5), loader)
    for batch, got in zip(loader, preds):
        with torch.no_grad():
            want = hf.generate(**batch, max_new_tokens=5, do_sample=False)
        assert torch.equal(got, want)


QUANTISED = {"int8": {}, "int4": dict(quantize_group_size=16)}     # (16: qwen2_moe's experts' down K is 48)


def _fake_quantised(hf, quantize):
    from helpers import fake_quantised_int4, fake_quantised_int8

    return fake_quantised_int8(hf) if quantize == "int8" else fake_quantised_int4(hf, 16)


def _no_requantising(monkeypatch):
    """Any quantisation from here on fails the test: the streamed experts must be used as their units hold them."""
    import lightning_dsinfer.modules.linear as linear
    import lightning_dsinfer.modules.moe as moe

    def refuse(*args, **kw):
        raise AssertionError("a streamed unit's weight was quantised again")
    for module in (linear, moe):
        monkeypatch.setattr(module, "quantize_rows", refuse)
        monkeypatch.setattr(module, "quantize_int4_rows", refuse)


def _assert_quantised_mlp_unit(tensors, quantize, dtype=torch.float32):
    """A sparse MLP half as an offload unit holds it: the experts int8 [E, N, K] with a scale per expert row, or int4
    packed [E, N, K / 2] with a scale per row and group; the shared expert quantised likewise (2D); router, its bias
    and the shared gate in the model's dtype (DeepSeek's router fp32)."""
    want = torch.int8 if quantize == "int8" else torch.uint8
    for name in ("gate_up", "down"):
        w, scale = tensors.get(f"moe.{name}"), tensors.get(f"moe.{name}_scale")
        if w is not None:         # (the disk tier's ring unit holds no routed experts)
            assert w.dtype == want and w.dim() == 3 and scale.dtype == torch.float32
            assert scale.shape == (w.shape[:2] if quantize == "int8" else (*w.shape[:2], 2 * w.shape[2] // 16))
        if f"shared.{name}.weight" in tensors:
            assert tensors[f"shared.{name}.weight"].dtype == want and f"shared.{name}.scale" in tensors
    assert tensors["moe.router"].dtype in (dtype, torch.float32)
    for key in ("moe.router_bias", "shared_gate.weight"):
        assert key not in tensors or tensors[key].dtype in (dtype, torch.float32)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_moe_quantised_offload_matches_fake_quantised_hf(family, quantize, tier, tmp_path, monkeypatch):
    """quantize="int8" / "int4" with offload under a streaming budget: the units hold the experts (and the shared
    expert) quantised, the router as it is (host tier: the whole sparse MLP half; disk tier: each routed expert a
    unit of its own, read when routed to); the streamed layers use them in place (no quantisation after the build).
    fp32 logits and greedy tokens as HF's over the same quantise-dequantised weights."""
    from helpers import assert_fp32_matches_quantised, streamed_copy

    hf = tiny_model(family)
    ref = _fake_quantised(hf, quantize)
    opt = streamed_copy(hf, tier, tmp_path, quantize=quantize, **QUANTISED[quantize])
    decoder = opt._dsinfer_engine.decoder
    streamer, pool = decoder.streamer, decoder.experts
    assert (pool is not None) == (tier == "nvme")
    mlp_units = [u for u, layout in enumerate(streamer.layouts) if any(e.name == "moe.router" for e in layout.entries)]
    if pool is None:
        assert set(mlp_units) & set(streamer.order) - set(streamer.resident), "no sparse MLP unit is streamed"
    else:        # (the ring units without their experts are small: the leftover budget may keep them all)
        assert pool.n_slots < sum(len(us) for us in pool.units.values()), "every expert is kept"
    for u in mlp_units:
        layout = streamer.layouts[u]
        _assert_quantised_mlp_unit(layout.views(torch.empty(layout.nbytes, dtype=torch.uint8)), quantize)
    if pool is not None:
        expert = pool.layouts[pool.units[min(pool.units)][0]]
        unit = expert.views(torch.empty(expert.nbytes, dtype=torch.uint8))
        assert unit["gate_up"].dtype == unit["down"].dtype == (torch.int8 if quantize == "int8" else torch.uint8)
        assert unit["gate_up_scale"].dtype == torch.float32 and unit["down_scale"].shape[0] == unit["down"].shape[0]
    _no_requantising(monkeypatch)
    assert_fp32_matches_quantised(ref, opt)


@pytest.mark.parametrize("family", MOE)
def test_moe_int8_on_cpu_matches_fake_quantised_hf(family):
    """quantize="int8" on the CPU: attention linears, each expert's gate|up and down and the shared expert int8 with
    per-row scales (router and shared gate as they are): fp32 logits and greedy tokens as HF's over the same
    quantise-dequantised weights; bf16 (the int8 CPU kernels) within 2% of the logits' scale of HF bf16 over them,
    where HF's routing has no near tie (checked)."""
    from helpers import fake_quantised_int8

    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64, quantize="int8")
    moe = next(layer.mlp for layer in opt._dsinfer_engine.decoder.layers if type(layer.mlp).__name__ == "MoEMLP")
    assert moe.cpu_experts[0][0].layout.startswith("int8") and moe.experts_gate_up is None
    assert_matches_hf(fake_quantised_int8(hf), opt, *padded_batch([12, 5, 9]))
    hf16 = hf.to(torch.bfloat16)
    bf, want = optimised_copy(hf16, max_seq_len=64, quantize="int8"), fake_quantised_int8(hf16)
    ids, mask = padded_batch([8, 5], seed=3)          # a batch without near ties in these quantised routers
    assert routing_margins(want, input_ids=ids, attention_mask=mask)[:, mask.flatten().bool()].min() >= 2e-3
    with torch.no_grad():
        ref = want(input_ids=ids, attention_mask=mask).logits.float()
    got = bf(input_ids=ids, attention_mask=mask).logits.float()
    err = (got[mask.bool()] - ref[mask.bool()]).abs().amax(-1) / ref[mask.bool()].abs().max()
    assert err.max() <= 0.02, err


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_moe_tensor_parallel_matches_hf(quantize, shared_runs):
    """TP=2 by expert slicing (each expert's intermediate split, the router whole, one all-reduce per sparse layer;
    qwen2_moe's shared expert sliced the same way): fp32 logits, greedy and beam search vs the single-process HF
    model (int8: HF over the same quantise-dequantised weights, the sliced downs' scales from their whole rows),
    sampling agrees across ranks."""
    _check_tp(shared_runs, f"test_moe_tensor_parallel_matches_hf[{quantize}]")


@pytest.mark.parametrize("variant", ["memory", "int8", "checkpoint_nvme"])
def test_moe_expert_parallel_matches_hf(variant, shared_runs):
    """expert_parallel_size = tensor_parallel_size = 2: each rank holds half of the experts whole (mixtral 4,
    qwen2_moe 6 with its shared expert sliced, qwen3_moe 8), runs them on the tokens routed to them, the layer's
    all-reduce sums the ranks: fp32 logits, greedy and beam search as HF's, sampling agrees across ranks; with int8
    weights (HF over the same quantise-dequantised weights); and from per-expert checkpoints on meta (each rank reads
    only its experts) on the disk tier."""
    _check_tp(shared_runs, f"test_moe_expert_parallel_matches_hf[{variant}]")


def test_expert_parallel_errors():
    """Before any work: expert_parallel_size other than 1 or the TP size; experts the group does not divide; a dense
    model."""
    with pytest.raises(ValueError, match="expert_parallel_size=2 must be 1 .* or tensor_parallel_size=4"):
        dsi.init_inference(tiny_model("mixtral"), tensor_parallel_size=4, expert_parallel_size=2)
    from lightning_dsinfer.engine import InferenceEngine
    from lightning_dsinfer.config import InferenceConfig

    class OneRank:      # a 3-rank group's rank 0 (the check runs before any collective)
        rank, size = 0, 3

    with pytest.raises(ValueError, match="expert_parallel_size=3 does not divide the 4 experts of mixtral"):
        InferenceEngine(tiny_model("mixtral"), InferenceConfig(tensor_parallel_size=3, expert_parallel_size=3),
                        comm=OneRank())
    with pytest.raises(ValueError, match="model_type='llama' has no experts"):
        InferenceEngine(tiny_model("llama"), InferenceConfig(tensor_parallel_size=3, expert_parallel_size=3),
                        comm=OneRank())
    from helpers import GENERIC_FAMILIES     # a family without a policy: the generic TP path cannot place experts
    assert "cohere_compass_text" in GENERIC_FAMILIES
    with pytest.raises(NotImplementedError, match="expert_parallel_size=2 needs a fused MoE policy"):
        dsi.init_inference(tiny_model("cohere_compass_text"), tensor_parallel_size=2, expert_parallel_size=2)


def test_packed_phi3_linears_count_as_int8_in_the_fit_check():
    """The size the fit check and offload="auto" use: Phi-3's packed qkv_proj / gate_up_proj are block linears, so
    with quantize="int8" they count a byte per weight, like Llama's unpacked ones."""
    from lightning_dsinfer.engine import _weight_bytes

    for family in ("llama", "phi3"):
        hf = tiny_model(family)
        full, int8 = _weight_bytes(hf, torch.bfloat16, None), _weight_bytes(hf, torch.bfloat16, "int8")
        linear = sum(p.numel() for n, p in hf.named_parameters() if "layers" in n and p.dim() == 2)
        assert full - int8 >= linear - 4 * 1024, (family, full, int8, linear)


def test_moe_tensor_parallel_size_must_divide_the_experts():
    from lightning_dsinfer.builder import _shard_moe
    from lightning_dsinfer.parallel import TensorShardPlan
    from lightning_dsinfer.policies import find_policy

    hf = tiny_model("qwen3_moe")                  # experts' intermediate 40
    weights = find_policy(hf)(hf, 64)
    plan = TensorShardPlan(0, 4, 4, 2, 32, 96, 97)   # 4 heads, 2 KV heads (replicated), dense intermediate 96: fine
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the experts' intermediate size 40"):
        _shard_moe(weights.layers[1].moe, TensorShardPlan(0, 3, 3, 3, 32, 96, 97), torch.float32)
    assert _shard_moe(weights.layers[1].moe, plan, torch.float32)["moe.gate_up"].shape == (8, 20, 64)


@pytest.mark.parametrize("family", MOE)
def test_moe_meta_model_from_checkpoint(family, tmp_path):
    """A meta model loaded from what save_pretrained writes: the experts one by one (Mixtral: w1 / w3 / w2 under
    block_sparse_moe; Qwen: gate_proj / up_proj / down_proj), stacked on read into the 3D layout."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hf = tiny_model(family)
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("gate_up_proj") for k in f.keys())        # the per-expert format, not ours
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf.config)
    opt = dsi.init_inference(meta, checkpoint=str(tmp_path), max_seq_len=48)
    assert_matches_hf(hf, opt, *padded_batch([9, 4], seed=2))


def test_moe_tensor_parallel_from_checkpoint(shared_runs):
    """TP=2 from per-expert checkpoints on meta: each rank reads its rows of each expert's parts."""
    _check_tp(shared_runs, "test_moe_tensor_parallel_from_checkpoint")


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_offload_matches_hf(family, tier, tmp_path):
    """Offloaded MoE under a budget that streams most units (host tier: a sparse layer's router, experts and shared
    expert stream as its MLP unit; disk tier: the experts apart, read when routed to): fp32 logits and greedy tokens
    as HF's, on both tiers."""
    from helpers import streaming_budget

    hf = tiny_model(family)

    def build(max_memory, folder=tmp_path / "units"):
        return optimised_copy(hf, max_seq_len=64, offload=tier, offload_path=str(folder), max_memory=max_memory,
                              max_batch_size=4)
    budget = streaming_budget(lambda mm: build(mm, tmp_path / "plan"))
    opt = build(budget)
    streamer = opt._dsinfer_engine.decoder.streamer
    pool = opt._dsinfer_engine.decoder.experts
    assert (pool is not None) == (tier == "nvme")
    if pool is None:
        moe_units = [u for u in streamer.order if any(e.name == "moe.gate_up" for e in streamer.layouts[u].entries)]
        assert moe_units and len(set(moe_units) - set(streamer.resident)) >= 1, "no MoE unit is streamed"
    else:        # (the ring units without their experts are small: the leftover budget may keep them all)
        assert pool.n_slots < sum(len(us) for us in pool.units.values()), "every expert is kept"
    assert_matches_hf(hf, opt, *padded_batch([12, 5, 9]))


def test_moe_offload_from_checkpoint_tensor_parallel(shared_runs):
    """TP=2, disk tier, meta models loaded from per-expert checkpoints: each rank writes and streams its expert
    slices; logits, greedy, beam as HF's."""
    _check_tp(shared_runs, "test_moe_offload_from_checkpoint_tensor_parallel")


ON_DEMAND = ["mixtral", "qwen2_moe", "deepseek_v3"]


@pytest.mark.parametrize("family,quantize", [(f, None) for f in ON_DEMAND] + [
    (f, q) for f in ("mixtral", "deepseek_v3") for q in QUANTISED])
def test_moe_disk_tier_reads_only_the_routed_experts(family, quantize, tmp_path, monkeypatch):
    """Disk tier, CPU: a sparse layer's ring unit holds its router (DeepSeek's correction bias) and shared expert, each
    routed expert is a unit of its own read when routed to, into a pool of top-k slots (prefill: all experts, in
    groups of top-k). fp32 logits and greedy tokens as HF's on a left-padded batch; then in each decode step (batch 1)
    each sparse layer reads exactly the experts its router picked that the pool did not hold, and a step reads fewer
    bytes than one reading every expert (the MLP half whole, as before). int8 / int4: the same against the
    fake-quantised HF, each expert's unit holding its quantised rows and scales only (what a read of it covers)."""
    from helpers import streamed_copy

    from lightning_dsinfer.offload.layout import PAGE, round_up

    hf = tiny_model(family)
    opt = streamed_copy(hf, "nvme", tmp_path, **({} if quantize is None else dict(quantize=quantize,
                                                                                 **QUANTISED[quantize])))
    hf = hf if quantize is None else _fake_quantised(hf, quantize)
    decoder = opt._dsinfer_engine.decoder
    pool, streamer = decoder.experts, decoder.streamer
    assert pool is not None and pool.n_slots < sum(len(us) for us in pool.units.values())
    assert not any(e.name == "moe.gate_up" for u in streamer.order for e in streamer.layouts[u].entries)
    if quantize is not None:      # an expert's bytes: int8 a byte a weight + an fp32 scale a row; int4 half a byte
        for u in (u for us in pool.units.values() for u in us):       # + an fp32 scale per row and group of 16
            entries = {e.name: e for e in pool.layouts[u].entries}
            (n2, k), (n, i) = entries["gate_up"].shape, entries["down"].shape
            k, i = (2 * k, 2 * i) if quantize == "int4" else (k, i)        # (int4: two weights a byte)
            weights = n2 * k + n * i
            want = weights + 4 * (n2 + n) if quantize == "int8" else weights // 2 + 4 * weights // 16
            assert sorted(entries) == ["down", "down_scale", "gate_up", "gate_up_scale"]
            assert sum(e.nbytes for e in entries.values()) == want
            assert k == hf.config.hidden_size and n2 == 2 * i
            assert streamer.store.stored_bytes(u) <= sum(round_up(e.nbytes, PAGE) for e in entries.values())
    assert_matches_hf(hf, opt, *padded_batch([12, 5, 9]))

    store, real_topk, real_read = streamer.store, reference.moe_topk, streamer.store.read
    calls, reads = [], []            # per router call: (expert ids [T, k], units held before, reads so far)

    def topk(*args, **kw):
        w, ids = real_topk(*args, **kw)
        calls.append((ids.clone(), set(pool.held), len(reads)))
        return w, ids

    def read(unit, buffer, threads):
        if unit in pool.layer_of:
            reads.append(unit)
        return real_read(unit, buffer, threads)

    monkeypatch.setattr(reference, "moe_topk", topk)
    monkeypatch.setattr(store, "read", read)
    new = 4
    ids = torch.randint(0, hf.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert torch.equal(opt.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False), want)
    sparse = sorted(pool.units)
    assert len(calls) == new * len(sparse)                  # the prompt, then one decode step per new token
    per_step = []
    for j, (routed, held, first) in enumerate(calls):
        last = calls[j + 1][2] if j + 1 < len(calls) else len(reads)
        units = pool.units[sparse[j % len(sparse)]]
        picked = {units[e] for e in routed.reshape(-1).tolist()}
        if j >= len(sparse):                                # a decode step: one row
            assert routed.shape[0] == 1
            assert sorted(reads[first:last]) == sorted(picked - held), (j, reads[first:last], picked, held)
            per_step.append(sum(store.stored_bytes(u) for u in reads[first:last]))
    every = sum(store.stored_bytes(u) for us in pool.units.values() for u in us)
    top_k = max(len(c[0][0]) for c in calls)
    steps = [sum(per_step[i:i + len(sparse)]) for i in range(0, len(per_step), len(sparse))]
    # (0: the pool held them; an expert's read: its frames, each rounded up to a page)
    most = max(store.stored_bytes(u) for us in pool.units.values() for u in us)
    assert all(s <= top_k * len(sparse) * most for s in steps), steps
    assert max(steps) < every, (steps, every)


class _ExpertStore:
    """A store in memory of one unit per expert (``gate_up[e]``, ``down[e]``): a read packs the unit into the slot at
    once, counted in ``reads``; while ``refuse`` holds entries, a read raises instead (one entry per refusal)."""

    def __init__(self, gate_up, down):
        from lightning_dsinfer.offload import UnitLayout

        self.gate_up, self.down = gate_up, down
        self.layouts = [UnitLayout.of({"gate_up": g, "down": d}) for g, d in zip(gate_up, down)]
        self.reads, self.refuse = 0, []

    def read(self, unit, buffer, threads):
        from concurrent.futures import Future

        if self.refuse:
            self.refuse.pop()
            raise OSError("cannot queue the read")
        self.reads += 1
        self.layouts[unit].pack({"gate_up": self.gate_up[unit], "down": self.down[unit]}, buffer)
        done = Future()
        done.set_result(None)
        return [done]

    def stored_bytes(self, unit):
        return self.layouts[unit].nbytes


def test_expert_pool_groups_and_cache_match_the_reference():
    """ExpertPool over a store in memory: experts hit by many rows run in groups of the pool's slots (1, 2, 5 slots
    for 5 experts): the sum is the reference's bit for bit; a second call with the same routing reads nothing when
    the pool holds every expert hit."""
    from lightning_dsinfer.offload.experts import ExpertPool

    torch.manual_seed(0)
    e, h, inter, t, k = 5, 16, 12, 9, 2
    gate_up, down = torch.randn(e, 2 * inter, h), torch.randn(e, h, inter)
    x, router = torch.randn(t, h), torch.randn(e, h)
    w, ids = reference.moe_topk(x, router, k)
    want = reference.moe_mlp(x, router, gate_up, down, k)
    for slots in (1, 2, 5):
        store = _ExpertStore(gate_up, down)
        pool = ExpertPool(store, store.layouts, {0: list(range(e))}, slots, layers=1)
        experts = pool.layer(0)
        experts.prefetch(ids)
        torch.testing.assert_close(experts.run(x, w, ids), want, atol=0, rtol=0)
        hit, before = len(torch.unique(ids)), store.reads
        experts.run(x, w, ids)
        if slots >= hit:
            assert store.reads == before, slots         # every expert hit stayed in its slot
        elif slots == 1:
            assert store.reads - before == hit          # one slot: each expert read again in turn
        pool.close()


def test_moe_disk_tier_budget_counts_the_expert_slots(tmp_path):
    """max_memory counts the routed experts' slots: a budget with room for the ring and the batch but not for a
    token's top-k experts is refused before work, naming the numbers."""
    hf = tiny_model("mixtral")

    def build(max_memory, sub):
        return optimised_copy(hf, max_seq_len=64, offload="nvme", offload_path=str(tmp_path / sub),
                              max_memory=max_memory, max_batch_size=4)
    ws = build(256 << 20, "plan")._dsinfer_engine.working_set
    assert ws.expert_slots == 2 and ws.expert_slot_bytes > 0
    least = ws.slot_bytes + 4 * ws.per_sequence_bytes + 16 * ws.per_token_bytes + ws.staging_bytes
    with pytest.raises(ValueError, match=r"\+ 2 x 72 KiB for the routed experts .* = .*Raise max_memory"):
        build(least + ws.expert_slot_bytes, "small")
    assert build(least + 2 * ws.expert_slot_bytes, "fits")._dsinfer_engine.working_set.expert_slots == 2


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_moe_disk_tier_tensor_parallel_with_experts_on_demand(quantize, shared_runs):
    """TP=2 on the disk tier from memory, the routed experts read on demand (each rank reads its slice of the experts
    its router picks; the ranks route alike): logits, greedy, beam as HF's (int8: the fake-quantised HF's, the experts'
    downs with whole-row scales) for mixtral / qwen2_moe / deepseek_v3."""
    _check_tp(shared_runs, f"test_moe_disk_tier_tensor_parallel_with_experts_on_demand[{quantize}]", ON_DEMAND)


def test_expert_pool_read_that_cannot_be_queued_holds_nothing():
    """A read the store refuses to queue (it raises in ``read``) leaves its expert not held and the slot it was given
    free: the next call reads the expert again and sums the right weights (it was taken for held, and the slot's old
    expert ran in its place)."""
    from lightning_dsinfer.offload.experts import ExpertPool

    torch.manual_seed(0)
    e, h, inter = 4, 8, 6
    gate_up, down = torch.randn(e, 2 * inter, h), torch.randn(e, h, inter)
    store = _ExpertStore(gate_up, down)

    def want(x, w, ids):
        return reference.moe_experts(x, w, ids, lambda i, rows: torch.nn.functional.linear(reference.silu_and_mul(
            torch.nn.functional.linear(rows, gate_up[i])), down[i]))

    pool = ExpertPool(store, store.layouts, {0: list(range(e))}, 2, layers=1)
    experts = pool.layer(0)
    x, w = torch.randn(1, h), torch.tensor([[0.75, 0.25]])
    first, second = torch.tensor([[0, 1]]), torch.tensor([[2, 3]])
    experts.prefetch(first)
    torch.testing.assert_close(experts.run(x, w, first), want(x, w, first), atol=0, rtol=0)
    store.refuse.append(True)
    with pytest.raises(OSError, match="cannot queue"):
        experts.prefetch(second)
    assert 2 not in pool.held and sorted(pool.owner, key=str) == [1, None]
    torch.testing.assert_close(experts.run(x, w, second), want(x, w, second), atol=0, rtol=0)
    pool.close()

