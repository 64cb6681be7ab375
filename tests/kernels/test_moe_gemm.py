import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.moe_gemm import moe_gemm

TOLS = [(torch.float32, 1e-4, 1e-5), (torch.float16, 1e-2, 2e-3), (torch.bfloat16, 8e-2, 1.6e-2)]


def _tables(t, e, k, device, skew=False):
    logits = torch.randn(t, e, device=device)
    if skew:
        logits[:, 0] += 10   # every token picks expert 0: one expert spans several row tiles, some get none
    return ref.moe_route(logits, k)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("t,e,k,kdim,n,skew", [(3, 4, 2, 40, 24, False), (19, 5, 2, 64, 33, True),
                                              (11, 8, 3, 73, 17, False)])
def test_moe_gemm_token_input(device, dtype, atol, rtol, t, e, k, kdim, n, skew):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    w_route, _, _, offsets, sorted_ids, _ = _tables(t, e, k, device, skew)
    x = torch.randn(t, kdim, device=device).to(dtype)
    w = torch.randn(e, n, kdim, device=device).to(dtype)
    got = moe_gemm(x, w, sorted_ids, offsets, k)
    assert_close(got, ref.moe_gemm(x, w, sorted_ids, offsets, k), atol, rtol)
    # Second GEMM form: per-assignment input, routing weights fused in, then the combine.
    h = torch.randn(t * k, n, device=device).to(dtype)
    w2 = torch.randn(e, kdim, n, device=device).to(dtype)
    got2 = moe_gemm(h, w2, sorted_ids, offsets, 1, row_scale=w_route)
    assert_close(got2, ref.moe_gemm(h, w2, sorted_ids, offsets, 1, w_route), atol, rtol)


