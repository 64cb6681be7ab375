"""Vision-language models (lightning_dsinfer/multimodal.py): the language model of a Gemma 3, LLaVA, Mistral 3 or
Qwen 3.5 ``*ForConditionalGeneration`` on the engine, images through HF's own vision code, against the unmodified
wrapper on the same inputs (pixel values included): fp32 logits atol 2e-4 / rtol 1e-4 on left-padded batches, greedy
tokens identical (the engine's loop, and HF's loop over our forward for beam search); Gemma 4 with audio too (HF's audio
tower's features in its placeholders). Each model's own image rule is shown to matter on the tiny model (Gemma 3's
image blocks, Qwen 3.5's M-RoPE rows)."""
import copy

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import streamed_copy, tiny_config

ATOL, RTOL = 2e-4, 1e-4

IMAGE = 5          # the image placeholder token of every tiny wrapper below
AUDIO = 6          # (Gemma 4's audio placeholder)
_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)


def tiny_vlm(kind: str, seed: int = 0, drop: tuple = (), window: int | None = None):
    """(a tiny random vision-language model, its image inputs for the two-row batch of :func:`image_batch`); ``drop``:
    text-config keys left out (Qwen3-VL: its config classes' defaults instead); ``window``: Gemma 4 unified's sliding
    window instead of 7."""
    import transformers as tf

    torch.manual_seed(seed)
    images = {"pixel_values": torch.randn(2, 3, 28, 28)}
    if kind == "gemma3":       # each image's 4 tokens see each other (token_type_ids), sliding layers of 7
        config = tf.Gemma3Config(text_config=tiny_config("gemma3_text").to_dict(),
                                 vision_config=tf.SiglipVisionConfig(**_VISION).to_dict(), mm_tokens_per_image=4,
                                 image_token_id=IMAGE, boi_token_id=3, eoi_token_id=4)
        model = tf.Gemma3ForConditionalGeneration(config)
    elif kind == "paligemma":  # PaliGemma 2: a Gemma 2 (sliding layers of 7) behind SigLIP; its prefix (images and the
        #                        prompt, token_type_ids 0) one block that every layer sees whole, past the window too
        config = tf.PaliGemmaConfig(text_config=tiny_config("gemma2").to_dict(),
                                    vision_config=tf.SiglipVisionConfig(**_VISION).to_dict(), image_token_index=IMAGE,
                                    projection_dim=64)
        model = tf.PaliGemmaForConditionalGeneration(config)
    elif kind == "gemma4_unified":    # Gemma 4 12B's wrapper: its language model without per-layer inputs, images
        #                               (token 5) as the vision embedder's output (mm_encoder_outputs), as "gemma4";
        #                               use_bidirectional_attention="vision" (its config's default)
        text = tiny_config("gemma4_unified_text", **({"sliding_window": window} if window else {})).to_dict()
        config = tf.Gemma4UnifiedConfig(text_config=text, image_token_id=IMAGE,
                                        audio_token_id=AUDIO,
                                        vision_config=dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32,
                                                           mm_posemb_size=16, output_proj_dims=64))
        model = tf.Gemma4UnifiedForConditionalGeneration(config)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = [torch.randn(4, 64) for _ in range(2)]
        images = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
    elif kind.startswith("gemma4"):   # Gemma 4 behind its wrapper (what AutoModelForCausalLM loads), image token 5; its
        #                               images given as the vision tower's output (mm_encoder_outputs: the tower is HF's
        #                               code either way); "gemma4_bidirectional": use_bidirectional_attention="vision"
        text = tiny_config("gemma4_text").to_dict()
        text["use_bidirectional_attention"] = "vision" if kind == "gemma4_bidirectional" else None
        #                               "gemma4_audio": audio instead (token 6), through HF's audio tower
        audio = kind == "gemma4_audio"
        config = tf.Gemma4Config(
            text_config=text, image_token_id=IMAGE, audio_token_id=AUDIO,
            audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,  # (the subsampling's first
                              subsampling_conv_channels=[128, 4], conv_kernel_size=3,      # width must be the 128
                              attention_chunk_size=4, attention_context_left=5,            # features' own)
                              output_proj_dims=48) if audio else None,
            vision_config=None if audio else dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=2, head_dim=16))
        model = tf.Gemma4ForConditionalGeneration(config)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = [torch.randn(4, 64) for _ in range(2)]
        images = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
        if audio:      # 16 frames of 128 features per row: 4 audio tokens each after the tower's 4x subsampling
            images = {"input_features": torch.randn(2, 16, 128), "input_features_mask": torch.ones(2, 16, dtype=bool)}
    elif kind == "llava":      # a Llama (biases, head_dim 24) behind CLIP
        config = tf.LlavaConfig(text_config=tiny_config("llama").to_dict(),
                                vision_config=tf.CLIPVisionConfig(**_VISION, projection_dim=32).to_dict(),
                                image_token_index=IMAGE, vision_feature_layer=-1, image_seq_length=4)
        model = tf.LlavaForConditionalGeneration(config)
    elif kind == "mistral3":   # a Mistral (sliding window 7) behind Pixtral
        vision = tf.PixtralVisionConfig(**{**_VISION, "head_dim": 16})
        config = tf.Mistral3Config(text_config=tiny_config("mistral").to_dict(), vision_config=vision.to_dict(),
                                   image_token_index=IMAGE, spatial_merge_size=1, vision_feature_layer=-1)
        model = tf.Mistral3ForConditionalGeneration(config)
        images["image_sizes"] = torch.tensor([[28, 28], [28, 28]])
    elif kind == "qwen3_5":    # Gated DeltaNet + gated attention behind Qwen's vision tower; M-RoPE positions
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=1, temporal_patch_size=1)
        config = CONFIG_MAPPING["qwen3_5"](text_config=tiny_config("qwen3_5_text").to_dict(), vision_config=vision,
                                           image_token_id=IMAGE, video_token_id=6, vision_start_token_id=3,
                                           vision_end_token_id=4)
        model = tf.Qwen3_5ForConditionalGeneration(config)
        images = {"pixel_values": torch.randn(8, 3 * 14 * 14), "image_grid_thw": torch.tensor([[1, 2, 2]] * 2)}
    elif kind in ("qwen2_5_vl", "qwen2_vl"):   # Qwen 2 (biases, sliding layers) with M-RoPE in sections behind Qwen
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING    # 2.5's (2's) vision tower

        text = {k: v for k, v in tiny_config("qwen2").to_dict().items() if k != "model_type"}
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=28)
        if kind == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=1, temporal_patch_size=1)
        config = CONFIG_MAPPING[kind](text_config=text, vision_config=vision, image_token_id=IMAGE,
                                      video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
        model = (tf.Qwen2_5_VLForConditionalGeneration if kind == "qwen2_5_vl" else tf.Qwen2VLForConditionalGeneration)(
            config)
        images = {"pixel_values": torch.randn(8, 3 * 14 * 14), "image_grid_thw": torch.tensor([[1, 2, 2]] * 2)}
    elif kind in ("qwen3_vl", "qwen3_vl_moe"):   # Qwen 3 (MoE) with interleaved M-RoPE; deepstack: the vision tower's
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING    # first two blocks' features added
                                                                                  # after the first two layers
        text = {k: v for k, v in tiny_config("qwen3" if kind == "qwen3_vl" else "qwen3_moe").to_dict().items()
                if k != "model_type" and k not in drop}
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                   "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=1, temporal_patch_size=1, deepstack_visual_indexes=[0, 1],
                      num_position_embeddings=16)
        config = CONFIG_MAPPING[kind](text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=6,
                                      vision_start_token_id=3, vision_end_token_id=4)
        model = (tf.Qwen3VLForConditionalGeneration if kind == "qwen3_vl" else tf.Qwen3VLMoeForConditionalGeneration)(
            config)
        images = {"pixel_values": torch.randn(8, 3 * 14 * 14), "image_grid_thw": torch.tensor([[1, 2, 2]] * 2)}
    elif kind == "llama4":     # Llama 4's text model (chunked attention, NoPE layer, experts) behind its vision model
        vision = tf.Llama4VisionConfig(**{**_VISION, "intermediate_size": 128}, vision_output_dim=32,
                                       projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
        config = tf.Llama4Config(text_config=tiny_config("llama4").to_dict(), vision_config=vision.to_dict(),
                                 image_token_index=IMAGE)
        model = tf.Llama4ForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():      # norms and Gemma 3's projection off their constant initial values
        tensors = [*model.named_parameters(), *(model.named_buffers() if kind.startswith("gemma4") else ())]
        for name, p in tensors:
            if kind.startswith("gemma4"):      # (as tests/helpers.tiny_model's Gemma 4: its w-scaled norms near 1,
                if "language_model" in name and "norm" in name:   # small q norms, layer scalars away from 1)
                    p.normal_(0.3 if name.endswith("q_norm.weight") else 1.0, 0.05 if "q_norm" in name else 0.2)
                elif name.endswith("layer_scalar"):
                    p.uniform_(0.5, 1.5)
            elif "norm" in name and "vision" not in name and "visual" not in name:
                p.normal_(1.0 if kind in ("llava", "mistral3", "llama4", "qwen3_vl", "qwen3_vl_moe")
                          or "linear_attn.norm" in name else 0.0, 0.2)
            elif "mm_input_projection" in name:
                p.normal_(0.0, 0.2)
    return model.eval(), images


def image_batch(kind: str, images: dict):
    """Two left-padded prompts with one 4-token image each (Gemma 3: between its begin / end tokens)."""
    ids = torch.tensor([[0, 0, 1, 7, 3, IMAGE, IMAGE, IMAGE, IMAGE, 4, 9, 11],
                        [1, 7, 8, 9, 3, IMAGE, IMAGE, IMAGE, IMAGE, 4, 10, 11]])
    if kind == "gemma4_audio":
        ids = torch.where(ids == IMAGE, AUDIO, ids)
    mask = ids.ne(0).long()
    inputs = dict(images)
    if kind == "gemma3":
        inputs["token_type_ids"] = ids.eq(IMAGE).long()
    if kind in ("gemma4_bidirectional", "gemma4_unified"):
        inputs["mm_token_type_ids"] = ids.eq(IMAGE).long()
    if kind == "paligemma":    # the prefix: the first 10 columns (padding included, as HF's processor marks it)
        inputs["token_type_ids"] = (torch.arange(ids.shape[1]) >= 10).long().expand_as(ids)
    if kind in ("qwen3_5", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"):
        inputs["mm_token_type_ids"] = ids.eq(IMAGE).long()
    return ids, mask, inputs


def _same_as_hf(hf, opt, ids, mask, inputs, new=6):
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **inputs).logits
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **inputs)
    got = opt(input_ids=ids, attention_mask=mask, **inputs).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **inputs),
                       tokens)
    if "mm_encoder_outputs" not in inputs:     # (HF's beam search does not repeat given features for its beams)
        with torch.no_grad():
            beams = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False,
                                **inputs)
        assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2,
                                        do_sample=False, **inputs), beams)   # (HF's loop over our forward: images in
    return want                                                              # its first step)


