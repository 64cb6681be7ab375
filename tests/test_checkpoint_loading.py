"""A model built on the meta device, weights read from a safetensors folder (no full copy in memory)."""
import pytest
import torch

import lightning_dsinfer as dsi
from helpers import assert_matches_hf, padded_batch, tiny_config, tiny_model


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen3", True), ("phi3", False)])
def test_meta_model_from_safetensors_checkpoint(tmp_path, family, tied):
    from transformers import AutoModelForCausalLM

    hf = tiny_model(family, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config(family, tie_word_embeddings=tied))
    opt = dsi.init_inference(meta, checkpoint=str(tmp_path), max_seq_len=48)
    assert_matches_hf(hf, opt, *padded_batch([9, 4], seed=2))


def test_meta_model_without_checkpoint_is_refused():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="meta device and not in a checkpoint; pass checkpoint="):
        dsi.init_inference(meta)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        dsi.init_inference(tiny_model("llama"), checkpoint=str(tmp_path))