def _assert_quantised_forms(q, s, kdim, k, w_route, offsets, sorted_ids, dtype, atol, rtol):
    """Both GEMM forms over quantised experts (``q`` with scales ``s``) against the dequantised reference: token input
    [T, K] (top-k rows each) and per-assignment input with the routing weights. Returns the token input."""
    t = w_route.shape[0]
    x = torch.randn(t, kdim, device=q.device).to(dtype)
    assert_close(moe_gemm(x, q, sorted_ids, offsets, k, weight_scale=s),
                 ref.moe_gemm(x, q, sorted_ids, offsets, k, weight_scale=s), atol, rtol)
    h = torch.randn(t * k, kdim, device=q.device).to(dtype)
    assert_close(moe_gemm(h, q, sorted_ids, offsets, 1, row_scale=w_route, weight_scale=s),
                 ref.moe_gemm(h, q, sorted_ids, offsets, 1, w_route, s), atol, rtol)
    return x


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_moe_gemm_int8_weights(device, dtype, atol, rtol):
    """int8 experts with a scale per expert row: both GEMM forms against the dequantised reference."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    t, e, k, kdim, n = 13, 5, 2, 72, 37
    w_route, _, _, offsets, sorted_ids, _ = _tables(t, e, k, device, skew=True)
    q, s = ref.quantize_int8_per_channel(torch.randn(e * n, kdim, device=device))
    q, s = q.view(e, n, kdim), s.view(e, n)
    x = _assert_quantised_forms(q, s, kdim, k, w_route, offsets, sorted_ids, dtype, atol, rtol)
    with pytest.raises(ValueError, match="int8 expert weights need weight_scale"):
        moe_gemm(x, q, sorted_ids, offsets, k)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("kdim,group", [(72, 8), (96, 16), (64, 64), (256, 128)])
def test_moe_gemm_int4_weights(device, dtype, atol, rtol, kdim, group):
    """int4 experts, packed as small_gemm_int4 takes them ([E, N, K / 2], low nibble the even input dim) with a scale
    per expert row and group: both GEMM forms against the dequantised reference; groups smaller than a K tile (8, 16)
    and larger, K not a multiple of the tile (72, 96)."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    t, e, k, n = 13, 5, 2, 37
    w_route, _, _, offsets, sorted_ids, _ = _tables(t, e, k, device, skew=True)
    q, s = ref.quantize_int4_groupwise(torch.randn(e * n, kdim, device=device), group)
    q, s = q.view(e, n, kdim // 2), s.view(e, n, kdim // group)
    assert torch.equal(ref.dequantize_experts(q, s)[1], ref.dequantize_int4(q[1], s[1], group))
    x = _assert_quantised_forms(q, s, kdim, k, w_route, offsets, sorted_ids, dtype, atol, rtol)
    with pytest.raises(ValueError, match="int4 expert weights need weight_scale"):
        moe_gemm(x, q, sorted_ids, offsets, k)
    with pytest.raises(ValueError, match=r"int4 weight_scale shape \(5, 37, 5\)"):
        moe_gemm(x, q, sorted_ids, offsets, k, weight_scale=torch.ones(e, n, 5, device=device))


def _experts(e, n, kdim, device, dtype, wmode):
    """(weight, weight_scale) of e experts [n, kdim]: float in dtype, int8 per expert row, int4 in groups of 8."""
    w = torch.randn(e * n, kdim, device=device)
    if wmode == "int8":
        q, s = ref.quantize_int8_per_channel(w)
        return q.view(e, n, kdim), s.view(e, n)
    if wmode == "int4":
        q, s = ref.quantize_int4_groupwise(w, 8)
        return q.view(e, n, kdim // 2), s.view(e, n, kdim // 8)
    return w.view(e, n, kdim).to(dtype), None


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("wmode", ["float", "int8", "int4"])
def test_moe_gemm_expert_bias(device, dtype, atol, rtol, wmode):
    """A bias row per expert (gpt-oss), added in fp32 in the epilogue: the token-input form, and the per-assignment
    form with the bias added before the routing weight (down(h) + b2, then the weight, as transformers); float, int8
    and int4 weights against the reference; one expert spans several row tiles, some experts get no rows."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    t, e, k, kdim, n = 13, 5, 2, 40, 37
    w_route, _, _, offsets, sorted_ids, _ = _tables(t, e, k, device, skew=True)
    w, s = _experts(e, n, kdim, device, dtype, wmode)
    bias = (torch.randn(e, n, device=device) * 4).to(dtype)
    x = torch.randn(t, kdim, device=device).to(dtype)
    want = ref.moe_gemm(x, w, sorted_ids, offsets, k, weight_scale=s, bias=bias)
    assert_close(moe_gemm(x, w, sorted_ids, offsets, k, weight_scale=s, bias=bias), want, atol, rtol)
    no_bias = ref.moe_gemm(x, w, sorted_ids, offsets, k, weight_scale=s).float()
    ex = torch.repeat_interleave(torch.arange(e, device=device), (offsets[1:] - offsets[:-1]).long())
    bias_rows = torch.empty_like(no_bias)
    bias_rows[sorted_ids.long()] = bias[ex].float()      # row a: its expert's bias
    assert_close(want.float(), no_bias + bias_rows, atol, rtol)
    h = torch.randn(t * k, kdim, device=device).to(dtype)
    want2 = ref.moe_gemm(h, w, sorted_ids, offsets, 1, w_route, s, bias=bias)
    assert_close(moe_gemm(h, w, sorted_ids, offsets, 1, row_scale=w_route, weight_scale=s, bias=bias), want2, atol,
                 rtol)
    plain = ref.moe_gemm(h, w, sorted_ids, offsets, 1, weight_scale=s).float()
    assert_close(want2.float(), (plain + bias_rows) * w_route.reshape(-1, 1).float(), atol, rtol)
    with pytest.raises(ValueError, match=r"bias shape \(5, 36\) must be \(5, 37\)"):
        moe_gemm(x, w, sorted_ids, offsets, k, weight_scale=s, bias=bias[:, :36])


@pytest.mark.parametrize("device", device_params())
def test_moe_gemm_equals_dense_moe(device):
    # End to end against a plain per-token loop (no tables): sum_j w_tj * x_t @ W[e_tj].T.
    t, e, k, kdim, n = 7, 4, 2, 32, 20
    weights, ids, _, offsets, sorted_ids, _ = _tables(t, e, k, device)
    x, w = torch.randn(t, kdim, device=device), torch.randn(e, n, kdim, device=device)
    xa = x.repeat_interleave(k, 0)                               # per-assignment input rows
    got = moe_gemm(xa, w, sorted_ids, offsets, 1, row_scale=weights).view(t, k, n).sum(1)
    want = torch.stack([sum(weights[i, j] * (x[i] @ w[ids[i, j]].T) for j in range(k)) for i in range(t)])
    assert_close(got, want, 1e-4, 1e-5)


def test_moe_gemm_rejects_bad_args():
    with pytest.raises(ValueError, match="must equal assignments"):
        moe_gemm(torch.randn(3, 8), torch.randn(2, 4, 8), torch.zeros(5, dtype=torch.int32),
                 torch.zeros(3, dtype=torch.int32), 2)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_moe_mlp_expert_parallel_segments_sum_to_the_whole(device, quantize):
    """Expert parallelism on the Triton path (ops.moe_mlp with first_expert): each "rank" routes over all 6 experts
    and runs only its 3 through the grouped GEMMs (its segment of the routing tables, the other assignments zero);
    the two partial outputs sum to the whole MoE (reference.moe_mlp over all experts); int8 and int4 (groups of 8)
    experts too."""
    from lightning_dsinfer.kernels import ops

    t, e, k, h, inter = 7, 6, 2, 32, 24
    x = torch.randn(t, h, device=device)
    router = torch.randn(e, h, device=device)
    gate_up = torch.randn(e, 2 * inter, h, device=device) / h ** 0.5
    down = torch.randn(e, h, inter, device=device) / inter ** 0.5
    gs = ds = None
    if quantize == "int8":
        q, gs = ref.quantize_int8_per_channel(gate_up.reshape(e * 2 * inter, h))
        gate_up, gs = q.view(e, 2 * inter, h), gs.view(e, 2 * inter)
        q, ds = ref.quantize_int8_per_channel(down.reshape(e * h, inter))
        down, ds = q.view(e, h, inter), ds.view(e, h)
    elif quantize == "int4":
        q, gs = ref.quantize_int4_groupwise(gate_up.reshape(e * 2 * inter, h), 8)
        gate_up, gs = q.view(e, 2 * inter, h // 2), gs.view(e, 2 * inter, h // 8)
        q, ds = ref.quantize_int4_groupwise(down.reshape(e * h, inter), 8)
        down, ds = q.view(e, h, inter // 2), ds.view(e, h, inter // 8)
    want = ref.moe_mlp(x, router, gate_up, down, k, True, False, gs, ds)
    with ops.force_triton(device == "cpu"):
        parts = [ops.moe_mlp(x, router, gate_up[a:a + 3], down[a:a + 3], k, True, False,
                             None if gs is None else gs[a:a + 3], None if ds is None else ds[a:a + 3], first_expert=a)
                 for a in (0, 3)]
        assert ops.dispatch_counts[("moe_mlp", "triton")] >= 2
    assert_close(parts[0] + parts[1], want, 1e-4, 1e-4)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_moe_mlp_clamped_swiglu_with_biases(device, quantize):
    """gpt-oss's experts on the Triton path (ops.moe_mlp with gate_up_bias, down_bias and ClampedSwiGLU): the biases in
    the grouped GEMMs, the clamped SwiGLU kernel between them, counted ``triton`` with no reference fallback; equal to
    reference.moe_mlp, whole and as two expert-parallel segments (down's bias on both ranks' own experts); int8 and
    int4 (groups of 8) experts too. The clamp limit is small enough that some gate / up values are clamped."""
    from lightning_dsinfer.kernels import ops

    t, e, k, h, inter = 7, 6, 2, 32, 24
    x = torch.randn(t, h, device=device)
    router = torch.randn(e, h, device=device)
    gate_up, gs = _experts(e, 2 * inter, h, device, torch.float32, quantize or "float")
    down, ds = _experts(e, h, inter, device, torch.float32, quantize or "float")
    gb, db = torch.randn(e, 2 * inter, device=device), torch.randn(e, h, device=device)
    act = ref.ClampedSwiGLU(alpha=1.702, limit=3.0)
    routing = ref.Routing(scoring="topk_softmax")
    want = ref.moe_mlp(x, router, gate_up, down, k, True, False, gs, ds, routing=routing, gate_up_bias=gb,
                       down_bias=db, act=act)
    ops.dispatch_counts.clear()
    with ops.force_triton(device == "cpu"):
        got = ops.moe_mlp(x, router, gate_up, down, k, True, False, gs, ds, routing=routing, gate_up_bias=gb,
                          down_bias=db, act=act)
        parts = [ops.moe_mlp(x, router, gate_up[a:a + 3], down[a:a + 3], k, True, False,
                             None if gs is None else gs[a:a + 3], None if ds is None else ds[a:a + 3], first_expert=a,
                             routing=routing, gate_up_bias=gb[a:a + 3], down_bias=db[a:a + 3], act=act)
                 for a in (0, 3)]
    assert dict(ops.dispatch_counts) == {("moe_mlp", "triton"): 3, ("clamped_swiglu", "triton"): 3}
    assert_close(got, want, 1e-4, 1e-4)
    assert_close(parts[0] + parts[1], want, 1e-4, 1e-4)
