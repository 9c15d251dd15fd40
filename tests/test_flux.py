"""Flux.1: recording is exact and does not perturb; rows, steps and layers labelled; ablations apply.

Reference for exactness: the q/k the attention kernel actually received in a *vanilla* run
(``F.scaled_dot_product_attention`` wrapped by the test while the transformer runs, so the text
encoders' own attention is not captured), softmax in float64. Reference for skipped blocks: an
identity block written here, returning the block's inputs in its own ``(text, image)`` order
(diffusers' ``apply_layer_skip`` swaps the streams on Flux, design.md §11).
"""

from __future__ import annotations


import pytest
import torch

import mmdit_probe as mp
from reference import kernel_inputs

PROMPT = "a red circle left of a blue square"
KW = dict(height=32, width=40, max_sequence_length=16, num_inference_steps=2, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return mp.tiny_flux_pipeline(seed=1)




def test_recording_is_exact_and_bitwise(pipe):
    with kernel_inputs(pipe.transformer) as seen:
        base = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    with mp.AttentionRecorder(pipe, groups=True, words=True, word_heads="all") as rec:
        out = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, base)
    res = rec.result
    n_layers = 4
    assert len(seen) == 2 * n_layers and res.mass.shape["layer"] == n_layers
    assert res.mass.aux["block_kind"][1] == ("joint", "joint", "single", "single")
    lay = res.layouts[0]
    n_text, n_img = lay.n_text, res.image_grid[0] * res.image_grid[1]
    assert lay.order == ("text", "image") and n_text == 16 and n_img == 80
    assert [t.encoder for t in lay.text] == ["t5"] * 16  # T5 only: CLIP is pooled only on Flux
    for i, (q, k) in enumerate(seen):
        step, layer = divmod(i, n_layers)
        logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
        P = torch.softmax(logits, -1)[0]  # [H, S, S], text first
        to_text = P[..., :n_text].sum(-1)
        got = res.mass.values[step, layer, 0, 0].double()  # [H, query, key] with query/key = (image, text)
        assert torch.allclose(got[:, 0, 1], to_text[:, n_text:].mean(-1), atol=2e-6)
        assert torch.allclose(got[:, 1, 1], to_text[:, :n_text].mean(-1), atol=2e-6)
        gm = res.stat("group_mass").values[step, layer, 0, 0].double()
        t5_real = lay.group_positions("t5_real")
        assert torch.allclose(gm[:, 0, 4], P[:, n_text:, t5_real].sum(-1).mean(-1), atol=2e-6)
        wm = res.stat("word_map").values[step, layer, 0, 0].double()  # [H, word, image_token]
        for wi, word in enumerate(res.words):
            ref = P[:, n_text:, lay.word_positions(word)].sum(-1)
            assert torch.allclose(wm[:, wi], ref, atol=2e-6)


def test_true_cfg_rows_and_steps(pipe):
    with mp.AttentionRecorder(pipe, words=True) as rec:
        pipe(PROMPT, negative_prompt="a green triangle", true_cfg_scale=2.0, generator=torch.manual_seed(0),
             **{**KW, "num_inference_steps": 3})
    res = rec.result
    assert res.branches == ("cond", "uncond")
    assert [lay.prompt for lay in res.layouts] == [PROMPT, "a green triangle"]
    assert res.mass.shape["step"] == 3 and torch.isfinite(res.mass.values).all()
    assert res.timesteps == pytest.approx((pipe.scheduler.timesteps[:3]).tolist(), rel=1e-5)


def test_prompt_layout_matches_the_recorded_one(pipe):
    with mp.AttentionRecorder(pipe) as rec:
        pipe(PROMPT, **{**KW, "num_inference_steps": 1})
    assert mp.prompt_layout(pipe, PROMPT, height=32, width=40, max_sequence_length=16) == rec.result.layouts[0]
    with pytest.raises(TypeError, match="prompt_layout"):
        mp.TokenLayout.from_prompt(pipe, PROMPT)


def _identity(module, args, kwargs, output):
    """The block returns its inputs, in its own (encoder_hidden_states, hidden_states) order."""
    return kwargs["encoder_hidden_states"], kwargs["hidden_states"]


@pytest.mark.parametrize("layer", [1, 3])  # a double-stream and a single-stream block
def test_skip_layers_equals_identity_block(pipe, layer):
    block = (list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks))[layer]
    h = block.register_forward_hook(_identity, with_kwargs=True)
    try:
        reference = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    finally:
        h.remove()
    with mp.intervene(pipe, mp.SkipLayers([layer])):
        out = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, reference)
    assert not torch.equal(out, pipe(PROMPT, generator=torch.manual_seed(0), **KW).images)


def test_knock_out_is_recorded_and_changes_output(pipe):
    plain = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    with mp.intervene(pipe, mp.KnockOut("image->text", layers=[0, 2])), mp.AttentionRecorder(pipe) as rec:
        out = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    m = rec.result.mass.values[:, :, 0, 0, :, 0, 1]  # image->text mass [step, layer, head]
    assert (m[:, [0, 2]] == 0).all() and (m[:, [1, 3]] > 0).all()
    assert not torch.equal(out, plain)


