import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.activations import bias_act, gated_act

# fp32 math inside, one rounding; |x| up to ~4 (gated outputs up to ~16).
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 2e-3), (torch.bfloat16, 6.3e-2, 1.6e-2)]
ACTS = ["silu", "gelu", "gelu_tanh", "relu"]


# bias + activation on [..., N]; gated (act(gate) * up) on [..., 2N]. 1500 > one 1024 block.
KERNELS = {"bias_act": (bias_act, ref.bias_act), "gated_act": (gated_act, ref.gated_act)}
CASES = [("bias_act", (3, 73)), ("bias_act", (2, 2, 123)), ("bias_act", (1, 1500)),
         ("gated_act", (3, 2 * 73)), ("gated_act", (2, 2, 2 * 123))]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kernel,shape", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_activation_matches_reference(device, dtype, atol, rtol, act, kernel, shape, with_bias):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    fn, reference_fn = KERNELS[kernel]
    x = (2 * torch.randn(shape, device=device)).to(dtype)
    bias = torch.randn(shape[-1], device=device).to(dtype) if with_bias else None
    assert_close(fn(x, bias, act), reference_fn(x, bias, act), atol, rtol)


def test_swiglu_reference_equals_cpu_path_op():
    x = torch.randn(3, 2 * 37)
    torch.testing.assert_close(ref.gated_act(x, None, "silu"), ref.silu_and_mul(x))


@pytest.mark.parametrize("device", device_params())
def test_gated_act_strided_input(device):
    x = torch.randn(4, 3 * 64, device=device)[:, :128]   # row stride 192
    assert_close(gated_act(x, None, "silu"), ref.silu_and_mul(x), 1e-5, 1e-5)


def test_activation_rejects_bad_args():
    with pytest.raises(ValueError, match="not one of"):
        bias_act(torch.randn(2, 4), act="swish")
    with pytest.raises(ValueError, match="last dim 7 must be even"):
        gated_act(torch.randn(2, 7))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("shape", [(3, 2 * 73), (2, 2, 2 * 123), (1, 2 * 1500)])
@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.702, 1.5)])
def test_clamped_swiglu_matches_reference(device, dtype, atol, rtol, shape, alpha, limit):
    """gpt-oss's clamped SwiGLU (gate clamped above, up both sides; limit 1.5 binds on much of |x| ~ 2 rows) against
    reference.ClampedSwiGLU over the rows widened to fp32 (the kernel's fp32 math and one rounding; in bf16 / fp16 the
    reference rounds each op); 1500 > one 1024 block; a strided input."""
    from lightning_dsinfer.kernels.activations import clamped_swiglu

    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    act = ref.ClampedSwiGLU(alpha=alpha, limit=limit)
    x = (2 * torch.randn(shape, device=device)).to(dtype)
    assert_close(clamped_swiglu(x, alpha, limit), act(x.float()), atol, rtol)
    wide = (2 * torch.randn(4, 3 * 64, device=device)).to(dtype)[:, :128]      # row stride 192
    assert_close(clamped_swiglu(wide, alpha, limit), act(wide.float()), atol, rtol)
    with pytest.raises(ValueError, match="last dim 7 must be even"):
        clamped_swiglu(torch.randn(2, 7, device=device), alpha, limit)
