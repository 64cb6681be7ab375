"""Weight-only int8 (``quantize="int8"``): the CPU int8 kernel against an fp32 reference, and the engine against the
unmodified Hugging Face model whose linear weights were replaced by the same quantise-dequantise (so the only
difference left is float rounding): fp32 logits atol 2e-4 / rtol 1e-4 and greedy tokens identical; bf16 logits
within the bf16 tolerance of tests/test_cpu_gemv.py (see the bf16 test for its tokens); the one-call C decode
step bit-identical to the per-op path.

Quantisation is per output row, symmetric (``reference.quantize_int8_per_channel``); the fused QKV and gate/up rows
are the rows of q, k, v, gate and up, so quantising HF's separate linears row by row gives the same weights.
"""
import copy
import os

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (FAMILIES, assert_fp32_matches_quantised, fake_quantised_int8, optimised_copy,
                     quantised_logits_and_reference, streaming_budget, tiny_model)
from lightning_dsinfer.kernels import cpu_gemv, reference
from multiproc import run_ranks
from stack_checks import assert_quantised_decode_steps

ATOL, RTOL = 1e-3, 2.0 ** -8            # the bf16 kernels' tolerance against fp32 (see test_cpu_gemv.py)
needs_int8 = pytest.mark.skipif(not cpu_gemv.has_int8(), reason="no C library or no AVX512: dequantised F.linear")
needs_amx = pytest.mark.skipif(not cpu_gemv.has_amx(), reason="CPU has no AMX-BF16 (or no tile permission)")
# The engine's int8 paths on this CPU: AMX int8 tiles, and the row-major kernel (+ dequantised GEMM for prompts).
INT8_PATHS = [p for p in ("amx_bf16", "avx512") if p in cpu_gemv.supported_isas()]


@needs_int8
@pytest.mark.parametrize("m", [1, 3, 4, 7, 33])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 70), (130, 96), (33, 1000), (260, 2816)])
def test_int8_kernel_matches_fp32(m, n, k):
    g = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=g) * 0.05
    q, s = reference.quantize_int8_per_channel(w)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias, res = torch.randn(n, generator=g).bfloat16(), torch.randn(m, n, generator=g).bfloat16()
    for b, r in ((None, None), (bias, None), (bias, res), (None, res)):
        y = cpu_gemv.linear_int8(x, q, s, b, r)
        want = x.float() @ reference.dequantize_int8(q, s).t()
        want = want + (b.float() if b is not None else 0) + (r.float() if r is not None else 0)
        torch.testing.assert_close(y.float(), want, atol=ATOL, rtol=RTOL)


@needs_amx
@pytest.mark.parametrize("m", [1, 5, 16, 17, 33, 300])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 70), (130, 96), (33, 1000), (64, 2816)])
def test_amx_int8_kernel_matches_fp32(m, n, k):
    g = torch.Generator().manual_seed(n * k + m)
    q, s = reference.quantize_int8_per_channel(torch.randn(n, k, generator=g) * 0.05)
    packed = cpu_gemv.pack_int8(q)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias, res = torch.randn(n, generator=g).bfloat16(), torch.randn(m, n, generator=g).bfloat16()
    for b, r in ((None, None), (bias, res)):
        y = cpu_gemv.linear_packed_int8(x, packed, s, n, k, b, r)
        want = x.float() @ reference.dequantize_int8(q, s).t()
        want = want + (b.float() if b is not None else 0) + (r.float() if r is not None else 0)
        torch.testing.assert_close(y.float(), want, atol=ATOL, rtol=RTOL)
    ints = torch.randint(-1, 2, (m, k), generator=g).bfloat16()           # integer sums: exact
    qi = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    got = cpu_gemv.linear_packed_int8(ints, cpu_gemv.pack_int8(qi), torch.ones(n), n, k)
    if k <= 200:
        assert torch.equal(got.float(), ints.float() @ qi.float().t())


@needs_int8
def test_int8_kernel_exact_on_integers_and_strided_views():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (70, 200), generator=g, dtype=torch.int8)
    s = torch.ones(70)
    x = torch.randint(-1, 2, (5, 200), generator=g).bfloat16()
    assert torch.equal(cpu_gemv.linear_int8(x, q, s).float(), x.float() @ q.float().t())
    big = torch.randint(-1, 2, (70, 300), generator=g, dtype=torch.int8)      # a [70, 200] view, row stride 300
    view = big[:, 50:250]
    assert torch.equal(cpu_gemv.linear_int8(x, view, s).float(), x.float() @ view.float().t())
    xs = torch.randint(-1, 2, (5, 400), generator=g).bfloat16()[:, ::2]      # x rows with a stride: copied
    assert torch.equal(cpu_gemv.linear_int8(xs, q, s).float(), xs.float() @ q.float().t())


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_engine_fp32_matches_fake_quantised_hf(family):
    hf = tiny_model(family)
    ref = fake_quantised_int8(hf)
    opt = optimised_copy(hf, max_seq_len=48, quantize="int8")
    layer = opt._dsinfer_engine.decoder.layers[0]
    assert layer.attn.qkv.layout.startswith("int8") and layer.attn.qkv.weight.dtype == torch.int8
    assert opt._dsinfer_engine.decoder.lm_head.layout != "int8"              # the lm_head stays in dtype
    assert_fp32_matches_quantised(ref, opt)


