"""The CPU bf16 linear kernels (``kernels/cpu_gemv``) against an fp32 reference, and the engine using them.

Every path this machine runs is checked (AMX on packed weights; AVX512-BF16 / AVX512F / AVX2 on row-major
weights): a CPU runs the paths below its best one too. ``test_report_path`` names the path this machine's
engine takes in the warnings summary, so a CI log says which one was exercised.

Tolerance against ``x.float() @ w.float().T (+ bias + residual)`` in fp32: the kernel accumulates in fp32 in
its own order (|error| up to ~1e-3 for K = 2816, hence atol 1e-3) and rounds once to bf16 (half a bf16 ulp,
at most 2^-8 relative, hence rtol 2^-8). On integer-valued data every sum is exact, so there the result is
compared bit for bit (entries in {-1, 0, 1}, K <= 200: every sum is an integer below 256, exact in bf16).
"""
import logging
import shutil
import warnings

import pytest
import torch

from helpers import optimised_copy, padded_batch, tiny_model
from lightning_dsinfer.kernels import cpu_gemv
from lightning_dsinfer.modules.linear import Linear

ATOL, RTOL = 1e-3, 2.0 ** -8


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


ROW_PATHS = [p for p in cpu_gemv.supported_isas() if p != "amx_bf16"]
needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="CPU GEMV kernel unavailable (see log)")
needs_amx = pytest.mark.skipif(not cpu_gemv.has_amx(), reason="CPU has no AMX-BF16 (or no tile permission)")
SHAPES = [(1, 1), (37, 70), (64, 64), (130, 96), (33, 1000), (1030, 2816)]   # (N, K): odd N, K % 32 != 0


def _case(m, n, k, bias, residual, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randint(-1, 2, shape, generator=g).float() if integer else torch.randn(*shape, generator=g)
        return t.to(torch.bfloat16)

    x, w = rnd(m, k), rnd(n, k)
    b = rnd(n) if bias else None
    r = rnd(m, n) if residual else None
    ref = x.float() @ w.float().t()
    if b is not None:
        ref = ref + b.float()
    if r is not None:
        ref = ref + r.float()
    return x, w, b, r, ref


def test_kernel_builds_where_it_can():
    # CI has g++ and an x86-64 CPU with AVX2 at least: there the kernel must build, not silently fall back.
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    if not {"avx2", "fma"} <= _cpu_flags() and "avx512f" not in _cpu_flags():
        pytest.skip("CPU without AVX2+FMA / AVX512: the kernel has no path here")
    assert cpu_gemv.available(), "CPU GEMV kernel failed to build or load (see the logged warning)"
    assert cpu_gemv._build()[1] == 0.0        # a second build finds the cached library


@needs_kernel
def test_report_path():
    amx = cpu_gemv.has_amx()
    warnings.warn(f"cpu_gemv: this machine runs {cpu_gemv.isa()} (checked: {', '.join(cpu_gemv.supported_isas())}); "
                  f"engine bf16 linears: {'AMX on packed weights' if amx else 'row-major kernel'}; "
                  f"built in {cpu_gemv.build_seconds():.1f} s (0.0: cached)", UserWarning)


@needs_kernel
@pytest.mark.parametrize("isa", ROW_PATHS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True), (False, True)])
def test_row_kernel_matches_fp32(isa, n, k, bias, residual):
    for m in range(1, 9):
        x, w, b, r, ref = _case(m, n, k, bias, residual, seed=m)
        got = cpu_gemv.linear(x, w, b, r, isa=isa)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        torch.testing.assert_close(got.float(), ref, atol=ATOL, rtol=RTOL, msg=lambda s: f"M={m}: {s}")


@needs_kernel
@pytest.mark.parametrize("isa", ROW_PATHS)
@pytest.mark.parametrize("m", [1, 3, 8, 13, 33])
def test_row_kernel_exact_on_integers(isa, m):
    x, w, b, r, ref = _case(m, 37, 200, True, True, integer=True)
    assert torch.equal(cpu_gemv.linear(x, w, b, r, isa=isa).float(), ref)


