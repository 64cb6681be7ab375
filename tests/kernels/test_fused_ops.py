"""The fused entry points of ``kernels/ops.py`` the engine uses on the Triton path (``add_rms_norm``,
``rotary_write_kv``, ``linear``), against their references; and the CPU path, which must stay bit-for-bit the
op sequence the engine ran before the fused forms (a frozen copy of that code below).

On CPU the kernels run in the Triton interpreter with the dispatch forced (``ops.force_triton``); on a GPU the
same tests run on CUDA tensors without forcing.
"""
import contextlib
import sys
from pathlib import Path

import pytest
import torch
from kernel_utils import DEVICES, FORCE_TRITON, INTERPRET, assert_close, bf16_ok

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/helpers.py
from helpers import optimised_copy, padded_batch, tiny_model  # noqa: E402

from lightning_dsinfer.kernels import ops, reference  # noqa: E402
from lightning_dsinfer.modules import transformer  # noqa: E402

DEVICE = DEVICES[0] if DEVICES else "cpu"
needs_kernels = pytest.mark.skipif(not DEVICES, reason="no CUDA and TRITON_INTERPRET unset")


def _triton_path():
    return ops.force_triton() if FORCE_TRITON else contextlib.nullcontext()


def _skip_dtype(dtype):
    if dtype == torch.bfloat16 and not bf16_ok(DEVICE):
        pytest.skip("bf16 unsupported on this GPU")


# ----------------------------------------------------------------------------------- add_rms_norm
# The kernel scales by the weight in fp32 and rounds once; the reference (HF's order) rounds the normalised
# value, then scales in the input dtype and rounds again: up to ~1.5 output ulps apart (|out| reaches ~6,
# a bf16 ulp there is 3.1e-2). The new residual h = x + residual is one rounding on both sides: equal.
NORM_TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 2e-3), (torch.bfloat16, 3.2e-2, 1.6e-2)]


@needs_kernels
@pytest.mark.parametrize("dtype,atol,rtol", NORM_TOLS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123), (7, 73)])
def test_add_rms_norm_matches_reference(dtype, atol, rtol, shape):
    _skip_dtype(dtype)
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    res = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device=DEVICE)).to(dtype)
    x0, res0 = x.clone(), res.clone()
    want, want_h = reference.add_rms_norm(x, res, w, 1e-6)
    ops.dispatch_counts.clear()
    with _triton_path():
        got, got_h = ops.add_rms_norm(x, res, w, 1e-6)
    assert dict(ops.dispatch_counts) == {("add_rms_norm", "triton"): 1}
    assert_close(got, want, atol, rtol)
    if dtype == torch.bfloat16 and INTERPRET:
        # The interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest): one ulp (2^-7 relative)
        assert_close(got_h, want_h, 0, 2 ** -7)
    else:
        assert torch.equal(got_h, want_h)
    assert torch.equal(x, x0) and torch.equal(res, res0)   # inputs untouched (the kernel's h is a new tensor)


@needs_kernels
def test_add_rms_norm_falls_back_on_mismatched_residual():
    x, w = torch.randn(2, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    res = torch.randn(2, 40, device=DEVICE, dtype=torch.float16)
    ops.dispatch_counts.clear()
    with _triton_path():
        got, h = ops.add_rms_norm(x, res, w, 1e-6)
    assert dict(ops.dispatch_counts) == {("add_rms_norm", "reference:layout"): 1}
    torch.testing.assert_close(h, x + res)


# ----------------------------------------------------------------------------------- rotary_write_kv
# Rotation in fp32 with one rounding in the kernel; the reference multiplies in the input dtype (x * cos
# rounded, then addcmul): about one output ulp apart (|q|, |k| reach ~4: bf16 ulp 3.1e-2, fp16 3.9e-3). K in
# the cache is the returned k in both; V is copied exactly.
ROT_TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 2e-3), (torch.bfloat16, 3.2e-2, 1.6e-2)]


