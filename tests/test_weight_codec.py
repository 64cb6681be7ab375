"""The disk tier's lossless weight packing (offload/codec.py, kernels/weight_codec.cpp): bit-exact round trips,
the sizes it promises, the frames a disk store writes and reads back, and an offloaded bf16 model whose output
is bit-identical with packed and with raw unit files."""
import copy
import json
import os

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import padded_batch, tiny_model
from lightning_dsinfer.offload import DiskStore, UnitLayout, aligned_empty, codec

pytestmark = pytest.mark.skipif(not codec.available(), reason="the C library does not build here")

WIDTH = {torch.bfloat16: 2, torch.float32: 4}


def _weights(n, dtype, std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * std).to(dtype)
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-38 if dtype == torch.float32 else 1e-39,
                3.0e4, -7.5]
    x[torch.randperm(n, generator=g)[:len(specials)]] = torch.tensor(specials, dtype=dtype)
    return x


def _roundtrip(x, simd):
    w = WIDTH[x.dtype]
    raw = x.view(torch.uint8)
    out = torch.full((codec.packed_capacity(raw.numel(), w) + 64,), 0xA5, dtype=torch.uint8)
    got = codec.encode(raw, w, out)
    if got is None:
        return None, None
    size, n_exc, table = got
    frame = codec.Frame(0, raw.numel(), w, n_exc, table, 0, size)
    back = torch.full_like(raw, 0x5A)                      # poisoned: an element not written fails
    codec.decode(frame, out, back, simd=simd)
    return back, frame


