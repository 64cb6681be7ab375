"""Weight-only int4, group-wise (``quantize="int4"``): the CPU int4 kernel and dequantisation against
``reference``, and the engine against the unmodified Hugging Face model whose block linears were replaced by the
same quantise-dequantise (``helpers.fake_quantised_int4``), so the only difference left is float rounding: fp32
logits atol 2e-4 / rtol 1e-4 and greedy tokens identical; bf16 logits within the bf16 tolerance of
tests/test_cpu_gemv.py; the one-call C decode step bit-identical to the per-op path.

Quantisation is per output row and group of inputs, symmetric (``reference.quantize_int4_groupwise``); the fused QKV
and gate/up rows are the rows of q, k, v, gate and up, so quantising HF's separate linears row by row gives the same
weights. The tiny models' K are 64 and 96 (48 per rank with two ranks), so the engine tests use groups of 32 (16).
"""
import copy
from types import SimpleNamespace

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (FAMILIES, assert_fp32_matches_quantised, fake_quantised_int4, optimised_copy, padded_batch,
                     quantised_logits_and_reference, streaming_budget, tiny_model)
from lightning_dsinfer.builder import check_int4_groups
from lightning_dsinfer.kernels import cpu_gemv, reference
from lightning_dsinfer.modules.cpu_stack import CpuDecodeStack
from lightning_dsinfer.parallel import TensorShardPlan
from stack_checks import assert_quantised_decode_steps, run_both_paths

ATOL, RTOL = 1e-3, 2.0 ** -8            # the bf16 kernels' tolerance against fp32 (see test_cpu_gemv.py)
GROUP = 32                              # divides the tiny models' K (64, 96)
needs_int4 = pytest.mark.skipif(not cpu_gemv.has_int4(), reason="no C library or no AVX512: dequantised F.linear")
needs_amx = pytest.mark.skipif(not cpu_gemv.has_amx(), reason="CPU has no AMX-BF16 (or no tile permission)")
# The int4 kernel's paths on this CPU: AVX512-BF16 dot products, and the AVX512F fp32 path.
INT4_PATHS = [p for p in ("avx512_bf16", "avx512") if p in cpu_gemv.supported_isas()]


def _quantised(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    packed, scale = reference.quantize_int4_groupwise(torch.randn(n, k, generator=g) * 0.05, group)
    return packed, scale, g


@needs_int4
@pytest.mark.parametrize("path", INT4_PATHS)
@pytest.mark.parametrize("n,k,group", [(1, 128, 128), (37, 96, 32), (130, 384, 128), (33, 1024, 256), (5, 48, 16),
                                       (7, 40, 8), (65, 192, 64), (260, 2816, 128)])
def test_int4_kernel_matches_fp32(n, k, group, path):
    """Odd N, K multiples of the group but not of the kernel's 128-input chunk (96, 40, 48, 192, 2816), every group
    size the kernel takes, rows 1..64 (blocks of 4 rows of x and a remainder), with and without bias / residual."""
    packed, scale, g = _quantised(n, k, group, n * k + group)
    want_w = reference.dequantize_int4(packed, scale, group)
    for m in (1, 3, 4, 7, 33, 64):
        x = torch.randn(m, k, generator=g).bfloat16()
        bias, res = torch.randn(n, generator=g).bfloat16(), torch.randn(m, n, generator=g).bfloat16()
        for b, r in ((None, None), (bias, None), (bias, res), (None, res)):
            y = cpu_gemv.linear_int4(x, packed, scale, group, b, r, isa=path)
            want = x.float() @ want_w.t() + (b.float() if b is not None else 0) + (r.float() if r is not None else 0)
            torch.testing.assert_close(y.float(), want, atol=ATOL, rtol=RTOL)


@needs_int4
@pytest.mark.parametrize("path", INT4_PATHS)
def test_int4_kernel_exact_on_integers_and_strided_views(path):
    """Integer x against scales of 1: the sums are exact, so the result is their bf16 rounding; a weight that is a
    view with a row stride (an offloaded unit's slice) and x rows with a stride (copied) give the same."""
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (70, 128), generator=g, dtype=torch.uint8)          # K = 256
    scale = torch.ones(70, 2)
    x = torch.randint(-1, 2, (5, 256), generator=g).bfloat16()
    want = (x.float() @ reference.dequantize_int4(packed, scale, 128).t()).bfloat16()
    assert torch.equal(cpu_gemv.linear_int4(x, packed, scale, 128, isa=path), want)
    big = torch.randint(0, 256, (70, 200), generator=g, dtype=torch.uint8)
    big[:, 40:168] = packed
    view = big[:, 40:168]                                                            # row stride 200 bytes
    assert torch.equal(cpu_gemv.linear_int4(x, view, scale, 128, isa=path), want)
    xs = torch.zeros(5, 512).bfloat16()
    xs[:, ::2] = x
    assert torch.equal(cpu_gemv.linear_int4(xs[:, ::2], packed, scale, 128, isa=path), want)