def _tables(b, t, d, dtype, offset=0):
    """cos / signed-sin rows [B, T, 1, D] as modules/rotary.py builds them (cat(c, c), cat(-s, s)), row b at
    positions offset + 3b + t (left-padded rows start later)."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = offset + 3 * torch.arange(b)[:, None] + torch.arange(t)[None, :]
    ang = pos[..., None].float() * inv
    cos = torch.cat((ang.cos(), ang.cos()), -1)[:, :, None].to(DEVICE, dtype)
    sin = torch.cat((-ang.sin(), ang.sin()), -1)[:, :, None].to(DEVICE, dtype)
    return cos, sin


# (B, T, Hq, Hkv, D, where): prefill into the cache at column 3, GQA 3:1 with head dim 24 (not a power of two);
# decode at a device column (CUDA-graph step); no cache (plain forward / HF cache); MHA with head dim 8.
ROT_CASES = [(2, 5, 6, 2, 24, "cache"), (3, 1, 4, 2, 16, "device_col"), (2, 3, 4, 1, 32, "none"),
             (1, 7, 2, 2, 8, "cache")]


@needs_kernels
@pytest.mark.parametrize("dtype,atol,rtol", ROT_TOLS)
@pytest.mark.parametrize("b,t,hq,hkv,d,where", ROT_CASES)
@pytest.mark.parametrize("norms", [False, True])
def test_rotary_write_kv_matches_reference(dtype, atol, rtol, b, t, hq, hkv, d, where, norms):
    _skip_dtype(dtype)
    qkv = torch.randn(b, t, hq + 2 * hkv, d, device=DEVICE).to(dtype)
    cos, sin = _tables(b, t, d, dtype, offset=2)
    qn = kn = None
    if norms:   # Qwen3's per-head q / k norms
        qn, kn = ((1 + 0.1 * torch.randn(d, device=DEVICE)).to(dtype) for _ in range(2))
    kc, vc = (torch.randn(b, hkv, 12, d, device=DEVICE).to(dtype) for _ in range(2))   # columns outside stay
    caches = {side: (kc.clone(), vc.clone()) for side in ("want", "got")}
    col = {"cache": 3, "device_col": torch.tensor([5], device=DEVICE), "none": 0}[where]
    kw = dict(q_norm=qn, k_norm=kn, eps=1e-6)
    slots = {side: (None, None, 0) if where == "none" else (*caches[side], col) for side in caches}
    want = reference.rotary_write_kv(qkv, hq, cos, sin, *slots["want"], **kw)
    ops.dispatch_counts.clear()
    with _triton_path():
        got = ops.rotary_write_kv(qkv, hq, cos, sin, *slots["got"], **kw)
    assert dict(ops.dispatch_counts) == {("rotary_write_kv", "triton"): 1}, dict(ops.dispatch_counts)
    for g, w, name in zip(got, want, "qkv"):
        assert g.shape == w.shape, name
        assert_close(g, w, atol, rtol, msg=name)
    assert torch.equal(got[2], qkv[:, :, hq + hkv:])   # v is the view of the QKV output
    if where != "none":
        (kw_, vw), (kg, vg) = caches["want"], caches["got"]
        assert_close(kg, kw_, atol, rtol, msg="k cache")
        assert torch.equal(vg, vw)
        c0 = 3 if where == "cache" else 5
        assert torch.equal(kg[:, :, c0:c0 + t], got[1].transpose(1, 2))   # the cache holds exactly k_out


@needs_kernels
def test_rotary_write_kv_falls_back_and_checks_columns():
    b, t, hq, hkv, d = 2, 3, 2, 1, 16
    qkv = torch.randn(b, t, hq + 2 * hkv, d, device=DEVICE)
    cos, sin = _tables(b, t, d, torch.float32)
    kc, vc = torch.zeros(b, hkv, 8, d, device=DEVICE), torch.zeros(b, hkv, 8, d, device=DEVICE)
    ops.dispatch_counts.clear()
    with _triton_path():
        # cos shared by the batch ([1, T, 1, D]) is not the per-token layout the kernel reads: reference
        q, _, _ = ops.rotary_write_kv(qkv, hq, cos[:1], sin[:1])
        assert dict(ops.dispatch_counts) == {("rotary_write_kv", "reference:layout"): 1}
        torch.testing.assert_close(q, reference.rotary_write_kv(qkv, hq, cos[:1], sin[:1])[0])
        with pytest.raises(ValueError, match=r"columns \[6, 9\) outside the cache's 8"):
            ops.rotary_write_kv(qkv, hq, cos, sin, kc, vc, 6)


# ----------------------------------------------------------------------------------- linear (SBI-GEMM)
# As tests/kernels/test_small_gemm.py: fp32 accumulation on both sides, low-precision products of |y| ~ 10.
GEMM_TOLS = [(torch.float16, 1e-2, 2e-3), (torch.bfloat16, 8e-2, 1.6e-2)]


@needs_kernels
@pytest.mark.parametrize("dtype,atol,rtol", GEMM_TOLS)
@pytest.mark.parametrize("lead,k,n", [((1,), 73, 40), ((2, 3), 96, 33), ((32,), 64, 130)])
@pytest.mark.parametrize("epilogue", ["none", "bias_residual"])
def test_linear_small_m_uses_small_gemm(dtype, atol, rtol, lead, k, n, epilogue):
    _skip_dtype(dtype)
    x = torch.randn(*lead, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / 4).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if epilogue != "none" else None
    res = torch.randn(*lead, n, device=DEVICE).to(dtype) if epilogue != "none" else None
    want = reference.small_gemm(x.reshape(-1, k), w, bias, None if res is None else res.reshape(-1, n))
    ops.dispatch_counts.clear()
    with _triton_path():
        got = ops.linear(x, w, bias, res)
    assert dict(ops.dispatch_counts) == {("linear", "triton"): 1}
    assert got.shape == (*lead, n)
    assert_close(got.reshape(-1, n), want, atol, rtol)


@needs_kernels
@pytest.mark.parametrize("m,dtype,path", [(33, torch.bfloat16, "torch:large_m"), (4, torch.float32, "torch:dtype")])
def test_linear_large_m_and_fp32_stay_on_torch(m, dtype, path):
    x, w = torch.randn(m, 40, device=DEVICE).to(dtype), torch.randn(24, 40, device=DEVICE).to(dtype)
    res = torch.randn(m, 24, device=DEVICE).to(dtype)
    ops.dispatch_counts.clear()
    with _triton_path():
        got = ops.linear(x, w, None, res)
    assert dict(ops.dispatch_counts) == {("linear", path): 1}
    assert torch.equal(got, reference.linear(x, w, None, res))


# ----------------------------------------------------------------------------------- the CPU path
def test_cpu_path_of_new_ops_is_the_old_op_sequence():
    # Unforced CPU tensors: no dispatch, and bit-for-bit what the engine computed before the fused forms.
    ops.dispatch_counts.clear()
    x, res, w = torch.randn(3, 5, 40), torch.randn(3, 5, 40), torch.randn(40)
    out, h = ops.add_rms_norm(x, res, w, 1e-6)
    y = x.clone()
    y += res                                         # what Linear(x, residual) did after F.linear
    assert torch.equal(h, y) and torch.equal(out, reference.rms_norm(y, w, 1e-6))
    lw, lb = torch.randn(24, 40), torch.randn(24)
    y = torch.nn.functional.linear(x, lw, lb)
    y += res[..., :24]
    assert torch.equal(ops.linear(x, lw, lb, res[..., :24]), y)
    assert not ops.dispatch_counts


def _old_attention(attn, x, residual, step):
    """Frozen copy of ``Attention.forward`` before the fused forms (reference ops, StaticKVCache.write). Attention
    and SwiGLU go through ``ops`` as the engine's do: on the CPU bf16 decode rows take one-call C kernels there
    (tests/test_cpu_gemv.py checks them against the reference); what is frozen here is the block's structure."""
    b, t, _ = x.shape
    hq, hkv, d = attn.hq, attn.hkv, attn.d
    qkv = attn.qkv(x).view(b, t, hq + 2 * hkv, d)
    v = qkv[:, :, hq + hkv:]
    if attn.q_norm is None:
        qk = reference.rotary_half(qkv[:, :, :hq + hkv], step.cos, step.sin)
        q, k = qk[:, :, :hq], qk[:, :, hq:]
    else:
        q = reference.rotary_half(reference.rms_norm(qkv[:, :, :hq], attn.q_norm, attn.eps), step.cos, step.sin)
        k = reference.rotary_half(reference.rms_norm(qkv[:, :, hq:hq + hkv], attn.k_norm, attn.eps), step.cos,
                                  step.sin)
    if step.cache is not None:
        keys, values = step.cache.write(attn.layer_idx, k, v, step.start)
    elif step.hf_cache is not None:
        keys, values = step.hf_cache.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)
    else:
        keys, values = k.transpose(1, 2), v.transpose(1, 2)
    mask = step.window_mask if (attn.sliding and step.window_mask is not None) else step.mask
    out = ops.attention(q.transpose(1, 2), keys, values, mask, attn.scaling)
    return attn.o(out.transpose(1, 2).reshape(b, t, hq * d), residual)


