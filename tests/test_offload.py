"""CPU / NVMe weight offload (ZeRO-Inference) against the unmodified HF model, fp32."""
import copy
import os
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_dsinfer as dsi
from helpers import FAMILIES, collate_left_padded, generating_module, padded_batch, random_prompts, tiny_model
from lightning_dsinfer.offload import UnitLayout, parse_bytes, plan_working_set
from lightning_dsinfer.offload.budget import slot_classes
from multiproc import clean_env

TIERS = ["cpu", "nvme"]


def _offloaded(hf, tier, tmp_path, **kw):
    kw.setdefault("max_memory", "832KiB")           # tight: the ring streams most units (asserted below)
    kw.setdefault("max_batch_size", 3)
    kw.setdefault("max_seq_len", 64)
    return dsi.init_inference(copy.deepcopy(hf), offload=tier, offload_path=str(tmp_path / "off"), **kw)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_offload_matches_hf(family, tier, tmp_path):
    hf = tiny_model(family)
    opt = _offloaded(hf, tier, tmp_path)
    engine = opt._dsinfer_engine
    assert engine.working_set is not None and type(engine.decoder).__name__ == "StreamedDecoderModel"
    ids, mask = padded_batch([12, 5, 9], seed=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ref_tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    streamer = engine.decoder.streamer
    if tier == "nvme":
        assert len(streamer.order) >= 2 and streamer.n_slots >= 1      # units really stream through the ring
        assert any(f.width for unit in streamer.store.frames for f in unit)   # from packed frames (fp32, 28 bits)
    got = opt(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (got[valid] - ref[valid]).abs().max() < 2e-4
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False), ref_tokens)
    # the HF module holds no weights any more: they live in the tier
    assert all(p.device.type == "meta" for p in opt.parameters())


def test_ring_by_unit_size_matches_hf(tmp_path):
    """MLP halves 2.6x the attention halves: the disk tier streams them through two slots per size class
    (two or three units read ahead) and some units stay resident; fp32 logits and greedy tokens as HF's."""
    hf = tiny_model("llama", intermediate_size=256, num_hidden_layers=6)
    opt = _offloaded(hf, "nvme", tmp_path, max_memory="3800KiB")
    engine = opt._dsinfer_engine
    streamer = engine.decoder.streamer
    assert engine.working_set.class_slots == (2, 2) and streamer.n_slots == 4 and len(streamer.order) >= 8
    assert streamer.ring_bytes <= engine.working_set.ring_bytes and streamer.resident
    ids, mask = padded_batch([12, 5, 9], seed=2)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ref_tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = opt(input_ids=ids, attention_mask=mask).logits
    assert (got[mask.bool()] - ref[mask.bool()]).abs().max() < 2e-4
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False), ref_tokens)


@pytest.mark.parametrize("tier", TIERS)
def test_chunked_plain_forward_matches_hf(tier, tmp_path):
    """A plain forward without a cache (``use_cache=False``) longer than the prefill chunk runs through each
    streamed block in pieces too, its K/V in a one-block scratch buffer: logits as HF's (fp32, left padding, a
    sliding-window family)."""
    import lightning_dsinfer.offload.decoder as offload_decoder

    hf = tiny_model("mistral")
    opt = _offloaded(hf, tier, tmp_path)
    decoder = opt._dsinfer_engine.decoder
    decoder.prefill_tokens = 6                       # 3 prompts of 14 columns -> chunks of 2 columns
    made = []
    real = offload_decoder.ScratchKV.__init__

    def counted(self, *args):
        made.append(args)
        real(self, *args)

    offload_decoder.ScratchKV.__init__ = counted
    try:
        ids, mask = padded_batch([14, 5, 9], seed=3)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits
        got = opt(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        offload_decoder.ScratchKV.__init__ = real
    assert len(made) == 1 and made[0][2] == 14        # one scratch buffer for the pass, all 14 columns
    valid = mask.bool()
    assert (got[valid] - ref[valid]).abs().max() < 2e-4


@pytest.mark.parametrize("tier", TIERS)
def test_chunked_prefill_and_hf_loop_match_hf(tier, tmp_path):
    """Prompts longer than the prefill chunk run through each streamed block in pieces (own loop and
    HF's loop with a DynamicCache: beam search); the lm_head is streamed in several slices."""
    hf = tiny_model("qwen3")
    opt = _offloaded(hf, tier, tmp_path)
    decoder = opt._dsinfer_engine.decoder
    decoder.prefill_tokens = 6                       # 3 prompts of 12 columns -> chunks of 2 columns
    assert len(decoder.head_units) >= 1
    ids, mask = padded_batch([12, 5, 9], seed=2)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        ref_beam = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False), ref)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2,
                                    do_sample=False), ref_beam)


