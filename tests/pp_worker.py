"""One rank of a pipeline-parallel run (optionally x tensor parallel): init_inference(pipeline_parallel_size=P) on
tiny models, compared with the unmodified HF model computed in the same process: fp32 logits of a left-padded batch,
greedy tokens through the pipelined schedule (row groups, prompt chunks, EOS stopping a group early, min_new_tokens),
beam search and a streamer through HF's loop, sampling agreeing across ranks."""
import argparse
import copy
import os
import sys
import tempfile

import torch

import lightning_dsinfer as dsi
from lightning_dsinfer.generation.pipeline import prompt_chunks, row_groups
from helpers import fake_quantised_int8, padded_batch, sampling_agrees_across_ranks, streaming_budget, tiny_model


class Collect:
    """A transformers streamer that keeps what it is given."""

    def __init__(self):
        self.parts = []

    def put(self, value):
        self.parts.append(value.reshape(-1, 1) if value.dim() < 2 else value)

    def end(self):
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--families", nargs="+", required=True)
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers of the tiny models")
    p.add_argument("--checkpoint", default=None, help="a folder holding <family>/: the model goes in on meta")
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--offload", choices=["cpu", "nvme"], default=None, help="each stage streams its own blocks")
    p.add_argument("--offload-path", default=None)
    p.add_argument("--full-shm", action="store_true",
                   help="/dev/shm has no room (posix_fallocate fails): the stages must talk through gloo, with a warning")
    args = p.parse_args()
    if args.full_shm:
        import errno
        import warnings

        import lightning_dsinfer.parallel.shm as shm

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        shm.os.posix_fallocate = full
        warnings.simplefilter("error", UserWarning)     # the warning must come: turned into an error, caught below
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dtype = getattr(torch, args.dtype)
    for family in args.families:
        hf = tiny_model(family, **({} if args.layers is None else {"num_hidden_layers": args.layers})).to(dtype)
        source = {} if args.checkpoint is None else dict(checkpoint=os.path.join(args.checkpoint, family))
        model = copy.deepcopy(hf)
        if args.checkpoint is not None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf.config)
        options = dict(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, max_seq_len=160,
                       collective_timeout_s=60, quantize=args.quantize, dtype=dtype, **source)
        if args.offload:       # a budget under which most units stream (sized with the same options first)
            options.update(offload=args.offload, max_batch_size=5,
                           offload_path=os.path.join(args.offload_path or "", family) if args.offload_path else None)
            with tempfile.TemporaryDirectory() as scratch:
                sizing = copy.deepcopy(hf)
                options["max_memory"] = streaming_budget(lambda mm: dsi.init_inference(
                    copy.deepcopy(sizing), **{**options, "max_memory": mm, "offload_path": scratch}))
        if args.full_shm:
            import pytest

            with pytest.warns(UserWarning, match="pipeline stages go through the process group"):
                opt = dsi.init_inference(model, **options)
            assert opt._dsinfer_engine.pipe.shm is None
        else:
            opt = dsi.init_inference(model, **options)
            assert opt._dsinfer_engine.pipe.shm is not None      # (one host, gloo: shared-memory rings)
        engine = opt._dsinfer_engine
        stage = (rank // args.tp) % args.pp
        if args.offload:
            streamer = engine.decoder.streamer
            assert type(engine.decoder).__name__ == "StreamedDecoderModel"
            assert args.offload == "cpu" or len(streamer.order) >= 1, "nothing is streamed"
            assert (engine.decoder.rows is None) == (stage > 0) and (not engine.decoder.head_units) == (stage < args.pp - 1)
        n_layers = hf.config.num_hidden_layers
        lo, hi = engine.layer_range
        blocks = engine.decoder.layer_units if args.offload else engine.decoder.layers
        assert len(blocks) == hi - lo == engine.cache.num_layers, (engine.layer_range, n_layers)
        if not args.offload:
            assert (engine.decoder.embed is None) == (stage > 0) and (engine.decoder.lm_head is None) == (stage < args.pp - 1)
        if args.quantize:
            hf = fake_quantised_int8(hf)
        if dtype != torch.float32:      # bf16: against the same engine without a pipeline (the same kernels)
            ref_model = dsi.init_inference(copy.deepcopy(hf), max_seq_len=160, dtype=dtype, pipeline_parallel_size=1)
        else:
            ref_model = hf
        results = {}
        ids, mask = padded_batch([12, 5, 9], seed=1)
        with torch.no_grad():
            ref = ref_model(input_ids=ids, attention_mask=mask).logits
            ref_last = ref_model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        got = opt(input_ids=ids, attention_mask=mask).logits
        valid = mask.bool()
        err = (got[valid].float() - ref[valid].float()).abs().max().item()
        tol = 2e-4 if dtype == torch.float32 else 6e-2
        results["logits"] = err < tol
        results["logits_to_keep"] = got.shape == ref.shape and torch.allclose(
            opt(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits.float(), ref_last.float(), atol=tol)
        for keep in (torch.tensor([7, 9, 11]), torch.tensor(11)):   # index tensors (real tokens in every row): 1-D, 0-dim
            want_keep = ref[:, keep]
            have_keep = opt(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            results["logits_to_keep"] &= have_keep.shape == want_keep.shape and torch.allclose(
                have_keep.float(), want_keep.float(), atol=tol)

        def same(**gen):
            batch = gen.pop("batch", (ids, mask))
            with torch.no_grad():
                want = ref_model.generate(input_ids=batch[0], attention_mask=batch[1], **gen)
            have = opt.generate(input_ids=batch[0], attention_mask=batch[1], **gen)
            if not torch.equal(have, want):
                print("MISMATCH", gen, have.tolist(), want.tolist(), flush=True)
            return torch.equal(have, want)

        greedy = dict(max_new_tokens=10, do_sample=False)
        results["greedy"] = same(**greedy)
        long_batch = padded_batch([140, 133, 71, 138, 17], seed=2)       # 5 rows, prompts cut into two chunks
        assert len(prompt_chunks(140, len(row_groups(5, args.pp)), args.pp)) == 2
        results["greedy_chunked"] = same(batch=long_batch, **greedy)
        results["greedy_one_row"] = same(batch=padded_batch([137], seed=3), **greedy)
        # EOS: every token the HF model emits for the last row in turn, so groups stop at different steps
        with torch.no_grad():
            free = ref_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      eos_token_id=None)
        eos_ok = []
        for tok in list(dict.fromkeys(free[-1, ids.shape[1]:].tolist()))[:4]:
            eos_ok.append(same(eos_token_id=tok, pad_token_id=0, **greedy))
            eos_ok.append(same(eos_token_id=tok, pad_token_id=0, min_new_tokens=4, **greedy))
        one = padded_batch([9], seed=4)      # every group stops early: the output is shorter than max_new_tokens
        with torch.no_grad():
            alone = ref_model.generate(input_ids=one[0], attention_mask=one[1], max_new_tokens=10, do_sample=False,
                                       eos_token_id=None)
        eos_ok.append(same(batch=one, eos_token_id=int(alone[0, 9 + 3]), pad_token_id=0, **greedy))
        results["eos"] = all(eos_ok) and len(eos_ok) > 1
        results["beam"] = same(max_new_tokens=5, num_beams=2, do_sample=False)
        streamer = Collect()
        streamed = opt.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **greedy)
        with torch.no_grad():
            want = ref_model.generate(input_ids=ids, attention_mask=mask, **greedy)
        results["streamer"] = torch.equal(streamed, want) and torch.equal(torch.cat(streamer.parts, dim=1), want)
        results["sampling_agrees"] = sampling_agrees_across_ranks(opt, ids, mask, 10)
        ok = all(results.values())
        streamed = f"streamed={len(engine.decoder.streamer.order)} " if args.offload else ""
        print(f"{family}: pp={args.pp} tp={args.tp} stage={stage} layers={lo}..{hi - 1} {streamed}max|dlogits|={err:.2e} "
              f"{' '.join(k for k, v in results.items() if not v) or 'all'}{'' if ok else ' failed'} "
              f"{'OK' if ok else 'FAIL'}", flush=True)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
