"""The one-call C decode step (modules/cpu_stack.py, ``dsi_decode_stack``) against the engine's per-op path.

Both run the same kernels in the same order with the same roundings, so every decode step's hidden states must be
bit-identical, single process (every CPU kernel path of this machine, every family: biases, sliding windows,
Qwen3's q/k norms, left-padded batches; the GPT families' LayerNorms, plain MLPs, parallel residual, partial or no
rotary, BLOOM's ALiBi; Gemma's (1 + w) fp32 norms, GeGLU, sandwich norms, soft-capped scores, q/k norms and second
rope table, bf16, int8 and int4) and at TP=2 (the all-reduces from C through the shared-memory exchange).
That the per-op path itself matches Hugging Face is tests/test_cpu_gemv.py's ``test_engine_bf16_matches_hf``
(which now runs its decode steps through the stack too).
"""
import pytest
import torch

from helpers import FAMILIES, optimised_copy, padded_batch, tiny_model
from lightning_dsinfer.kernels import cpu_gemv
from lightning_dsinfer.modules.cpu_stack import MAX_ROWS, CpuDecodeStack
from multiproc import run_ranks
from stack_checks import run_both_paths

needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="CPU GEMV kernel unavailable (see log)")
needs_wide = pytest.mark.skipif(not cpu_gemv.has_wide_ops(), reason="CPU without AVX512: the per-op path runs")


@needs_kernel
@pytest.mark.parametrize("isa", cpu_gemv.supported_isas())
@pytest.mark.parametrize("family", FAMILIES)
def test_stack_bit_identical_to_per_op_path(family, isa):
    hf = tiny_model(family).to(torch.bfloat16)
    with cpu_gemv.use_path(isa):
        opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16)
        ids, mask = padded_batch([12, 5, 9])
        runs = run_both_paths(opt, ids, mask, new_tokens=8)
    (tok_s, hid_s, _, n_s), (tok_o, hid_o, _, n_o) = runs["stack"], runs["ops"]
    wide = isa in ("amx_bf16", "avx512_bf16", "avx512")   # without AVX512 the per-op path runs (torch's ops win)
    assert n_s == (7 if wide else 0) and n_o == 0     # every decode step (not the prompt) went through C, or none
    assert torch.equal(tok_s, tok_o)
    assert len(hid_s) == len(hid_o) == 8
    for a, b in zip(hid_s, hid_o):
        assert torch.equal(a, b)
    if family in ("mistral", "qwen2"):                # window 7 < 12 + 8 columns: window masks were in play
        assert any(ly.attn.sliding for ly in opt._dsinfer_engine.decoder.layers)


# (family, config overrides, expected form: LayerNorm, parallel residual, MLP activation, rotary width of D = 16)
GPT_CASES = {
    "gpt_neox": ("gpt_neox", {}, (1, 1, "gelu", 8)),                    # parallel residual, two norms, rotary 50%
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False}, (1, 0, "gelu", 8)),
    "phi": ("phi", {}, (1, 1, "gelu_tanh", 8)),                         # parallel, one shared norm
    "gpt2": ("gpt2", {}, (1, 0, "gelu_tanh", 0)),                       # learned positions: no rotary
    "stablelm": ("stablelm", {}, (1, 0, "swiglu", 8)),                  # SwiGLU under LayerNorms, GQA
    "opt": ("opt", {}, (1, 0, "relu", 0)),
    "gptj": ("gptj", {}, (1, 1, "gelu_tanh", 8)),                       # parallel, shared norm, reordered rotary
    "falcon": ("falcon", {}, (1, 1, "gelu", 16)),                       # parallel, ln_attn / ln_mlp, KV groups
    "cohere": ("cohere", {}, (1, 1, "swiglu", 16)),                     # zero LayerNorm biases, SwiGLU, shared norm
    "gpt_bigcode": ("gpt_bigcode", {}, (1, 0, "gelu_tanh", 0)),         # multi-query, learned positions
    "gpt_neo": ("gpt_neo", {}, (1, 0, "gelu_tanh", 0)),                 # unscaled scores, a local (windowed) layer
    "starcoder2": ("starcoder2", {}, (1, 0, "gelu_tanh", 16)),          # sliding window, GQA, biases
    "bloom": ("bloom", {}, (1, 0, "gelu_tanh", 0)),                     # ALiBi: each block's slopes, no rotary
}