@needs_amx
@pytest.mark.parametrize("n,k,group", [(1, 128, 128), (37, 256, 128), (130, 384, 128), (33, 1024, 256),
                                       (70, 2816, 128)])
def test_int4_amx_matches_fp32(n, k, group):
    """The AMX int4 path: tiles of bf16(q - 8) times the group's scale (the bf16 weights a dequantised GEMM multiplies),
    fp32 sums; odd N (a partial block of 32 rows), rows 1..70 (blocks of 16 and 32 rows of x and a remainder)."""
    packed, scale, g = _quantised(n, k, group, n + k)
    want_w = reference.dequantize_int4(packed, scale, group).bfloat16().float()
    for m in (1, 3, 16, 17, 32, 33, 70):
        x = torch.randn(m, k, generator=g).bfloat16()
        bias, res = torch.randn(n, generator=g).bfloat16(), torch.randn(m, n, generator=g).bfloat16()
        for b, r in ((None, None), (bias, res)):
            y = cpu_gemv.linear_int4_amx(x, packed, scale, group, b, r)
            want = x.float() @ want_w.t() + (b.float() if b is not None else 0) + (r.float() if r is not None else 0)
            torch.testing.assert_close(y.float(), want, atol=ATOL, rtol=RTOL)
    view = torch.zeros(n, k // 2 + 32, dtype=torch.uint8)                 # a view with a row stride
    view[:, 16:16 + k // 2] = packed
    x = torch.randn(5, k, generator=g).bfloat16()
    assert torch.equal(cpu_gemv.linear_int4_amx(x, view[:, 16:16 + k // 2], scale, group),
                       cpu_gemv.linear_int4_amx(x, packed, scale, group))


@needs_int4
@pytest.mark.parametrize("n,k,group", [(37, 96, 32), (5, 40, 8), (9, 48, 16), (130, 384, 128), (3, 512, 256)])
def test_int4_dequantise_is_the_reference(n, k, group):
    """The prompt path's C dequantisation: fp32 values exactly reference.dequantize_int4's, bf16 their rounding."""
    packed, scale, _ = _quantised(n, k, group, 7)
    want = reference.dequantize_int4(packed, scale, group)
    assert torch.equal(cpu_gemv.dequantize_int4(packed, scale, group, torch.float32), want)
    assert torch.equal(cpu_gemv.dequantize_int4(packed, scale, group), want.bfloat16())
    out = torch.empty(n, k, dtype=torch.bfloat16)
    cpu_gemv.dequantize_int4(packed[:, :], scale, group, out=out)
    assert torch.equal(out, want.bfloat16())


@needs_int4
def test_int4_kernel_refuses_groups_it_does_not_take():
    packed, scale, _ = _quantised(4, 96, 48, 1)
    with pytest.raises(ValueError, match="group_size=48"):
        cpu_gemv.linear_int4(torch.zeros(1, 96).bfloat16(), packed, scale, 48)


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_neox"])
def test_int4_engine_fp32_matches_fake_quantised_hf(family):
    """fp32 rows multiply the weights dequantised to fp32 (in C, a chunk of rows at a time): HF's fake-quantised
    weights exactly."""
    hf = tiny_model(family)
    ref = fake_quantised_int4(hf, GROUP)
    opt = optimised_copy(hf, max_seq_len=48, quantize="int4", quantize_group_size=GROUP)
    layer = opt._dsinfer_engine.decoder.layers[0]
    assert layer.attn.qkv.layout == "int4" and layer.attn.qkv.weight.dtype == torch.uint8
    assert layer.mlp.down.scale.shape == (layer.mlp.down.out_features, layer.mlp.down.in_features // GROUP)
    assert opt._dsinfer_engine.decoder.lm_head.layout != "int4"              # the lm_head stays in dtype
    assert_fp32_matches_quantised(ref, opt)


# MoE families: groups of 16 divide every K (experts' intermediates 48 / 32, qwen2_moe's shared expert 80, DeepSeek's
# heads' v rows 48); all-experts routing for bf16 (top-k = all: no near tie of the router flips an expert between
# the two bf16 runs, so what is compared is the arithmetic)
MOE_INT4 = {"mixtral": dict(num_experts_per_tok=4), "qwen2_moe": dict(num_experts_per_tok=6),
            "deepseek_v3": dict(num_experts_per_tok=8, topk_group=4), "gpt_oss": dict(num_experts_per_tok=4)}
MOE_GROUP = 16


@pytest.mark.parametrize("family", list(MOE_INT4))
def test_int4_moe_fp32_matches_fake_quantised_hf(family):
    """Mixture of experts on the CPU: each expert's gate|up and down an int4 Linear (a scale per row and group; gpt-oss
    with its expert biases as they are), the shared experts int4 like a dense MLP, the attention linears int4; router
    and shared gate as they are: fp32 logits and greedy tokens as HF's over the same quantise-dequantised weights."""
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64, quantize="int4", quantize_group_size=MOE_GROUP)
    moe = next(layer.mlp for layer in opt._dsinfer_engine.decoder.layers if type(layer.mlp).__name__ == "MoEMLP")
    gate_up, down = moe.cpu_experts[0]
    assert gate_up.layout == down.layout == "int4" and moe.experts_gate_up is None
    assert down.scale.shape == (down.out_features, down.in_features // MOE_GROUP)
    assert moe.router.dtype != torch.uint8 and (moe.shared is None or moe.shared.gate_up.layout == "int4")
    assert_fp32_matches_quantised(fake_quantised_int4(hf, MOE_GROUP), opt)


@needs_int4
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_int4_moe_bf16_matches_fake_quantised_hf(family):
    """bf16 (the int4 CPU kernels), every expert routed: logits within the bf16 tolerance of HF bf16 over the same
    quantise-dequantised weights on a left-padded batch."""
    hf = tiny_model(family, **MOE_INT4[family]).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, quantize="int4", quantize_group_size=MOE_GROUP)
    ids, mask, want, _, got = quantised_logits_and_reference(fake_quantised_int4(hf, MOE_GROUP), opt)
    valid = mask.bool()
    torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=6e-2, rtol=2e-2)


@needs_int4
@pytest.mark.parametrize("family,path", [(f, INT4_PATHS[0]) for f in FAMILIES] + [("llama", p) for p in INT4_PATHS[1:]])
def test_int4_engine_bf16_matches_fake_quantised_hf_and_stack_is_bit_identical(family, path):
    hf = tiny_model(family).to(torch.bfloat16)
    ref = fake_quantised_int4(hf, GROUP)
    with cpu_gemv.use_path(path):
        opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, quantize="int4", quantize_group_size=GROUP)
        ids, mask, want, want_tokens, got = quantised_logits_and_reference(ref, opt)
        valid = mask.bool()
        torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=6e-2, rtol=2e-2)
        assert_quantised_decode_steps(ref, opt, ids, mask, want_tokens, "int4")


@needs_amx
def test_int4_engine_bf16_amx_path_and_stack_are_bit_identical():
    """Groups of 128 on an AMX machine (a model whose K are multiples of 128): prompts and decode steps of 3 or more
    rows through the AMX int4 path, 1-2 rows through the row kernel; logits within the bf16 tolerance of the
    fake-quantised HF's, and the one-call C decode step (which takes the same path for the same rows) bit-identical
    to the per-op path at 3 rows and at 1 row."""
    hf = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32).to(torch.bfloat16)
    ref = fake_quantised_int4(hf, 128)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, quantize="int4")
    qkv = opt._dsinfer_engine.decoder.layers[0].attn.qkv
    assert qkv.layout == "int4" and qkv.group_size == 128 and qkv.amx_rows == 3
    ids, mask, want, want_tokens, got = quantised_logits_and_reference(ref, opt)
    valid = mask.bool()
    torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=6e-2, rtol=2e-2)
    assert CpuDecodeStack.build(opt._dsinfer_engine.decoder) is not None
    for rows in ([12, 5, 9], [7]):
        ids, mask = padded_batch(rows)
        runs = run_both_paths(opt, ids, mask, new_tokens=5)
        (tok_s, hid_s, _, n_s), (tok_o, hid_o, _, n_o) = runs["stack"], runs["ops"]
        assert n_s == 4 and n_o == 0 and torch.equal(tok_s, tok_o)
        assert all(torch.equal(a, b) for a, b in zip(hid_s, hid_o))