def test_lm_head_streamed_in_slices(tmp_path):
    hf = tiny_model("llama", vocab_size=1000)        # lm_head (1000 x 64 fp32) is larger than a block
    opt = _offloaded(hf, "nvme", tmp_path)
    decoder = opt._dsinfer_engine.decoder
    assert len(decoder.head_units) > 1
    ids, mask = padded_batch([7, 4], vocab=1000, seed=3)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref)


@pytest.mark.parametrize("budget", ["1MiB", "64MiB"])
def test_spare_budget_keeps_units_resident(budget, tmp_path):
    """A small batch leaves budget over: some units (1 MiB) or all of them (64 MiB) are read once and never
    streamed; the output is unchanged."""
    hf = tiny_model("llama")
    opt = _offloaded(hf, "nvme", tmp_path, max_memory=budget, max_batch_size=2, max_seq_len=16)
    streamer = opt._dsinfer_engine.decoder.streamer
    n_units = len(streamer.layouts)
    assert 0 < len(streamer.resident) < n_units if budget == "1MiB" else len(streamer.resident) == n_units
    ids, mask = padded_batch([7, 4], seed=6)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for _ in range(2):
        assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref)


def test_streamer_recovers_from_an_aborted_pass(tmp_path):
    hf = tiny_model("llama")
    opt = _offloaded(hf, "nvme", tmp_path)
    decoder = opt._dsinfer_engine.decoder
    streamer = decoder.streamer
    assert len(streamer.order) >= 2
    streamer.acquire(streamer.order[1])                # a pass that starts out of order and stops half way
    streamer.release()
    ids, mask = padded_batch([6, 3], seed=4)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)


@pytest.mark.parametrize("family", ["mistral", "phi3"])     # phi3: q / k / v and gate / up read from packed rows
def test_meta_model_from_checkpoint_to_nvme_and_folder_reuse(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf = tiny_model(family)
    hf.save_pretrained(tmp_path / "ckpt")
    ids, mask = padded_batch([9, 4], seed=5)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    reused = []
    for _ in range(2):
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf.config)
        opt = dsi.init_inference(meta, checkpoint=str(tmp_path / "ckpt"), offload="nvme", max_seq_len=32,
                                 offload_path=str(tmp_path / "off"), max_memory="4MiB", dtype=torch.float32)
        reused.append(opt._dsinfer_engine.decoder.streamer.store.reused)
        assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref)
    assert reused == [False, True]                  # the second run found the folder written by the first


