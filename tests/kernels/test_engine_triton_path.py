"""The whole engine through the Triton kernels (``kernels/ops.py`` dispatch), against unmodified HF.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) with the dispatch
forced (``ops.force_triton``); on a GPU the same tests run on CUDA without forcing. Tolerance: fp32 logits
within atol 2e-4 / rtol 1e-4, as ``tests/test_parity.py`` (the kernels compute in fp32 and round once, so
results differ from HF by float rounding only); greedy tokens identical. The engine uses the fused forms
there: residual add + RMSNorm (``add_rms_norm``) and rotary + KV-cache append (``rotary_write_kv``).
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_utils import DEVICES, FORCE_TRITON

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/helpers.py
from helpers import optimised_copy, padded_batch, tiny_model  # noqa: E402

from lightning_dsinfer.kernels import ops, reference  # noqa: E402
from lightning_dsinfer.modules.masks import build_masks  # noqa: E402

pytestmark = pytest.mark.skipif(not DEVICES, reason="no CUDA and TRITON_INTERPRET unset")
REPO = Path(__file__).resolve().parents[2]
# cases whose code another case already runs in the interpreter (a case of the same test, or the test named; named
# at each): on a GPU every case runs; in the interpreter (the CPU suite's slowest tests, ~10-20 s each) these are left
# to the GPU
GPU_ONLY = pytest.mark.skipif(DEVICES == ["cpu"], reason="covered in the interpreter by a sibling case; runs on a GPU")
DEVICE = DEVICES[0] if DEVICES else "cpu"
ATOL, RTOL = 2e-4, 1e-4
# Greedy tokens per generate: 5 on a GPU (4 decode steps); in the interpreter, where a decode step of the tiny models
# costs seconds, 3 (2 decode steps: the second reads the K/V or state the first appended, so a wrong append still
# changes a token or a logit). The dispatch counts below follow: FORWARDS = the plain forward + the prefill + STEPS.
NEW_TOKENS = 3 if DEVICES == ["cpu"] else 5
STEPS = NEW_TOKENS - 1
FORWARDS = 2 + STEPS


def _triton_path():
    return ops.force_triton() if FORCE_TRITON else contextlib.nullcontext()


def _fallbacks():
    """Calls that fell back to the reference ("torch:..." is ``linear`` on F.linear by design: M > 32, fp32)."""
    return {k: n for k, n in ops.dispatch_counts.items() if k[1] not in ("triton",) and not k[1].startswith("torch:")}


def _assert_fused(small: int, large: int, exact: bool = True):
    """Per forward of the 2-layer dense models. Decode-sized rows (M <= 32, ``small`` forwards): the input norm (with
    the pending residual add) + QKV and the post-attention norm (with attention's add) + gate/up + SwiGLU are one
    small-GEMM kernel each (4 ``norm_linear``), the final norm an ``add_rms_norm``. More rows (``large``): the
    first input norm a plain ``rms_norm``, the other four norms ``add_rms_norm``, SwiGLU ``silu_and_mul``. Rotary +
    KV append and attention: one kernel per block either way. Nothing falls back to the reference."""
    expect = {"rotary_write_kv": 2 * (small + large), "attention": 2 * (small + large), "norm_linear": 4 * small,
              "add_rms_norm": small + 4 * large, "rms_norm": large, "silu_and_mul": 2 * large}
    got = {op: ops.dispatch_counts[(op, "triton")] for op in expect}
    assert got == expect if exact else all(got[op] >= n for op, n in expect.items()), dict(ops.dispatch_counts)
    assert not any(op == "rotary_half" for op, _ in ops.dispatch_counts), dict(ops.dispatch_counts)
    assert not _fallbacks(), _fallbacks()


def _hf_and_triton_path(hf, opt, forward_batch, generate_batch):
    """(HF logits, HF greedy tokens, ours through the Triton path: logits, tokens); dispatch counts reset first."""
    (fids, fmask), (gids, gmask) = forward_batch, generate_batch
    with torch.no_grad():
        ref_logits = hf(input_ids=fids, attention_mask=fmask).logits
        ref_tokens = hf.generate(input_ids=gids, attention_mask=gmask, max_new_tokens=NEW_TOKENS, do_sample=False)
    ops.dispatch_counts.clear()
    with _triton_path():
        logits = opt(input_ids=fids, attention_mask=fmask).logits
        tokens = opt.generate(input_ids=gids, attention_mask=gmask, max_new_tokens=NEW_TOKENS, do_sample=False)
    return ref_logits, ref_tokens, logits, tokens


def _matches_hf_through_triton(family: str, **overrides):
    """A tiny ``family`` model through the Triton path: fp32 logits of a left-padded batch and greedy tokens as HF's
    (dispatch counts reset before ours run). Returns the optimised model."""
    hf = tiny_model(family, **overrides).to(DEVICE)
    opt = optimised_copy(hf, max_seq_len=32)
    ids, mask = (x.to(DEVICE) for x in padded_batch([12, 5, 9]))
    ref_logits, ref_tokens, logits, tokens = _hf_and_triton_path(hf, opt, (ids, mask), (ids, mask))
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, ref_tokens)
    return opt


# llama: biases, head_dim 24 (odd block sizes); qwen3: q/k norms; mistral: sliding window 7, which the
# 12-token prompt and the decode steps exceed; phi3: packed q|k|v and gate|up, also with partial rotary (the rotary
# kernel's rotary_dim: half of each head rotates); mixtral / qwen2_moe: routing with mapping tables + grouped expert
# GEMMs (ops.moe_mlp), qwen2_moe with a shared expert, a dense layer, top-k not renormalised, routing weights in the
# dtype.
PARTIAL_ROTARY = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}


# In the interpreter: qwen3's q / k norms and fused path run in test_engine_small_gemm_linears_fp16[qwen3] (the same
# model), the per-head q / k norms at this tolerance in glm4_moe's and gemma3_text's; mistral's window 7 in
# phi3-partial-rotary's (a dense model with the same window) and mixtral's; qwen2_moe's shared expert, dense layer and
# routing in test_int8_through_triton_matches_fake_quantised_hf[qwen2_moe], the float grouped GEMMs in mixtral's.
@pytest.mark.parametrize("family,overrides", [("llama", {}), pytest.param("qwen3", {}, marks=GPU_ONLY),
                                              pytest.param("mistral", {}, marks=GPU_ONLY),
                                              pytest.param("phi3", {}, marks=GPU_ONLY),      # (packing: partial's)
                                              ("phi3", PARTIAL_ROTARY), ("mixtral", {}),
                                              pytest.param("qwen2_moe", {}, marks=GPU_ONLY)],
                         ids=["llama", "qwen3", "mistral", "phi3", "phi3-partial-rotary", "mixtral", "qwen2_moe"])
def test_engine_through_triton_matches_hf(family, overrides, monkeypatch):
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")   # on a GPU: the eager decode step (graphs: test below)
    opt = _matches_hf_through_triton(family, **overrides)
    # Every op went through its (fused) kernel, none fell back: 1 forward + 1 prefill (M = 36) + STEPS decode steps.
    sparse = sum(type(layer.mlp).__name__ == "MoEMLP" for layer in opt._dsinfer_engine.decoder.layers)
    if sparse:
        assert ops.dispatch_counts[("moe_mlp", "triton")] == FORWARDS * sparse, dict(ops.dispatch_counts)
        assert not _fallbacks(), _fallbacks()
    else:
        _assert_fused(small=STEPS, large=2)


@pytest.mark.parametrize("family", [pytest.param("gemma", marks=GPU_ONLY), "gemma2", "gemma3_text"])  # (gemma's (1 + w)
# norms and GeGLU: gemma3_text's; its single KV head: tests/kernels/test_prefill_attention.py, and the decode kernel in
# test_registered_ranges_decode_over_full_cache)
def test_gemma_through_triton_matches_hf(family, monkeypatch):
    """Gemma on the Triton path: (1 + w) norms held in fp32 in the norm kernels and the GEMM prologues, GeGLU
    (``gated_act``), the sandwich norms of Gemma 2 / 3, soft-capped scores in the decode-attention kernel (Gemma 2;
    its prompts go to the reference, the prefill kernel has no cap), Gemma 3's second rotary table for the sliding
    layers: fp32 logits and greedy tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    opt = _matches_hf_through_triton(family)
    layers = len(opt._dsinfer_engine.decoder.layers)
    counts = dict(ops.dispatch_counts)
    assert counts[("gated_act", "triton")] == FORWARDS * layers
    assert counts[("rotary_write_kv", "triton")] == FORWARDS * layers
    capped = family == "gemma2"        # (Gemma 3 takes no attention cap, as in HF)
    # decode steps' attention in the kernel (capped too); prompts' in the prefill kernel, or the reference when capped
    assert counts[("attention", "triton")] == (STEPS if capped else FORWARDS) * layers, counts
    assert _fallbacks() == ({("attention", "reference:softcap"): 2 * layers} if capped else {}), _fallbacks()


@pytest.mark.parametrize("family", ["gpt_neox", "bloom", "opt", "gptj"])
def test_gpt_family_through_triton_matches_hf(family, monkeypatch):
    """The GPT families on the Triton path: LayerNorms with a bias (``layer_norm``; the residual adds in the output
    projections' GEMMs), the plain MLP's activation (``act``: GeLU, or OPT's ReLU), partial rotary (GPT-NeoX) and
    GPT-J's reordered rotary rows, BLOOM's ALiBi in the decode-attention kernel (its prompts take the reference; the
    prefill kernel has no ALiBi), learned positions (OPT): fp32 logits and greedy tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    opt = _matches_hf_through_triton(family)
    layers = len(opt._dsinfer_engine.decoder.layers)
    counts = dict(ops.dispatch_counts)
    assert counts[("act", "triton")] == FORWARDS * layers, counts      # 1 forward + 1 prefill + STEPS decode steps
    assert counts[("layer_norm", "triton")] >= FORWARDS * layers, counts
    rotary = family != "bloom" and family != "opt"
    assert counts.get(("rotary_write_kv", "triton"), 0) == (FORWARDS * layers if rotary else 0), counts
    alibi = family == "bloom"
    assert counts[("attention", "triton")] == (STEPS if alibi else FORWARDS) * layers, counts
    assert _fallbacks() == ({("attention", "reference:alibi"): 2 * layers} if alibi else {}), _fallbacks()


@pytest.mark.parametrize("family", ["deepseek_v3"])
def test_deepseek_through_triton_matches_hf(family, monkeypatch):
    """DeepSeek on the Triton path: the latent attention's q_a | kv_a GEMM with the input norm as its prologue, its
    norms, q_b and o through the kernels; the grouped routers' choice in torch with the mapping tables and grouped
    expert GEMMs by kernel (``moe_tables``, ``moe_gemm``); prompts in the expanded form through the prefill kernel
    (keys nope + rope wide, values v_head_dim), decode steps over the latent rows in the decode kernel: keys latent +
    rope wide (24 + 8 here, DeepSeek-V3's 512 + 64 in tests/kernels/test_decode_attention.py), values the latent
    columns of the same rows. Nothing falls back: fp32 logits and greedy tokens as HF's."""
    from lightning_dsinfer.kernels import decode_attention as decode_module
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    widths = []   # (key width, value width, values a view of the key rows) per decode-kernel launch
    decode = decode_module.decode_attention

    def recording(q, k_cache, v_cache, *args, **kwargs):
        widths.append((k_cache.shape[-1], v_cache.shape[-1], v_cache.data_ptr() == k_cache.data_ptr()))
        return decode(q, k_cache, v_cache, *args, **kwargs)

    monkeypatch.setattr(decode_module, "decode_attention", recording)
    opt = _matches_hf_through_triton(family)
    layers = opt._dsinfer_engine.decoder.layers
    sparse = sum(type(layer.mlp).__name__ == "MoEMLP" for layer in layers)
    counts = dict(ops.dispatch_counts)
    assert counts[("moe_mlp", "triton")] == FORWARDS * sparse, counts   # 1 forward + 1 prefill + STEPS decode steps
    assert counts[("norm_linear", "triton")] >= STEPS * len(layers), counts   # decode steps: norm + q_a | kv_a GEMM
    assert counts[("attention", "triton")] == FORWARDS * len(layers), counts
    assert not _fallbacks(), _fallbacks()
    assert widths == [(24 + 8, 24, True)] * (STEPS * len(layers)), widths     # the decode steps, every layer


def test_gpt_oss_through_triton_matches_hf(monkeypatch):
    """gpt-oss on the Triton path: its attention sinks in the prefill and decode kernels (sliding and full layers,
    a left-padded batch); its experts through the routing tables and grouped GEMMs (the biases in their epilogues,
    down's before the routing weight), their clamped SwiGLU the activation kernel; the norms, QKV / o GEMMs and rotary
    + K/V append go through the kernels; nothing falls back. fp32 logits and greedy tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    opt = _matches_hf_through_triton("gpt_oss")
    layers = len(opt._dsinfer_engine.decoder.layers)
    counts = dict(ops.dispatch_counts)                                   # 1 forward + 1 prefill + STEPS decode steps
    assert counts[("attention", "triton")] == FORWARDS * layers, counts
    assert ("attention", "reference:sinks") not in counts, counts
    assert counts[("moe_mlp", "triton")] == FORWARDS * layers, counts
    assert counts[("clamped_swiglu", "triton")] == FORWARDS * layers, counts   # one call per layer, all routed rows
    assert counts[("rotary_write_kv", "triton")] == FORWARDS * layers, counts
    assert not _fallbacks(), _fallbacks()


@pytest.mark.parametrize("family,op,mixers", [("nemotron_h", "mamba2", 4),
                                               pytest.param("bamba", "mamba2", 2, marks=GPU_ONLY),   # (nemotron_h's)
                                               ("lfm2", "short_conv", 2)])
def test_linear_state_decode_steps_through_triton_match_hf(family, op, mixers, monkeypatch):
    """Mamba-2's decode steps through kernels/mamba2.py (convolution, scan, gated norm: three kernels), LFM2's short
    convolution's through one (kernels/gated_delta.short_conv_step); prompts run the modules' torch ops: fp32 logits
    and greedy tokens as HF's; STEPS decode steps per mixer."""
    _matches_hf_through_triton(family)
    assert ops.dispatch_counts[(op, "triton")] == STEPS * mixers, dict(ops.dispatch_counts)


@pytest.mark.parametrize("family", ["mamba", pytest.param("falcon_mamba", marks=GPU_ONLY)])   # (falcon_mamba: the
def test_mamba1_through_triton_matches_hf(family, monkeypatch):                                # same scan, its norms)
    """Mamba-1: every call's selective scan (prompts' and decode steps') in kernels/mamba1.py: fp32 logits and greedy
    tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    opt = _matches_hf_through_triton(family)
    assert ops.dispatch_counts[("mamba1", "triton")] == FORWARDS * len(opt._dsinfer_engine.decoder.layers), \
        dict(ops.dispatch_counts)


@pytest.mark.parametrize("family", [pytest.param("nemotron_h_moe", marks=GPU_ONLY), "nemotron_h_latent"])  # (latent
# experts run the plain activation's path too)
def test_nemotron_h_experts_through_triton_match_hf(family, monkeypatch):
    """NemotronH's ReLU² experts without a gate through the routing tables and grouped GEMMs (their activation
    between the two; the latent experts' inputs from fc1_latent_proj); the Mamba-2 mixers run their torch ops (no
    Triton kernel): fp32 logits and greedy tokens as HF's."""
    opt = _matches_hf_through_triton(family)
    counts = dict(ops.dispatch_counts)
    assert counts[("moe_mlp", "triton")] == FORWARDS * 2, counts        # 1 forward + 1 prefill + STEPS decode steps
    assert not any(op == "moe_mlp" and how != "triton" for op, how in counts), counts
    assert opt._dsinfer_engine.decoder.layers[0].mlp.latent_in is not None or family == "nemotron_h_moe"


def test_llama4_through_triton_matches_hf(monkeypatch):
    """Llama 4 (top-2, biases): the input-scaled experts through the routing tables and grouped GEMMs (each
    assignment's w * x row into gate|up, the down GEMM unscaled), L2 q / k norms after the rotary kernel, the
    temperature-tuned NoPE layer; the chunked layers' decode steps through the decode kernel (each row's chunk is one
    key range), their prompts (a chunked mask is not) on the reference: fp32 logits and greedy tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    opt = _matches_hf_through_triton("llama4_top2")
    layers = opt._dsinfer_engine.decoder.layers
    sparse = sum(type(ly.mlp).__name__ == "MoEMLP" for ly in layers)
    chunked = sum(ly.attn.sliding for ly in layers)
    counts = dict(ops.dispatch_counts)
    assert counts[("moe_mlp", "triton")] == FORWARDS * sparse, counts
    assert counts[("attention", "triton")] == FORWARDS * len(layers) - 2 * chunked, counts
    assert _fallbacks() == {("attention", "reference:mask"): 2 * chunked}, _fallbacks()


def test_gemma4_through_triton_matches_hf(monkeypatch):
    """Gemma 4 in 26B-A4B's layout (tests/helpers.py "gemma4_moe"): the sliding and full layers' own head dims and KV
    heads through the rotary and attention kernels, the v norm through the norm kernel, the shared-K/V layers'
    attention over another layer's cache, the per-layer inputs, the GeGLU experts beside the MLP through the routing
    tables and grouped GEMMs (the gated-activation kernel): fp32 logits and greedy tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    # (four layers, not the helper's six, for the interpreter's time: a sliding and a full layer computing K/V, and one
    # of each reading theirs)
    opt = _matches_hf_through_triton("gemma4_moe", num_hidden_layers=4, num_kv_shared_layers=2,
                                     layer_types=["sliding_attention", "full_attention"] * 2)
    layers = len(opt._dsinfer_engine.decoder.layers)
    assert [ly.attn.kv_source for ly in opt._dsinfer_engine.decoder.layers] == [None, None, 0, 1]
    counts = dict(ops.dispatch_counts)
    assert counts[("moe_mlp", "triton")] == FORWARDS * layers, counts
    assert counts[("attention", "triton")] == FORWARDS * layers, counts
    assert not _fallbacks(), _fallbacks()


def test_falcon_h1_through_triton_matches_hf(monkeypatch):
    """Falcon-H1 (the gated group norm after the gate): each block's one GEMM into attention and Mamba-2 (the input
    norm its prologue on decode-sized rows), the Mamba-2 decode steps through kernels/mamba2.py, attention through the
    prefill and decode kernels, one GEMM out of both: fp32 logits and greedy tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    opt = _matches_hf_through_triton("falcon_h1_norm", mamba_norm_before_gate=False)
    layers = len(opt._dsinfer_engine.decoder.layers)
    counts = dict(ops.dispatch_counts)
    assert counts[("mamba2", "triton")] == STEPS * layers, counts
    assert counts[("attention", "triton")] == FORWARDS * layers, counts
    assert counts[("norm_linear", "triton")] >= 2 * STEPS * layers, counts     # qkv | in_proj and gate/up, each step
    assert not _fallbacks(), _fallbacks()


@pytest.mark.parametrize("kind", ["none", "left", "holes"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("t,past", [(9, 0), (1, 8), (3, 6)])
def test_gpt_oss_sinks_dispatch_equals_reference(kind, window, t, past):
    """gpt-oss's sinks through ops.attention on the Triton path, masks as the engine builds them: every row as the
    reference's, the padding queries too (their own V row weighted against the sink, written after the prefill
    kernel); masks with holes fall back with the sinks."""
    b, total = 3, past + t
    q, k, v = _qkv(b, 6, 2, t, total)
    sinks = torch.randn(6, device=DEVICE) * 2
    mask, window_mask = build_masks(_key_valid(kind, b, total), past, t, window, DEVICE)
    for m in (mask, window_mask if window_mask is not None else mask):
        want = reference.attention(q, k, v, m, 0.3, sinks=sinks)
        ops.dispatch_counts.clear()
        with _triton_path():
            got = ops.attention(q, k, v, m, 0.3, sinks=sinks)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert set(ops.dispatch_counts) <= {("attention", "triton"), ("attention", "reference:mask")}


def test_moe_quantised_offload_through_the_grouped_gemms(tmp_path, monkeypatch):
    """The CUDA path of a quantised, offloaded MoE on the host tier: a streamed unit's int8 / int4 3D experts and
    scales go to the grouped GEMMs as they are (no quantisation after the build). fp32 logits as the fake-quantised
    HF's."""
    from test_moe import QUANTISED, _fake_quantised, _no_requantising

    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    for family, quantize in (("mixtral", "int8"), ("qwen2_moe", "int4")):
        hf = tiny_model(family)
        ref = _fake_quantised(hf, quantize)
        with _triton_path():
            opt = optimised_copy(hf.to(DEVICE), offload="cpu", offload_path=str(tmp_path), max_memory=2 << 20,
                                 max_batch_size=3, max_seq_len=32, quantize=quantize, **QUANTISED[quantize])
            ids, mask = (x.to(DEVICE) for x in padded_batch([12, 5, 9]))
            with monkeypatch.context() as m, torch.no_grad():
                _no_requantising(m)
                ops.dispatch_counts.clear()
                want = ref.to(DEVICE)(input_ids=ids, attention_mask=mask).logits
                got = opt(input_ids=ids, attention_mask=mask).logits
            assert ops.dispatch_counts[("moe_mlp", "triton")] > 0, dict(ops.dispatch_counts)
        assert len(opt._dsinfer_engine.decoder.streamer.order) >= 2, "nothing is streamed"
        valid = mask.bool()
        torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("t,past", [(9, 0), (3, 6), (1, 8)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_values_of_another_width_dispatch_equals_reference(t, past, softcap):
    """Values narrower than the keys (DeepSeek's expanded prompts) through ops.attention on the Triton path: prompts
    in the prefill kernel, which takes them (padding queries too), a single query (soft-capped or not) in the decode
    kernel, which takes them too; a soft-capped prompt in the reference. Every row as the reference's."""
    b, total = 3, past + t
    q, k, _ = _qkv(b, 4, 4, t, total, d=24)
    v = torch.randn(b, 4, total, 16, device=DEVICE)
    mask, _ = build_masks(_key_valid("left", b, total), past, t, None, DEVICE)
    want = reference.attention(q, k, v, mask, 0.3, softcap=softcap)
    ops.dispatch_counts.clear()
    with _triton_path():
        got = ops.attention(q, k, v, mask, 0.3, softcap=softcap)
    assert got.shape == (b, 4, t, 16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    kernel = t == 1 or softcap is None
    assert dict(ops.dispatch_counts) == {("attention", "triton" if kernel else "reference:softcap"): 1}


# (glm4_moe on a GPU only: its grouped sigmoid routing with a correction bias and its grouped GEMMs run in the
# interpreter in test_deepseek_through_triton_matches_hf[deepseek_v3], the same MoE code)
@pytest.mark.parametrize("family", ["olmo2", "exaone4", pytest.param("glm4_moe", marks=GPU_ONLY)])
def test_llama_like_family_through_triton_matches_hf(family, monkeypatch):
    """Llama-like families' own pieces on the Triton path: OLMo 2's q / k norms over the whole projection (the norm
    kernel on the QKV output's column views) and its norms on the outputs only (fp32 weights); Exaone 4's NoPE layer
    (its per-head q / k norms without the rotation) between output norms; GLM-4.5's partial rotary, per-head q / k
    norms and grouped sigmoid router (chosen in torch), its MoE through the mapping tables and grouped expert GEMMs.
    fp32 logits and greedy tokens as HF's."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    opt = _matches_hf_through_triton(family)
    layers = len(opt._dsinfer_engine.decoder.layers)
    counts = dict(ops.dispatch_counts)
    assert counts[("attention", "triton")] == FORWARDS * layers, counts  # 1 forward + 1 prefill + STEPS decode steps
    nope = sum(not layer.attn.rotary for layer in opt._dsinfer_engine.decoder.layers)
    assert counts[("rotary_write_kv", "triton")] == FORWARDS * (layers - nope), counts
    if family == "olmo2":      # per block and forward: q and k norms, the two output norms; and the final norm
        assert counts[("rms_norm", "triton")] == FORWARDS * (4 * layers + 1), counts
    sparse = sum(type(layer.mlp).__name__ == "MoEMLP" for layer in opt._dsinfer_engine.decoder.layers)
    assert counts.get(("moe_mlp", "triton"), 0) == FORWARDS * sparse, counts
    assert not _fallbacks(), _fallbacks()


def test_hybrid_linear_attention_through_triton_matches_hf(monkeypatch):
    """Qwen3.5 on the Triton path: the gated attention block's norms, q / k norms, rotary, attention and GEMMs through
    the kernels (its output gate the QKV GEMM's last rows); the linear-attention block's input norm as the prologue of
    its fused in_proj GEMM, out_proj through the GEMM kernel, its decode steps' convolution and rule through
    kernels/gated_delta.py (prompts: the chunked rule in torch). fp32 logits and greedy tokens as HF's, nothing
    falling back."""
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    _matches_hf_through_triton("qwen3_5_text")
    counts = dict(ops.dispatch_counts)
    assert counts[("attention", "triton")] == FORWARDS, counts    # the one full-attention block: every forward
    assert counts[("gated_delta", "triton")] == STEPS * 2, counts  # the decode steps x the 2 linear-attention blocks
    assert not _fallbacks(), _fallbacks()


def test_relu2_takes_torch_ops_on_the_triton_path():
    """Arcee's ReLU squared has no kernel: on the Triton path ``ops.act`` runs the reference (counted as such)."""
    x = torch.randn(5, 7, device=DEVICE)
    ops.dispatch_counts.clear()
    with _triton_path():
        y = ops.act(x, "relu2")
    assert torch.equal(y, reference.act(x, "relu2")) and torch.equal(y, torch.relu(x) ** 2)
    assert dict(ops.dispatch_counts) == {("act", "reference:relu2"): 1}


@pytest.mark.parametrize("family", ["llama", pytest.param("mixtral", marks=GPU_ONLY), "qwen2_moe", "gpt_oss"])
def test_int8_through_triton_matches_fake_quantised_hf(family, monkeypatch):      # (mixtral's grouped int8: qwen2_moe's)
    """quantize="int8" on the Triton path (built under the forced dispatch on a CPU, as on CUDA): llama's block linears
    int8 with a scale per row, the decode steps' norm + QKV and norm + gate/up + SwiGLU through the int8 GEMM's
    prologue / epilogue; the MoE experts int8 in their 3D layout with a scale per expert row, through the grouped
    GEMMs (gpt-oss: with the experts' biases and the clamped SwiGLU). fp32 logits and greedy tokens as HF's over the
    same quantise-dequantised weights."""
    from helpers import fake_quantised_int8

    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    hf = tiny_model(family).to(DEVICE)
    with _triton_path():
        opt = optimised_copy(hf, max_seq_len=32, quantize="int8")
    moe = [layer.mlp for layer in opt._dsinfer_engine.decoder.layers if type(layer.mlp).__name__ == "MoEMLP"]
    if moe:
        assert moe[0].experts_gate_up.dtype == torch.int8 and moe[0].cpu_experts is None
    else:
        assert all(layer.attn.qkv.layout == "int8" for layer in opt._dsinfer_engine.decoder.layers)
    ids, mask = (x.to(DEVICE) for x in padded_batch([12, 5, 9]))
    ref_logits, ref_tokens, logits, tokens = _hf_and_triton_path(fake_quantised_int8(hf), opt, (ids, mask), (ids, mask))
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, ref_tokens)
    if moe:
        assert ops.dispatch_counts[("moe_mlp", "triton")] > 0, dict(ops.dispatch_counts)
        assert not any(op == "moe_mlp" for op, how in _fallbacks()), _fallbacks()
    else:       # the decode steps x 2 blocks x (norm + QKV, norm + gate/up + SwiGLU)
        assert ops.dispatch_counts[("norm_linear", "triton")] == STEPS * 2 * 2, dict(ops.dispatch_counts)


def test_int4_through_triton_matches_fake_quantised_hf(monkeypatch):
    """quantize="int4" on the Triton path (built under the forced dispatch on a CPU, as on CUDA), groups of 32: the
    decode steps' four block linears through the small-batch int4 GEMM (nibbles dequantised in the tile load, a scale
    per tile of K); the prompts' 36 rows through weights dequantised in torch. fp32 logits and greedy tokens as HF's
    over the same quantise-dequantised weights."""
    from helpers import fake_quantised_int4

    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    hf = tiny_model("llama").to(DEVICE)
    with _triton_path():
        opt = optimised_copy(hf, max_seq_len=32, quantize="int4", quantize_group_size=32)
    assert all(layer.attn.qkv.layout == "int4" for layer in opt._dsinfer_engine.decoder.layers)
    ids, mask = (x.to(DEVICE) for x in padded_batch([12, 5, 9]))
    ref_logits, ref_tokens, logits, tokens = _hf_and_triton_path(fake_quantised_int4(hf, 32), opt, (ids, mask),
                                                                 (ids, mask))
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, ref_tokens)
    # the decode steps x 2 blocks x 4 linears on the kernel; the forward and the prefill (36 rows): 2 x 2 x 4
    # dequantised
    assert ops.dispatch_counts[("linear_int4", "triton")] == STEPS * 2 * 4, dict(ops.dispatch_counts)
    assert ops.dispatch_counts[("linear_int4", "torch:dequantise")] == 16, dict(ops.dispatch_counts)


@pytest.mark.parametrize("family,group", [("mixtral", 32), pytest.param("qwen2_moe", 16, marks=GPU_ONLY),
                                          ("gpt_oss", 16)])             # (qwen2_moe's groups of 16: gpt_oss's)
def test_int4_moe_through_triton_matches_fake_quantised_hf(family, group, monkeypatch):
    """quantize="int4" for a MoE family on the Triton path (built under the forced dispatch on a CPU, as on CUDA): the
    experts packed in their 3D layout ([E, N, K / 2], a scale per expert row and group) through the grouped int4
    GEMM, qwen2_moe's shared expert and the attention linears as dense int4 Linears (groups of 16: dequantised in
    torch, the small GEMM takes groups from 32); gpt-oss's experts with their biases and the clamped SwiGLU. fp32
    logits and greedy tokens as HF's over the same quantise-dequantised weights."""
    from helpers import fake_quantised_int4

    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    hf = tiny_model(family).to(DEVICE)
    with _triton_path():
        opt = optimised_copy(hf, max_seq_len=32, quantize="int4", quantize_group_size=group)
    moe = [layer.mlp for layer in opt._dsinfer_engine.decoder.layers if type(layer.mlp).__name__ == "MoEMLP"]
    gate_up = moe[0].experts_gate_up
    assert gate_up.dtype == torch.uint8 and moe[0].cpu_experts is None
    assert moe[0].gate_up_scale.shape == (gate_up.shape[0], gate_up.shape[1], 2 * gate_up.shape[2] // group)
    ids, mask = (x.to(DEVICE) for x in padded_batch([12, 5, 9]))
    ref_logits, ref_tokens, logits, tokens = _hf_and_triton_path(fake_quantised_int4(hf, group), opt, (ids, mask),
                                                                 (ids, mask))
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=ATOL, rtol=RTOL)
    assert torch.equal(tokens, ref_tokens)
    assert ops.dispatch_counts[("moe_mlp", "triton")] > 0, dict(ops.dispatch_counts)
    assert not any(op == "moe_mlp" for op, how in _fallbacks()), _fallbacks()


@pytest.mark.parametrize("family", ["qwen3"])
def test_engine_small_gemm_linears_fp16(family, monkeypatch):
    # fp16 (bf16 weights are oneDNN-packed on a CPU, so they never reach F.linear there). The plain forward has
    # 3 x 6 = 18 rows: every linear, lm_head included, on the small GEMM; the 3 x 12 prefill stays on F.linear.
    # Tolerance: fp16 logits reach ~3, where one fp16 ulp is 2e-3; HF's own fp16 CPU path differs from ours by
    # a few ulps (accumulation order), so atol 1e-2 / rtol 1e-2. Greedy tokens identical.
    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    hf = tiny_model(family).half().to(DEVICE)
    opt = optimised_copy(hf, max_seq_len=32, dtype=torch.float16)
    ids, mask = (x.to(DEVICE) for x in padded_batch([12, 5, 9]))
    short_ids, short_mask = (x.to(DEVICE) for x in padded_batch([6, 3, 5], seed=3))
    ref_logits, ref_tokens, logits, tokens = _hf_and_triton_path(hf, opt, (short_ids, short_mask), (ids, mask))
    valid = short_mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-2, rtol=1e-2)
    assert torch.equal(tokens, ref_tokens)
    _assert_fused(small=1 + STEPS, large=1)
    # 9 linears per forward (qkv, o, gate_up, down in 2 blocks, and lm_head) on the small GEMM in the short
    # forward and the decode steps, qkv and gate_up with their norms (norm_linear, counted above); the 3 x 12
    # prefill's 8 block linears have M = 36 (F.linear), its lm_head reads the last position only (M = 3: small GEMM).
    assert ops.dispatch_counts[("linear", "triton")] == (1 + STEPS) * 5 + 1, dict(ops.dispatch_counts)
    assert ops.dispatch_counts[("linear", "torch:large_m")] == 8, dict(ops.dispatch_counts)
    assert ops.dispatch_counts[("norm_linear", "torch:large_m")] == 4, dict(ops.dispatch_counts)


def test_chunked_forward_with_hf_cache_through_triton():
    # A second chunk attends to the first chunk's cached keys (prefill kernel with L > T), sliding window 7
    # cut inside both chunks, left padding; equal to one forward over the whole batch.
    hf = tiny_model("mistral").to(DEVICE)
    opt = optimised_copy(hf, max_seq_len=32)
    ids, mask = (x.to(DEVICE) for x in padded_batch([14, 9, 5], seed=9))
    with _triton_path():
        full = opt(input_ids=ids, attention_mask=mask).logits
        ops.dispatch_counts.clear()
        first = opt(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        name = "cache" if getattr(first, "cache", None) is not None else "past_key_values"
        second = opt(input_ids=ids[:, 8:], attention_mask=mask, **{name: getattr(first, name)})
    valid = mask.bool()
    got = torch.cat([first.logits, second.logits], 1)
    torch.testing.assert_close(got[valid], full[valid], atol=ATOL, rtol=RTOL)
    assert ops.dispatch_counts[("attention", "triton")] == 4 and not _fallbacks(), dict(ops.dispatch_counts)
    assert ops.dispatch_counts[("rotary_write_kv", "triton")] == 4     # no cache write: the HF cache updates


@pytest.mark.parametrize("t,past", [(9, 0), (5, 6)])
def test_prompt_fallback_in_query_blocks_equals_reference(t, past, monkeypatch):
    """A prompt whose mask the prefill kernel does not take (Llama 4's chunks from each row's first real token; a hole)
    runs the reference in blocks of queries, each over its keys up to its last column, so its temporaries stay bounded
    (``ops.FALLBACK_SCORE_BYTES``, here a block of 2 queries): the same output as one call."""
    b, total = 3, past + t
    q, k, v = _qkv(b, 6, 2, t, total)
    monkeypatch.setattr(ops, "FALLBACK_SCORE_BYTES", b * 6 * total * 4 * 2)
    for kind, chunk in (("left", 4), ("holes", None)):
        mask, window_mask = build_masks(_key_valid(kind, b, total), past, t, None, DEVICE, chunk=chunk)
        m = window_mask if chunk else mask
        want = reference.attention(q, k, v, m, 0.3)
        ops.dispatch_counts.clear()
        with _triton_path():
            got = ops.attention(q, k, v, m, 0.3)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert dict(ops.dispatch_counts) == {("attention", "reference:mask"): 1}


def _qkv(b, hq, hkv, t, length, d=16):
    q = torch.randn(b, hq, t, d, device=DEVICE)
    k, v = torch.randn(b, hkv, length, d, device=DEVICE), torch.randn(b, hkv, length, d, device=DEVICE)
    return q, k, v


def _key_valid(kind, b, total):
    if kind == "none":
        return None
    kv = torch.ones(b, total, dtype=torch.bool, device=DEVICE)
    kv[0, :3] = False                  # left padding
    kv[1, :total - 1] = kind != "left"  # "left": a row with only its last token
    if kind == "holes":
        kv[2, 4] = False               # a zero inside the prompt: not a range
    return kv


@pytest.mark.parametrize("kind", ["none", "left", "holes"])
@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("t,past", [(9, 0), (1, 8), (3, 6)])
def test_attention_dispatch_equals_reference(kind, window, t, past):
    # Masks as the engine builds them (modules/masks.py); GQA 6 query heads over 2 KV heads.
    b, total = 3, past + t
    q, k, v = _qkv(b, 6, 2, t, total)
    mask, window_mask = build_masks(_key_valid(kind, b, total), past, t, window, DEVICE)
    for m in (mask, window_mask if window_mask is not None else mask):
        want = reference.attention(q, k, v, m, 0.3)
        ops.dispatch_counts.clear()
        with _triton_path():
            got = ops.attention(q, k, v, m, 0.3)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        if kind == "holes":   # a window may cut the hole off (then the rows are runs again)
            expect = {"reference:mask"} if m is mask else {"reference:mask", "triton"}
        else:
            expect = {"triton"}
        (path,) = [p for (op, p) in ops.dispatch_counts]
        assert path in expect and sum(ops.dispatch_counts.values()) == 1


def test_registered_ranges_decode_over_full_cache():
    # The CUDA-graph step's form: keys are the whole cache, the visible run is given as device tensors.
    b, s = 3, 20
    q, k, v = _qkv(b, 4, 1, 1, s)
    kv_start = torch.tensor([0, 5, 9], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([12, 12, 12], dtype=torch.int32, device=DEVICE)
    cols = torch.arange(s, device=DEVICE)
    for window in (None, 4):
        lo = kv_start.long() if window is None else torch.maximum(kv_start.long(), seq_lens.long() - window)
        mask = ((cols >= lo[:, None]) & (cols < seq_lens.long()[:, None]))[:, None, None]
        want = reference.attention(q, k, v, mask, 0.25)
        ops.dispatch_counts.clear()
        with _triton_path(), ops.kv_ranges((mask, kv_start, seq_lens, window)):
            got = ops.attention(q, k, v, mask, 0.25)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert dict(ops.dispatch_counts) == {("attention", "triton"): 1}


def test_cpu_path_untouched_without_force():
    x = torch.randn(2, 3, 8)
    ops.dispatch_counts.clear()
    torch.testing.assert_close(ops.rms_norm(x, torch.ones(8), 1e-6), reference.rms_norm(x, torch.ones(8), 1e-6))
    assert not ops.dispatch_counts


def test_force_without_interpreter_is_a_clear_error():
    code = ("import torch\nfrom lightning_dsinfer.kernels import ops\n"
            "try:\n    ops.force_triton().__enter__()\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert "refused:" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr[-2000:]


@pytest.mark.parametrize("family", [pytest.param("llama", marks=GPU_ONLY), "mistral"])   # (the graph step: mistral's,
# a window on top; its registered ranges without one: test_registered_ranges_decode_over_full_cache)
def test_graph_decode_step_through_triton(family):
    # The CUDA-graph step's fixed shapes (full-cache K/V, ranges registered with ops.kv_ranges) through the
    # kernels; on CPU it runs eagerly (cuda_graphs.emulate), on a GPU it is captured and replayed.
    from lightning_dsinfer.generation import cuda_graphs

    hf = tiny_model(family).to(DEVICE)
    opt = optimised_copy(hf, max_seq_len=24, max_batch_size=4)
    ids, mask = (x.to(DEVICE) for x in padded_batch([10, 4, 7], seed=4))   # 3 rows: bucket 4, one dummy
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        want = hf.generate(**kw)
    ops.dispatch_counts.clear()
    with _triton_path(), cuda_graphs.emulate():
        got = opt.generate(**kw)
    assert torch.equal(got, want)
    assert sorted(opt._dsinfer_engine._decode_graphs.buckets) == [4]
    # All small-row forwards (the 3 x 10 prompt too): prefill + first step; on CPU also the later steps, on a GPU
    # the warm-up and the capture (replays dispatch nothing). The graph step writes K/V at its device column inside
    # the rotary kernel.
    _assert_fused(small=NEW_TOKENS if DEVICE == "cpu" else 3, large=0, exact=DEVICE == "cpu")


def test_vision_language_images_through_triton(monkeypatch):
    """A Gemma 3 wrapper with images on the Triton path (lightning_dsinfer/multimodal.py): the prompt's image blocks
    (tokens that see later ones) take the reference attention in blocks of queries, each over the keys its queries
    see (``FALLBACK_SCORE_BYTES`` made small, so that a block of queries ends inside an image), decode steps the
    kernels: fp32 logits and greedy tokens as HF's."""
    from test_multimodal import image_batch, tiny_vlm

    monkeypatch.setenv("DSINFER_CUDA_GRAPHS", "0")
    hf, images = tiny_vlm("gemma3")
    hf = hf.to(DEVICE)
    ids, mask, inputs = image_batch("gemma3", images)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    heads = hf.config.text_config.num_attention_heads
    monkeypatch.setattr(ops, "FALLBACK_SCORE_BYTES", 3 * len(ids) * heads * ids.shape[1] * 4)   # 3 queries a block
    opt = optimised_copy(hf, max_seq_len=32)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **inputs).logits
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **inputs)
    ops.dispatch_counts.clear()
    with _triton_path():
        got = opt(input_ids=ids, attention_mask=mask, **inputs).logits
        ours = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **inputs)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=RTOL)
    assert torch.equal(ours, tokens)
    layers = len(opt._dsinfer_engine.decoder.layers)
    assert ops.dispatch_counts[("attention", "reference:mask")] == 2 * layers, dict(ops.dispatch_counts)
    assert ops.dispatch_counts[("attention", "triton")] == STEPS * layers, dict(ops.dispatch_counts)
