"""Flux Kontext: the context image's tokens are a third token group (text / image / context).

References: the ``(q, k)`` the attention kernel received in a vanilla run (``F.scaled_dot_product_attention``
spied while the transformer runs, as in ``test_flux.py``), softmax in float64, sliced by the ``img_ids``
diffusers built for that call (``t = 0`` generated, ``t = 1`` context); the tokenizer's own ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import kernel_inputs

import mmdit_probe as mp
from mmdit_probe.families import FluxFamily
from mmdit_probe.kontext import (STREAM_GROUPS, ContextMass, ContextWordMap, context_table, context_word_map,
                                 kontext_layout, kontext_sizes, split_image_ids)

PROMPT = "a red circle left of a blue square"
H, W, T5 = 32, 40, 16
KW = dict(height=H, width=W, max_sequence_length=T5, num_inference_steps=2, output_type="pt", max_area=H * W,
          _auto_resize=False)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def pipe():
    return mp.tiny_flux_pipeline(seed=1, kontext=True)


@pytest.fixture(scope="module")
def image():
    """48×32 px: a 12×8 context grid, taller than the 8×10 generated grid (so neither grid bounds the other)."""
    return Image.fromarray((np.random.RandomState(0).rand(48, 32, 3) * 255).astype("uint8"))


def _layout(pipe, image, prompt=PROMPT):
    return kontext_layout(pipe, prompt, image, height=H, width=W, max_sequence_length=T5, max_area=H * W,
                          auto_resize=False)


def _first_call(module, pipe, image, **kw):
    """``(args, kwargs)`` of ``module``'s first forward in ``pipe(image=image, ...)`` (the run is stopped there)."""
    seen = []

    def stop(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    h = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            pipe(image=image, prompt=PROMPT, **{"max_sequence_length": T5, "num_inference_steps": 1, **kw})
    finally:
        h.remove()
    return seen[0]


def _transformer_kwargs(pipe, image, **kw):
    return _first_call(pipe.transformer, pipe, image, **kw)[1]


def test_tiny_kontext_pipeline_shares_the_flux_weights(pipe):
    flux = mp.tiny_flux_pipeline(seed=1)
    assert type(pipe).__name__ == "FluxKontextPipeline" and type(flux).__name__ == "FluxPipeline"
    a, b = pipe.transformer.state_dict(), flux.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_call_inputs_read_the_context_from_img_ids(pipe, image):
    kw = _transformer_kwargs(pipe, image, height=H, width=W, max_area=H * W, _auto_resize=False)
    ids = kw["img_ids"]
    inp = FluxFamily().call_inputs(pipe.transformer, (), kw)
    gen, ctx = ids[ids[:, 0] == 0], ids[ids[:, 0] == 1]
    assert len(gen) + len(ctx) == len(ids) == kw["hidden_states"].shape[1]
    assert inp.grid == (H // 4, W // 4) == (int(gen[:, 1].max()) + 1, int(gen[:, 2].max()) + 1)
    assert inp.context_grid == (12, 8) == (int(ctx[:, 1].max()) + 1, int(ctx[:, 2].max()) + 1)
    assert inp.grid[0] * inp.grid[1] == len(gen) and inp.context_grid[0] * inp.context_grid[1] == len(ctx)
    predicted = kontext_sizes(pipe, image, height=H, width=W, max_area=H * W, auto_resize=False)
    assert (predicted.grid, predicted.context_grid) == (inp.grid, inp.context_grid)


def test_sizes_follow_max_area_and_auto_resize(pipe, image):
    """The pipeline's own rescaling: default max_area (1024²) and the preferred Kontext resolutions."""
    kw = _transformer_kwargs(pipe, None, height=H, width=W)  # default max_area=1024**2: the size is rescaled
    got = split_image_ids(kw["img_ids"])
    assert kontext_sizes(pipe, None, height=H, width=W) == got and got.grid != (H // 4, W // 4)
    assert mp.prompt_layout(pipe, PROMPT, height=H, width=W, max_sequence_length=T5).image_grid == got.grid
    # _auto_resize=True: the context image is resized to a preferred resolution before the VAE encodes it
    (pixels,), _ = _first_call(pipe.vae.encoder, pipe, image, height=H, width=W, max_area=H * W)
    ctx = kontext_sizes(pipe, image, height=H, width=W, max_area=H * W).context_grid
    assert tuple(pixels.shape[-2:]) == (ctx[0] * 2 * pipe.vae_scale_factor, ctx[1] * 2 * pipe.vae_scale_factor)
    assert ctx != (12, 8)
    latents = torch.zeros(1, pipe.latent_channels, 6, 10)  # a context given as latents is used as is
    kw = _transformer_kwargs(pipe, latents, height=H, width=W, max_area=H * W)
    assert kontext_sizes(pipe, latents, height=H, width=W, max_area=H * W) == split_image_ids(kw["img_ids"])
    assert split_image_ids(kw["img_ids"]).context_grid == (3, 5)


def test_layout_against_tokenizer_ids(pipe, image):
    lay = _layout(pipe, image)
    ids = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=T5, truncation=True).input_ids
    assert [t.token_id for t in lay.text] == ids and [t.encoder for t in lay.text] == ["t5"] * T5
    n_text, n_image, n_context = T5, (H // 4) * (W // 4), 12 * 8
    assert (lay.n_text, lay.n_image, lay.n_context, lay.n_tokens) == (n_text, n_image, n_context,
                                                                      n_text + n_image + n_context)
    assert lay.text_slice == slice(0, n_text) and lay.image_slice == slice(n_text, n_text + n_image)
    assert lay.context_slice == slice(n_text + n_image, lay.n_tokens)
    assert lay.group_positions("context") == list(range(n_text + n_image, lay.n_tokens))
    assert [p for p in lay.word_positions("red")] == [t.position for t in lay.text if t.word == "red"]
    assert "context 12x8=96" in lay.describe()
    with mp.AttentionRecorder(pipe) as rec:  # the recorded layout: the same text and grid, read from the call
        pipe(image=image, prompt=PROMPT, **{**KW, "num_inference_steps": 1})
    assert rec.result.layouts[0] == lay and rec.result.image_grid == (H // 4, W // 4)


def test_statistics_split_text_image_context_exactly(pipe, image):
    with kernel_inputs(pipe.transformer) as seen:
        base = pipe(image=image, prompt=PROMPT, generator=torch.manual_seed(0), **KW).images
    lay = _layout(pipe, image)
    stats = [ContextMass(), ContextWordMap(heads="all")]
    with mp.AttentionRecorder(pipe, words=True, word_heads="all", statistics=stats, layout=lay) as rec:
        out = pipe(image=image, prompt=PROMPT, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, base)
    res = rec.result
    n_layers = 4
    assert len(seen) == 2 * n_layers
    cm, cwm, wm = res.stat("context_mass"), res.stat("context_word_map"), res.stat("word_map")
    assert cm.labels("query") == cm.labels("key") == STREAM_GROUPS
    sl = {"text": lay.text_slice, "image": lay.image_slice, "context": lay.context_slice}
    for i, (q, k) in enumerate(seen):
        step, layer = divmod(i, n_layers)
        assert q.shape[2] == lay.n_tokens
        P = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, -1)[0]  # [H, S, S]
        got = cm.values[step, layer, 0, 0].double()  # [H, query, key]
        for qi, qg in enumerate(STREAM_GROUPS):
            for ki, kg in enumerate(STREAM_GROUPS):
                ref = P[:, sl[qg], sl[kg]].sum(-1).mean(-1)
                assert torch.allclose(got[:, qi, ki], ref, atol=2e-6), (layer, qg, kg)
        for wi, word in enumerate(res.words):
            to_word = P[..., lay.word_positions(word)].sum(-1)  # [H, S]
            assert torch.allclose(cwm.values[step, layer, 0, 0, :, wi].double(), to_word[:, sl["context"]], atol=2e-6)
            assert torch.allclose(wm.values[step, layer, 0, 0, :, wi, : lay.n_image].double(), to_word[:, sl["image"]],
                                  atol=2e-6)
    table = context_table(res)
    assert table.shape == (n_layers, 9)
    assert np.allclose(sum(table[f"context->{k}"] for k in STREAM_GROUPS), 1.0, atol=1e-5)
    red = context_word_map(res, "red", layer=0, head="all")
    assert red.shape == (1, 4, 12, 8)
    assert torch.equal(red.flatten(-2), cwm.sel(layer=0, word="red", attention="attn").mean("step").values)


def test_context_mass_without_a_context_image_matches_the_builtin_mass():
    pipe = mp.tiny_flux_pipeline(seed=1)
    with mp.AttentionRecorder(pipe, statistics=[ContextMass(), ContextWordMap()]) as rec:
        pipe(PROMPT, generator=torch.manual_seed(0), height=H, width=W, max_sequence_length=T5, num_inference_steps=1)
    res = rec.result
    cm, mass = res.stat("context_mass").values, res.mass.values  # mass: query/key = (image, text)
    t, i, c = (STREAM_GROUPS.index(g) for g in ("text", "image", "context"))
    for (qm, km), (qc, kc) in {(0, 0): (i, i), (0, 1): (i, t), (1, 0): (t, i), (1, 1): (t, t)}.items():
        assert torch.allclose(cm[..., qc, kc], mass[..., qm, km], atol=1e-6)
    assert torch.isnan(cm[..., c, :]).all() and (cm[..., :c, c] == 0).all()
    assert "context_word_map" not in res.stats  # nothing to record without a context image


def test_a_layout_for_another_context_is_refused_and_the_model_restored(pipe, image):
    wrong = _layout(pipe, image).with_context((4, 4))
    originals = dict(pipe.transformer.attn_processors)
    with pytest.raises(mp.CallContextError, match="kontext_layout"):
        with mp.AttentionRecorder(pipe, statistics=[ContextMass()], layout=wrong):
            pipe(image=image, prompt=PROMPT, **{**KW, "num_inference_steps": 1})
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == {k: type(v) for k, v in originals.items()}
    assert "_mmdit_probe_controller" not in pipe.transformer.__dict__


def test_bad_input_names_the_fix():
    flux = mp.tiny_flux_pipeline(seed=1)
    with pytest.raises(TypeError, match="prompt_layout"):
        kontext_layout(flux, PROMPT)
    ids = torch.zeros(6, 3)
    ids[:, 1], ids[:, 2] = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    assert split_image_ids(ids).grid == (2, 3) and split_image_ids(ids).context_grid is None
    ids[:2, 0] = 1  # context tokens before the generated ones
    with pytest.raises(ValueError, match="t = 0"):
        split_image_ids(ids)
    ids[:, 0] = 0
    ids[5, 2] = 7  # not a grid
    with pytest.raises(ValueError, match="row-major grid"):
        split_image_ids(ids)


def _kontext_identity(module, args, kwargs, output):
    """The block returns its inputs, in its own (encoder_hidden_states, hidden_states) order."""
    return kwargs["encoder_hidden_states"], kwargs["hidden_states"]


@pytest.mark.parametrize("layer", [1, 2])  # a double-stream and a single-stream block
def test_skip_layers_on_kontext_equals_identity_block(pipe, image, layer):
    block = (list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks))[layer]
    h = block.register_forward_hook(_kontext_identity, with_kwargs=True)
    try:
        reference = pipe(image=image, prompt=PROMPT, generator=torch.manual_seed(0), **KW).images
    finally:
        h.remove()
    with mp.intervene(pipe, mp.SkipLayers([layer])):
        out = pipe(image=image, prompt=PROMPT, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, reference)
    assert not torch.equal(out, pipe(image=image, prompt=PROMPT, generator=torch.manual_seed(0), **KW).images)


def test_knock_out_on_kontext_covers_the_context_tokens(pipe, image):
    """``KnockOut("image->text")`` counts the context tokens as image: under it, both the generated image's and the
    context image's queries put exactly 0 on the text (ContextMass, from the q/k the kernel receives), the text's
    queries still see everything, and the output changes."""
    plain = pipe(image=image, prompt=PROMPT, generator=torch.manual_seed(0), **KW).images
    with mp.intervene(pipe, mp.KnockOut("image->text", layers=[0, 2])), \
            mp.AttentionRecorder(pipe, statistics=[ContextMass()], layout=_layout(pipe, image)) as rec:
        out = pipe(image=image, prompt=PROMPT, generator=torch.manual_seed(0), **KW).images
    cm = rec.result.stat("context_mass").values[:, :, 0, 0]  # [step, layer, head, query, key] over STREAM_GROUPS
    q = {g: i for i, g in enumerate(STREAM_GROUPS)}
    for group in ("image", "context"):
        assert (cm[:, [0, 2], :, q[group], q["text"]] == 0).all()
        assert (cm[:, [1, 3], :, q[group], q["text"]] > 0).all()
    assert (cm[:, :, :, q["text"], q["context"]] > 0).all()
    assert not torch.equal(out, plain)
