import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.layer_norm import layer_norm

# (dtype, atol, rtol): one rounding at the end; outputs reach |4|, where one bf16 ulp is 3.1e-2.
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 3.2e-2, 1.6e-2)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 123), (7, 73)])
@pytest.mark.parametrize("mode", ["plain", "beta", "residual_beta", "residual_bias_nobeta", "gemma"])
def test_layer_norm_matches_reference(device, dtype, atol, rtol, shape, mode):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    n = shape[-1]
    x = (3 + torch.randn(shape, device=device)).to(dtype)   # non-zero mean exercises the centring
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    beta = torch.randn(n, device=device).to(dtype) if "beta" in mode and "nobeta" not in mode else None
    res = torch.randn(shape, device=device).to(dtype) if "residual" in mode else None
    bias = torch.randn(n, device=device).to(dtype) if "bias" in mode else None
    gemma = mode == "gemma"
    got = layer_norm(x, w, beta, 1e-5, residual=res, bias=bias, unit_offset=gemma)
    want = ref.add_bias_layer_norm(x, w, beta, 1e-5, residual=res, bias=bias, unit_offset=gemma)
    if res is None and bias is None:
        assert_close(got, want, atol, rtol)
    else:
        assert_close(got[0], want[0], atol, rtol)
        assert_close(got[1], want[1], atol, rtol)


def test_reference_agrees_with_torch_layer_norm():
    x, w, b = torch.randn(4, 33), torch.randn(33), torch.randn(33)
    torch.testing.assert_close(ref.add_bias_layer_norm(x, w, b, 1e-5), torch.nn.functional.layer_norm(x, (33,), w, b))


def test_layer_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="norm_bias shape"):
        layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(7), 1e-6)