@pytest.mark.parametrize("kind", ["gemma3", "llava", "mistral3", "qwen3_5", "qwen2_5_vl", "qwen2_vl", "qwen3_vl",
                                  "qwen3_vl_moe", "paligemma", "gemma4", "gemma4_bidirectional", "gemma4_audio",
                                  "gemma4_unified"])
def test_images_match_hf(kind):
    hf, images = tiny_vlm(kind)
    ids, mask, inputs = image_batch(kind, images)
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
    want = _same_as_hf(hf, opt, ids, mask, inputs)
    valid = mask.bool()
    with torch.no_grad():      # what each model does with images matters here: a path that ignored it would fail
        plain = hf(input_ids=ids, attention_mask=mask).logits
        assert (plain - want)[valid].abs().max() > 1e-2                   # the images themselves
        # each image's tokens (PaliGemma: the prefix's; Gemma 4: in the sliding layers) seeing each other
        if kind in ("gemma3", "paligemma", "gemma4_bidirectional", "gemma4_unified"):
            causal = hf(input_ids=ids, attention_mask=mask, **images).logits
            assert (causal - want)[valid].abs().max() > 1e-2
        if kind == "paligemma":          # HF's sliding mask ORs the prefix in after the window
            assert opt._dsinfer_engine.blocks_in == "past_window"
        if kind != "gemma3" and kind.startswith("qwen"):                   # M-RoPE: image tokens' rows differ, and
            rows, deltas = hf.model.get_rope_index(ids, inputs["mm_token_type_ids"], images["image_grid_thw"],
                                                   attention_mask=mask)     # decoding goes on from the largest
            assert not torch.equal(rows[1], rows[0]) and bool((deltas != 0).all())
        if kind.startswith("qwen3_vl"):                                    # Qwen3-VL's deepstack features
            language = hf.model.language_model
            language._deepstack_process = lambda hidden, *args: hidden
            try:
                without = hf(input_ids=ids, attention_mask=mask, **inputs).logits
            finally:
                del language._deepstack_process
            assert (without - want)[valid].abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["gemma3", "llava", "qwen3_5", "qwen2_5_vl", "gemma4"])
