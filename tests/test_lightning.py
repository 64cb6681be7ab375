"""Trainer(strategy="dsinfer").predict on the user's unchanged LightningModule."""
import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_dsinfer as dsi
from helpers import collate_left_padded, generating_module, padded_batch, random_prompts, tiny_model


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_predict_matches_hf_one_prediction_per_sample_in_order(family):
    hf = tiny_model(family)
    prompts = random_prompts(7)
    loader = DataLoader(prompts, batch_size=2, collate_fn=collate_left_padded)
    preds = _trainer(strategy="dsinfer").predict(generating_module(copy.deepcopy(hf)), loader)
    assert len(preds) == 4
    rows = [r for p in preds for r in p]
    assert len(rows) == len(prompts)
    for batch, pred in zip(loader, preds):
        with torch.no_grad():
            ref = hf.generate(**batch, max_new_tokens=8, do_sample=False)
        assert torch.equal(pred, ref)
    for prompt, row in zip(prompts, rows):        # each row continues its own prompt, in dataset order
        assert torch.equal(row[row.shape[0] - 8 - len(prompt): row.shape[0] - 8], prompt)


def test_strategy_instance_and_precision_plugin():
    hf = tiny_model("qwen3")
    module = generating_module(copy.deepcopy(hf))
    strategy = dsi.DSInferStrategy(max_seq_len=40, max_batch_size=2)
    preds = _trainer(strategy=strategy, plugins=[dsi.DSInferPrecision("bf16")]).predict(
        module, DataLoader(random_prompts(3), batch_size=3, collate_fn=collate_left_padded))
    engine = module.model._dsinfer_engine
    assert engine.dtype == torch.bfloat16 and engine.max_seq_len == 40
    assert preds[0].shape[0] == 3
    # bf16 logits follow the fp32 HF model closely (a check that can fail, unlike "it ran")
    ids, mask = padded_batch([9, 5], seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    got = module.model(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(got[valid], ref[valid], dim=-1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int8_precision_plugin_quantizes_the_block_linears(mode):
    """DSInferPrecision("int8") / ("int4"): bf16 with int8 / int4 block linears, the same engine as
    init_inference(quantize=...) (int4's group size from the strategy: the tiny model's K are 64 and 96); a strategy
    whose quantization disagrees is refused."""
    hf = tiny_model("llama").to(torch.bfloat16)
    module = generating_module(copy.deepcopy(hf))
    loader = DataLoader(random_prompts(3), batch_size=3, collate_fn=collate_left_padded)
    preds = _trainer(strategy=dsi.DSInferStrategy(max_seq_len=40, quantize_group_size=32),
                     plugins=[dsi.DSInferPrecision(mode)]).predict(module, loader)
    engine = module.model._dsinfer_engine
    assert engine.dtype == torch.bfloat16 and engine.config.quantize == mode
    assert engine.decoder.layers[0].attn.qkv.scale is not None
    assert engine.decoder.layers[0].attn.qkv.layout.startswith(mode)
    direct = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=40, quantize=mode,
                                quantize_group_size=32)
    batch = next(iter(loader))
    assert torch.equal(preds[0], direct.generate(**batch, max_new_tokens=8, do_sample=False))
    other = "int8" if mode == "int4" else "int4"
    with pytest.raises(ValueError, match="disagree"):
        _trainer(strategy=dsi.DSInferStrategy(max_seq_len=40, quantize=other, quantize_group_size=32),
                 plugins=[dsi.DSInferPrecision(mode)]).predict(generating_module(copy.deepcopy(hf)), loader)
    with pytest.raises(ValueError, match="supported modes are"):
        dsi.DSInferPrecision("int3")


def test_fit_is_refused():
    class Train(type(generating_module(None))):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    with pytest.raises(RuntimeError, match="for inference"):
        _trainer(strategy="dsinfer", max_steps=1).fit(Train(tiny_model("llama")),
                                                       DataLoader(random_prompts(2), batch_size=1, collate_fn=collate_left_padded))


def test_module_without_hf_model_is_refused():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def predict_step(self, batch, batch_idx):
            return self.layer(batch)

    with pytest.raises(dsi.UnsupportedModelError, match="no Hugging Face PreTrainedModel"):
        _trainer(strategy="dsinfer").predict(Plain(), DataLoader(torch.zeros(2, 2), batch_size=1))


def test_registered_name():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "dsinfer" in StrategyRegistry
