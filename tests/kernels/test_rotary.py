import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.rotary import rotary_qkv

# fp32 math inside, one rounding at the end; |outputs| < 5.
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 2e-3), (torch.bfloat16, 3.2e-2, 1.6e-2)]


def _qkv(b, t, hq, hkv, d, dtype, device):
    # Slices of one fused QKV output, as the attention module produces them (strided views).
    qkv = torch.randn(b, t, hq + 2 * hkv, d, device=device).to(dtype)
    return qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("b,t,hq,hkv,d,rot", [(2, 3, 4, 2, 16, 16), (1, 5, 3, 1, 24, 8), (3, 1, 6, 6, 40, 40)])
def test_rotary_matches_reference(device, dtype, atol, rtol, interleaved, b, t, hq, hkv, d, rot):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    q, k, v = _qkv(b, t, hq, hkv, d, dtype, device)
    cos, sin = ref.rotary_tables(rot, 64, device=device)
    pos = torch.randint(0, 64, (b, t), device=device)   # per-token position ids, any order
    qo, ko, vo = rotary_qkv(q, k, cos, sin, pos, v, interleaved=interleaved, rotary_dim=rot)
    wq, wk, _ = ref.rotary_qkv_cache_write(q, k, v, cos, sin, pos, interleaved=interleaved, rotary_dim=rot)
    assert_close(qo, wq, atol, rtol)
    assert_close(ko, wk, atol, rtol)
    assert vo is v


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_bias_and_cache_write(device, dtype, atol, rtol, interleaved):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    b, t, hq, hkv, d, rot, s = 3, 4, 6, 2, 20, 12, 11
    q, k, v = _qkv(b, t, hq, hkv, d, dtype, device)
    qb, kb, vb = (torch.randn(h * d, device=device).to(dtype) for h in (hq, hkv, hkv))
    cos, sin = ref.rotary_tables(rot, 32, device=device)
    start = torch.tensor([0, 5, 7], device=device)                     # each row appends at its own column
    pos = start[:, None] + torch.arange(t, device=device)[None] + 1
    caches = [torch.full((4, hkv, s, d), float("nan"), device=device).to(dtype) for _ in range(4)]
    kc, vc, kc_ref, vc_ref = caches
    got = rotary_qkv(q, k, cos, sin, pos, v, interleaved=interleaved, rotary_dim=rot, q_bias=qb, k_bias=kb,
                     v_bias=vb, k_cache=kc, v_cache=vc, cache_start=start)
    want = ref.rotary_qkv_cache_write(q, k, v, cos, sin, pos, kc_ref, vc_ref, start, interleaved, rot, qb, kb, vb)
    for g, w in zip(got, want):
        assert_close(g, w, atol, rtol)
    written = ~torch.isnan(kc_ref.float())
    assert torch.equal(written, ~torch.isnan(kc.float())), "kernel wrote outside the token's columns"
    assert_close(kc[written], kc_ref[written], atol, rtol)
    assert_close(vc[written], vc_ref[written], atol, rtol)


def test_reference_neox_equals_cpu_path_rotary():
    # The new reference reproduces the engine's rotary_half with HF-style cos / signed-sin rows.
    x = torch.randn(2, 3, 4, 8)
    cos, sin = ref.rotary_tables(8, 16)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
    want = ref.rotary_half(x, torch.cat((c, c), -1), torch.cat((-s, s), -1))
    torch.testing.assert_close(ref.rotary_embedding(x, cos, sin, pos), want)


def test_rotary_rejects_bad_args():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8)
    cos, sin = ref.rotary_tables(8, 4)
    with pytest.raises(ValueError, match="rotary_dim 7"):
        rotary_qkv(q, k, cos, sin, torch.zeros(1, 2, dtype=torch.long), rotary_dim=7)
    with pytest.raises(ValueError, match="positions shape"):
        rotary_qkv(q, k, cos, sin, torch.zeros(2, 2, dtype=torch.long))
