"""The one-call C decode step (modules/cpu_stack.py, ``dsi_decode_stack``) against the engine's per-op path.

Both run the same kernels in the same order with the same roundings, so every decode step's hidden states must be
bit-identical, single process (every CPU kernel path of this machine, every family: biases, sliding windows,
Qwen3's q/k norms, left-padded batches; the GPT families' LayerNorms, plain MLPs, parallel residual, partial or no
rotary) and at TP=2 (the all-reduces from C through the shared-memory exchange).
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
}


@needs_wide
@pytest.mark.parametrize("case", list(GPT_CASES))
def test_stack_gpt_families_bit_identical_to_per_op_path(case, monkeypatch):
    """The GPT families' blocks through C: LayerNorms with biases, gelu / gelu_tanh / relu MLPs or SwiGLU, the
    parallel residual (with two norms or one shared), partial rotary (the step's cos rows narrower than a head) or
    none (GPT-2's / OPT's learned positions are added before the blocks)."""
    family, overrides, (layer_norm, parallel, act, rotary_dim) = GPT_CASES[case]
    hf = tiny_model(family, **overrides).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16)
    stack = CpuDecodeStack.build(opt._dsinfer_engine.decoder)
    assert stack is not None
    assert (stack.shape.layer_norm, stack.shape.parallel) == (layer_norm, parallel)
    assert stack.shape.mlp_act == (-1 if act == "swiglu" else cpu_gemv.ACT_KINDS[act])
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


@needs_wide
def test_stack_declines_alibi():
    """BLOOM's ALiBi: the C decode attention adds no position biases, so its blocks keep the per-op path."""
    opt = optimised_copy(tiny_model("bloom").to(torch.bfloat16), max_seq_len=48, dtype=torch.bfloat16)
    assert CpuDecodeStack.build(opt._dsinfer_engine.decoder) is None
    ids, mask = padded_batch([12, 5, 9])
    runs = run_both_paths(opt, ids, mask, new_tokens=3)
    assert runs["stack"][3] == 0 and torch.equal(runs["stack"][0], runs["ops"][0])


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
    codes, outs, _ = run_ranks("stack_tp_worker.py", 2, ["--families", "llama", "qwen3", "gpt_neox"], timeout=240)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == 3, outs[0]
