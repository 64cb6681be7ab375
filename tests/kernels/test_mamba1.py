"""Mamba-1's selective-scan kernel (kernels/mamba1.py, through ``ops.mamba1_scan``) against the module's torch
recurrence (modules/gated_deltanet.Mamba1Mixer: softplus dt in fp32, exp(dt A) h + dt B x per channel and state, the
state rounded to the rows' dtype times C, D x, silu(z)) over one token (a decode step) and a prompt's seven: odd widths
(channels not a multiple of the block, states of 10 and 16), a held state, fp32 and bf16, outputs poisoned before the
run (tests/kernels/conftest.py). fp32 within 1e-5 (the state too); bf16 within a rounding of the torch ops' on CUDA;
Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest (tests/kernels/test_mamba2.py), which the
state's product then carries: 0.1 / 6% there."""
import pytest
import torch
import torch.nn.functional as F

from lightning_dsinfer.kernels import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=0.1, rtol=0.06) if INTERPRETED else dict(atol=3e-2, rtol=2e-2)}


def _reference(x, z, dt, bc, dt_bias, a_log, d, state):
    """The module's torch recurrence (Mamba1Mixer.from_qkv after x_proj / dt_proj, before out_proj)."""
    dtype, n = x.dtype, a_log.shape[-1]
    b, c = bc.split([n, n], dim=-1)
    dt = F.softplus(dt.float() + dt_bias.float())
    a = -torch.exp(a_log.float())
    h, ys = state.clone(), []
    for i in range(x.shape[1]):
        dti = dt[:, i, :, None]
        h = torch.exp(dti * a) * h + dti * b[:, i, None, :].float() * x[:, i, :, None].float()
        ys.append((h.to(dtype).float() * c[:, i, None, :].float()).sum(-1).to(dtype))
    y = torch.stack(ys, 1).float() + x.float() * d.float()
    return (y * F.silu(z.float())).to(dtype), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,i,n", [(3, 1, 24, 10), (2, 7, 70, 16), (1, 5, 16, 4)])
def test_scan_matches_the_torch_recurrence(dtype, b, t, i, n):
    g = torch.Generator().manual_seed(t * i + n)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    x, proj, dt, bc = rand(b, t, i), rand(b, t, 2 * i), rand(b, t, i), rand(b, t, 2 * n)
    z = proj[..., i:]                                      # (a view with the in_proj rows' strides, as the module's)
    dt_bias = torch.linspace(-4.0, 1.0, i).to(device=DEVICE, dtype=dtype)
    a_log, d = rand(i, n, scale=0.5), rand(i)
    state = torch.randn(b, i, n, generator=g).to(DEVICE) * 0.3
    want, want_state = _reference(x, z, dt, bc, dt_bias, a_log, d, state)
    got_state = state.clone()
    ops.dispatch_counts.clear()
    got = ops.mamba1_scan(x, z, dt, bc, dt_bias, a_log, d, got_state)
    assert dict(ops.dispatch_counts) == {("mamba1", "triton"): 1}
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    torch.testing.assert_close(got_state, want_state, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32
                                                         else {"atol": 0.15 if INTERPRETED else 5e-2, "rtol": 2e-2}))


def test_shapes_that_do_not_fit_are_refused():
    x = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        ops.mamba1_scan(x, x, x, torch.zeros(1, 2, 6, device=DEVICE), torch.zeros(8, device=DEVICE),
                        torch.zeros(8, 4, device=DEVICE), torch.zeros(8, device=DEVICE),
                        torch.zeros(1, 8, 4, device=DEVICE))