@needs_wide
@pytest.mark.parametrize("case", list(GPT_CASES))
def test_stack_gpt_families_bit_identical_to_per_op_path(case, monkeypatch):
    """The GPT families' blocks through C: LayerNorms with biases, gelu / gelu_tanh / relu MLPs or SwiGLU, the
    parallel residual (with two norms or one shared), partial rotary (the step's cos rows narrower than a head) or
    none (GPT-2's / OPT's learned positions are added before the blocks; BLOOM's ALiBi slopes go to the attention)."""
    family, overrides, (layer_norm, parallel, act, rotary_dim) = GPT_CASES[case]
    hf = tiny_model(family, **overrides).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16)
    stack = CpuDecodeStack.build(opt._dsinfer_engine.decoder)
    assert stack is not None
    assert (stack.shape.layer_norm, stack.shape.parallel) == (layer_norm, parallel)
    want = (1, cpu_gemv.ACT_KINDS["silu"]) if act == "swiglu" else (0, cpu_gemv.ACT_KINDS[act])
    assert (stack.shape.gated, stack.shape.mlp_act) == want
    assert all(bool(t.alibi) == (family == "bloom") for t in stack.table)
    widths = []
    real = CpuDecodeStack.__call__

    def recording(self, h, step):
        out = real(self, h, step)
        widths.append(self.shape.rotary_dim)
        return out

    monkeypatch.setattr(CpuDecodeStack, "__call__", recording)
    ids, mask = padded_batch([12, 5, 9])
    runs = run_both_paths(opt, ids, mask, new_tokens=8)
    (tok_s, hid_s, _, n_s), (tok_o, hid_o, _, n_o) = runs["stack"], runs["ops"]
    assert n_s == 7 and n_o == 0 and widths == [rotary_dim] * 7
    assert torch.equal(tok_s, tok_o)
    assert len(hid_s) == len(hid_o) == 8 and all(torch.equal(a, b) for a, b in zip(hid_s, hid_o))


# (family, config overrides, quantize options): the tiny configs of tests/helpers.py (windows of 7 columns < 12 + 8:
# the window masks matter; the prompts left-padded)
GEMMA_CASES = {
    "gemma": ("gemma", {}, {}),                                         # (1 + w) fp32 norms, GeGLU (tanh), MQA
    "gemma_erf": ("gemma", {"hidden_act": "gelu"}, {}),                 # GeGLU (erf)
    "gemma2": ("gemma2", {"attn_logit_softcapping": 1.0}, {}),          # sandwich norms; scores up to ~2.7 capped at 1
    "gemma3_text": ("gemma3_text", {}, {}),                             # q/k norms, the sliding layers' rope table
    "gemma2_int8": ("gemma2", {}, {"quantize": "int8"}),
    "gemma3_int4": ("gemma3_text", {}, {"quantize": "int4", "quantize_group_size": 32}),
}


@needs_wide
@pytest.mark.parametrize("case", list(GEMMA_CASES))
def test_stack_gemma_bit_identical_to_per_op_path(case, monkeypatch):
    """Gemma's blocks through C: (1 + w) RMSNorms kept in fp32 (scaled in fp32, rounded once), GeGLU, Gemma 2 / 3's
    norms of the attention's and the MLP's outputs before the residual adds, Gemma 2's soft-capped scores, its
    sliding and full layers, Gemma 3's q/k norms and the sliding layers' own rope rows; bf16, int8 and int4 weights.
    The per-op path takes the same C kernels for each piece (ops.rms_norm with fp32 weights, ops.gated_act,
    ops.attention with a cap), so the steps agree bit for bit."""
    family, overrides, quantize = GEMMA_CASES[case]
    hf = tiny_model(family, **overrides).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, **quantize)
    dec = opt._dsinfer_engine.decoder
    stack = CpuDecodeStack.build(dec)
    assert stack is not None
    act = "gelu" if case == "gemma_erf" else "gelu_tanh"
    assert (stack.shape.norm_f32, stack.shape.gated, stack.shape.mlp_act) == (1, 1, cpu_gemv.ACT_KINDS[act])
    assert stack.shape.softcap == (1.0 if case == "gemma2" else 5.0 if family == "gemma2" else 0.0)
    sandwich = family != "gemma"
    assert all(bool(t.attn_out_norm) == bool(t.mlp_out_norm) == sandwich for t in stack.table)
    assert any(ly.attn.sliding for ly in dec.layers) == sandwich                  # Gemma 2 / 3: windowed layers
    own = []
    real = CpuDecodeStack.__call__

    def recording(self, h, step):
        own.append(self.own_tables(step))
        return real(self, h, step)

    monkeypatch.setattr(CpuDecodeStack, "__call__", recording)
    ids, mask = padded_batch([12, 5, 9])
    runs = run_both_paths(opt, ids, mask, new_tokens=8)
    (tok_s, hid_s, _, n_s), (tok_o, hid_o, _, n_o) = runs["stack"], runs["ops"]
    assert n_s == 7 and n_o == 0 and own == [family == "gemma3_text"] * 7
    assert torch.equal(tok_s, tok_o)
    assert len(hid_s) == len(hid_o) == 8 and all(torch.equal(a, b) for a, b in zip(hid_s, hid_o))


