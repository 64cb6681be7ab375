import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.rms_norm import rms_norm

# (dtype, atol, rtol): one rounding at the end; outputs reach |4|, where one bf16 ulp is 3.1e-2.
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 3.2e-2, 1.6e-2)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123), (7, 73)])
@pytest.mark.parametrize("mode", ["plain", "residual", "residual_bias", "bias_gemma"])
def test_rms_norm_matches_reference(device, dtype, atol, rtol, shape, mode):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    n = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    res = torch.randn(shape, device=device).to(dtype) if "residual" in mode else None
    bias = torch.randn(n, device=device).to(dtype) if "bias" in mode else None
    gemma = mode == "bias_gemma"
    x_before = x.clone()
    got = rms_norm(x, w, 1e-6, residual=res, bias=bias, unit_offset=gemma)
    want = ref.add_bias_rms_norm(x, w, 1e-6, residual=res, bias=bias, unit_offset=gemma)
    if mode == "plain":
        assert_close(got, want, atol, rtol)
    else:
        assert_close(got[0], want[0], atol, rtol)
        assert_close(got[1], want[1], atol, rtol)  # new residual: one rounding of x + bias + res
    assert torch.equal(x, x_before)  # inputs untouched


def test_reference_agrees_with_cpu_path_op():
    # The new fused reference equals the engine's existing rms_norm (fp32, no residual).
    x, w = torch.randn(4, 33), torch.randn(33)
    torch.testing.assert_close(ref.add_bias_rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("device", device_params())
def test_rms_norm_non_contiguous_rows(device):
    x = torch.randn(6, 2 * 96, device=device)[:, :96]  # row stride 192
    w = torch.randn(96, device=device)
    assert_close(rms_norm(x, w, 1e-5), ref.add_bias_rms_norm(x, w, 1e-5), 1e-5, 1e-5)


def test_rms_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6)
    with pytest.raises(ValueError, match="70000 exceeds"):
        rms_norm(torch.randn(1, 70000), torch.randn(70000), 1e-6)
