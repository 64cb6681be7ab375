import contextlib

import pytest
import torch
from kernel_utils import assert_close, bf16_ok, device_params

from lightning_dsinfer.kernels import reference as ref
from lightning_dsinfer.kernels.decode_attention import decode_attention

# p is rounded to the value dtype before the PV product (as flash attention does); |out| < 3.
TOLS = [(torch.float32, 2e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 2.5e-2, 2e-2)]


def _cache(bmax, hkv, s, d, dtype, device):
    k = torch.randn(bmax, hkv, s, d, device=device).to(dtype)
    v = torch.randn(bmax, hkv, s, d, device=device).to(dtype)
    return k, v


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("b,hq,hkv,d,s", [(1, 4, 4, 16, 37), (3, 8, 2, 24, 45), (2, 6, 1, 40, 19)])
@pytest.mark.parametrize("splits", [1, None])
def test_decode_attention_gqa_padded(device, dtype, atol, rtol, b, hq, hkv, d, s, splits):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    k, v = _cache(b + 1, hkv, s, d, dtype, device)          # B_max > B: spare cache rows are ignored
    q = torch.randn(b, hq, d, device=device).to(dtype)
    lens = torch.tensor([s, 1, s - 7][:b], device=device, dtype=torch.int32)   # padded batch: ragged lengths
    got = decode_attention(q, k, v, lens, 0.3, num_splits=splits)
    assert_close(got, ref.decode_attention(q, k, v, lens, 0.3), atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("feature", ["alibi", "window", "softcap", "left_pad", "all"])
def test_decode_attention_features(device, dtype, atol, rtol, feature):
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    b, hq, hkv, d, s = 3, 6, 2, 32, 41
    k, v = _cache(b, hkv, s, d, dtype, device)
    q = torch.randn(b, hq, d, device=device).to(dtype)
    lens = torch.tensor([41, 23, 9], device=device, dtype=torch.int32)
    kw = {}
    if feature in ("alibi", "all"):
        kw["alibi_slopes"] = 2.0 ** (-8.0 * torch.arange(1, hq + 1, device=device) / hq)
    if feature in ("window", "all"):
        kw["window"] = 13
    if feature in ("softcap", "all"):
        kw["softcap"] = 2.0
    if feature in ("left_pad", "all"):
        kw["kv_start"] = torch.tensor([3, 0, 5], device=device, dtype=torch.int32)
    got = decode_attention(q, k, v, lens, 0.5, num_splits=3, **kw)
    assert_close(got, ref.decode_attention(q, k, v, lens, 0.5, **kw), atol, rtol)


@pytest.mark.parametrize("device", device_params())
def test_decode_attention_matches_cpu_path_attention(device):
    # Against the engine's existing reference.attention (SDPA), with a key-padding mask.
    b, hq, hkv, d, s = 2, 8, 2, 16, 21
    k, v = _cache(b, hkv, s, d, torch.float32, device)
    q = torch.randn(b, hq, d, device=device)
    lens = torch.tensor([21, 12], device=device, dtype=torch.int32)
    mask = (torch.arange(s, device=device)[None, :] < lens[:, None])[:, None, None, :]
    want = ref.attention(q[:, :, None], k, v, mask, 0.25)[:, :, 0]
    assert_close(decode_attention(q, k, v, lens, 0.25), want, 2e-5, 1e-5)


def test_decode_attention_rejects_bad_args():
    k = torch.zeros(2, 3, 8, 16)
    with pytest.raises(ValueError, match="query heads 4 must be a multiple of kv heads 3"):
        decode_attention(torch.zeros(2, 4, 16), k, k, torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seq_len 9"):
        decode_attention(torch.zeros(2, 6, 16), k, k, torch.ones(2, dtype=torch.int32), max_seq_len=9)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"dv = 24 values \(0 < dv <= head dim 16\)"):
        decode_attention(torch.zeros(1, 3, 16), k, torch.zeros(2, 3, 8, 24), lens)
    with pytest.raises(ValueError, match="head dim 1040 \\(max 1024\\)"):
        decode_attention(torch.zeros(1, 3, 1040), torch.zeros(1, 3, 8, 1040), torch.zeros(1, 3, 8, 16), lens)
    wide = torch.zeros(1, 1, 8, 640)
    with pytest.raises(ValueError, match="value dim 640 \\(max 512 for head dims over 256\\)"):
        decode_attention(torch.zeros(1, 1, 640), wide, wide, lens)


@pytest.mark.parametrize("device", device_params())
def test_decode_attention_empty_row_gives_zeros(device):
    # A padded batch slot with no keys yet (seq_len 0) must come back as zeros, not NaN / garbage.
    k, v = _cache(3, 2, 20, 16, torch.float16, device)
    q = torch.randn(3, 4, 16, device=device).to(torch.float16)
    lens = torch.tensor([20, 0, 7], device=device, dtype=torch.int32)
    got = decode_attention(q, k, v, lens, 0.25, num_splits=2)
    assert_close(got, ref.decode_attention(q, k, v, lens, 0.25), 4e-3, 4e-3)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("device", device_params())
def test_decode_attention_merge_leaves_semaphores_at_zero(device):
    """The split that merges a (row, kv head) resets its semaphore: launch after launch with other batch sizes and
    split counts stays right (a stale count would leave heads unmerged: NaN from the poisoned output)."""
    from lightning_dsinfer.kernels._common import semaphores
    for b, splits in [(2, 3), (3, 2), (2, 4), (1, 3)]:
        q = torch.randn(b, 4, 16, device=device)
        k, v = torch.randn(4, 2, 40, 16, device=device), torch.randn(4, 2, 40, 16, device=device)
        lens = torch.tensor([40, 33, 17, 9][:b], dtype=torch.int32, device=device)
        got = decode_attention(q, k, v, lens, 0.25, num_splits=splits)
        want = ref.decode_attention(q, k, v, lens, 0.25)
        assert_close(got, want, 1e-4, 1e-4)
        assert int(semaphores(q.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("b,hq,hkv,d,s", [(1, 4, 4, 16, 37), (3, 8, 2, 24, 45), (2, 6, 1, 40, 19)])
@pytest.mark.parametrize("splits", [1, None, 3])
@pytest.mark.parametrize("feature", ["sinks", "window", "left_pad_window_softcap"])
def test_decode_attention_sinks(device, dtype, atol, rtol, b, hq, hkv, d, s, splits, feature):
    """gpt-oss's sinks (a logit per query head in the softmax's denominator, no value), alone and with the sliding
    window of its alternate layers (and left padding, a cap): applied once over the merged splits, not per split
    (a per-split sink would shrink multi-split rows further than one split's)."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    k, v = _cache(b + 1, hkv, s, d, dtype, device)
    q = torch.randn(b, hq, d, device=device).to(dtype)
    lens = torch.tensor([s, 1, s - 7][:b], device=device, dtype=torch.int32)
    sinks = (torch.randn(hq, device=device) * 2 + torch.linspace(-2.0, 3.0, hq, device=device)).to(dtype)
    kw = {}
    if feature != "sinks":
        kw["window"] = 9
    if feature == "left_pad_window_softcap":
        kw["kv_start"] = torch.tensor([3, 0, 5][:b], device=device, dtype=torch.int32)
        kw["softcap"] = 2.0
    got = decode_attention(q, k, v, lens, 0.3, sinks=sinks, num_splits=splits, **kw)
    assert_close(got, ref.decode_attention(q, k, v, lens, 0.3, sinks=sinks, **kw), atol, rtol)


@pytest.mark.parametrize("device", device_params())
def test_decode_attention_sinks_extremes(device):
    """A row with no key gives zeros with a sink too; a sink far above every score (weights near 0, no overflow:
    exp(sink - m) is never formed) and far below (as no sink)."""
    k, v = _cache(3, 2, 40, 16, torch.float32, device)
    q = torch.randn(3, 4, 16, device=device)
    lens = torch.tensor([40, 0, 17], device=device, dtype=torch.int32)
    for value in (200.0, -200.0):
        sinks = torch.full((4,), value, device=device)
        for splits in (1, 3):
            got = decode_attention(q, k, v, lens, 0.25, sinks=sinks, num_splits=splits)
            assert_close(got, ref.decode_attention(q, k, v, lens, 0.25, sinks=sinks), 2e-5, 1e-5)
            assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert_close(decode_attention(q, k, v, lens, 0.25, sinks=torch.full((4,), -200.0, device=device)),
                 decode_attention(q, k, v, lens, 0.25), 2e-5, 1e-5)
    with pytest.raises(ValueError, match=r"sinks shape \(3,\) must be \(4,\)"):
        decode_attention(q, k, v, lens, 0.25, sinks=torch.zeros(3, device=device))


def _features(kind, b, hq, device, dtype):
    """Every per-launch switch at once for ``kind == "all"`` (ALiBi, window, cap, left padding, sinks), else none."""
    if kind != "all":
        return {}
    return {"alibi_slopes": 2.0 ** (-8.0 * torch.arange(1, hq + 1, device=device) / hq), "window": 13,
            "softcap": 2.0, "kv_start": torch.tensor([3, 0, 5][:b], device=device, dtype=torch.int32),
            "sinks": torch.linspace(-2.0, 3.0, hq, device=device).to(dtype)}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("d,dv,values", [(48, 32, "own"), (48, 32, "key_view"), (64, 40, "key_view"),
                                         (40, 24, "dv_arg")])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kind", ["plain", "all"])
def test_decode_attention_values_narrower_than_keys(device, dtype, atol, rtol, d, dv, values, splits, kind):
    """Values dv < D wide (keys up to 256): a cache of their own, a view of the keys' first columns (64 / 40: the
    value block is the key block, the key tile serves as the value tile) or a wider cache of which ``dv`` keeps the
    first columns; output [B, Hq, dv]."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    b, hq, hkv, s = 3, 8, 2, 41
    k = torch.randn(b, hkv, s, d, device=device).to(dtype)
    v = {"own": lambda: torch.randn(b, hkv, s, dv, device=device).to(dtype), "key_view": lambda: k[..., :dv],
         "dv_arg": lambda: torch.randn(b, hkv, s, d, device=device).to(dtype)}[values]()
    q = torch.randn(b, hq, d, device=device).to(dtype)
    lens = torch.tensor([41, 23, 9], device=device, dtype=torch.int32)
    kw = _features(kind, b, hq, device, dtype)
    got = decode_attention(q, k, v, lens, 0.3, dv=dv if values == "dv_arg" else None, num_splits=splits, **kw)
    assert got.shape == (b, hq, dv)
    assert_close(got, ref.decode_attention(q, k, v[..., :dv], lens, 0.3, **kw), atol, rtol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("d,dv,hq,hkv,values", [(320, 256, 32, 2, "key_view"), (320, 200, 20, 1, "own"),
                                                (512, 512, 20, 1, "own")])
@pytest.mark.parametrize("kind", ["plain", "all"])
def test_decode_attention_wide_keys(device, dtype, atol, rtol, d, dv, hq, hkv, values, kind):
    """Keys over 256 wide, scaled down from DeepSeek-V3's 576: 320 = a 256 main block + a 64 tail, 512 one block with
    no tail; the query heads of a kv head in tiles of 16 (32: two full tiles, 20: a full and a partial one), each
    tile merging its own splits."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    b, s = 3, 23
    k = torch.randn(b, hkv, s, d, device=device).to(dtype)
    v = k[..., :dv] if values == "key_view" else torch.randn(b, hkv, s, dv, device=device).to(dtype)
    q = torch.randn(b, hq, d, device=device).to(dtype)
    lens = torch.tensor([23, 14, 6], device=device, dtype=torch.int32)
    kw = _features(kind, b, hq, device, dtype)
    for splits in (1, 3):
        got = decode_attention(q, k, v, lens, 0.05, num_splits=splits, **kw)
        assert_close(got, ref.decode_attention(q, k, v, lens, 0.05, **kw), atol, rtol, f"splits {splits}")


# DeepSeek-V3's latent rows: 512 values + 64 rotary columns; |out| < 3 (a mean of normal values): fp32 as TOLS, bf16
# with the rounding of q, k, p and out plus the 576-term score sums at scale 0.05.
MLA_TOLS = [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 2.5e-2, 2e-2)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype,atol,rtol", MLA_TOLS)
@pytest.mark.parametrize("hq", [16, 128])
def test_decode_attention_mla_width(device, dtype, atol, rtol, hq):
    """The real shape of DeepSeek-V3 / Kimi-K2's absorbed decode: one kv head of 576-wide rows, the values their
    first 512 columns (a view: row stride 576), 16 or 128 query heads; a padded batch of lengths 5 and 9 (the first
    left-padded: keys 2..4), into a NaN-filled output, one split and several."""
    if not bf16_ok(device) and dtype == torch.bfloat16:
        pytest.skip("bf16 unsupported on this GPU")
    b, s, d, dv = 2, 12, 576, 512
    rows = torch.randn(b, 1, s, d, device=device).to(dtype)
    q = torch.randn(b, hq, d, device=device).to(dtype)
    lens = torch.tensor([5, 9], device=device, dtype=torch.int32)
    start = torch.tensor([2, 0], device=device, dtype=torch.int32)
    want = ref.decode_attention(q, rows, rows[..., :dv], lens, 0.05, kv_start=start)
    for splits in (1, None):
        out = torch.full((b, hq, dv), float("nan"), device=device, dtype=dtype)
        decode_attention(q, rows, rows[..., :dv], lens, 0.05, kv_start=start, num_splits=splits, out=out)
        assert_close(out, want, atol, rtol, f"splits {splits}")


@pytest.mark.parametrize("device", device_params())
def test_attention_dispatch_takes_mla_width_decode(device):
    """ops.attention of one query over the latent rows with the values as their 512-column view (modules/mla.py's
    decode call) goes to the decode kernel, masked by a key-padding mask, as the reference; none to the fallback."""
    from lightning_dsinfer.kernels import ops
    b, hq, s, d, dv = 2, 16, 9, 576, 512
    rows = torch.randn(b, 1, s, d, device=device)
    q = torch.randn(b, hq, 1, d, device=device)
    mask = (torch.arange(s, device=device)[None, :] >= torch.tensor([4, 0], device=device)[:, None])[:, None, None, :]
    want = ref.attention(q, rows, rows[..., :dv], mask, 0.05)
    ops.dispatch_counts.clear()
    with ops.force_triton() if device == "cpu" else contextlib.nullcontext():
        got = ops.attention(q, rows, rows[..., :dv], mask, 0.05)
    assert got.shape == (b, hq, 1, dv)
    assert_close(got, want, 2e-5, 1e-5)
    assert dict(ops.dispatch_counts) == {("attention", "triton"): 1}