def test_offload_auto_and_the_fit_check(tmp_path, monkeypatch):
    """offload="auto": resident when the weights and the KV cache fit in the device's free memory, else streamed
    (on a CPU: the disk tier), greedy tokens as HF's either way; without offload a meta model that does not fit is
    refused before loading, naming the numbers and the options; "auto" without a folder when it needs the disk."""
    import lightning_dsinfer.engine as engine_mod
    from transformers import AutoModelForCausalLM

    hf = tiny_model("llama")
    hf.save_pretrained(tmp_path / "ckpt")
    ids, mask = padded_batch([7, 3], seed=11)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)

    def load(free, **kw):
        monkeypatch.setattr(engine_mod, "available_memory", lambda device: free)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf.config)
        return dsi.init_inference(meta, checkpoint=str(tmp_path / "ckpt"), max_seq_len=32, dtype=torch.float32,
                                  max_batch_size=2, **kw)

    weights = sum(p.numel() for p in hf.parameters()) * 4
    plenty = load(100 * weights, offload="auto", offload_path=str(tmp_path / "off"))
    assert plenty._dsinfer_engine.offload is None and plenty._dsinfer_engine.working_set is None
    tight = load(weights // 2, offload="auto", offload_path=str(tmp_path / "off"), max_memory="2MiB")
    assert tight._dsinfer_engine.offload == "nvme"
    assert type(tight._dsinfer_engine.decoder).__name__ == "StreamedDecoderModel"
    for opt in (plenty, tight):
        assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)
    with pytest.raises(ValueError, match=r"does not fit without offload: the weights need .* GiB .* Pass "
                                         r"offload='auto' \(or offload='nvme', offload_path="):
        load(weights // 2)
    with pytest.raises(ValueError, match=r"offload='auto' chose the disk tier .* no offload_path was given"):
        load(weights // 2, offload="auto")
    # int8 block linears: the fit check counts a byte per weight (the tiny model's blocks hold most of its weights)
    linears = sum(p.numel() for n, p in hf.named_parameters() if n.endswith("_proj.weight"))
    int8_bytes = weights - 3 * linears
    assert int8_bytes < 0.6 * weights
    fits_int8 = load(2 * int8_bytes, offload="auto", offload_path=str(tmp_path / "off"), quantize="int8")
    assert fits_int8._dsinfer_engine.offload is None
    assert load(2 * int8_bytes, offload="auto", offload_path=str(tmp_path / "off"),
                max_memory="2MiB")._dsinfer_engine.offload == "nvme"                    # the same memory, bf16: no
    with pytest.raises(ValueError, match=r"the weights need .* GiB in float32 \(block linears int8\)"):
        load(int8_bytes // 2, quantize="int8")


def test_working_set_budget():
    ws = plan_working_set(max_memory=100, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=0, batch_size=None)
    assert ws.n_slots == 2 and ws.batch_size == 6 and ws.total == 100 and ws.spare == 0   # a 3rd slot costs batch
    ws = plan_working_set(max_memory=100, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=0, batch_size=None,
                          max_auto_batch=3)
    assert ws.n_slots == 3 and ws.batch_size == 3 and ws.spare == 10                   # the batch is capped anyway
    ws = plan_working_set(max_memory=100, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=0, batch_size=4)
    assert ws.n_slots == 3 and ws.spare == 0
    ws = plan_working_set(max_memory=100, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=0, batch_size=5)
    assert ws.n_slots == 2 and ws.spare == 10
    ws = plan_working_set(max_memory=355, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=1, batch_size=4)
    assert ws.n_slots == 2 and ws.prefill_tokens == 256    # not at the price of a shorter prefill chunk
    # slots per size class where cheaper than three shared ones: 2 x 20 + 2 x 5 = 50 < 60
    ws = plan_working_set(max_memory=100, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=0, batch_size=5,
                          classes=[(20, 2), (5, 2)])
    assert ws.class_slots == (2, 2) and ws.n_slots == 4 and ws.ring_bytes == 50 and ws.spare == 0
    ws = plan_working_set(max_memory=100, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=0, batch_size=None,
                          classes=[(20, 2), (5, 2)])
    assert ws.class_slots == () and ws.n_slots == 2 and ws.batch_size == 6    # 5 would be under 95% of 6
    ws = plan_working_set(max_memory=100, slot_bytes=20, per_sequence_bytes=10, per_token_bytes=0, batch_size=4,
                          classes=[(20, 2), (15, 2)])
    assert ws.class_slots == () and ws.n_slots == 3                           # 70 > 60: three shared slots
    ws = plan_working_set(max_memory=100, slot_bytes=45, per_sequence_bytes=5, per_token_bytes=0, batch_size=2)
    assert ws.n_slots == 2 and ws.batch_size == 2
    ws = plan_working_set(max_memory=100, slot_bytes=60, per_sequence_bytes=5, per_token_bytes=0, batch_size=2)
    assert ws.n_slots == 1                          # no room for a unit in flight: no overlap, still runs
    with pytest.raises(ValueError, match=r"smaller than one layer's working set"):
        plan_working_set(max_memory=10 << 20, slot_bytes=11 << 20, per_sequence_bytes=1, per_token_bytes=1,
                         batch_size=None)
    assert parse_bytes("200MiB") == 200 << 20 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(7) == 7
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_slot_classes():
    big, small = 36, 13
    sizes = [small, big] * 16 + [big, big, 22]      # attention / MLP halves, then lm_head slices (the last smaller)
    unit_class, classes = slot_classes(sizes)
    assert classes == [(big, 2), (small, 2)]        # the lone 22 uses a big slot; the run of slices gets 2, not 3
    assert unit_class[:4] == [1, 0, 1, 0] and unit_class[-3:] == [0, 0, 0]
    assert slot_classes([76] * 4 + [28]) == ([0] * 5, [(76, 3)])          # long runs of one size: a shared ring
    assert slot_classes([10]) == ([0], [(10, 1)])
    assert slot_classes([9, 10, 9, 10]) == ([0] * 4, [(10, 3)])            # alike sizes: one class


class _RecordingStore:
    """A host-memory store whose reads take a while and fill the slot with the unit's number; it records
    which reads were outstanding at once."""

    zero_copy_on_cpu = False

    def __init__(self, layouts):
        import threading
        self.layouts, self.lock, self.busy, self.most = layouts, threading.Lock(), 0, 0

    def read(self, unit, buffer, pool):
        import time

        def work():
            with self.lock:
                self.busy += 1
                self.most = max(self.most, self.busy)
            time.sleep(0.004)
            buffer[:self.layouts[unit].nbytes].fill_(unit)
            with self.lock:
                self.busy -= 1
        return [pool.submit(work)]


@pytest.mark.parametrize("by_class", [False, True])
def test_streamer_ring_keeps_each_unit_until_released(by_class):
    """Units of two sizes stream through a shared ring or slots per size class for three passes and a
    restart: every unit acquired holds its own bytes until it is released (no read lands in a slot in use).
    Reads slower than the consumer: after the first pass a shared ring of two has at most two reads in
    flight (one, and the next queued as a unit is released), the per-class ring (two slots of each size) three
    or more."""
    from lightning_dsinfer.offload import UnitStreamer

    sizes = [4096, 3 * 4096] * 4 + [3 * 4096, 2 * 4096]
    layouts = [UnitLayout.of({"w": torch.empty(n, dtype=torch.uint8)}) for n in sizes]
    unit_class, classes = slot_classes([l.nbytes for l in layouts])
    store = _RecordingStore(layouts)
    streamer = UnitStreamer(store, layouts, list(range(len(layouts))), torch.device("cpu"),
                            [n for _, n in classes] if by_class else 2, io_threads=4, resident=(4,),
                            classes=unit_class if by_class else None)
    assert streamer.ring_bytes == (2 * 3 * 4096 + 2 * 4096 if by_class else 2 * 3 * 4096)
    order = [u for u in range(len(sizes)) if u != 4]
    import time
    for i, unit in enumerate((order * 3)[:-5] + order[2:] + order):   # a pass stops half way; restart at order[2]
        if i == len(order):
            store.most = store.busy                            # steady state from the second pass on
        w = streamer.acquire(unit)["w"]
        first = w.clone()
        time.sleep(0.001)                                      # reads of other units land meanwhile
        assert (first == unit).all() and torch.equal(w, first), unit
        streamer.release()
    assert store.most >= 3 if by_class else store.most <= 2, store.most
    streamer.close()


def test_layout_views_are_aligned_and_roundtrip():
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.bfloat16), "c": torch.ones(2, dtype=torch.int8)}
    layout = UnitLayout.of(tensors)
    assert layout.nbytes % 4096 == 0 and all(e.offset % 256 == 0 for e in layout.entries)
    buf = torch.full((layout.nbytes,), 255, dtype=torch.uint8)
    layout.pack(tensors, buf)
    views = UnitLayout.from_json(layout.to_json()).views(buf)
    assert all(torch.equal(views[k], v) for k, v in tensors.items())


def test_offload_errors_before_work(tmp_path, monkeypatch):
    hf = tiny_model("llama")
    with pytest.raises(ValueError, match="offload='nvme' needs offload_path"):
        dsi.init_inference(copy.deepcopy(hf), offload="nvme")
    with pytest.raises(ValueError, match="is not one of None, 'cpu', 'nvme'"):
        dsi.init_inference(copy.deepcopy(hf), offload="gpu")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        dsi.init_inference(copy.deepcopy(hf), offload="nvme", offload_path=str(blocker / "sub"), max_memory="8MiB")
    with pytest.raises(ValueError, match=r"max_memory=1 MiB is smaller than one layer's working set.*Raise max_memory"):
        dsi.init_inference(copy.deepcopy(hf), offload="cpu", max_memory="1MiB", max_seq_len=4096)
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ValueError, match=r"has 0 MiB free but the offloaded weights need"):
        dsi.init_inference(copy.deepcopy(hf), offload="nvme", offload_path=str(tmp_path / "full"), max_memory="8MiB")


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("strategy", ["dsinfer_offload", "dsinfer_offload_nvme", "instance"])
def test_lightning_predict_with_offload(strategy, tmp_path, monkeypatch):
    monkeypatch.setenv("DSINFER_OFFLOAD_PATH", str(tmp_path / "off"))
    if strategy == "instance":
        strategy = dsi.DSInferStrategy(offload="nvme", offload_path=str(tmp_path / "inst"), max_memory="8MiB",
                                       max_seq_len=48)
    hf = tiny_model("llama")
    module = generating_module(copy.deepcopy(hf))
    loader = DataLoader(random_prompts(5), batch_size=2, collate_fn=collate_left_padded)
    preds = _trainer(strategy=strategy).predict(module, loader)
    assert module.model._dsinfer_engine.working_set is not None
    for batch, pred in zip(loader, preds):
        with torch.no_grad():
            assert torch.equal(pred, hf.generate(**batch, max_new_tokens=8, do_sample=False))


