"""Demo: ``trainer.predict`` with ``strategy="dsinfer"`` on a Llama model built from a config (no download).

The model has random weights (so the text is gibberish); what the demo shows is the workflow, the
speed, and that the tokens are identical to the unmodified Hugging Face model's.

    python examples/predict_llama.py [--prompts 32] [--new-tokens 32] [--precision bf16] [--family llama]

``--family`` builds another supported architecture of about the same size instead (gpt_neox, gpt2, falcon, phi, ...:
any ``lightning_dsinfer.supported_model_types()`` entry with a config class that takes the usual size names).
"""
import argparse
import copy
import time

import lightning as L
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import lightning_dsinfer as dsi


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte tokens + <pad>, <s>, </s>; nothing to download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


class Generator(L.LightningModule):          # an ordinary user module: nothing dsinfer-specific inside
    def __init__(self, model, new_tokens):
        super().__init__()
        self.model = model
        self.new_tokens = new_tokens

    def predict_step(self, batch, batch_idx):
        return self.model.generate(**batch, max_new_tokens=self.new_tokens, do_sample=False)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--family", default="llama", choices=dsi.supported_model_types())
    args = p.parse_args()

    tokenizer = byte_tokenizer()
    sizes = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 initializer_range=0.3)   # peaked logits, so bf16 rounding rarely flips a token
    config = LlamaConfig(**sizes) if args.family == "llama" else AutoConfig.for_model(args.family, **sizes)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()

    words = ["Lightning", "inference", "kernels", "tensor", "pipeline", "experts", "offload", "cache"]
    texts = [f"Prompt {i}: " + " ".join(words[(i + j) % len(words)] for j in range(1 + i % 6)) for i in range(args.prompts)]
    loader = DataLoader(texts, batch_size=args.batch_size,
                        collate_fn=lambda rows: dict(tokenizer(rows, return_tensors="pt", padding=True)))

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="dsinfer", logger=False,
                        plugins=[dsi.DSInferPrecision(args.precision)],
                        callbacks=[dsi.TokensPerSecondProgressBar()])
    module = Generator(copy.deepcopy(hf_model), args.new_tokens)
    t = time.perf_counter()
    predictions = trainer.predict(module, loader)
    ours_s = time.perf_counter() - t

    t = time.perf_counter()
    with torch.inference_mode():
        reference = [hf_model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False) for batch in loader]
    hf_s = time.perf_counter() - t

    same = sum(int((a == b).sum()) for a, b in zip(predictions, reference))
    total = sum(b.numel() for b in reference)
    n_tokens = args.prompts * args.new_tokens
    print(f"\nfirst prediction: {tokenizer.decode(predictions[0][0], skip_special_tokens=True)!r}")
    print(f"dsinfer : {n_tokens} tokens in {ours_s:.2f}s ({n_tokens / ours_s:.1f} tok/s, model set-up included)")
    print(f"HF      : {n_tokens} tokens in {hf_s:.2f}s ({n_tokens / hf_s:.1f} tok/s)")
    print(f"tokens identical to HF: {same}/{total} ({args.precision}; fp32 is exact, bf16 may differ where two "
          f"logits tie within bf16 rounding)")


if __name__ == "__main__":
    main()