@needs_int8
@pytest.mark.parametrize("path", INT8_PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_engine_bf16_matches_fake_quantised_hf_and_stack_is_bit_identical(family, path):
    hf = tiny_model(family).to(torch.bfloat16)
    ref = fake_quantised_int8(hf)
    with cpu_gemv.use_path(path):
        opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, quantize="int8")
    assert opt._dsinfer_engine.decoder.layers[0].attn.qkv.layout == ("int8_amx" if path == "amx_bf16" else "int8")
    ids, mask, want, want_tokens, got = quantised_logits_and_reference(ref, opt)
    valid = mask.bool()
    torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=6e-2, rtol=2e-2)
    assert_quantised_decode_steps(ref, opt, ids, mask, want_tokens, "int8")

def test_int8_halves_the_bytes_a_step_reads():
    hf = tiny_model("llama", hidden_size=256, intermediate_size=512).to(torch.bfloat16)
    plain = optimised_copy(hf, max_seq_len=32, dtype=torch.bfloat16)._dsinfer_engine.decoder
    int8 = optimised_copy(hf, max_seq_len=32, dtype=torch.bfloat16, quantize="int8")._dsinfer_engine.decoder
    blocks = [sum(lin.nbytes for lin in (ly.attn.qkv, ly.attn.o, ly.mlp.gate_up, ly.mlp.down)) for d in (plain, int8)
              for ly in d.layers[:1]]
    assert 0.5 < blocks[1] / blocks[0] < 0.52                 # int8 + one fp32 scale per row (+ bf16 biases)


def test_int8_errors_before_work(tmp_path):
    hf = tiny_model("llama")
    with pytest.raises(ValueError, match=r"quantize='int3' is not one of None, 'int8', 'int4'"):
        dsi.init_inference(copy.deepcopy(hf), quantize="int3")


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_int8_offload_fp32_matches_fake_quantised_hf(family, tier, tmp_path, monkeypatch):
    """int8 weights in the offload tiers (half the bytes streamed): written quantised (a few rows at a time), streamed
    and used in place (row-major int8 + fp32 scales; fp32 rows through the torch GEMM over weights dequantised a
    chunk of rows at a time, chunks made small here so there are several); fp32 logits and greedy tokens as the
    fake-quantised HF's."""
    import lightning_dsinfer.modules.linear as linear

    monkeypatch.setattr(linear, "QUANTIZE_CHUNK_BYTES", 4 * 64 * 24)            # 24 rows of a 64-wide weight
    hf = tiny_model(family)
    ref = fake_quantised_int8(hf)
    def build(max_memory):
        return optimised_copy(hf, quantize="int8", offload=tier, offload_path=str(tmp_path / "off"),
                              max_memory=max_memory, max_batch_size=3, max_seq_len=48)

    opt = build(streaming_budget(build))
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_BYTES", 10 * 64 * 40)            # 40 rows of a 64-wide weight
    streamer = opt._dsinfer_engine.decoder.streamer
    attention = streamer.layouts[0].views(torch.empty(streamer.layouts[0].nbytes, dtype=torch.uint8))
    assert attention["qkv.weight"].dtype == torch.int8 and attention["qkv.scale"].dtype == torch.float32
    assert attention["input_norm"].dtype == torch.float32
    if tier == "nvme":
        assert len(streamer.order) >= 3                     # most units stream
    assert_fp32_matches_quantised(ref, opt)


