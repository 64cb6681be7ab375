import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.prefill_attention import prefill_attention

# p is rounded to the value dtype before the PV product (as flash attention does); |out| < 3.
TOLS = [(torch.float32, 2e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 2.5e-2, 2e-2)]


def _qkv(b, t, hq, hkv, d, dtype, device):
    qkv = torch.randn(b, t, hq + 2 * hkv, d, device=device).to(dtype)      # fused QKV output, strided views
    return qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 19, 2, 2, 16), (2, 33, 4, 1, 24), (2, 7, 6, 2, 40)])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_prefill_attention(device, dtype, atol, rtol, b, t, hq, hkv, d, padding):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    q, k, v = _qkv(b, t, hq, hkv, d, dtype, device)
    kw = {}
    if padding == "left":
        kw["kv_start"] = torch.tensor([0, t - 3][:b], device=device, dtype=torch.int32)
    if padding == "right":
        kw["seq_lens"] = torch.tensor([t, 4][:b], device=device, dtype=torch.int32)
    got = prefill_attention(q, k, v, 0.3, **kw)
    assert_close(got, ref.prefill_attention(q, k, v, 0.3, **kw), atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_prefill_attention_window_and_both_paddings(device, dtype, atol, rtol):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    q, k, v = _qkv(2, 37, 4, 2, 32, dtype, device)
    kw = dict(kv_start=torch.tensor([2, 9], device=device, dtype=torch.int32),
              seq_lens=torch.tensor([37, 30], device=device, dtype=torch.int32), window=11)
    assert_close(prefill_attention(q, k, v, 0.2, **kw), ref.prefill_attention(q, k, v, 0.2, **kw), atol, rtol)


def _later_chunk(dtype, device):
    """A later prompt chunk: q [3, 9, 4, 24] over k, v [3, 30, 2, 24] (21 keys from earlier chunks; strided views)."""
    b, t, length, hq, hkv, d = 3, 9, 30, 4, 2, 24
    q = torch.randn(b, t, hq, d, device=device).to(dtype)
    kv = torch.randn(b, length, 2 * hkv, d, device=device).to(dtype)
    return q, kv[:, :, :hkv], kv[:, :, hkv:]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_attention_after_cached_keys(device, dtype, atol, rtol, window):
    # A later prompt chunk: 9 queries over 30 keys (21 of them from earlier chunks), left padding.
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    q, k, v = _later_chunk(dtype, device)
    kw = dict(kv_start=torch.tensor([0, 7, 25], device=device, dtype=torch.int32), window=window)
    assert_close(prefill_attention(q, k, v, 0.3, **kw), ref.prefill_attention(q, k, v, 0.3, **kw), atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("d,dv", [(40, 16), (24, 48)])
def test_prefill_attention_values_of_another_width(device, dtype, atol, rtol, d, dv):
    # DeepSeek's expanded latent attention: keys nope + rope wide, values v_head_dim; 9 queries over 30 keys, padded.
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    b, t, length, hq, hkv = 2, 9, 30, 4, 2
    q = torch.randn(b, t, hq, d, device=device).to(dtype)
    k = torch.randn(b, length, hkv, d, device=device).to(dtype)
    v = torch.randn(b, length, 2 * hkv, dv, device=device).to(dtype)[:, :, 1::2]       # strided heads
    kw = dict(kv_start=torch.tensor([0, 25], device=device, dtype=torch.int32), window=12)
    got = prefill_attention(q, k, v, 0.3, **kw)
    assert got.shape == (b, t, hq, dv)
    assert_close(got, ref.prefill_attention(q, k, v, 0.3, **kw), atol, rtol)


@pytest.mark.parametrize("device", device_params())
def test_prefill_matches_cpu_path_attention(device):
    # Against the engine's existing reference.attention (SDPA with GQA) on a causal, left-padded mask.
    b, t, hq, hkv, d = 2, 21, 4, 2, 16
    q, k, v = _qkv(b, t, hq, hkv, d, torch.float32, device)
    start = torch.tensor([0, 5], device=device)
    i = torch.arange(t, device=device)
    mask = ((i[None, :] <= i[:, None])[None] & (i[None, None, :] >= start[:, None, None]))[:, None]
    want = ref.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, 0.25).transpose(1, 2)
    got = prefill_attention(q, k, v, 0.25, kv_start=start)
    # Padded query rows (no visible key): SDPA gives NaN, the kernel zeros; compare the real rows.
    assert_close(got[0], want[0], 2e-5, 1e-5)
    assert_close(got[1, 5:], want[1, 5:], 2e-5, 1e-5)
    assert torch.equal(got[1, :5], torch.zeros_like(got[1, :5]))


def test_prefill_attention_rejects_bad_args():
    with pytest.raises(ValueError, match="query heads 5 must be a multiple of kv heads 2"):
        prefill_attention(torch.zeros(1, 3, 5, 16), torch.zeros(1, 3, 2, 16), torch.zeros(1, 3, 2, 16))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 19, 2, 2, 16), (2, 33, 4, 1, 24), (2, 7, 6, 2, 40)])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_attention_sinks(device, dtype, atol, rtol, b, t, hq, hkv, d, padding, window):
    """gpt-oss's sinks (a logit per query head in each row's softmax denominator, no value), on full and sliding
    layers (window 5, which the prompts exceed), with left / right padding (rows with no key: zeros)."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    q, k, v = _qkv(b, t, hq, hkv, d, dtype, device)
    sinks = (torch.randn(hq, device=device) * 2 + torch.linspace(-2.0, 3.0, hq, device=device)).to(dtype)
    kw = dict(window=window)
    if padding == "left":
        kw["kv_start"] = torch.tensor([0, t - 3][:b], device=device, dtype=torch.int32)
    if padding == "right":
        kw["seq_lens"] = torch.tensor([t, 4][:b], device=device, dtype=torch.int32)
    got = prefill_attention(q, k, v, 0.3, sinks=sinks, **kw)
    assert_close(got, ref.prefill_attention(q, k, v, 0.3, sinks=sinks, **kw), atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_prefill_attention_sinks_after_cached_keys(device, dtype, atol, rtol):
    # A later prompt chunk (9 queries over 30 keys) with both paddings, a window and sinks far apart (one at 50:
    # weights near 0 without overflow).
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    q, k, v = _later_chunk(dtype, device)
    sinks = torch.tensor([50.0, 1.5, -1.0, -50.0], device=device).to(dtype)
    kw = dict(kv_start=torch.tensor([0, 7, 25], device=device, dtype=torch.int32),
              seq_lens=torch.tensor([30, 28, 30], device=device, dtype=torch.int32), window=11)
    got = prefill_attention(q, k, v, 0.3, sinks=sinks, **kw)
    assert_close(got, ref.prefill_attention(q, k, v, 0.3, sinks=sinks, **kw), atol, rtol)
    with pytest.raises(ValueError, match=r"sinks shape \(2,\) must be \(4,\)"):
        prefill_attention(q, k, v, 0.3, sinks=sinks[:2])