def test_int4_reads_a_quarter_of_the_bytes():
    hf = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64).to(torch.bfloat16)
    plain = optimised_copy(hf, max_seq_len=32, dtype=torch.bfloat16)._dsinfer_engine.decoder
    int4 = optimised_copy(hf, max_seq_len=32, dtype=torch.bfloat16, quantize="int4")._dsinfer_engine.decoder
    blocks = [sum(lin.nbytes for lin in (ly.attn.qkv, ly.attn.o, ly.mlp.gate_up, ly.mlp.down)) for d in (plain, int4)
              for ly in d.layers[:1]]
    assert 0.26 < blocks[1] / blocks[0] < 0.28        # 4 bits + an fp32 scale per 128 weights (+ bf16 biases)
    assert int4.weight_bytes_per_token < plain.weight_bytes_per_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_int4_offload_matches_fake_quantised_hf(tier, dtype, tmp_path, monkeypatch):
    """int4 units in the offload tiers (packed weights + group scales, a quarter of bf16's bytes streamed): written
    quantised a few rows at a time, streamed and used in place; the prompt's GEMM over weights dequantised a chunk of
    rows at a time (chunks made small here so there are several), bf16 decode rows through the kernel. fp32: logits
    and greedy tokens as the fake-quantised HF's; bf16: logits within the bf16 tolerance, prompt and a decode step."""
    import lightning_dsinfer.modules.linear as linear

    monkeypatch.setattr(linear, "QUANTIZE_CHUNK_BYTES", 4 * 64 * 24)            # 24 rows of a 64-wide weight
    hf = tiny_model("llama").to(dtype)
    ref = fake_quantised_int4(hf, GROUP)

    def build(max_memory):
        return optimised_copy(hf, dtype=dtype, quantize="int4", quantize_group_size=GROUP, offload=tier,
                              offload_path=str(tmp_path / "off"), max_memory=max_memory, max_batch_size=3,
                              max_seq_len=48)

    opt = build(streaming_budget(build))
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_BYTES", 4 * 64 * 40)             # 40 rows of a 64-wide fp32 weight
    streamer = opt._dsinfer_engine.decoder.streamer
    mlp = streamer.layouts[1].views(torch.empty(streamer.layouts[1].nbytes, dtype=torch.uint8))
    assert mlp["gate_up.weight"].dtype == torch.uint8 and mlp["gate_up.scale"].shape == (192, 64 // GROUP)
    assert tier == "cpu" or len(streamer.order) >= 3                 # most units stream
    if dtype == torch.float32:
        assert_fp32_matches_quantised(ref, opt)
        return
    ids, mask, want, _, got = quantised_logits_and_reference(ref, opt)
    valid = mask.bool()
    torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=6e-2, rtol=2e-2)
    step = opt(input_ids=ids, attention_mask=mask, use_cache=True)
    nxt = step.logits[:, -1:].argmax(-1)
    full = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        want_next = ref(input_ids=torch.cat([ids, nxt], 1), attention_mask=full).logits[:, -1]
    cache = step.cache if getattr(step, "cache", None) is not None else step.past_key_values
    key = "cache" if getattr(step, "cache", None) is not None else "past_key_values"
    out = opt(input_ids=nxt, attention_mask=full, use_cache=True, **{key: cache})
    torch.testing.assert_close(out.logits[:, -1].float(), want_next.float(), atol=6e-2, rtol=2e-2)