@needs_kernel
@pytest.mark.parametrize("isa", ROW_PATHS)
def test_row_kernel_strided_views(isa):
    # pack=False weights are views into a streamed buffer (row stride > K); x / residual rows may be strided.
    x, w, b, r, ref = _case(5, 37, 70, True, True)
    wbuf = torch.zeros(37, 100, dtype=torch.bfloat16)
    wbuf[:, 10:80] = w
    xbuf = torch.zeros(5, 90, dtype=torch.bfloat16)
    xbuf[:, 3:73] = x
    rbuf = torch.zeros(5, 50, dtype=torch.bfloat16)
    rbuf[:, :37] = r
    got = cpu_gemv.linear(xbuf[:, 3:73], wbuf[:, 10:80], b, rbuf[:, :37], isa=isa)
    torch.testing.assert_close(got.float(), ref, atol=ATOL, rtol=RTOL)
    # 3-D activations (batch, tokens, features), as the engine calls it
    got3 = cpu_gemv.linear(x.view(5, 1, 70), w, b, r.view(5, 1, 37), isa=isa)
    assert got3.shape == (5, 1, 37) and torch.equal(got3.view(5, 37), cpu_gemv.linear(x, w, b, r, isa=isa))


@needs_amx
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias,residual", [(False, False), (True, True)])
def test_amx_packed_matches_fp32(n, k, bias, residual):
    # M: 1..8 (decode), 16, 17 / 33 / 100 (the last block of 16 rows overlaps the one before), 300 (chunks of rows)
    for m in [*range(1, 9), 16, 17, 33, 100, 300]:
        x, w, b, r, ref = _case(m, n, k, bias, residual, seed=m)
        got = cpu_gemv.linear_packed(x, cpu_gemv.pack(w), n, k, b, r)
        torch.testing.assert_close(got.float(), ref, atol=ATOL, rtol=RTOL, msg=lambda s: f"M={m}: {s}")


@needs_amx
@pytest.mark.parametrize("m", [1, 8, 40])
def test_amx_packed_exact_on_integers_and_strided_x(m):
    x, w, b, r, ref = _case(m, 70, 96, True, True, integer=True)
    xbuf = torch.zeros(m, 200, dtype=torch.bfloat16)
    xbuf[:, 7:103] = x
    assert torch.equal(cpu_gemv.linear_packed(xbuf[:, 7:103], cpu_gemv.pack(w), 70, 96, b, r).float(), ref)


@needs_amx
def test_amx_packed_checks_its_weight():
    w = torch.randn(40, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="packs to"):
        cpu_gemv.linear_packed(torch.randn(1, 128, dtype=torch.bfloat16), cpu_gemv.pack(w), 40, 128)


# ----------------------------------------------------------------------------------- modules.linear.Linear
ALL_PATHS = cpu_gemv.supported_isas()


@needs_kernel
@pytest.mark.parametrize("isa", ALL_PATHS)
@pytest.mark.parametrize("pack", [True, False])
def test_linear_module(isa, pack):
    with cpu_gemv.use_path(isa):
        _check_linear_module(isa, pack)


def _check_linear_module(isa, pack):
    n, k = 130, 96
    _, w, b, _, _ = _case(1, n, k, True, False)
    lin = Linear(w, b, pack=pack)
    assert lin.layout == ("amx" if pack and isa == "amx_bf16" else "plain")
    if not pack:
        assert lin.weight is w                # offload's views are used in place
    for m in (1, 4, 8, 40):                   # 40: above the row kernel's limit on the AMX/AVX512-BF16 paths
        x, _, _, r, _ = _case(m, n, k, False, True, seed=m)
        got = lin(x.view(m, 1, k), r.view(m, 1, n)).view(m, n)
        if lin.layout == "amx" or m <= lin.row_kernel_rows:   # the kernel: one rounding of the fp32 result
            ref = x.float() @ w.float().t() + b.float() + r.float()
            torch.testing.assert_close(got.float(), ref, atol=ATOL, rtol=RTOL)
        else:                                                 # F.linear, then += residual (as before)
            assert torch.equal(got, torch.nn.functional.linear(x, w, b) + r)


