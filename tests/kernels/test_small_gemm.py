import json

import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.small_gemm import (
    CONFIG_DIR, GEMV_MAX_M, config_key, heuristic_config, rows_bucket, small_gemm, small_gemm_int4, small_gemm_int8)

# fp32 accumulation in both; the rows allow output rounding plus (bf16/fp16) low-precision products
# of |y| ~ sqrt(K) ~ 10.
TOLS = [(torch.float32, 1e-4, 1e-5), (torch.float16, 1e-2, 2e-3), (torch.bfloat16, 8e-2, 1.6e-2)]
# (M, K, N): GEMV, odd K and N, 3 rows in a 4-row GEMV tile, M > 16 (second M tile)
SHAPES = [(1, 73, 40), (5, 96, 33), (3, 200, 17), (17, 64, 130)]
# (M, K, N, kernel): both kernels for the rows the GEMV kernel takes (M <= 8), the tensor-core one beyond
CASES = [(m, k, n, kernel) for m, k, n in SHAPES for kernel in (("gemv", "dot") if m <= GEMV_MAX_M else ("dot",))]


def _skip(device, dtype):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("m,k,n,kernel", CASES)
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("epilogue", ["none", "bias_residual"])
def test_small_gemm(device, dtype, atol, rtol, m, k, n, kernel, split_k, epilogue):
    _skip(device, dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if epilogue != "none" else None
    res = torch.randn(m, n, device=device).to(dtype) if epilogue != "none" else None
    got = small_gemm(x, w, bias, res, split_k=split_k, kernel=kernel)
    assert_close(got, ref.small_gemm(x, w, bias, res), atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("m,k,n,kernel", CASES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_small_gemm_int8(device, dtype, atol, rtol, m, k, n, kernel, split_k):
    _skip(device, dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    q, s = ref.quantize_int8_per_channel(torch.randn(n, k, device=device))
    bias = torch.randn(n, device=device).to(dtype)
    got = small_gemm_int8(x, q, s, bias, split_k=split_k, kernel=kernel)
    assert_close(got, ref.small_gemm(x, ref.dequantize_int8(q, s), bias), atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("m,k,n,group", [(1, 128, 40, 32), (7, 192, 33, 64), (18, 128, 20, 128)])
@pytest.mark.parametrize("split_k", [1, 2])
def test_small_gemm_int4(device, dtype, atol, rtol, m, k, n, group, split_k):
    _skip(device, dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    packed, s = ref.quantize_int4_groupwise(torch.randn(n, k, device=device), group)
    res = torch.randn(m, n, device=device).to(dtype)
    got = small_gemm_int4(x, packed, s, group, residual=res, split_k=split_k)
    assert_close(got, ref.small_gemm(x, ref.dequantize_int4(packed, s, group), None, res), atol, rtol)


FUSED = ["norm", "add_norm", "gated", "add_norm_gated"]


def _fused_args(kind, m, k, n, dtype, device):
    """Inputs of a Deep-Fusion call with O(1) outputs: weight rows of norm ~1 over K."""
    x = torch.randn(m, k, device=device).to(dtype)
    add = torch.randn(m, k, device=device).to(dtype) if "add" in kind else None
    norm = ((1 + 0.5 * torch.randn(k, device=device)).to(dtype), 1e-5) if "norm" in kind else None
    rows = 2 * n if "gated" in kind else n
    w = (torch.randn(rows, k, device=device) / k ** 0.5)
    bias = torch.randn(rows, device=device).to(dtype)
    return x, add, norm, w, bias


def _assert_stream(h, u):
    """The stream x + add the kernel stores equals torch's x + add: exactly on a GPU; within one ulp of fp16 / bf16
    in the interpreter, whose float conversions truncate instead of rounding to nearest."""
    exact = h.device.type == "cuda" or h.dtype == torch.float32
    assert_close(h, u, 0 if exact else 1e-2, 0 if exact else 8e-3)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("m,k,n,kernel", CASES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("kind", FUSED)
def test_small_gemm_deep_fusion(device, dtype, atol, rtol, m, k, n, kernel, split_k, kind):
    """RMSNorm prologue (with and without the residual add) and the SwiGLU epilogue, on both kernels, with and
    without split-K (the last split of a tile reduces), against reference.norm_small_gemm."""
    _skip(device, dtype)
    x, add, norm, w, bias = _fused_args(kind, m, k, n, dtype, device)
    w = w.to(dtype)
    res = torch.randn(m, n, device=device).to(dtype) if split_k == 3 else None    # with and without a residual
    got = small_gemm(x, w, bias, res, add=add, norm=norm, gated="gated" in kind, split_k=split_k, kernel=kernel)
    want, u = ref.norm_small_gemm(x, w, add, norm, bias, res, "gated" in kind)
    if add is not None:
        got, h = got
        _assert_stream(h, u)
    assert got.shape == (m, n)
    assert_close(got, want, atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float16, 1e-2, 2e-3), (torch.bfloat16, 8e-2, 1.6e-2)])
@pytest.mark.parametrize("m,k,n,kernel", CASES)
@pytest.mark.parametrize("split_k", [1, 2])
def test_small_gemm_int8_deep_fusion(device, dtype, atol, rtol, m, k, n, kernel, split_k):
    """int8 weights with the norm prologue, the gated epilogue and a residual: the gate and up rows keep their own
    scales."""
    _skip(device, dtype)
    x, add, norm, w, bias = _fused_args("add_norm_gated", m, k, n, dtype, device)
    q, s = ref.quantize_int8_per_channel(w)
    res = torch.randn(m, n, device=device).to(dtype)
    got, h = small_gemm_int8(x, q, s, bias, res, add=add, norm=norm, gated=True, split_k=split_k, kernel=kernel)
    want, u = ref.norm_small_gemm(x, ref.dequantize_int8(q, s), add, norm, bias, res, True)
    _assert_stream(h, u)
    assert_close(got, want, atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kernel", ["gemv", "dot"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_deep_fusion_large_stream_fp16(device, kernel, split_k):
    """A residual stream of ~3000 and norm weights of ~30 (real models have both): the stream times the norm weight
    overflows fp16, so the input must be normalised before any rounding to fp16. Finite and equal to the reference."""
    m, k, n = 3, 96, 40
    x = (3000 * torch.randn(m, k, device=device)).half()
    add = torch.randn(m, k, device=device).half()
    nw = (30 + torch.randn(k, device=device)).half()
    w = (torch.randn(2 * n, k, device=device) / k ** 0.5).half()
    got, _ = small_gemm(x, w, add=add, norm=(nw, 1e-5), gated=True, split_k=split_k, kernel=kernel)
    want, _ = ref.norm_small_gemm(x, w, add, (nw, 1e-5), None, None, True)
    assert torch.isfinite(got).all()
    assert_close(got, want, 0.5, 2e-2)     # |out| ~ 30 * 30


@pytest.mark.parametrize("device", device_params())
def test_split_k_semaphores_are_left_at_zero(device):
    """The split that finishes a tile resets its semaphore, so launch after launch (other shapes, other tile counts,
    the same semaphores) reduces correctly; a semaphore left non-zero would leave its tile unwritten (NaN)."""
    from lightning_dsinfer.kernels._common import semaphores as _semaphores
    for m, n, k, kernel, split in [(1, 40, 256, "gemv", 4), (3, 33, 200, "dot", 3), (1, 40, 256, "gemv", 2),
                                   (5, 70, 96, "gemv", 3), (1, 40, 256, "gemv", 4)]:
        x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
        assert_close(small_gemm(x, w, split_k=split, kernel=kernel), ref.small_gemm(x, w), 1e-4, 1e-4)
        assert int(_semaphores(x.device, 1).abs().sum()) == 0


def test_fused_gemm_rejects_bad_args():
    with pytest.raises(ValueError, match="rows is odd"):
        small_gemm(torch.randn(1, 8), torch.randn(5, 8), gated=True)
    with pytest.raises(ValueError, match="norm weight shape"):
        small_gemm(torch.randn(1, 8), torch.randn(4, 8), norm=(torch.ones(7), 1e-6))
    with pytest.raises(ValueError, match="add .* must match x"):
        small_gemm(torch.randn(1, 8), torch.randn(4, 8), add=torch.randn(2, 8))


def test_quantizers_round_trip():
    w = torch.randn(16, 64)
    q, s = ref.quantize_int8_per_channel(w)
    assert (ref.dequantize_int8(q, s) - w).abs().max() <= s.max() / 2 + 1e-6
    p, s4 = ref.quantize_int4_groupwise(w, 32)
    assert p.shape == (16, 32) and s4.shape == (16, 2)
    assert (ref.dequantize_int4(p, s4, 32) - w).abs().max() <= s4.max() / 2 + 1e-6


@pytest.mark.parametrize("device", device_params())
def test_small_gemm_leading_dims(device):
    x = torch.randn(2, 3, 40, device=device)
    w = torch.randn(24, 40, device=device)
    assert_close(small_gemm(x, w), ref.small_gemm(x.reshape(6, 40), w).reshape(2, 3, 24), 1e-4, 1e-5)


def test_small_gemm_rejects_bad_args():
    with pytest.raises(ValueError, match="x last dim 5 does not match"):
        small_gemm(torch.randn(1, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="group_size 48"):
        small_gemm_int4(torch.randn(1, 96), torch.zeros(3, 48, dtype=torch.uint8), torch.ones(3, 2), 48)
    with pytest.raises(ValueError, match="scale shape"):
        small_gemm_int8(torch.randn(1, 4), torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))


def test_gemv_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="up to 8 rows, got 9 rows"):
        small_gemm(torch.randn(9, 16), torch.randn(4, 16), kernel="gemv")
    with pytest.raises(ValueError, match="'gemv' or 'dot'"):
        small_gemm(torch.randn(1, 16), torch.randn(4, 16), kernel="wide")


def test_config_keys_and_heuristic():
    assert config_key(2560, 2048, 1, "float") == "float m1 n2560 k2048"
    assert config_key(2560, 2048, 3, "int8") == "int8 m4 n2560 k2048" and rows_bucket(17) == 32
    assert config_key(11264, 2048, 1, "float", "gated") == "float m1 n11264 k2048 gated"
    # an H200 has 132 SMs: 2048 outputs -> N tiles of 2 (4 programs per SM), a 1-row K tile of 512
    c = heuristic_config(2048, 2048, 1, 0, 132)
    assert c == {"kernel": "gemv", "block_n": 2, "block_k": 512, "split_k": None, "warps": 4}
    assert heuristic_config(2048, 2048, 16, 0, 132)["kernel"] == "dot"
    assert heuristic_config(2048, 2048, 1, 2, 132)["kernel"] == "dot"   # int4: the tensor-core kernel
    assert heuristic_config(11264, 2048, 1, 0, 132)["kernel"] == "dot"  # wide bf16 weights: tensor cores
    assert heuristic_config(6144, 4096, 1, 1, 132)["kernel"] == "gemv"  # int8 up to 8192 outputs


SHIPPED = sorted(CONFIG_DIR.glob("*.json"))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_compute_the_product(device, path):
    """Every distinct config of a measured table (kernels/configs/*.json) is a valid launch that computes x @ W.T
    (int8 entries through the int8 kernel), here on a small shape that has a K tail and an N tail."""
    table = json.loads(path.read_text())
    assert table, path
    seen = set()
    for key, cfg in table.items():
        wmode, bucket = key.split()[0], int(key.split()[1][1:])
        assert cfg["kernel"] in ("gemv", "dot") and (cfg["kernel"] == "dot" or bucket <= GEMV_MAX_M), key
        params = (wmode, min(bucket, 3), cfg["kernel"], cfg["block_n"], cfg["block_k"], cfg["split_k"], cfg["warps"])
        if params in seen:
            continue
        seen.add(params)
        m = params[1]
        n, k = 2 * cfg["block_n"] + 3, cfg["block_k"] + 40
        x = torch.randn(m, k, device=device)
        kw = dict(kernel=cfg["kernel"], block_n=cfg["block_n"], block_k=cfg["block_k"], split_k=cfg["split_k"],
                  warps=cfg["warps"])
        if wmode == "int8":
            q, s = ref.quantize_int8_per_channel(torch.randn(n, k, device=device))
            assert_close(small_gemm_int8(x, q, s, **kw), ref.small_gemm(x, ref.dequantize_int8(q, s)), 1e-4, 1e-4)
        else:
            w = torch.randn(n, k, device=device)
            assert_close(small_gemm(x, w, **kw), ref.small_gemm(x, w), 1e-4, 1e-4)
