"""TokenLayout against the tokenizers' own ids."""

from __future__ import annotations

import pytest
import torch

import mmdit_probe as mp
from mmdit_probe import joint_order
from mmdit_probe.layout import CLIP_LENGTH

PROMPTS = [
    "a red circle left of a blue square",
    "A photo of a cat, riding a horse!",
    "zebra quokka",  # words outside the vocabulary: split into pieces
]
LONG = " ".join(["a red circle left of a blue square"] * 12)  # > 77 CLIP tokens


@pytest.fixture(scope="module")
def pipe():
    return mp.tiny_sd3_pipeline("sd3", seed=0)


@pytest.mark.parametrize("prompt", PROMPTS + [LONG])
def test_layout_matches_tokenizer_ids(pipe, prompt):
    msl = 40
    lay = mp.TokenLayout.from_prompt(pipe, prompt, height=32, width=48, max_sequence_length=msl)
    clip = pipe.tokenizer(prompt, padding="max_length", max_length=CLIP_LENGTH, truncation=True).input_ids
    t5 = pipe.tokenizer_3(prompt, padding="max_length", max_length=msl, truncation=True).input_ids
    assert lay.image_grid == (32 // 2 // 2, 48 // 2 // 2) and lay.n_image == 8 * 12
    assert lay.n_text == CLIP_LENGTH + msl and lay.n_tokens == lay.n_image + lay.n_text
    assert [t.token_id for t in lay.tokens("clip")] == clip
    assert [t.token_id for t in lay.tokens("t5")] == t5
    # kinds: BOS/EOS special, after EOS padding, real in between
    unpadded = pipe.tokenizer(prompt, truncation=True, max_length=CLIP_LENGTH).input_ids
    assert len(lay.tokens("clip", "real")) == len(unpadded) - 2
    assert [t.token_id for t in lay.tokens("clip", "special")] == [unpadded[0], unpadded[-1]]
    assert len(lay.tokens("clip", "padding")) == CLIP_LENGTH - len(unpadded)
    n_t5 = len(pipe.tokenizer_3(prompt, truncation=True, max_length=msl).input_ids)
    assert len(lay.tokens("t5", "padding")) == msl - n_t5
    assert [t.token for t in lay.tokens("t5", "special")] == [pipe.tokenizer_3.eos_token]
    # positions: image first, then text (SD3 order)
    assert lay.order == ("image", "text") == joint_order(pipe.transformer)
    assert lay.text_slice == slice(lay.n_image, lay.n_tokens)
    assert lay.group_positions("clip_special")[0] == lay.n_image


@pytest.mark.parametrize("prompt", PROMPTS)
def test_words_map_back_to_their_tokens(pipe, prompt):
    lay = mp.TokenLayout.from_prompt(pipe, prompt, max_sequence_length=32)
    expected = [w.strip(",!").lower() for w in prompt.split()]
    assert list(lay.words) == list(dict.fromkeys(expected))
    for word in lay.words:
        pos = lay.word_positions(word)
        for enc, ids in (("clip", pipe.tokenizer), ("t5", pipe.tokenizer_3)):
            toks = [lay.text[p - lay.n_image] for p in pos if lay.text[p - lay.n_image].encoder == enc]
            assert toks, (word, enc)
            # decoding the word's own ids gives the word back (once per occurrence)
            decoded = ids.decode([t.token_id for t in toks]).replace(" ", "").lower()
            assert decoded.replace(",", "").replace("!", "") == word * expected.count(word)


def test_long_prompt_truncated(pipe):
    lay = mp.TokenLayout.from_prompt(pipe, LONG, max_sequence_length=256)
    assert len(lay.tokens("clip", "real")) == CLIP_LENGTH - 2 and not lay.tokens("clip", "padding")
    assert len(lay.tokens("t5", "real")) == len(pipe.tokenizer_3(LONG).input_ids) - 1


def test_t5_omitted():
    pipe = mp.tiny_sd3_pipeline("sd3", seed=0, with_t5=False)
    assert pipe.text_encoder_3 is None
    lay = mp.TokenLayout.from_prompt(pipe, PROMPTS[0], max_sequence_length=20)
    assert not lay.has_t5 and len(lay.tokens("t5")) == 20 == len(lay.tokens("t5", "padding"))
    # recorder: the captured layout equals the prompt-built one, and T5 keys are zero-embedding padding
    with mp.AttentionRecorder(pipe, groups=True) as rec:
        pipe(PROMPTS[0], num_inference_steps=1, max_sequence_length=20, guidance_scale=1.0, output_type="latent")
    got = rec.result.layouts[0]
    assert got.text == lay.text and got.image_grid == lay.image_grid
    gm = rec.result.stat("group_mass").sel(key_group="t5_real").values
    assert torch.all(gm[~torch.isnan(gm)] == 0)


def test_captured_layouts_match_prompt_layouts(pipe):
    prompts = [PROMPTS[0], PROMPTS[1]]
    with mp.AttentionRecorder(pipe, groups=True) as rec:
        pipe(prompts, negative_prompt=["blurry", "ugly"], num_inference_steps=1, height=32, width=24,
             max_sequence_length=24, guidance_scale=4.0, num_images_per_prompt=2, output_type="latent")
    rows = rec.result.layouts
    assert len(rows) == 8 and rec.result.branches == ("uncond",) * 4 + ("cond",) * 4
    expect = ["blurry", "blurry", "ugly", "ugly", *[p for p in prompts for _ in range(2)]]
    for lay, prompt in zip(rows, expect):
        ref = mp.TokenLayout.from_prompt(pipe, prompt, height=32, width=24, max_sequence_length=24)
        assert lay.text == ref.text


def test_flux_order_and_errors(pipe):
    assert joint_order(mp.tiny_flux_pipeline()) == ("text", "image")  # from the family adapter
    assert joint_order(pipe.transformer) == ("image", "text")

    class FluxTransformer2DModel:  # a class name alone is not a model
        pass

    with pytest.raises(TypeError, match="not supported yet"):
        joint_order(FluxTransformer2DModel())
    lay = mp.TokenLayout.from_prompt(pipe, PROMPTS[0], max_sequence_length=8)
    with pytest.raises(KeyError, match="words present: a, red, circle"):
        lay.word_positions("zebra")
    with pytest.raises(KeyError, match="valid groups"):
        lay.group_positions("clip_words")
    assert "image 8x8=64" in lay.describe()