@needs_kernel
def test_linear_module_fallback_when_disabled():
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    with cpu_gemv.disabled():
        lin = Linear(w)
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert lin.layout == ("onednn" if onednn else "plain") and not lin.row_kernel
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x).float(), x.float() @ w.float().t(), atol=ATOL, rtol=2 * RTOL)


def test_build_failure_falls_back_and_logs_once(monkeypatch, caplog):
    # No compiler: available() is False with one warning, and Linear takes its oneDNN / F.linear path.
    monkeypatch.setattr(cpu_gemv, "_kernel", None)
    monkeypatch.setattr(cpu_gemv, "_tried", False)
    monkeypatch.setattr(cpu_gemv, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger=cpu_gemv.__name__):
        assert not cpu_gemv.available() and not cpu_gemv.available() and cpu_gemv.isa() is None
        lin = Linear(torch.randn(16, 32, dtype=torch.bfloat16))
    logged = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(logged) == 1 and "no C++ compiler" in logged[0]
    assert lin.layout in ("onednn", "plain") and not lin.row_kernel
    assert lin(torch.randn(2, 32, dtype=torch.bfloat16)).shape == (2, 16)


# ----------------------------------------------------------------------------------- the whole engine, bf16
@needs_kernel
@pytest.mark.parametrize("isa", ALL_PATHS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_bf16_matches_hf(family, isa):
    # bf16 logits reach ~3, where a bf16 ulp is 1.6e-2. HF rounds after every linear and residual add, the
    # kernel once per linear (residual included), so they differ by a few ulps: atol 6e-2 / rtol 1.6e-2, as
    # for the oneDNN path this replaces. Greedy tokens identical (llama: attention and MLP biases).
    hf = tiny_model(family).to(torch.bfloat16)
    with cpu_gemv.use_path(isa):
        opt = optimised_copy(hf, max_seq_len=48, dtype=torch.bfloat16)
        _check_engine(hf, opt, isa)


def _check_engine(hf, opt, isa):
    lin = opt._dsinfer_engine.decoder.layers[0].attn.qkv
    assert lin.layout == ("amx" if isa == "amx_bf16" else "plain") and (lin.packed or lin.row_kernel)
    ids, mask = padded_batch([12, 5, 9])
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, attention_mask=mask).logits
        ref_tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    logits = opt(input_ids=ids, attention_mask=mask).logits
    tokens = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid].float(), ref_logits[valid].float(), atol=6e-2, rtol=1.6e-2)
    assert torch.equal(tokens, ref_tokens)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 2, 97), (16, 64)])
def test_rms_norm_kernel_matches_reference(shape):
    """The one-call bf16 RMSNorm (decode-sized rows) against kernels/reference.py: HF's order (normalise in fp32,
    round, scale, round). Only the fp32 sum of squares is added in another order, so at most one bf16 ulp apart
    (measured: identical on most elements)."""
    from lightning_dsinfer.kernels import ops, reference

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).bfloat16()
    w = torch.randn(shape[-1], generator=g).bfloat16()
    got = cpu_gemv.rms_norm(x, w, 1e-6)
    want = reference.rms_norm(x, w, 1e-6)
    assert got is not None and got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -7)
    assert (got == want).float().mean() > 0.99
    assert torch.equal(ops.rms_norm(x, w, 1e-6), got)                  # the CPU dispatch takes it
    assert cpu_gemv.rms_norm(x[..., ::2], w[::2], 1e-6) is None        # not contiguous: the reference runs
    rows = cpu_gemv.RMS_NORM_MAX_ROWS + 1
    assert cpu_gemv.rms_norm(torch.randn(rows, shape[-1]).bfloat16(), w, 1e-6) is None   # prompt-sized