def test_text_prompts_match_hf(kind):
    hf, _ = tiny_vlm(kind)
    ids = torch.tensor([[0, 0, 1, 7, 8, 9, 10, 11], [1, 7, 8, 9, 12, 13, 14, 15]])
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
    _same_as_hf(hf, opt, ids, ids.ne(0).long(), {})
    assert opt._dsinfer_engine.outer is opt      # (the engine runs the wrapper's language model)


def test_llama4_images_match_its_language_model():
    """Llama4ForConditionalGeneration (Scout / Maverick's checkpoints): one image token per image here (pixel shuffle),
    the prompt long enough for the chunked layers' chunks of 8. transformers 5.24's own forward of this wrapper fails
    after its language model has run (it reads ``image_outputs`` off the text model's output), so the reference is
    the wrapper's own steps up to there: its embedding, vision model, projector and placement, then its language
    model over the merged embeddings, prompt and greedy one-token steps through HF's cache."""
    from transformers import DynamicCache

    hf, images = tiny_vlm("llama4")
    ids = torch.tensor([[0, 0, 1, 7, IMAGE, 9, 11, 12, 13, 14, 15, 16], [1, 7, 8, 9, IMAGE, 9, 11, 12, 13, 14, 15, 16]])
    mask = ids.ne(0).long()
    new = 5
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        features = hf.get_image_features(pixel_values=images["pixel_values"], return_dict=True).last_hidden_state
        projected = hf.multi_modal_projector(features.view(-1, features.size(-1)))
        embeds = embeds.masked_scatter(hf.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected),
                                       projected)
        cache = DynamicCache(config=hf.language_model.config)
        want = hf.language_model(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True).logits
        tokens, step_mask = [want[:, -1].argmax(-1)], mask
        for _ in range(new - 1):
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            logits = hf.language_model(input_ids=tokens[-1][:, None], attention_mask=step_mask, cache=cache,
                                       use_cache=True).logits
            tokens.append(logits[:, -1].argmax(-1))
        text_only = hf.language_model(input_ids=ids, attention_mask=mask).logits
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
    got = opt(input_ids=ids, attention_mask=mask, **images).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)
    assert (text_only - want)[valid].abs().max() > 1e-2            # (the image matters)
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **images)
    assert torch.equal(out[:, ids.shape[1]:], torch.stack(tokens, 1))
    torch.testing.assert_close(opt(input_ids=ids, attention_mask=mask).logits[valid], text_only[valid], atol=ATOL,
                               rtol=RTOL)