def worker_runs(tmp, selected):
    """The TP=2 run, in the session's shared launch of two ranks (tests/conftest.py ``shared_runs``)."""
    return {2: {"test_int4_tensor_parallel_matches_fake_quantised_hf": [
        "tp_worker.py", "--tp", "2", "--families", "llama", "qwen3", "mixtral", "--quantize", "int4",
        "--quantize-group-size", "16"]}}


def test_int4_tensor_parallel_matches_fake_quantised_hf(shared_runs):
    """TP=2 with int4 (fp32), groups of 16 (the shards' K are 48): a row-parallel shard's groups are the whole rows'
    groups (its K a multiple of the group), so both ranks hold the int4 weights of one process with no collective:
    logits, greedy and beam search as the fake-quantised HF model's, sampling agrees across ranks. Mixtral by expert
    slicing (each expert's intermediate split: its down's K 48 per rank, the router whole)."""
    outs = shared_runs.outputs(2, "test_int4_tensor_parallel_matches_fake_quantised_hf")
    assert outs[0].count(" OK") == 3, outs[0]


def test_int4_errors_before_work():
    hf = tiny_model("llama")
    with pytest.raises(ValueError, match=r"qkv projection's K \(input dims\) is 64, not a multiple of 128.*"
                                         r"quantize_group_size=32"):
        dsi.init_inference(copy.deepcopy(hf), quantize="int4")
    with pytest.raises(ValueError, match=r"quantize_group_size=48 must be 8, 16, 32, 64 or a multiple of 128"):
        dsi.init_inference(copy.deepcopy(hf), quantize="int4", quantize_group_size=48)
    moe = tiny_model("qwen2_moe")
    with pytest.raises(ValueError, match=r"the experts' down projection's K \(input dims\) is 48, not a multiple of "
                                         r"32 \(experts' down: 48, shared expert's down: 80\).*quantize_group_size=16"):
        dsi.init_inference(moe, quantize="int4", quantize_group_size=GROUP)
    assert all(p.device.type == "cpu" for p in (*hf.parameters(), *moe.parameters()))     # refused before any work