@needs_kernel
@pytest.mark.parametrize("b,t,col", [(1, 1, 0), (2, 1, 7), (3, 2, 30)])
@pytest.mark.parametrize("r", [24, 8, 10])
def test_rotary_write_kv_kernel_matches_reference(b, t, col, r):
    """The one-call bf16 rotary + K/V append (decode-sized steps) against kernels/reference.py: the same two
    roundings, so bit-identical; cache columns outside [col, col + t) untouched. r < 24 = D: partial rotary (the
    first r dims of each head rotate, "rotate half" within them, the rest pass through: GPT-NeoX, Phi, StableLM)."""
    from lightning_dsinfer.kernels import ops, reference

    g = torch.Generator().manual_seed(b * 10 + t)
    hq, hkv, d, s = 8, 2, 24, 32
    qkv = torch.randn(b, t, hq + 2 * hkv, d, generator=g).bfloat16()
    ang = torch.rand(b, t, 1, r // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).bfloat16()
    sin = torch.cat([-ang.sin(), ang.sin()], -1).bfloat16()
    caches = [torch.full((b, hkv, s, d), 7.0).bfloat16() for _ in range(4)]
    want = reference.rotary_write_kv(qkv, hq, cos, sin, caches[0], caches[1], col)
    got = cpu_gemv.rotary_write_kv(qkv, hq, cos, sin, caches[2], caches[3], col)
    assert got is not None
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    if r < d:                                                                 # the unrotated dims pass through
        assert torch.equal(got[0][..., r:], qkv[:, :, :hq, r:]) and not torch.equal(got[0], qkv[:, :, :hq])
    assert all(torch.equal(x, y) for x, y in zip(ops.rotary_write_kv(qkv, hq, cos, sin), reference.rotary_write_kv(
        qkv, hq, cos, sin)))                                                 # no cache: q, k only
    assert cpu_gemv.rotary_write_kv(qkv.float(), hq, cos, sin) is None       # fp32: the reference runs
    odd = cos[..., :r - 1].contiguous()
    assert cpu_gemv.rotary_write_kv(qkv, hq, odd, odd) is None               # odd width: no halves to swap
    n = cpu_gemv.ROTARY_MAX_TOKENS // 4 + 1                                   # 4 x n tokens: prompt-sized
    big = torch.randn(4, n, hq + 2 * hkv, d).bfloat16()
    big_cos, big_sin = (x[:1, :1].expand(4, n, 1, r).contiguous() for x in (cos, sin))
    assert cpu_gemv.rotary_write_kv(big, hq, big_cos, big_sin) is None


# SwiGLU, decode attention and the one-call decode step are AVX512 code: on a CPU without it torch's ops stay.
needs_wide = pytest.mark.skipif(not cpu_gemv.has_wide_ops(), reason="CPU without AVX512: these ops stay on torch")


@needs_kernel
def test_wide_ops_stay_on_torch_without_avx512():
    """On the AVX2 path (as on a CPU without AVX512) SwiGLU, the plain activations, LayerNorm and decode attention
    decline (the reference / torch runs)."""
    if "avx2" not in cpu_gemv.supported_isas():
        pytest.skip("CPU without AVX2")
    q, k, v = _decode_attention_case(1, 4, 2, 8, 16, seed=0)
    w = torch.ones(64).bfloat16()
    with cpu_gemv.use_path("avx2"):
        assert not cpu_gemv.has_wide_ops()
        assert cpu_gemv.silu_and_mul(torch.randn(1, 64).bfloat16()) is None
        assert cpu_gemv.decode_attention(q, k, v, None, 0.25) is None
        assert cpu_gemv.act(torch.randn(1, 64).bfloat16(), "gelu") is None
        assert cpu_gemv.layer_norm(torch.randn(1, 64).bfloat16(), w, w, 1e-5) is None


@needs_wide
@pytest.mark.parametrize("shape", [(1, 1, 5632), (3, 2, 198), (16, 34)])
def test_silu_and_mul_kernel_matches_reference(shape):
    """The one-call bf16 SwiGLU (decode-sized rows) against kernels/reference.py (F.silu, round, mul_, round). The
    kernel's exp is a polynomial within ~1e-7 of libm's, so a rounding tie may land one bf16 ulp away; measured
    identical on every element here, asserted on >= 99.9% and within one ulp on the rest."""
    from lightning_dsinfer.kernels import ops, reference

    g = torch.Generator().manual_seed(shape[-1])
    gate_up = (torch.randn(*shape, generator=g) * 4).bfloat16()
    gate_up[..., 0] = -200.0                                  # exp overflow side: silu -> -0
    gate_up[..., 1] = 200.0
    want = reference.silu_and_mul(gate_up)
    got = cpu_gemv.silu_and_mul(gate_up)
    assert got is not None and got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -7)
    assert (got == want).float().mean() >= 0.999
    assert torch.equal(ops.silu_and_mul(gate_up), cpu_gemv.silu_and_mul(gate_up))   # the CPU dispatch takes it
    assert cpu_gemv.silu_and_mul(gate_up[..., :-2].contiguous()[..., ::2]) is None   # not contiguous
    rows = cpu_gemv.SILU_MUL_MAX_ROWS + 1
    assert cpu_gemv.silu_and_mul(torch.randn(rows, shape[-1]).bfloat16()) is None    # prompt-sized


