"""Gated DeltaNet's decode-step kernels (kernels/gated_delta.py) against the module's torch ops
(modules/gated_deltanet.py: causal_conv + SiLU, delta_rule's one-token recurrence): odd widths (Dv 12 over 16-wide
tiles, C not a multiple of the 128-channel block), grouped value heads, kernels 3 and 4, fp32 and bf16, outputs
poisoned before the run (tests/kernels/conftest.py). fp32 within 1e-5; bf16 within a rounding of the torch ops' (the
kernels' fp32 sums run in another order, so a value can round the other way)."""
import pytest
import torch
import torch.nn.functional as F

from lightning_dsinfer.kernels import ops
from lightning_dsinfer.kernels.gated_delta import conv_step, delta_step, short_conv_step
from lightning_dsinfer.modules.gated_deltanet import causal_conv, delta_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(dtype, b=3, hk=2, hv=4, dk=8, dv=12, kernel=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = 2 * hk * dk + hv * dv

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    return dict(x=rand(b, c), history=rand(b, c, kernel - 1), weight=rand(c, kernel), ba=rand(b, 2 * hv),
                a_log=rand(hv), dt_bias=rand(hv), state=torch.randn(b, hv, dk, dv, generator=g).to(DEVICE) * 0.5,
                hk=hk, hv=hv, dk=dk, dv=dv)


@pytest.mark.parametrize("kernel", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_step_matches_the_torch_ops(dtype, kernel):
    a = _inputs(dtype, kernel=kernel)
    window = torch.cat((a["history"], a["x"][:, :, None]), dim=-1)
    want = F.silu(causal_conv(window, a["weight"], 1))[:, :, 0]
    history = a["history"].clone()
    got = conv_step(a["x"], history, a["weight"])
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    assert torch.equal(history, window[..., 1:])            # shifted: the new input joined, the oldest left


@pytest.mark.parametrize("kernel", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_step_matches_the_torch_ops(dtype, kernel):
    """LFM2's gated short convolution (modules/gated_deltanet.ShortConv's torch ops: B * x through the convolution,
    times C) for one token on in_proj rows B | C | x; 200 channels (over two 128-channel blocks)."""
    g = torch.Generator().manual_seed(kernel)
    b, c = 3, 200
    proj = torch.randn(b, 3 * c, generator=g).to(device=DEVICE, dtype=dtype)
    history = torch.randn(b, c, kernel - 1, generator=g).to(device=DEVICE, dtype=dtype)
    weight = torch.randn(c, kernel, generator=g).to(device=DEVICE, dtype=dtype)
    gate_in, gate_out, x = proj.split([c, c, c], dim=-1)
    window = torch.cat((history, (gate_in * x)[:, :, None]), dim=-1)
    want = gate_out * causal_conv(window, weight, 1)[:, :, 0]
    got_history = history.clone()
    got = short_conv_step(proj, got_history, weight)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    if dtype == torch.float32:      # (bf16: the interpreter truncates B * x where torch rounds it: test_mamba2.py)
        assert torch.equal(got_history, window[..., 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hk,hv,dk,dv,beta_scale", [(2, 4, 8, 12, 1.0), (1, 1, 16, 16, 1.0), (2, 6, 4, 40, 1.0),
                                                    (2, 4, 8, 12, 2.0)])      # (2: OLMo Hybrid's beta in (0, 2))
def test_delta_step_matches_the_recurrence(dtype, hk, hv, dk, dv, beta_scale):
    a = _inputs(dtype, hk=hk, hv=hv, dk=dk, dv=dv)
    qkv, ba = a["x"].contiguous(), a["ba"]
    q, k, v = qkv.split([hk * dk, hk * dk, hv * dv], dim=-1)
    beta = torch.sigmoid(ba[:, :hv]) * beta_scale
    g = -a["a_log"].float().exp() * F.softplus(ba[:, hv:].float() + a["dt_bias"])
    b = qkv.shape[0]
    want, want_state = delta_rule(q.reshape(b, 1, hk, dk), k.reshape(b, 1, hk, dk), v.reshape(b, 1, hv, dv),
                                  g[:, None], beta[:, None], a["state"])
    state = a["state"].clone()
    got = delta_step(qkv, ba, a["a_log"], a["dt_bias"], state, hk, dk, beta_scale)
    torch.testing.assert_close(got.float(), want[:, 0].to(dtype).float(), **TOL[dtype])
    torch.testing.assert_close(state, want_state, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32
                                                     else {"atol": 5e-2, "rtol": 2e-2}))


def test_ops_dispatch_runs_both_kernels_on_an_in_proj_row():
    """``ops.gated_delta_step`` on in_proj rows laid out q | k | v | z | b | a (the module's call): the convolution
    over the first C columns, b and a after z, counted once."""
    a = _inputs(torch.float32)
    hk, hv, dk, dv = a["hk"], a["hv"], a["dk"], a["dv"]
    z = torch.randn(3, hv * dv, device=DEVICE)
    proj = torch.cat((a["x"], z, a["ba"]), dim=-1)
    history, state = a["history"].clone(), a["state"].clone()
    ops.dispatch_counts.clear()
    got = ops.gated_delta_step(proj, history, a["weight"], a["a_log"], a["dt_bias"], state, hk, dk)
    assert dict(ops.dispatch_counts) == {("gated_delta", "triton"): 1}
    qkv = conv_step(a["x"], a["history"].clone(), a["weight"])
    state_again = a["state"].clone()
    torch.testing.assert_close(got, delta_step(qkv, a["ba"], a["a_log"], a["dt_bias"], state_again, hk, dk))
    torch.testing.assert_close(state, state_again)
