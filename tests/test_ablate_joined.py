"""Block-level ablations and activation caches on blocks that take and return the *joined* sequence
(Flux.2's single-stream blocks: ``hidden_states = [text; image]``, ``encoder_hidden_states=None``, one tensor
out; their ``attn`` returns one tensor), through the family's ``BlockIO``.

References, written here from diffusers' source rather than from mmdit_probe: an identity block (the
block returns its joined input), diffusers' own ``apply_layer_skip``, pre-hooks that zero the text part
``hidden_states[:, :n_text]`` (diffusers' Flux.2 transformer joins ``cat([encoder_hidden_states,
hidden_states])``), plain forward hooks capturing or replacing a block's / ``attn``'s output. Also: the
``attn`` of Flux.1's single blocks (separate streams in and out, one joined tensor from ``attn``), and the
refusal of pooled specs on Flux.2. Every comparison is bitwise (CPU fp32).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.hooks import LayerSkipConfig, apply_layer_skip

import mmdit_probe as mp
from mmdit_probe.ablate import AblationError
from mmdit_probe.tiny_flux2 import tiny_flux2_pipeline

PROMPT = "a red circle left of a blue square"
OTHER = "a green square right of a red circle"
L = 48  # max_sequence_length = the text length of every call
KW = dict(height=32, width=40, max_sequence_length=L, num_inference_steps=2)
SINGLE = (2, 3)  # the tiny model: double-stream layers 0, 1; single-stream layers 2, 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux2_pipeline(seed=1)


@pytest.fixture(scope="module")
def plain(pipe):
    return run(pipe)


def run(pipe, prompt=PROMPT):
    return pipe(prompt=prompt, generator=torch.manual_seed(0), output_type="latent", **KW).images


def single(pipe, layer):
    return pipe.transformer.single_transformer_blocks[layer - len(pipe.transformer.transformer_blocks)]


@contextlib.contextmanager
def hooked(module, hook, *, pre=False, with_kwargs=True):
    h = (module.register_forward_pre_hook if pre else module.register_forward_hook)(hook, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        h.remove()


def no_hooks_left(pipe) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in pipe.transformer.modules())


# ------------------------------------------------------------------------------------------ SkipLayers
def test_skip_single_block_equals_identity_and_diffusers_layer_skip(pipe, plain):
    with hooked(single(pipe, 3), lambda m, a, kw, out: kw["hidden_states"]):
        identity = run(pipe)
    apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[1], fqn="single_transformer_blocks"))
    try:
        layer_skip = run(pipe)
    finally:
        pipe.transformer._diffusers_hook.remove_hook("layer_skip_hook", recurse=True)
    with mp.intervene(pipe, mp.SkipLayers([3])):
        out = run(pipe)
    assert torch.equal(out, identity) and torch.equal(out, layer_skip) and not torch.equal(out, plain)
    assert no_hooks_left(pipe)


def test_skip_image_stream_of_single_block(pipe, plain):
    """mode="image": the image part of the joined output is the block's image input; the text part is updated."""
    def image_through(module, args, kwargs, out):
        return torch.cat([out[:, :L], kwargs["hidden_states"][:, L:]], dim=1)

    with hooked(single(pipe, 2), image_through):
        reference = run(pipe)
    with mp.intervene(pipe, mp.SkipLayers([2], mode="image")):
        out = run(pipe)
    assert torch.equal(out, reference) and not torch.equal(out, plain)


def test_skip_single_block_for_one_branch_keeps_the_other_row(pipe):
    """A bare-transformer batch of two rows labelled uncond / cond: only the cond row passes through."""
    calls = []
    with hooked(pipe.transformer, lambda m, a, kw: calls.append(kw) or None, pre=True):
        pipe(prompt=[PROMPT, OTHER], generator=torch.manual_seed(0), output_type="latent", **{**KW, "num_inference_steps": 1})
    inputs = {**calls[0], "return_dict": False}
    tr = pipe.transformer

    def cond_row_through(module, args, kwargs, out):
        out = out.clone()
        out[1] = kwargs["hidden_states"][1]
        return out

    with torch.no_grad():
        plain = tr(**inputs)[0]
        with hooked(single(pipe, 3), cond_row_through):
            reference = tr(**inputs)[0]
        with mp.intervene(tr, mp.SkipLayers([3], branch="cond"), branches=("uncond", "cond")):
            out = tr(**inputs)[0]
    assert torch.equal(out, reference)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])


# ------------------------------------------------------------------------------------------- ZeroText
def test_zero_text_on_single_block_equals_zeroing_the_joined_text_part(pipe, plain):
    lay = mp.prompt_layout(pipe, PROMPT, **{k: KW[k] for k in ("height", "width", "max_sequence_length")})
    red = [p - lay.text_slice.start for p in lay.word_positions("red")]
    assert lay.order == ("text", "image") and red

    def zeroing(positions):
        def hook(module, args, kwargs):
            hs = kwargs["hidden_states"].clone()
            hs[:, positions] = 0
            return args, {**kwargs, "hidden_states": hs}
        return hook

    for spec, positions in [(mp.ZeroText(layers=[3]), list(range(L))), (mp.ZeroText(layers=[2], words=["red"]), red)]:
        with hooked(single(pipe, spec.layers[0]), zeroing(positions), pre=True):
            reference = run(pipe)
        with mp.intervene(pipe, spec):
            out = run(pipe)
        assert torch.equal(out, reference) and not torch.equal(out, plain), spec.describe()


