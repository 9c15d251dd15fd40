"""Tests for mmdit_probe.models / mmdit_probe.tokenizers (tiny in-code pipelines, loading errors)."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from mmdit_probe.models import (
    TINY_NAMES,
    WeightsNotAvailableError,
    load_pipeline,
    tiny_sd3_pipeline,
)
from mmdit_probe.tokenizers import DEFAULT_VOCAB

PROMPT = "a red circle left of a blue square"


def _run(pipe, prompt=PROMPT, seed: int = 0, **kw) -> torch.Tensor:
    kw = {"num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt", **kw}
    return pipe(prompt, generator=torch.manual_seed(seed), **kw).images


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pipe(request):
    return tiny_sd3_pipeline(request.param)


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline("sd3")


# ------------------------------------------------------------------------------------------- running


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_runs_non_square_and_deterministic(pipe, guidance_scale):
    variant = "sd35" if pipe.transformer.config.qk_norm else "sd3"
    out = _run(pipe, height=32, width=48, guidance_scale=guidance_scale)
    assert out.shape == (1, 3, 32, 48)
    assert torch.isfinite(out).all()
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 1e-3
    assert torch.equal(out, _run(pipe, height=32, width=48, guidance_scale=guidance_scale))
    fresh = tiny_sd3_pipeline(variant)  # rebuilt from the same seed -> bitwise the same image
    assert torch.equal(out, _run(fresh, height=32, width=48, guidance_scale=guidance_scale))
    assert not torch.equal(out, _run(pipe, seed=1, height=32, width=48, guidance_scale=guidance_scale))


def test_cfg_changes_output(sd3):
    assert not torch.equal(_run(sd3, guidance_scale=1.0), _run(sd3, guidance_scale=5.0))


def test_defaults(sd3):
    assert sd3.vae_scale_factor == 2
    assert sd3.default_sample_size == 16 and sd3.patch_size == 2
    out = sd3(PROMPT, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 32, 32)  # 16 latent px * vae factor 2 -> 64 image tokens
    embeds, neg, pooled, _ = sd3.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77 + 256, 32) and pooled.shape == (1, 64) and neg is None
    assert not sd3.transformer.training and not sd3.text_encoder_3.training


def test_batch_and_images_per_prompt(sd3):
    out = _run(sd3, prompt=["a red circle", "a green star"], num_images_per_prompt=2, guidance_scale=5.0)
    assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[2])


def test_without_t5():
    pipe = tiny_sd3_pipeline("sd3", with_t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    out = _run(pipe, guidance_scale=5.0, width=48)
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()
    embeds, _, _, _ = pipe.encode_prompt(PROMPT, None, None, max_sequence_length=16, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77 + 16, 32)
    assert torch.count_nonzero(embeds[:, 77:]) == 0 and torch.count_nonzero(embeds[:, :77]) > 0


def test_seed_changes_weights_and_rng_untouched():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = tiny_sd3_pipeline(seed=0), tiny_sd3_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG is restored
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert any(not torch.equal(sa[k], sb[k]) for k in sa), name
    w_l = a.text_encoder.text_model.embeddings.token_embedding.weight
    w_g = a.text_encoder_2.text_model.embeddings.token_embedding.weight
    assert not torch.equal(w_l, w_g)  # CLIP-L and CLIP-G use distinct seeds


def test_dtype():
    pipe = tiny_sd3_pipeline(torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder_3.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- structure


def test_variant_structure():
    sd3, sd35 = tiny_sd3_pipeline("sd3"), tiny_sd3_pipeline("sd35")
    keys3, keys35 = set(sd3.transformer.attn_processors), set(sd35.transformer.attn_processors)
    assert keys3 == {f"transformer_blocks.{i}.attn.processor" for i in range(4)}
    assert keys35 == keys3 | {f"transformer_blocks.{i}.attn2.processor" for i in (0, 1)}
    for i, block in enumerate(sd35.transformer.transformer_blocks):
        assert (block.attn2 is not None) == (i < 2)
        assert block.attn.norm_added_k is not None and block.attn.norm_k is not None
    for block in sd3.transformer.transformer_blocks:
        assert getattr(block, "attn2", None) is None
        assert block.attn.norm_added_k is None and block.attn.norm_k is None
    assert sd3.transformer.config.pos_embed_max_size >= 32
    assert sd3.vae.config.latent_channels == sd3.transformer.config.in_channels == sd3.transformer.config.out_channels
    assert sd3.scheduler.config.shift == 3.0
    assert (sd3.vae.config.shift_factor, sd3.vae.config.scaling_factor) == (0.0609, 1.5305)


def test_unknown_variant():
    with pytest.raises(ValueError, match="sd35"):
        tiny_sd3_pipeline("sdxl")


# ---------------------------------------------------------------------------------------- tokenizers


def test_clip_tokenizer_pieces(sd3):
    for tok, pad in ((sd3.tokenizer, "<|endoftext|>"), (sd3.tokenizer_2, "!")):
        ids = tok("a red circle", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and tok.model_max_length == 77
        pieces = tok.convert_ids_to_tokens(ids)
        assert pieces[:5] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
        assert set(pieces[5:]) == {pad}
    assert sd3.tokenizer_2.pad_token_id == 0  # like the real CLIP-G tokenizer ("!" is byte symbol 0)
    assert sd3.tokenizer.pad_token_id == sd3.tokenizer.eos_token_id == len(sd3.tokenizer) - 1


def test_t5_tokenizer_pieces(sd3):
    tok = sd3.tokenizer_3
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red circle", padding="max_length", max_length=8).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁circle", "</s>"] + ["<pad>"] * 4


def test_vocab_words_are_single_tokens(sd3):
    for word in DEFAULT_VOCAB:
        assert len(sd3.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
        assert sd3.tokenizer_3.convert_ids_to_tokens(sd3.tokenizer_3(word).input_ids) == ["▁" + word, "</s>"]


def test_unknown_word_char_fallback(sd3):
    prompt = "a zebra, xylophone_42 quokka!"
    for tok in (sd3.tokenizer, sd3.tokenizer_2):
        ids = tok(prompt, add_special_tokens=False).input_ids
        pieces = tok.convert_ids_to_tokens(ids)
        assert tok.unk_token_id not in ids
        joined = "".join(pieces).replace("</w>", " ").split()
        assert joined == ["a", "zebra", ",", "xylophone", "_", "4", "2", "quokka", "!"]
        assert "zebra</w>" not in pieces and len(pieces) > len(joined)
    ids = sd3.tokenizer_3(prompt + " Zebra").input_ids
    assert sd3.tokenizer_3.unk_token_id not in ids
    assert sd3.tokenizer_3.decode(ids, skip_special_tokens=True) == prompt + " Zebra"


def test_custom_vocab():
    pipe = tiny_sd3_pipeline(vocab=["zebra", "quokka"], with_t5=True)
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("quokka zebra").input_ids)[1:3] == [
        "quokka</w>", "zebra</w>"]
    assert pipe.tokenizer_3.convert_ids_to_tokens(pipe.tokenizer_3("zebra").input_ids) == ["▁zebra", "</s>"]
    assert len(pipe.tokenizer("red", add_special_tokens=False).input_ids) > 1  # not in the custom list
    for enc, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_3, pipe.tokenizer_3)):
        assert enc.config.vocab_size == len(tok)
    assert torch.isfinite(_run(pipe, prompt="a zebra")).all()


def test_long_prompt_truncated_to_77(sd3):
    long = " ".join(["red circle"] * 50)  # 100 words -> 102 CLIP tokens with bos/eos
    assert len(sd3.tokenizer(long).input_ids) > 77
    kw = {"max_sequence_length": 16, "do_classifier_free_guidance": False}
    e1, _, p1, _ = sd3.encode_prompt(long, None, None, **kw)
    e2, _, p2, _ = sd3.encode_prompt(long + " blue square star", None, None, **kw)
    assert e1.shape == (1, 77 + 16, 32)
    assert torch.equal(e1, e2) and torch.equal(p1, p2)  # everything after token 77 (and T5 16) dropped
    e3, _, _, _ = sd3.encode_prompt("blue " + long, None, None, **kw)
    assert not torch.equal(e1, e3)


# ------------------------------------------------------------------------------------------- loading


def test_save_and_load_roundtrip(tmp_path):
    pipe = tiny_sd3_pipeline("sd35", seed=3)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    for a, b in ((pipe.tokenizer, loaded.tokenizer), (pipe.tokenizer_2, loaded.tokenizer_2),
                 (pipe.tokenizer_3, loaded.tokenizer_3)):
        text = "a zebra!! left of 3 Blue squares"
        assert a(text, padding="max_length", max_length=24).input_ids == b(
            text, padding="max_length", max_length=24).input_ids
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.model_max_length == 77
    kw = {"guidance_scale": 4.0, "width": 48}
    assert torch.equal(_run(pipe, **kw), _run(loaded, **kw))


@pytest.mark.parametrize("name", sorted(TINY_NAMES))
def test_load_tiny_names(name):
    pipe = load_pipeline(name)
    has_attn2 = "transformer_blocks.0.attn2.processor" in pipe.transformer.attn_processors
    assert has_attn2 == (name == "tiny-sd35")


def test_offline_hub_id_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(WeightsNotAvailableError) as info:
        load_pipeline(model, cache_dir=tmp_path / "hub")  # local_files_only inferred from HF_HUB_OFFLINE
    msg = str(info.value)
    assert f"huggingface-cli download {model}" in msg and "HF_HUB_CACHE" in msg and "tiny_sd3_pipeline" in msg
    assert info.value.__cause__ is not None
    assert isinstance(info.value, RuntimeError)


def test_missing_local_path(tmp_path):
    with pytest.raises(WeightsNotAvailableError, match="does not exist") as info:
        load_pipeline(tmp_path / "no" / "such" / "model")
    assert "huggingface-cli download" in str(info.value)


def test_local_folder_without_model_index(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(WeightsNotAvailableError, match="model_index.json"):
        load_pipeline(tmp_path)
    ckpt = tmp_path / "sd3.5_medium.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(WeightsNotAvailableError, match="from_single_file"):
        load_pipeline(ckpt)


def test_supplied_transformer_and_vae():
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
    )
    donor = tiny_sd3_pipeline(seed=7)
    pipe = tiny_sd3_pipeline(transformer=transformer, vae=donor.vae)
    assert pipe.transformer is transformer and pipe.vae is donor.vae
    assert pipe.text_encoder_3.config.d_model == 48
    assert pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim == 40
    out = _run(pipe, guidance_scale=3.0, height=16, width=24)
    assert out.shape == (1, 3, 16, 24) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="latent_channels"):
        tiny_sd3_pipeline(transformer=transformer, vae=AutoencoderKL(latent_channels=4))