def test_generate_keeps_hfs_own_arguments():
    """Arguments of generate that are not the wrapper's inputs (stopping criteria, prefix constraints, chunked
    prefill) reach HF's loop as for any model, images merged in its steps; chunks of a Gemma 3 prompt see HF's
    block ids over the whole prompt."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 14, dtype=torch.bool)

    for kind, extra in (("llava", dict(stopping_criteria=StoppingCriteriaList([AfterTwo()]))),
                        ("llava", dict(prefix_allowed_tokens_fn=lambda batch, ids: [42])),
                        ("gemma3", dict(prefill_chunk_size=5)), ("qwen3_5", dict(prefill_chunk_size=5))):
        hf, images = tiny_vlm(kind)
        ids, mask, inputs = image_batch(kind, images)
        opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
        with torch.no_grad():
            want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **inputs, **extra)
        got = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **inputs, **extra)
        assert torch.equal(got, want), (kind, extra)
        if "stopping_criteria" in extra:
            assert want.shape[1] == 14


def test_a_cache_the_caller_builds():
    """A caller's DynamicCache: a prompt with an image, then one-token steps (HF's greedy tokens) with no positions
    given, which Qwen 3.5's wrapper places from the prompt's rope_deltas (negative here: the image's tokens take fewer
    positions). One unpadded row (HF's Qwen 3.5 steps fail with a mask)."""
    from transformers import DynamicCache

    for kind in ("qwen3_5", "qwen2_5_vl", "gemma3"):
        hf, images = tiny_vlm(kind)
        ids, _, inputs = image_batch(kind, images)
        ids = ids[1:]
        inputs = {k: v[4:] if k == "pixel_values" and kind != "gemma3" else v[1:] for k, v in inputs.items()}
        opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
        runs = []
        for model in (hf, opt):
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                out = model(input_ids=ids, cache=cache, use_cache=True, **inputs)
                logits = [out.logits[:, -1]]
                for i in range(4):
                    token = (runs[0][:, i] if runs else logits[-1]).argmax(-1)[:, None]     # (HF's tokens)
                    logits.append(model(input_ids=token, cache=cache, use_cache=True).logits[:, -1])
            runs.append(torch.stack(logits, 1))
        torch.testing.assert_close(runs[1], runs[0], atol=ATOL, rtol=RTOL)
        if kind != "gemma3":
            assert bool((hf.model.rope_deltas < 0).all())


def test_logits_as_the_wrapper_gives_them():
    """A wrapper whose forward applies lm_head itself gives its logits without the text model's own post-processing
    (granite-vision's LLaVA over Granite: no 1 / logits_scaling; Aya Vision over Cohere 2: no logit_scale; Gemma 3's
    wrapper: no final soft-cap): the engine gives the wrapper's."""
    import transformers as tf

    granite = tf.GraniteConfig(**{k: v for k, v in tiny_config("llama").to_dict().items()
                                  if k not in ("model_type", "mlp_bias", "head_dim")}, logits_scaling=8.0)
    cohere = tf.Cohere2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              logit_scale=0.25, sliding_window=7)
    torch.manual_seed(0)
    models = [tf.LlavaForConditionalGeneration(tf.LlavaConfig(
                  text_config=granite.to_dict(), vision_config=tf.CLIPVisionConfig(**_VISION, projection_dim=32).to_dict(),
                  image_token_index=IMAGE, vision_feature_layer=-1, image_seq_length=4)),
              tf.AyaVisionForConditionalGeneration(tf.AyaVisionConfig(
                  text_config=cohere.to_dict(), vision_config=tf.SiglipVisionConfig(**_VISION).to_dict(),
                  image_token_index=IMAGE, downsample_factor=1))]
    gemma, _ = tiny_vlm("gemma3")
    gemma.config.text_config.final_logit_softcapping = 3.0
    ids = torch.tensor([[0, 0, 1, 7, 8, 9, 10, 11], [1, 7, 8, 9, 12, 13, 14, 15]])
    mask = ids.ne(0).long()
    for hf in (*models, gemma):
        hf.eval()
        opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
        with torch.no_grad():
            want = hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(opt(input_ids=ids, attention_mask=mask).logits[mask.bool()], want[mask.bool()],
                                   atol=ATOL, rtol=RTOL)