def test_lightning_predict_with_int8_offload(tmp_path):
    """DSInferStrategy(offload="nvme", quantize="int8"): predictions are the greedy tokens of HF over the same
    quantise-dequantised weights (fp32)."""
    from helpers import fake_quantised_int8, streaming_budget

    hf = tiny_model("llama")
    options = dict(offload="nvme", offload_path=str(tmp_path / "off"), max_seq_len=48, max_batch_size=2,
                   quantize="int8")
    budget = streaming_budget(lambda mm: dsi.init_inference(copy.deepcopy(hf), max_memory=mm, **options))
    strategy = dsi.DSInferStrategy(max_memory=budget, **options)
    module = generating_module(copy.deepcopy(hf))
    loader = DataLoader(random_prompts(5), batch_size=2, collate_fn=collate_left_padded)
    preds = _trainer(strategy=strategy).predict(module, loader)
    engine = module.model._dsinfer_engine
    assert engine.working_set is not None and len(engine.decoder.streamer.order) >= 2
    ref = fake_quantised_int8(hf)
    for batch, pred in zip(loader, preds):
        with torch.no_grad():
            assert torch.equal(pred, ref.generate(**batch, max_new_tokens=8, do_sample=False))


def worker_runs(tmp, selected):
    """TP=2 on each tier (tp_worker.py), in the session's shared launch of two ranks (tests/conftest.py
    ``shared_runs``: a rank's start-up costs more than the runs)."""
    return {2: {f"test_offload_with_tensor_parallel[{tier}]": ["tp_worker.py", "--tp", "2", "--families", "llama",
                                                              "qwen3", "--offload", tier, "--offload-path",
                                                              str(tmp / tier)] for tier in TIERS}}