@needs_int8
@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("path", INT8_PATHS)
def test_int8_offload_bf16_matches_fake_quantised_hf(path, tier, tmp_path):
    """bf16 through the CPU int8 kernels from streamed units. AMX machines: the units hold the weights in AMX tile
    order (any rows). Else row-major: the int8 kernel for decode rows, the prompt's GEMM over weights dequantised a
    chunk of rows at a time (chunks made small here so there are several)."""
    import lightning_dsinfer.modules.linear as linear

    hf = tiny_model("llama").to(torch.bfloat16)
    ref = fake_quantised_int8(hf)
    def build(max_memory):
        return optimised_copy(hf, dtype=torch.bfloat16, quantize="int8", offload=tier, offload_path=str(tmp_path),
                              max_memory=max_memory, max_batch_size=3, max_seq_len=48)

    with cpu_gemv.use_path(path):
        opt = build(streaming_budget(build))
    streamer = opt._dsinfer_engine.decoder.streamer
    mlp = streamer.layouts[1].views(torch.empty(streamer.layouts[1].nbytes, dtype=torch.uint8))
    assert mlp["gate_up.weight"].dim() == (1 if path == "amx_bf16" else 2) and len(streamer.order) >= 3
    old, linear.DEQUANT_CHUNK_BYTES = linear.DEQUANT_CHUNK_BYTES, 2 * 64 * 40      # 40 rows of a 64-wide weight
    try:
        ids, mask, want, _, got = quantised_logits_and_reference(ref, opt)
        valid = mask.bool()
        torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=6e-2, rtol=2e-2)
        step = opt(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = step.logits[:, -1:].argmax(-1)
        with torch.no_grad():
            want_next = ref(input_ids=torch.cat([ids, nxt], 1),
                            attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1)).logits[:, -1]
        cache = step.cache if getattr(step, "cache", None) is not None else step.past_key_values
        key = "cache" if getattr(step, "cache", None) is not None else "past_key_values"
        out = opt(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), use_cache=True,
                  **{key: cache})
        torch.testing.assert_close(out.logits[:, -1].float(), want_next.float(), atol=6e-2, rtol=2e-2)
    finally:
        linear.DEQUANT_CHUNK_BYTES = old


def _offload_tp_args(tier, tmp):
    return ["--tp", "2", "--families", "llama", "qwen3", "--quantize", "int8", "--offload", tier,
            "--offload-path", str(tmp / tier / "off"), "--max-memory", "streaming",   # int8 units: a smaller budget
            "--checkpoint", str(tmp / "ckpt")]


def worker_runs(tmp, selected):
    """The TP=2 runs of the tests below, in the session's shared launch of two ranks (tests/conftest.py
    ``shared_runs``: a rank's start-up costs more than the runs): int8 from memory, and the first run of each offload
    tier (the disk tier's later runs, which reuse or rewrite its folders, are launches of their own)."""
    if any(name.startswith("test_int8_offload_tensor_parallel") for name in selected):
        for family in ("llama", "qwen3"):
            tiny_model(family).save_pretrained(tmp / "ckpt" / family)
    return {2: {"test_int8_tensor_parallel_matches_fake_quantised_hf": ["tp_worker.py", "--tp", "2", "--families",
                                                                        "llama", "qwen3", "--quantize", "int8"],
                **{f"test_int8_offload_tensor_parallel_matches_fake_quantised_hf[{t}]":
                   ["tp_worker.py", *_offload_tp_args(t, tmp)] for t in ("cpu", "nvme")}}}


def test_int8_tensor_parallel_matches_fake_quantised_hf(shared_runs):
    """TP=2 with int8 (fp32): the row-parallel shards take their scales from the whole rows (a max over the
    group), so both ranks hold the int8 weights of one process: logits, greedy and beam search as the
    fake-quantised HF model's, sampling agrees across ranks."""
    outs = shared_runs.outputs(2, "test_int8_tensor_parallel_matches_fake_quantised_hf")
    assert outs[0].count(" OK") == 2, outs[0]


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_int8_offload_tensor_parallel_matches_fake_quantised_hf(tier, shared_runs):
    """TP=2, int8 units in each rank's tier (fp32), the model on meta loading from a checkpoint: the row-parallel
    shards' scales come from a max over the group while the units are written, so the ranks stream the int8
    weights of one process: logits, greedy and beam search as the fake-quantised HF's. Disk tier: a second run
    reuses both ranks' folders; a third, with one rank's folder made stale, rewrites both (the write's collective
    needs every rank: a rank reusing its folder alone would leave the other waiting). The first run is in the
    session's shared launch (``shared_runs``), the others launches of their own."""
    tmp = shared_runs.tmp
    args = _offload_tp_args(tier, tmp)
    for attempt in range(3 if tier == "nvme" else 1):
        if attempt == 0:
            outs = shared_runs.outputs(2, f"test_int8_offload_tensor_parallel_matches_fake_quantised_hf[{tier}]")
        else:
            if attempt == 2:
                for family in ("llama", "qwen3"):
                    os.remove(tmp / tier / "off" / family / "rank1-tp1of2" / "manifest.json")
            codes, outs, _ = run_ranks("tp_worker.py", 2, args, timeout=300)
            assert codes == [0, 0], "\n".join(outs)
        for out in outs:
            assert out.count(" OK") == 2 and out.count(" reused ") == (2 if attempt == 1 else 0), out