def test_int4_groups_per_rank_are_checked():
    """Tensor parallelism: the row-parallel shards' K (o: this rank's heads, down: its intermediate columns) must be
    multiples of the group, so their boundaries fall on the whole rows' group boundaries (pure check, fake ranks)."""
    w = SimpleNamespace(hidden_size=256, head_dim=32, num_heads=8, num_kv_heads=4, intermediate_size=384, mla=None)
    for rank in range(2):
        plan = TensorShardPlan(rank, 2, 8, 4, 32, 384, 1000)
        check_int4_groups(w, plan, 64)                                  # o: 128, down: 192 per rank
        with pytest.raises(ValueError, match=r"the down projection's K \(input dims on each of the 2 tensor-parallel "
                                             r"ranks\) is 192, not a multiple of 128.*quantize_group_size=64"):
            check_int4_groups(w, plan, 128)

    # MoE layers: the experts' down K is each expert's slice (expert slicing) or the whole expert (expert
    # parallelism), the shared expert's down K its slice
    def sparse(expert_parallel):
        from lightning_dsinfer.policies.base import MoEWeights

        shape = SimpleNamespace
        moe = MoEWeights(router=None, gate_up=shape(shape=(4, 2 * 192, 256)), down=None, top_k=2, renormalize=True,
                         weights_in_dtype=False, shared_gate=shape(shape=(256, 256)), shared_up=shape(shape=(256, 256)),
                         expert_parallel=expert_parallel)
        return SimpleNamespace(**vars(w), layers=[SimpleNamespace(moe=moe)])

    plan = TensorShardPlan(1, 2, 8, 4, 32, 384, 1000)
    check_int4_groups(sparse(True), plan, 64)                           # whole experts: 192, shared: 128
    with pytest.raises(ValueError, match=r"the experts' down projection's K \(input dims on each of the 2 "
                                         r"tensor-parallel ranks\) is 96, not a multiple of 64.*quantize_group_size=32"):
        check_int4_groups(sparse(False), plan, 64)                      # sliced experts: 96