def test_several_sequences_per_prompt_with_images():
    """num_return_sequences: each prompt repeated with its image's embeddings, M-RoPE rows and deepstack rows (top-1
    sampling: the same draws as HF's greedy)."""
    hf, images = tiny_vlm("qwen3_vl")
    ids, mask, inputs = image_batch("qwen3_vl", images)
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2,
              **inputs)
    with torch.no_grad():
        want = hf.generate(**kw)
    assert torch.equal(opt.generate(**kw), want)


def test_tying_follows_the_wrapper():
    """Qwen3-VL-MoE's text config defaults to tied embeddings, its wrapper's config (which HF ties by) does not: with
    the key left out of the text config, the head stays its own tensor in HF, and in the engine."""
    hf, _ = tiny_vlm("qwen3_vl_moe", drop=("tie_word_embeddings",))
    assert hf.config.text_config.tie_word_embeddings and hf.lm_head.weight is not hf.get_input_embeddings().weight
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
    ids = torch.tensor([[0, 0, 1, 7, 8, 9, 10, 11], [1, 7, 8, 9, 12, 13, 14, 15]])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=ids.ne(0).long()).logits
    got = opt(input_ids=ids, attention_mask=ids.ne(0).long()).logits
    torch.testing.assert_close(got[ids.ne(0)], want[ids.ne(0)], atol=ATOL, rtol=RTOL)