# (config overrides, quantize options): tests/helpers.py's tiny Gemma 4 (E2B-like: per-layer inputs, the last two
# layers reading earlier layers' K/V, full layers with 32-wide heads, one KV head whose values are the keys'
# projection, a proportional rope of their own; sliding layers 16 wide with a window of 7 < 12 + 8 columns)
GEMMA4_CASES = {
    "e2b": ({}, {}),
    "31b": (dict(hidden_size_per_layer_input=0, num_kv_shared_layers=0, attention_k_eq_v=False,
                 use_double_wide_mlp=False), {}),                     # no per-layer inputs, every layer its own K/V
    "e2b_int8": ({}, {"quantize": "int8"}),
    "e2b_int4": ({}, {"quantize": "int4", "quantize_group_size": 8}),
}


@needs_wide
@pytest.mark.parametrize("case", list(GEMMA4_CASES))
def test_stack_gemma4_bit_identical_to_per_op_path(case):
    """Gemma 4's blocks through C: each layer's own head dim, KV heads and MLP width, v RMS-normed, the full layers'
    rope table and the sliding layers' own, the shared layers' queries over an earlier layer's cache columns (nothing
    written), the per-layer input (gate, GeLU, times the layer's row, projection, norm, add) and the layer scalar;
    bf16, int8 and int4 weights. Every decode step through C, bit-identical to the per-op path."""
    overrides, quantize = GEMMA4_CASES[case]
    hf = tiny_model("gemma4_text", **overrides).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, **quantize)
    dec = opt._dsinfer_engine.decoder
    stack = CpuDecodeStack.build(dec)
    assert stack is not None
    heads = {t.head_dim for t in stack.table}
    assert heads == {16, 32} and stack.shape.head_dim == 32 and stack.shape.scale == 1.0
    e2b = not overrides
    assert [bool(t.shared_kv) for t in stack.table] == [False] * 4 + [e2b] * 2
    assert all(bool(t.v_norm) != bool(t.shared_kv) and t.scalar for t in stack.table)
    assert all(bool(t.pl_gate.w) == e2b for t in stack.table) and stack.per_layer_dim == (8 if e2b else 0)
    if e2b:     # the shared layers' MLPs twice as wide, their tables pointing at layers 3 (sliding) and 2 (full)
        assert [t.inter for t in stack.table] == [96] * 4 + [192] * 2
    ids, mask = padded_batch([12, 5, 9])
    runs = run_both_paths(opt, ids, mask, new_tokens=8)
    (tok_s, hid_s, _, n_s), (tok_o, hid_o, _, n_o) = runs["stack"], runs["ops"]
    assert n_s == 7 and n_o == 0
    assert torch.equal(tok_s, tok_o)
    assert len(hid_s) == len(hid_o) == 8 and all(torch.equal(a, b) for a, b in zip(hid_s, hid_o))
    if e2b:
        cache = opt._dsinfer_engine.cache
        bound = stack._bind_cache(cache)
        assert cache.k[4].numel() == cache.k[5].numel() == 0        # (no columns of their own)
        assert [(bound[i].k_cache, bound[i].v_cache) for i in (4, 5)] == [
            (cache.k[j].data_ptr(), cache.v[j].data_ptr()) for j in (3, 2)]