@pytest.mark.parametrize("simd", [2, 1, 0], ids=["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n", [1024, 1031, 64 * 37 + 63, 100_003])
def test_roundtrip_is_bit_exact(n, dtype, simd):
    x = _weights(n, dtype, seed=n)
    back, frame = _roundtrip(x, simd)
    assert back is not None
    assert torch.equal(back, x.view(torch.uint8))                # bits, so NaN, -0.0 and denormals count
    if n > 10_000:
        assert frame.n_exc >= 1                                  # the specials are outside the 16 exponents


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_packed_size(dtype):
    """12 bits per bf16 weight (28 per fp32) plus the few exceptions, for weights of any scale."""
    n = 1 << 20
    for std in (0.006, 0.02, 0.1, 1.0):
        back, frame = _roundtrip(_weights(n, dtype, std=std), simd=2)
        ratio = frame.file_bytes / (n * WIDTH[dtype])
        bound = 0.75 if dtype == torch.bfloat16 else 0.875
        assert bound <= ratio < bound + 0.002, (std, ratio, frame.n_exc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_many_exceptions_still_exact_and_too_many_refused(dtype):
    # 5% of the elements over 40 octaves: more than 1/64 outside any 16 exponents -> not packed
    n = 20_000
    x = _weights(n, dtype)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(n, generator=g)[:n // 20]
    x[idx] = (2.0 ** torch.randint(-60, -20, (len(idx),), generator=g).float()).to(dtype)
    assert _roundtrip(x, simd=2)[0] is None
    x = _weights(n, dtype)                                         # 1/100: packed, patched back exactly
    idx = torch.randperm(n, generator=g)[:n // 100]
    x[idx] = (2.0 ** torch.randint(-60, -20, (len(idx),), generator=g).float()).to(dtype)
    for simd in (2, 1, 0):
        back, frame = _roundtrip(x, simd)
        assert frame.n_exc >= n // 200 and torch.equal(back, x.view(torch.uint8))


def test_damaged_frame_is_an_error_not_a_stray_write():
    x = _weights(5000, torch.bfloat16)
    x[::100] = (2.0 ** -torch.arange(40, 90).float()).bfloat16()   # 50 exponents: most are exceptions
    raw = x.view(torch.uint8)
    out = torch.zeros(codec.packed_capacity(raw.numel(), 2), dtype=torch.uint8)
    size, n_exc, table = codec.encode(raw, 2, out)
    assert n_exc >= 30
    at = size - n_exc * 6 + 4 * 7                                  # the 8th exception's index
    out[at:at + 4] = torch.tensor([0xFF, 0xFF, 0xFF, 0x7F], dtype=torch.uint8)
    with pytest.raises(OSError, match="damaged.*Delete the offload folder"):
        codec.decode(codec.Frame(0, raw.numel(), 2, n_exc, table, 0, size), out, torch.empty_like(raw))


def _unit(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return {"norm": torch.ones(64, dtype=dtype) + torch.rand(64, generator=g).to(dtype),          # raw (small)
            "qkv": (torch.randn(192, 64, generator=g) * 0.05).to(dtype),
            "bias": torch.randn(192, generator=g).to(dtype),
            "ids": torch.randint(0, 100, (3000,), generator=g, dtype=torch.int32).view(torch.float32)
            if dtype == torch.float32 else torch.randint(0, 100, (3000,), generator=g).to(torch.uint8),
            "big": (torch.randn(3 * codec.MAX_FRAME_BYTES // WIDTH[dtype] // 1024 + 5, 1024, generator=g) * 0.01).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_disk_store_writes_frames_and_reads_them_back(dtype, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    units = [_unit(dtype, s) for s in range(2)]
    layouts = [UnitLayout.of(u) for u in units]
    fingerprint = {"model": "test"}
    store = DiskStore(str(tmp_path), layouts, fingerprint)
    assert store.compress and store.staging_bytes > 0
    for i, u in enumerate(units):
        store.write(i, u)
    store.finish()
    frames = store.frames[0]
    assert sum(f.width > 0 for f in frames) >= 4                 # qkv + "big" in several frames
    assert any(f.width == 0 for f in frames)                     # bias / uint8 rows stay raw
    assert max(f.raw_bytes for f in frames) <= codec.MAX_FRAME_BYTES
    assert all(f.file_offset % 4096 == 0 for f in frames)
    assert store.stored_bytes(0) < (0.8 if dtype == torch.bfloat16 else 0.9) * layouts[0].nbytes
    assert os.path.getsize(store.path(0)) == store.stored_bytes(0) <= codec.max_file_bytes(layouts[0])
    with open(tmp_path / "manifest.json") as f:
        assert json.load(f)["packed"] is True

    def read_back(s):
        with ThreadPoolExecutor(3) as pool:
            for i, u in enumerate(units):
                buf = aligned_empty(layouts[i].nbytes)
                buf.fill_(0x5A)
                for fut in s.read(i, buf, pool):
                    fut.result()
                for name, view in layouts[i].views(buf).items():
                    assert torch.equal(view.view(torch.uint8), u[name].view(torch.uint8)), name

    read_back(store)
    store.close()
    again = DiskStore(str(tmp_path), layouts, fingerprint)       # same fingerprint: the folder is reused
    assert again.reused and again.frames == store.frames
    again.finish()
    read_back(again)
    again.close()
    raw = DiskStore(str(tmp_path), layouts, fingerprint, compress=False)    # other packing: rewritten raw
    assert not raw.reused and raw.staging_bytes == 0
    for i, u in enumerate(units):
        raw.write(i, u)
    raw.finish()
    assert os.path.getsize(raw.path(0)) == layouts[0].nbytes == raw.stored_bytes(0)
    read_back(raw)
    raw.close()


def test_offloaded_bf16_output_identical_packed_and_raw(tmp_path):
    """The weights come back bit for bit: logits of a bf16 model from packed units equal those from raw ones."""
    hf = tiny_model("qwen3").to(torch.bfloat16)
    ids, mask = padded_batch([9, 4, 7], seed=3)
    outs = []
    for compress in (True, False):
        opt = dsi.init_inference(copy.deepcopy(hf), offload="nvme", offload_path=str(tmp_path / str(compress)),
                                 max_memory="320KiB", max_batch_size=3, max_seq_len=32, dtype=torch.bfloat16,
                                 offload_compress=compress)
        store = opt._dsinfer_engine.decoder.streamer.store
        assert store.compress == compress
        if compress:
            assert any(f.width for unit in store.frames for f in unit)
            assert len(opt._dsinfer_engine.decoder.streamer.order) >= 4          # units really stream
        outs.append((opt(input_ids=ids, attention_mask=mask).logits,
                     opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_folder_written_with_other_frames_is_rewritten(tmp_path, monkeypatch):
    """Frames of another size (another budget's frame_bytes) are not reused: the staging buffers are sized for
    this one's, and a short read would decode garbage."""
    units = [_unit(torch.bfloat16, 0)]
    layouts = [UnitLayout.of(u) for u in units]
    store = DiskStore(str(tmp_path), layouts, {"model": "test"})
    store.write(0, units[0])
    store.finish()
    store.close()
    again = DiskStore(str(tmp_path), layouts, {"model": "test"}, frame_bytes=codec.MAX_FRAME_BYTES // 2)
    assert not again.reused
    same = DiskStore(str(tmp_path), layouts, {"model": "test"})
    assert not same.reused       # the folder was emptied for the other frame size


def test_frame_size_follows_units_and_budget():
    big, small = UnitLayout.of({"w": torch.empty(36 << 20, dtype=torch.uint8)}), \
        UnitLayout.of({"w": torch.empty(9 << 20, dtype=torch.uint8)})
    assert codec.frame_bytes_for([big], 239 << 20) == 4 << 20          # the 956 MiB benchmark model
    assert codec.frame_bytes_for([small], 41 << 20) == 1 << 20         # a 166 MiB model at a quarter
    assert codec.frame_bytes_for([small], 1 << 20) == codec.MIN_FRAME_BYTES
    assert codec.frame_bytes_for([big], 64 << 30) == codec.MAX_FRAME_BYTES