def _old_hidden(self, h, step):
    """Frozen copy of ``DecoderModel.hidden`` / ``DecoderLayer.forward`` before the fused forms."""
    for layer in self.layers:
        h = _old_attention(layer.attn, reference.rms_norm(h, layer.input_norm, layer.eps), h, step)
        x = reference.rms_norm(h, layer.post_norm, layer.eps)
        h = layer.mlp.down(ops.silu_and_mul(layer.mlp.gate_up(x)), h)
    return reference.rms_norm(h, self.final_norm, self.eps)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_engine_bit_identical_to_pre_fusion_code(family, dtype, monkeypatch):
    # The CPU engine (oneDNN-packed bf16 linears with the residual add in the GEMM, reference ops) gives the
    # same bits as before: plain forward, own decode loop (static cache), HF's loop (beam search: HF cache).
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=32, dtype=dtype)
    dec = opt._dsinfer_engine.decoder
    ids, mask = padded_batch([12, 5, 9])
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False)
    runs = {}
    for version in ("new", "old"):
        hidden = []   # every hidden state the decoder returned (prefill and each decode step)

        def record(h, step):
            out = type(dec).hidden(dec, h, step)
            hidden.append(out)
            return out

        with monkeypatch.context() as mp:
            if version == "old":
                mp.setattr(transformer.DecoderModel, "hidden", _old_hidden)
            mp.setattr(dec, "hidden", record)
            ops.dispatch_counts.clear()
            runs[version] = (opt(input_ids=ids, attention_mask=mask).logits, opt.generate(**kw, max_new_tokens=4),
                             opt.generate(**kw, max_new_tokens=3, num_beams=2), hidden)
            assert not ops.dispatch_counts   # the CPU path never reaches the dispatch counters
    new, old = runs["new"], runs["old"]
    assert torch.equal(new[0], old[0])       # plain forward (K/V nowhere)
    assert torch.equal(new[1], old[1])       # own loop (static cache) ...
    assert torch.equal(new[2], old[2])       # ... and HF's loop (beam search, HF cache)
    assert len(new[3]) == len(old[3]) >= 1 + 4 + 3
    assert all(torch.equal(a, b) for a, b in zip(new[3], old[3]))   # bit-identical at every step