@pytest.mark.parametrize("tier", TIERS)
def test_offload_with_tensor_parallel(tier, shared_runs):
    outs = shared_runs.outputs(2, f"test_offload_with_tensor_parallel[{tier}]")
    assert outs[0].count(" OK") == 2, outs[0]
    if tier == "nvme":                               # each rank streams its own shard from its own folder
        assert sorted(os.listdir(shared_runs.tmp / tier / "llama")) == ["rank0-tp0of2", "rank1-tp1of2"]


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_peak_memory_bounded_by_max_memory(quantize, tmp_path):
    """A model whose weights are >= 4x max_memory, loaded from a checkpoint on meta and run from the disk
    tier (int8: its units quantised while they are written): peak RSS growth over the process's baseline stays
    within max_memory + a fixed overhead."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    proc = subprocess.run([sys.executable, os.path.join(here, "offload_memory_worker.py"), str(tmp_path)]
                          + ([quantize] if quantize else []), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    print(proc.stdout.splitlines()[-1])


def test_folder_of_another_in_memory_model_is_rewritten(tmp_path):
    """Weights from memory carry no fingerprint: a folder they wrote is never taken for another model's."""
    ids, mask = padded_batch([6, 4], seed=7)
    for seed in (0, 1):
        hf = tiny_model("llama", seed=seed)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        opt = _offloaded(hf, "nvme", tmp_path)
        assert not opt._dsinfer_engine.decoder.streamer.store.reused
        assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)


def test_dropped_engine_closes_its_files_and_threads(tmp_path):
    import gc

    hf = tiny_model("llama")
    opt = _offloaded(hf, "nvme", tmp_path)
    ids, mask = padded_batch([5, 3], seed=8)
    opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    decoder = opt._dsinfer_engine.decoder
    fds = [fd for fd, _ in decoder.streamer.store._fds] + [decoder.rows.fd]
    threads = list(decoder.streamer.io._threads)
    folder = str(tmp_path / "off")

    def ours_open():
        """Our fds that still point into the offload folder (a closed number may be reused by someone else)."""
        out = []
        for fd in fds:
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(folder):
                    out.append(fd)
            except FileNotFoundError:
                pass
        return out

    assert len(ours_open()) == len(fds) and threads and all(t.is_alive() for t in threads)
    del opt, decoder
    gc.collect()                 # (the finalizer hands the close to the closer thread: done soon after)
    for _ in range(300):
        if ours_open() == [] and not any(t.is_alive() for t in threads):
            break
        time.sleep(0.1)
    assert ours_open() == [] and not any(t.is_alive() for t in threads)