@needs_wide
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 2, 97), (64, 73), (5, 4099)])
def test_layer_norm_kernel_matches_torch(shape):
    """The one-call bf16 LayerNorm with weight and bias (decode-sized rows) against torch's CPU kernel (what HF runs):
    both fp32 inside with one rounding, the mean and variance summed in another order, so a rare element lands one
    bf16 ulp away (measured > 99.99% identical); asserted on >= 99.9% and within one ulp elsewhere (rtol 2^-7; atol
    1e-5 for outputs near zero, where w * x_hat and b cancel). Rows far from zero mean (x * 3 + 5): the variance is
    taken about the mean (two passes), so it does not cancel."""
    from lightning_dsinfer.kernels import ops

    g = torch.Generator().manual_seed(shape[-1])
    n = shape[-1]
    x = (torch.randn(*shape, generator=g) * 3 + 5).bfloat16()
    w = (torch.randn(n, generator=g) * 0.2 + 1).bfloat16()
    b = (torch.randn(n, generator=g) * 0.2).bfloat16()
    want = torch.nn.functional.layer_norm(x, (n,), w, b, 1e-5)
    got = cpu_gemv.layer_norm(x, w, b, 1e-5)
    assert got is not None and got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=2 ** -7)
    assert (got == want).float().mean() >= 0.999
    assert torch.equal(ops.layer_norm(x, w, b, 1e-5), got)                         # the CPU dispatch takes it
    assert cpu_gemv.layer_norm(x[..., ::2], w[::2], b[::2], 1e-5) is None          # not contiguous: torch runs
    assert cpu_gemv.layer_norm(x.float(), w, b, 1e-5) is None
    big = torch.randn(cpu_gemv.LAYER_NORM_MAX_ROWS + 1, n).bfloat16()              # prompt-sized: torch runs
    assert cpu_gemv.layer_norm(big, w, b, 1e-5) is None
    assert torch.equal(ops.layer_norm(big, w, b, 1e-5), torch.nn.functional.layer_norm(big, (n,), w, b, 1e-5))