@needs_wide
def test_gemma_pieces_match_reference():
    """The C kernels the per-op path now takes for Gemma's pieces, against kernels/reference.py: the RMSNorm with
    fp32 (1 + w) weights (the same arithmetic, only the sum of squares in another order: within one bf16 ulp, nearly
    all identical), GeGLU (tanh / erf; the kernels' vectorised tanh / erf are within ~1 fp32 ulp of torch's, so a rare
    element lands one bf16 ulp away) and the soft-capped decode attention (fp32 throughout, against the fp32 twin
    reference.decode_attention)."""
    from lightning_dsinfer.kernels import ops, reference

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 1, 200, generator=g) * 3).bfloat16()
    w = torch.randn(200, generator=g) * 0.2 + 1.0                       # fp32, as builder.norm_weight keeps it
    got, want = cpu_gemv.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)
    assert got is not None and torch.equal(ops.rms_norm(x, w, 1e-6), got)
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -7)
    assert (got == want).float().mean() > 0.99
    gate_up = (torch.randn(4, 1, 2 * 328, generator=g) * 3).bfloat16()
    for act, approximate in (("gelu_tanh", "tanh"), ("gelu", "none")):
        got, want = cpu_gemv.gated_act(gate_up, act), reference.gelu_and_mul(gate_up, approximate)
        assert got is not None and torch.equal(ops.gated_act(gate_up, act), got)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=2 ** -7)
        assert (got == want).float().mean() > 0.99
    b, hq, hkv, length, d = 3, 8, 2, 37, 32
    q = torch.randn(b, hq, 1, d, generator=g).bfloat16()
    k, v = (torch.randn(b, hkv, length, d, generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :9] = False                                            # a left-padded row
    mask[2, ..., :length - 7] = False                                   # a sliding window
    got = cpu_gemv.decode_attention(q, k, v, mask, 0.3, softcap=1.5)
    kv_start = torch.tensor([0, 9, length - 7])
    want = reference.decode_attention(q[:, :, 0], k, v, torch.full((b,), length), 0.3, kv_start=kv_start,
                                      softcap=1.5)
    assert got is not None and torch.equal(ops.attention(q, k, v, mask, 0.3, softcap=1.5), got)
    torch.testing.assert_close(got[:, :, 0].float(), want.float(), atol=1e-2, rtol=2 ** -7)
    uncapped = cpu_gemv.decode_attention(q, k, v, mask, 0.3)
    assert not torch.equal(got, uncapped)                               # the cap changed the result


@needs_wide
def test_stack_bit_identical_with_many_rows():
    """A decode batch of 40 rows (above the row-major kernel's limit on AVX512-BF16 machines: there the per-op path
    runs too) is bit-identical as well."""
    hf = tiny_model("qwen2").to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, max_batch_size=40)
    ids, mask = padded_batch([4 + i % 9 for i in range(40)], seed=4)
    runs = run_both_paths(opt, ids, mask, new_tokens=4)
    assert torch.equal(runs["stack"][0], runs["ops"][0])
    assert all(torch.equal(a, b) for a, b in zip(runs["stack"][1], runs["ops"][1]))
    stack = CpuDecodeStack.build(opt._dsinfer_engine.decoder)
    assert runs["stack"][3] == (3 if stack.row_limit >= 40 else 0)      # AMX / no bf16 row limit: through C


@needs_wide
def test_stack_takes_only_what_it_runs():
    """Per-op path for: prompts, more than MAX_ROWS rows, HF caches (beam search), fp32 models; never a wrong
    answer."""
    hf = tiny_model("llama").to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16, max_batch_size=MAX_ROWS + 1)
    dec = opt._dsinfer_engine.decoder
    ids, mask = padded_batch([12, 5, 9])
    opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert isinstance(dec._stack, CpuDecodeStack)
    big_ids, big_mask = padded_batch([6 + i % 5 for i in range(MAX_ROWS + 1)])
    runs = run_both_paths(opt, big_ids, big_mask, new_tokens=3)
    assert runs["stack"][3] == 0 and torch.equal(runs["stack"][0], runs["ops"][0])      # too many rows: per-op
    calls = []
    real = CpuDecodeStack.__call__
    CpuDecodeStack.__call__ = lambda self, h, step: calls.append(1) or real(self, h, step)
    try:
        beam = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
    finally:
        CpuDecodeStack.__call__ = real
    assert not calls and beam.shape[1] == ids.shape[1] + 3                                # HF cache: per-op
    fp32 = optimised_copy(tiny_model("llama"), max_seq_len=48)
    fp32.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert fp32._dsinfer_engine.decoder._stack is False                                   # never built for fp32


@needs_kernel
def test_stack_declines_the_onednn_fallback():
    with cpu_gemv.disabled():
        opt = optimised_copy(tiny_model("llama").to(torch.bfloat16), max_seq_len=48, dtype=torch.bfloat16)
    assert CpuDecodeStack.build(opt._dsinfer_engine.decoder) is None


@needs_wide
def test_stack_under_tensor_parallelism():
    # gemma2: the all-reduce before the output's norm; bloom: each rank's slice of the ALiBi slopes; gemma4_text: its
    # per-layer inputs whole on each rank, its single full-layer KV head on both
    families = ["llama", "qwen3", "gpt_neox", "gemma2", "bloom", "gemma4_text"]
    codes, outs, _ = run_ranks("stack_tp_worker.py", 2, ["--families", *families], timeout=240)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == len(families), outs[0]