def test_one_token_prompt_keeps_the_deepstack():
    """bf16 on the CPU: a one-token prompt (a single image token) is no decode step for the one-call C stack, which
    has no deepstack: its logits follow HF's with the deepstack (made large enough to tell apart), not without."""
    hf32, images = tiny_vlm("qwen3_vl")
    with torch.no_grad():
        for name, p in hf32.model.visual.deepstack_merger_list.named_parameters():
            if name.endswith("linear_fc2.weight"):
                p.mul_(20)
    hf = copy.deepcopy(hf32).to(torch.bfloat16)
    ids = torch.tensor([[IMAGE]])
    inputs = {"pixel_values": images["pixel_values"][:1].to(torch.bfloat16), "image_grid_thw": torch.tensor([[1, 1, 1]]),
              "mm_token_type_ids": ids.eq(IMAGE).long()}
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=64)
    with torch.no_grad():
        want = hf(input_ids=ids, **inputs).logits[:, -1].float()
        language = hf.model.language_model
        language._deepstack_process = lambda hidden, *args: hidden
        without = hf(input_ids=ids, **inputs).logits[:, -1].float()
        del language._deepstack_process
    out = opt.generate(input_ids=ids, max_new_tokens=2, do_sample=False, output_scores=True,
                       return_dict_in_generate=True, **inputs)
    got = out.scores[0].float()
    assert (want - without).abs().max() > 0.2
    torch.testing.assert_close(got, want, atol=6e-2, rtol=2e-2)


def test_inputs_embeds_without_images():
    hf, _ = tiny_vlm("llava")
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
    embeds = torch.randn(2, 6, hf.config.text_config.hidden_size) * 0.3
    with torch.no_grad():
        want = hf(inputs_embeds=embeds).logits
        tokens = hf.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(opt(inputs_embeds=embeds).logits, want, atol=ATOL, rtol=RTOL)
    assert torch.equal(opt.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False), tokens)