@needs_wide
@pytest.mark.parametrize("name", list(cpu_gemv.ACT_KINDS))
@pytest.mark.parametrize("shape", [(1, 1, 2816), (3, 2, 197), (64, 33)])
def test_act_kernel_matches_torch(name, shape):
    """The one-call bf16 plain activations (a GPT MLP's, decode-sized rows) against torch's ops (reference.act, what
    HF runs), on x ~ 3 N(0, 1) plus -10, +-200, +-0. gelu_tanh, relu and silu follow torch's order of operations
    with tanh / exp within ~1 fp32 ulp (tanh saturating where torch's SLEEF tanhf does): measured identical on every
    element, asserted on >= 99.9% and within one bf16 ulp elsewhere. gelu (erf): the same where x >= -3; below it
    torch runs oneDNN's own GeLU approximation, and 1 + erf(x / sqrt 2) cancels in fp32 on both sides (each ~8e-6
    from the exact value there; measured |difference| <= 1.6e-5 on outputs of size < 4e-3), so the tail is held to
    atol 3e-5 instead (14-19% of these tail elements differ, by one bf16 ulp)."""
    from lightning_dsinfer.kernels import ops, reference

    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).bfloat16()
    x.view(-1)[:5] = torch.tensor([-10.0, -200.0, 200.0, 0.0, -0.0])
    want = reference.act(x, name)
    got = cpu_gemv.act(x, name)
    assert got is not None and got.shape == want.shape and got.dtype == torch.bfloat16
    core = x >= -3 if name == "gelu" else torch.ones_like(x, dtype=torch.bool)
    torch.testing.assert_close(got.float()[core], want.float()[core], atol=0, rtol=2 ** -7)
    assert (got == want)[core].float().mean() >= 0.999
    torch.testing.assert_close(got.float(), want.float(), atol=3e-5, rtol=2 ** -7)
    assert torch.equal(ops.act(x, name), got)                                      # the CPU dispatch takes it
    assert cpu_gemv.act(x[..., ::2], name) is None                                 # not contiguous
    assert cpu_gemv.act(x, "gelu_new") is None                                     # not one of its names
    rows = cpu_gemv.ACT_MAX_ROWS + 1
    assert cpu_gemv.act(torch.randn(rows, shape[-1]).bfloat16(), name) is None     # prompt-sized


def _decode_attention_case(b, hq, hkv, length, d, seed):
    g = torch.Generator().manual_seed(seed)
    cap = length + 5                                          # a cache longer than the visible columns: views
    kc = torch.randn(b, hkv, cap, d, generator=g).bfloat16()
    vc = torch.randn(b, hkv, cap, d, generator=g).bfloat16()
    q = (torch.randn(b, 1, hq, d, generator=g) * 2).bfloat16().transpose(1, 2)   # as the engine passes it
    return q, kc[:, :, :length], vc[:, :, :length]


@needs_wide
@pytest.mark.parametrize("b,hq,hkv,length,d", [(1, 16, 4, 190, 64), (3, 8, 2, 37, 24), (2, 4, 4, 5, 80),
                                               (4, 6, 1, 100, 128), (2, 32, 8, 700, 128), (2, 4, 1, 45, 200),
                                               (2, 8, 1, 40, 512)])     # (Gemma 4's full layers: 512-wide heads)