def test_zero_text_into_every_block(pipe, plain):
    """Default layers = every block: double-stream blocks get encoder_hidden_states zeroed, single ones the text part."""
    tr = pipe.transformer
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "encoder_hidden_states": torch.zeros_like(
        kw["encoder_hidden_states"])}), with_kwargs=True) for b in tr.transformer_blocks]
    hooks += [b.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "hidden_states": torch.cat(
        [torch.zeros_like(kw["hidden_states"][:, :L]), kw["hidden_states"][:, L:]], 1)}), with_kwargs=True)
              for b in tr.single_transformer_blocks]
    try:
        reference = run(pipe)
    finally:
        for h in hooks:
            h.remove()
    with mp.intervene(pipe, mp.ZeroText()):
        out = run(pipe)
    assert torch.equal(out, reference) and not torch.equal(out, plain)


# ---------------------------------------------------------------------------------- record / Patch
def test_record_activations_on_single_blocks_equals_the_split_output(pipe, plain):
    seen = {"block": [], "attn": []}
    hooks = [single(pipe, 2).register_forward_hook(lambda m, a, out: seen["block"].append(out.clone())),
             single(pipe, 2).attn.register_forward_hook(lambda m, a, out: seen["attn"].append(out.clone()))]
    try:
        with mp.record_activations(pipe, layers=list(SINGLE)) as cache:
            out = run(pipe)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, plain)
    assert cache.steps == (0, 1) and len(seen["block"]) == 2 and seen["block"][0].shape[1] == L + 80
    assert cache.recorded_layers("pooled") == () and not any(k[2] == "pooled" for k in cache.data)
    for step in cache.steps:
        block, attn = seen["block"][step], seen["attn"][step]
        assert torch.equal(cache.get(step, 2, "text"), block[:, :L]) and torch.equal(cache.get(step, 2, "image"), block[:, L:])
        image, text = cache.get(step, 2, "attention")
        assert torch.equal(text, attn[:, :L]) and torch.equal(image, attn[:, L:])


def test_patching_the_first_single_block_restores_the_clean_run(pipe, plain):
    """Blocks after layer 2 see the clean run's joined stream (Flux.2 has no pooled input): the output is the clean one."""
    with mp.record_activations(pipe, layers=[2, 3]) as clean:
        assert torch.equal(run(pipe), plain)
    corrupt = run(pipe, OTHER)
    assert not torch.equal(corrupt, plain)
    with mp.intervene(pipe, mp.Patch(clean, layers=[2], stream="image"), mp.Patch(clean, layers=[2], stream="text")):
        assert torch.equal(run(pipe, OTHER), plain)
    with mp.intervene(pipe, mp.Patch(clean, layers=[2], stream="image")):  # the text part stays corrupt
        partial = run(pipe, OTHER)
    assert not torch.equal(partial, plain) and not torch.equal(partial, corrupt)


def test_patch_attention_of_a_single_block_equals_replacing_its_output(pipe):
    outputs = []
    with hooked(single(pipe, 3).attn, lambda m, a, out: outputs.append(out.clone()), with_kwargs=False):
        run(pipe)
    replay = iter(outputs)
    with hooked(single(pipe, 3).attn, lambda m, a, out: next(replay), with_kwargs=False):
        reference = run(pipe, OTHER)
    with mp.record_activations(pipe, layers=[3], streams=["attention"]) as clean:
        run(pipe)
    with mp.intervene(pipe, mp.Patch(clean, layers=[3], stream="attention")):
        out = run(pipe, OTHER)
    assert torch.equal(out, reference) and not torch.equal(out, run(pipe, OTHER))


def test_flux1_single_block_attention_is_split_at_the_text_length():
    """Flux.1's single blocks take separate streams but their attn returns the joined [text, image] sequence."""
    flux = mp.tiny_flux_pipeline(seed=1)
    call = dict(height=32, width=40, max_sequence_length=16, num_inference_steps=1, output_type="latent")
    attn = flux.transformer.single_transformer_blocks[0].attn  # layer 2
    seen = []
    with hooked(attn, lambda m, a, out: seen.append(out.clone()), with_kwargs=False):
        with mp.record_activations(flux, layers=[2], streams=["attention"]) as clean:
            flux(PROMPT, generator=torch.manual_seed(0), **call)
    image, text = clean.get(0, 2, "attention")
    assert torch.equal(text, seen[0][:, :16]) and torch.equal(image, seen[0][:, 16:])
    with hooked(attn, lambda m, a, out: seen[0], with_kwargs=False):
        reference = flux(OTHER, generator=torch.manual_seed(0), **call).images
    with mp.intervene(flux, mp.Patch(clean, layers=[2], stream="attention")):
        out = flux(OTHER, generator=torch.manual_seed(0), **call).images
    assert torch.equal(out, reference)


# ------------------------------------------------------------------------------------------- refusals
def test_pooled_specs_are_refused_on_flux2_before_any_compute(pipe):
    with mp.record_activations(pipe, layers=[2]) as cache:
        run(pipe)
    cases = [(mp.ZeroText(pooled=True), r"ZeroText\(pooled=True\): Flux\.2 has no pooled text conditioning.*ZeroText\(\)"),
             (mp.Patch(cache, stream="pooled"), r"Patch\(stream='pooled'\): Flux\.2 has no pooled.*stream='text'")]
    calls = []
    with hooked(pipe.transformer, lambda m, a, kw: calls.append(1) or None, pre=True):
        for spec, match in cases:
            with pytest.raises(AblationError, match=match):
                mp.check_specs(pipe, spec)
            with pytest.raises(AblationError, match=match):
                with mp.intervene(pipe, spec):
                    run(pipe)
    assert not calls
    assert no_hooks_left(pipe)