def test_gemma3_bf16_follows_hf():
    truth, images = tiny_vlm("gemma3")
    hf = copy.deepcopy(truth).to(torch.bfloat16)
    ids, mask, inputs = image_batch("gemma3", images)
    opt = dsi.init_inference(copy.deepcopy(hf), max_seq_len=64)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **inputs).logits.float()
        exact = truth(input_ids=ids, attention_mask=mask, **inputs).logits
    got = opt(input_ids=ids, attention_mask=mask, **inputs).logits.float()
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=6e-2, rtol=2e-2)
    assert (got - exact)[valid].abs().max() <= 1.3 * (want - exact)[valid].abs().max()


def test_from_checkpoint_on_meta(tmp_path):
    """The wrapper built on meta: the language model read by the engine from what ``save_pretrained`` writes (HF saves
    the wrapper's tensors under their original names), the vision tower and projector read into the wrapper (its
    position ids, which no checkpoint stores, from HF's own init)."""
    hf, images = tiny_vlm("gemma3")
    ids, mask, inputs = image_batch("gemma3", images)
    hf.save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = type(hf)(hf.config)
    opt = dsi.init_inference(meta, checkpoint=str(tmp_path), dtype=torch.float32, max_seq_len=64)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **inputs).logits
    got = opt(input_ids=ids, attention_mask=mask, **inputs).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_vl"])
@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_offloaded_language_model(tier, kind, tmp_path):
    """Both offload tiers under a streaming budget: Gemma 3's image blocks (the prompt in one chunk), Qwen3-VL's
    deepstack features added after the streamed blocks."""
    hf, images = tiny_vlm(kind)
    ids, mask, inputs = image_batch(kind, images)
    opt = streamed_copy(hf, tier, tmp_path, dtype=torch.float32)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **inputs).logits
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **inputs)
    got = opt(input_ids=ids, attention_mask=mask, **inputs).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=RTOL)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **inputs),
                       tokens)


def test_lightning_predict_with_images():
    import lightning as L

    hf, images = tiny_vlm("llava")
    ids, mask, inputs = image_batch("llava", images)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **inputs)

    class Describe(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            return self.model.generate(**batch, max_new_tokens=5, do_sample=False)

    batch = dict(input_ids=ids, attention_mask=mask, **inputs)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=dsi.DSInferStrategy(max_seq_len=64, dtype=torch.float32),
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)
    module = Describe(copy.deepcopy(hf))
    (got,) = trainer.predict(module, torch.utils.data.DataLoader([batch], batch_size=None))
    assert dsi.is_optimised(module.model)
    assert torch.equal(got, want)


def test_granite_scales_given_embeddings_as_hf():
    """Granite's forward multiplies inputs_embeds a caller passes too (Gemma's scale lives in its embedding module,
    Falcon-H1's applies to looked-up rows only): the engine does as each does."""
    from helpers import tiny_model

    for family in ("granite", "gemma2", "falcon_h1"):
        hf = tiny_model(family)
        ids = torch.tensor([[1, 7, 8, 9, 12]])
        emb = torch.randn(1, 5, hf.config.hidden_size) * 0.3
        opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
        with torch.no_grad():
            want = hf(inputs_embeds=emb).logits
        torch.testing.assert_close(opt(inputs_embeds=emb).logits, want, atol=ATOL, rtol=RTOL)
        assert opt(input_ids=ids).logits.shape[1] == 5


def worker_runs(tmp, selected):
    """TP=2 in the session's shared launch of two ranks (tests/conftest.py ``shared_runs``)."""
    return {2: {"test_tensor_parallel_language_model/tp": ["tp_worker.py", "--tp", "2", "--families",
                                                            "vlm-gemma3", "vlm-qwen3_5", "vlm-llava",
                                                            "vlm-qwen2_5_vl", "vlm-qwen3_vl"]}}


def test_tensor_parallel_language_model(shared_runs):
    """TP=2: the language model split over the ranks, each rank encoding the images with the whole vision tower:
    logits, greedy, beam search (HF's loop, images in its first step) as the unmodified wrapper's."""
    outs = shared_runs.outputs(2, "test_tensor_parallel_language_model/tp")
    assert outs[0].count(" OK") == 5, outs[0]