@pytest.mark.parametrize("masking", ["none", "left_pad", "window", "broadcast"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_decode_attention_kernel_matches_reference(b, hq, hkv, length, d, masking, with_sinks):
    """The one-call bf16 decode attention against the fp32 reference on the same bf16 inputs: fp32 throughout and
    one rounding, so within a bf16 ulp of the fp32 result (atol 4e-3 on outputs of magnitude < 1; torch's bf16
    SDPA, the path it replaces, is at about the same distance). GQA ratios 1..6, head dims not a multiple of 16,
    cache views with a row stride beyond the visible columns, masks per row / broadcast / with holes, and a case
    big enough to split over threads (B * Hq * L * D >= 2^20). With gpt-oss's sinks (bf16 logits per query head,
    spread over and above the scores' range, in each softmax's denominator): the same, and ops.attention takes it."""
    from lightning_dsinfer.kernels import ops, reference

    q, k, v = _decode_attention_case(b, hq, hkv, length, d, seed=b * 1000 + length)
    sinks = None
    if with_sinks:
        g = torch.Generator().manual_seed(length)
        sinks = (torch.randn(hq, generator=g) * 2 + torch.linspace(-1.0, 4.0, hq)).bfloat16()
    mask = None
    if masking != "none":
        cols = torch.arange(length)
        rows = torch.arange(b if masking != "broadcast" else 1).view(-1, 1)
        if masking == "left_pad":            # row i left-padded by 2i columns
            keep = cols >= 2 * rows
        elif masking == "window":            # sliding window of 4 columns and a hole: not one run
            keep = (cols >= length - 4 - rows) | (cols == 0)
        else:
            keep = cols >= min(3, length - 1)
        mask = keep.view(-1, 1, 1, length)
    want = reference.attention(q.float(), k.float(), v.float(), mask, d ** -0.5, sinks=sinks)
    got = cpu_gemv.decode_attention(q, k, v, mask, d ** -0.5, sinks=sinks)
    assert got is not None and got.shape == (b, hq, 1, d) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=2 ** -7)
    ops.dispatch_counts.clear()
    assert torch.equal(ops.attention(q, k, v, mask, d ** -0.5, sinks=sinks),
                       cpu_gemv.decode_attention(q, k, v, mask, d ** -0.5, sinks=sinks))
    assert not ops.dispatch_counts          # no reference:sinks
    if with_sinks:                          # the sinks changed the result
        assert not torch.equal(got, cpu_gemv.decode_attention(q, k, v, mask, d ** -0.5))


@needs_wide
@pytest.mark.parametrize("b,hq,hkv,length,d,ranks", [(3, 8, 2, 37, 24, 1), (2, 4, 4, 5, 80, 1),
                                                     (1, 16, 4, 190, 64, 2), (2, 32, 8, 700, 128, 1)])
@pytest.mark.parametrize("masking", ["none", "left_pad"])
@pytest.mark.parametrize("softcap", [None, 1.5], ids=["plain", "capped"])
def test_decode_attention_kernel_alibi_matches_reference(b, hq, hkv, length, d, ranks, masking, softcap):
    """BLOOM's ALiBi in the one-call decode attention (slope_h * (j - (L - 1)) added to key j's fp32 score after the
    cap, before the mask) against the fp32 reference on the same bf16 inputs, within the same tolerance as above:
    BLOOM's slopes (``ranks`` 2: the second rank's heads of twice as many, as tensor parallelism slices them), GQA
    ratios 1..4 (BLOOM itself has none; the kernel takes them), left padding, with and without a cap, a case split
    over threads; ops.attention takes it (no reference:alibi) and the slopes change the result."""
    from lightning_dsinfer.kernels import ops, reference
    from lightning_dsinfer.policies.gpt import _alibi_slopes

    q, k, v = _decode_attention_case(b, hq, hkv, length, d, seed=b * 1000 + length + 7)
    slopes = _alibi_slopes(hq * ranks)[-hq:]
    mask = None
    if masking == "left_pad":                # row i left-padded by 2i columns
        mask = (torch.arange(length) >= 2 * torch.arange(b).view(-1, 1)).view(-1, 1, 1, length)
    want = reference.attention(q.float(), k.float(), v.float(), mask, d ** -0.5, softcap, slopes)
    got = cpu_gemv.decode_attention(q, k, v, mask, d ** -0.5, softcap, alibi=slopes)
    assert got is not None and got.shape == (b, hq, 1, d) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=2 ** -7)
    ops.dispatch_counts.clear()
    assert torch.equal(ops.attention(q, k, v, mask, d ** -0.5, softcap, alibi=slopes), got)
    assert not ops.dispatch_counts          # no reference:alibi
    if length > 5:                          # the slopes changed the result
        assert not torch.equal(got, cpu_gemv.decode_attention(q, k, v, mask, d ** -0.5, softcap))