def test_finalizer_neither_waits_nor_starts_threads(tmp_path):
    """A collection can run a dropped engine's finalizer inside threading's own bookkeeping: a thread starting holds
    ``threading._shutdown_locks_lock`` while it registers itself, an allocation there collects, and joining a thread
    takes that same lock (a suite run hung so: the main thread waiting for a new reader thread to start, that thread
    joining the dropped engine's readers). A collection with that lock held must return at once; the closer thread
    then stops the readers and closes the files."""
    import gc
    import threading
    import weakref

    lock = getattr(threading, "_shutdown_locks_lock", None)
    if lock is None:
        pytest.skip("this Python's threading has no _shutdown_locks_lock (the hang's mechanism)")
    opt = _offloaded(tiny_model("llama"), "nvme", tmp_path)
    opt.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    streamer = opt._dsinfer_engine.decoder.streamer
    workers, store = list(streamer.io._threads), streamer.store
    assert workers and store._fds
    decoder = weakref.ref(opt._dsinfer_engine.decoder)
    returned = threading.Event()

    def collect_while_a_thread_starts():
        with lock:
            gc.collect()
        returned.set()

    enabled = gc.isenabled()
    gc.disable()
    try:
        del opt, streamer
        assert decoder() is not None, "the engine is freed without a collection: this test no longer tests anything"
        threading.Thread(target=collect_while_a_thread_starts, daemon=True).start()
        assert returned.wait(20), "the finalizer blocked with threading's lock held"
    finally:
        if enabled:
            gc.enable()
    for _ in range(300):
        if store._fds == [] and not any(t.is_alive() for t in workers):
            break
        threading.Event().wait(0.1)
    assert decoder() is None and store._fds == [] and not any(t.is_alive() for t in workers)


_EXIT_WHILE_CLOSING = """
import gc, sys, torch
import lightning_dsinfer as dsi
from helpers import tiny_model
for i in range(3):
    opt = dsi.init_inference(tiny_model("llama"), offload="nvme", offload_path=f"{sys.argv[1]}/{i}",
                             max_memory="512KiB", max_seq_len=32)
    opt.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    del opt
gc.collect()       # the three decoders' closes go to the closer thread, and the interpreter exits at once
"""


def test_exit_while_the_closer_closes(tmp_path):
    """The interpreter exiting while the closer thread closes collected decoders: a clean exit (a daemon closer cut
    off in torch's C++ aborted the process, "terminate called without an active exception", in 4 of 6 runs; two runs
    here)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = clean_env(PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
    for run in range(2):
        res = subprocess.run([sys.executable, "-c", _EXIT_WHILE_CLOSING, str(tmp_path / str(run))], env=env,
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0 and "terminate called" not in res.stderr, res.stderr[-2000:]


def test_engine_collected_on_a_reader_thread_closes_without_deadlock(tmp_path):
    """An engine dropped while its reads are in flight can be collected by a garbage collection that one of its own
    reader threads triggers (any allocation there). Its finalizer waits for those reads, that thread's own task
    among them: it must close from another thread, not wait for itself forever (a hung test process)."""
    import gc
    import threading
    import weakref

    opt = _offloaded(tiny_model("llama"), "nvme", tmp_path)
    streamer = opt._dsinfer_engine.decoder.streamer
    store, decoder = streamer.store, weakref.ref(opt._dsinfer_engine.decoder)
    go = threading.Event()

    def reader_task():    # a read in flight when the engine is dropped, during which a collection runs
        go.wait(30)
        gc.collect()

    task = streamer.io.submit(reader_task)
    streamer.pending[-1] = [task]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del opt, streamer
        assert decoder() is not None, "the engine is freed without a collection: this test no longer tests anything"
        go.set()
        try:
            task.result(timeout=30)
        except TimeoutError:
            task.set_result(None)        # (frees the reader thread stuck on itself, so the process can still exit)
            pytest.fail("the finalizer, run on a reader thread, waited for that thread's own read")
    finally:
        if enabled:
            gc.enable()
    for _ in range(300):
        if store._fds == []:
            break
        threading.Event().wait(0.1)
    assert decoder() is None and store._fds == [], "the dropped engine's files were not closed"