def test_unsupported_family_is_named():
    with pytest.raises(TypeError, match="not supported yet"):
        mp.AttentionRecorder(torch.nn.Linear(2, 2))


def test_load_pipeline_reads_a_flux_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "flux")
    loaded = mp.load_pipeline(tmp_path / "flux", local_files_only=True)
    assert type(loaded).__name__ == "FluxPipeline"
    loaded.set_progress_bar_config(disable=True)
    a = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    with mp.AttentionRecorder(loaded) as rec:
        b = loaded(PROMPT, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(a, b) and rec.result.meta["family"] == "flux"


def test_patching_every_stream_restores_the_clean_run(pipe):
    """Blocks after layer 1 see the clean run's streams and pooled conditioning: the output is the clean one."""
    clean_out = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    with mp.record_activations(pipe, layers=[1]) as clean:
        pipe(PROMPT, generator=torch.manual_seed(0), **KW)
    specs = [mp.Patch(clean, layers=[1], stream="image"), mp.Patch(clean, layers=[1], stream="text"),
             mp.Patch(clean, stream="pooled")]
    with mp.intervene(pipe, *specs):
        out = pipe("a green triangle", generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, clean_out)


def test_zero_text_word_on_single_stream_block(pipe):
    lay = mp.prompt_layout(pipe, PROMPT, height=32, width=40, max_sequence_length=16)
    pos = [p - lay.text_slice.start for p in lay.word_positions("red")]
    block = pipe.transformer.single_transformer_blocks[0]  # layer 2

    def zero(module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"].clone()
        ehs[:, pos] = 0
        return args, {**kwargs, "encoder_hidden_states": ehs}

    h = block.register_forward_pre_hook(zero, with_kwargs=True)
    try:
        reference = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    finally:
        h.remove()
    with mp.intervene(pipe, mp.ZeroText(layers=[2], words=["red"])):
        out = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, reference)



def test_schedule_is_the_one_the_pipeline_runs(pipe):
    """``mp.schedule`` on Flux reproduces FluxPipeline's sigmas and resolution-dependent mu: its timesteps equal the
    timesteps the transformer receives (×1000) in a real call."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(float(kw["timestep"].reshape(-1)[0]) * 1000), with_kwargs=True)
    try:
        pipe(PROMPT, generator=torch.manual_seed(0), **{**KW, "num_inference_steps": 4})
    finally:
        hook.remove()
    sched = mp.schedule(pipe, 4, height=KW["height"], width=KW["width"])
    assert len(seen) == 4 and sched.timesteps == pytest.approx(seen, abs=1e-3)


def test_one_negative_prompt_for_a_batch_of_prompts(pipe):
    """True CFG with one negative prompt for two prompts: the uncond call's single text row is broadcast by the model;
    every uncond row is labelled with the negative prompt's layout, and the output is unchanged."""
    kw = {**KW, "num_inference_steps": 1}
    prompts = [PROMPT, "a green triangle"]
    base = pipe(prompts, negative_prompt="a blue star", true_cfg_scale=4.0, generator=torch.manual_seed(0), **kw).images
    with mp.AttentionRecorder(pipe, words=True) as rec:
        out = pipe(prompts, negative_prompt="a blue star", true_cfg_scale=4.0, generator=torch.manual_seed(0), **kw).images
    assert torch.equal(out, base)
    res = rec.result
    neg = mp.prompt_layout(pipe, "a blue star", height=KW["height"], width=KW["width"], max_sequence_length=16)
    uncond = [lay for b, lay in zip(res.branches, res.layouts) if b == "uncond"]
    cond = [lay for b, lay in zip(res.branches, res.layouts) if b == "cond"]
    assert len(uncond) == 2 and all(lay.text == neg.text for lay in uncond)
    assert [lay.prompt for lay in cond] == prompts


@pytest.mark.parametrize("fqn,index,layer", [("transformer_blocks", 1, 1), ("single_transformer_blocks", 1, 3)])
def test_skip_layers_equals_diffusers_layer_skip(pipe, fqn, index, layer):
    """``SkipLayers`` equals diffusers' own ``LayerSkipConfig`` + ``apply_layer_skip`` bitwise. diffusers' skip hook
    returns ``(hidden, encoder)``; its block registry says in which order the block returns them, so the reference
    puts them back in that order (the trap in design.md §11)."""
    from diffusers.hooks import HookRegistry, LayerSkipConfig, apply_layer_skip
    from diffusers.hooks._helpers import TransformerBlockRegistry

    block = getattr(pipe.transformer, fqn)[index]
    meta = TransformerBlockRegistry.get(type(block))

    def reorder(module, args, kwargs, output):
        out = [None, None]
        out[meta.return_hidden_states_index], out[meta.return_encoder_hidden_states_index] = output
        return tuple(out)

    apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[index], fqn=fqn))
    h = block.register_forward_hook(reorder, with_kwargs=True)
    try:
        reference = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    finally:
        h.remove()
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("layer_skip_hook", recurse=True)
    with mp.intervene(pipe, mp.SkipLayers([layer])):
        out = pipe(PROMPT, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, reference)
    assert not torch.equal(out, pipe(PROMPT, generator=torch.manual_seed(0), **KW).images)