@needs_wide
def test_decode_attention_kernel_declines_what_it_does_not_take():
    """Shapes and dtypes outside the kernel give None (the reference runs): prompts, fp32, float masks, a mask
    over other columns, K and V with different layouts, head dim above 512."""
    q, k, v = _decode_attention_case(2, 8, 2, 20, 32, seed=0)
    assert cpu_gemv.decode_attention(q, k, v, None, 0.1) is not None
    assert cpu_gemv.decode_attention(torch.randn(2, 8, 3, 32).bfloat16(), k, v, None, 0.1) is None   # T = 3
    assert cpu_gemv.decode_attention(q.float(), k.float(), v.float(), None, 0.1) is None
    assert cpu_gemv.decode_attention(q, k, v, torch.zeros(2, 1, 1, 20), 0.1) is None                 # float mask
    assert cpu_gemv.decode_attention(q, k, v, torch.ones(2, 1, 1, 21, dtype=torch.bool), 0.1) is None
    assert cpu_gemv.decode_attention(q, k, v.contiguous(), None, 0.1) is None                        # strides differ
    big = _decode_attention_case(1, 2, 1, 4, 520, seed=1)
    assert cpu_gemv.decode_attention(*big, None, 0.1) is None
    assert cpu_gemv.decode_attention(q, k, v, None, 0.1, sinks=torch.zeros(4)) is None                # sinks not [Hq]
    assert cpu_gemv.decode_attention(q, k, v, None, 0.1, alibi=torch.zeros(4)) is None                # slopes not [Hq]


@needs_kernel
def test_rotary_write_kv_kernel_with_head_norms():
    """Qwen3's per-head q / k RMSNorm before rotary, in C: within one bf16 ulp of the reference's norm (the fp32 sum
    of squares in another order), through rotary; the cache gets the same k; qkv itself is not modified."""
    from lightning_dsinfer.kernels import ops, reference

    g = torch.Generator().manual_seed(5)
    b, t, hq, hkv, d, s, col = 2, 1, 4, 2, 32, 16, 3
    qkv = (torch.randn(b, t, hq + 2 * hkv, d, generator=g) * 3).bfloat16()
    before = qkv.clone()
    qn, kn = torch.randn(d, generator=g).bfloat16(), torch.randn(d, generator=g).bfloat16()
    ang = torch.rand(b, t, 1, d // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).bfloat16()
    sin = torch.cat([-ang.sin(), ang.sin()], -1).bfloat16()
    caches = [torch.zeros(b, hkv, s, d).bfloat16() for _ in range(4)]
    want = reference.rotary_write_kv(qkv, hq, cos, sin, caches[0], caches[1], col, qn, kn, 1e-6)
    got = cpu_gemv.rotary_write_kv(qkv, hq, cos, sin, caches[2], caches[3], col, qn, kn, 1e-6)
    assert got is not None and torch.equal(qkv, before)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y.float(), atol=3e-2, rtol=2 ** -6)
    assert torch.equal(got[1].transpose(1, 2), caches[2][:, :, col:col + t]) and torch.equal(caches[1], caches[3])
    assert all(torch.equal(x, y) for x, y in zip(ops.rotary_write_kv(qkv, hq, cos, sin, q_norm=qn, k_norm=kn, eps=1e-6),
                                                 cpu_gemv.rotary_write_kv(qkv, hq, cos, sin, q_norm=qn, k_norm=kn,
                                                                          eps=1e-6)))


@needs_wide
def test_act_and_layer_norm_keep_nan_as_torch_does():
    """ReLU passes NaN and -0 through (vmaxps returns its second operand for either), and a LayerNorm row whose
    sum of squares overflows fp32 gives NaN, as torch's do (found by review: 0 and the bias came out before)."""
    x = torch.tensor([[float("nan"), -0.0, 1.0, -2.0] * 8], dtype=torch.bfloat16)
    got, want = cpu_gemv.act(x, "relu"), torch.relu(x)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan].signbit(), want[~nan].signbit())
    big = torch.full((2, 32), 1e20, dtype=torch.bfloat16)
    big[:, 0] = -1e20
    w, b = torch.ones(32, dtype=torch.bfloat16), torch.zeros(32, dtype=torch.bfloat16)
    assert torch.isnan(cpu_gemv.layer_norm(big, w, b, 1e-5)).all()
