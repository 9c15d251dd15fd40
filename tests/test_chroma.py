"""Chroma: recording under the T5 padding mask is exact and does not perturb; layouts; ablations.

Reference for exactness: the ``(q, k, attn_mask)`` the attention kernel actually received in a
*vanilla* run (``F.scaled_dot_product_attention`` wrapped while the transformer runs), softmax in
float64 with the mask applied as SDPA defines it (boolean: drop; float: add). ``ChromaPipeline`` in
diffusers 0.42.1 builds a float 0/1 mask (an additive +1 bias, padding not removed); a boolean
``prompt_attention_mask`` gives the true padding mask, under which padding queries attend nowhere
(probability 0 on every key, as the kernel's zero output row says).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import mmdit_probe as mp
from diffusers.hooks import LayerSkipConfig, apply_layer_skip
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock
from reference import kernel_inputs as reference_kernel_inputs

from mmdit_probe.ablate import AblationError
from mmdit_probe.families.chroma import ChromaFamily
from mmdit_probe.kernels import MaskFoldError
from mmdit_probe.layout import KEY_GROUPS
from mmdit_probe.tiny_chroma import tiny_chroma_pipeline

PROMPTS = ["a red circle left of a blue square", "a green star"]
KW = dict(height=32, width=40, max_sequence_length=16, num_inference_steps=2, output_type="pt")
N_LAYERS = 4  # 2 double-stream + 2 single-stream blocks


@pytest.fixture(scope="module")
def pipe():
    return tiny_chroma_pipeline(seed=1)


def kernel_inputs(transformer):
    """Every ``(q, k, attn_mask)`` the attention kernel receives inside the transformer's forward."""
    return reference_kernel_inputs(transformer, masks=True)


def masked_softmax64(q, k, mask, knocked=None):
    """fp64 ``softmax(s·q·kᵀ + mask)`` ``[B, H, S, S]`` (boolean masks drop pairs), further dropping the
    ``knocked [B|1, 1, S, S]`` pairs; rows whose every key is dropped are 0. Also the LSE (−inf there)."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    if knocked is not None:
        logits = logits.masked_fill(knocked, float("-inf"))
    live = (logits != float("-inf")).any(-1, keepdim=True)
    return torch.softmax(logits.masked_fill(~live, 0.0), -1) * live, torch.logsumexp(logits, -1)


class RowLse(mp.Statistic):
    """The ``lse`` observers receive, per head and joint position."""

    name, dims = "row_lse", ("head", "token")

    def compute(self, call, q, k, v, lse):
        return lse.float().clone()


def _bool_mask_inputs(pipe, prompts):
    """``prompt_embeds`` and a boolean ``prompt_attention_mask`` (the padding mask Chroma was trained with)."""
    embeds, _, mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
    return dict(prompt_embeds=embeds, prompt_attention_mask=mask.bool())


def _run(pipe, mask_kind, **recorder):
    if mask_kind == "float":  # what ChromaPipeline builds (diffusers 0.42.1)
        inputs, layout = dict(prompt=PROMPTS), None
    else:
        inputs = _bool_mask_inputs(pipe, PROMPTS)
        layout = [mp.prompt_layout(pipe, p, height=32, width=40, max_sequence_length=16) for p in PROMPTS]
    with kernel_inputs(pipe.transformer) as seen:
        base = pipe(**inputs, guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    with mp.AttentionRecorder(pipe, layout=layout, **recorder) as rec:
        out = pipe(**inputs, guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    return base, out, seen, rec.result


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_every_statistic_equals_fp64_masked_softmax_and_output_is_bitwise(pipe, mask_kind):
    maps = [mp.MapSelection(q, layers=[1, 3], steps=[1]) for q in mp.QUADRANTS]
    base, out, seen, res = _run(pipe, mask_kind, groups=True, words=True, word_heads="all", entropy=True,
                                key_mass=True, maps=maps, statistics=[RowLse()])
    assert torch.equal(out, base)
    assert len(seen) == 2 * N_LAYERS and res.mass.shape["layer"] == N_LAYERS
    assert res.mass.aux["block_kind"][1] == ("joint", "joint", "single", "single")
    n_text, n_img = res.layouts[0].n_text, res.image_grid[0] * res.image_grid[1]
    txt, img = slice(0, n_text), slice(n_text, n_text + n_img)
    tol = 2e-6
    dead_rows = 0
    for i, (q, k, mask) in enumerate(seen):
        step, layer = divmod(i, N_LAYERS)
        assert mask.dtype == (torch.bool if mask_kind == "bool" else torch.float32) and mask.shape[-2:] == (96, 96)
        P, lse = masked_softmax64(q, k, mask)  # [B, H, S, S]
        at = (step, layer, 0)
        # observers' LSE: the masked one; exactly −inf where every key is masked (padding queries, boolean mask)
        got_lse = res.stat("row_lse").values[at].double()
        dead = lse == float("-inf")
        dead_rows += int(dead.sum())
        assert torch.equal(got_lse == float("-inf"), dead)
        assert torch.allclose(got_lse[~dead], lse[~dead], atol=1e-5)
        for b, lay in enumerate(res.layouts):
            Pb = P[b]  # [H, S, S]
            mass = res.mass.values[at][b].double()  # [H, query, key], (image, text)
            for qi, qs in enumerate((img, txt)):
                for ki, ks in enumerate((img, txt)):
                    assert torch.allclose(mass[:, qi, ki], Pb[:, qs, ks].sum(-1).mean(-1), atol=tol), (i, b, qi, ki)
            H_ref = -(Pb * torch.log(Pb.clamp_min(1e-300))).sum(-1)  # a row that attends nowhere: 0
            ent = res.stat("entropy").values[at][b].double()
            assert torch.allclose(ent[:, 0], H_ref[:, img].mean(-1), atol=1e-5)
            assert torch.allclose(ent[:, 1], H_ref[:, txt].mean(-1), atol=1e-5)
            km = res.stat("key_mass").values[at][b].double()  # [H, query, key_token] at joint positions
            assert torch.allclose(km[:, 0], Pb[:, img].sum(-2), atol=1e-4)
            assert torch.allclose(km[:, 1], Pb[:, txt].sum(-2), atol=1e-4)
            gm = res.stat("group_mass").values[at][b].double()  # [H, query, key_group]
            for gi, group in enumerate(KEY_GROUPS):
                pos = lay.group_positions(group)
                for qi, qs in enumerate((img, txt)):
                    ref = Pb[:, qs][..., pos].sum(-1).mean(-1) if pos else torch.zeros(Pb.shape[0], dtype=torch.float64)
                    assert torch.allclose(gm[:, qi, gi], ref, atol=tol), (group, qi)
            wm = res.stat("word_map").values[step, layer, 0, b].double()  # [H, word, image_token]
            for wi, word in enumerate(res.stat("word_map").labels("word")):
                if word in lay.words:
                    ref = Pb[:, img][..., lay.word_positions(word)].sum(-1)
                    assert torch.allclose(wm[:, wi], ref, atol=tol), word
                else:
                    assert torch.isnan(wm[:, wi]).all()
        if step == 1 and layer in (1, 3):
            sl = {"image": img, "text": txt}
            for quad in mp.QUADRANTS:
                qs, ks = quad.split("->")
                assert torch.allclose(res.attention_map(1, layer, qs, ks).double(), P[:, :, sl[qs], sl[ks]], atol=tol)
    # the boolean mask leaves padding queries with no key (and the float one never does)
    assert (dead_rows > 0) == (mask_kind == "bool")


def test_layouts_follow_the_tokenizer_ids(pipe):
    with mp.AttentionRecorder(pipe) as rec:
        pipe(PROMPTS, guidance_scale=1.0, **{**KW, "num_inference_steps": 1})
    res = rec.result
    assert rec.result.meta["family"] == "chroma"
    for prompt, lay in zip(PROMPTS, res.layouts):
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=16, truncation=True).input_ids
        assert [t.token_id for t in lay.text] == ids and [t.encoder for t in lay.text] == ["t5"] * 16
        assert lay.order == ("text", "image") and lay.prompt == prompt
        assert lay == mp.prompt_layout(pipe, prompt, height=32, width=40, max_sequence_length=16)
        n_real = len(pipe.tokenizer(prompt).input_ids) - 1  # without the EOS
        assert lay.group_positions("t5_real") == list(range(n_real))
        assert lay.group_positions("t5_special") == [n_real]
        assert lay.group_positions("t5_padding") == list(range(n_real + 1, 16))
        assert lay.words == tuple(dict.fromkeys(prompt.split()))  # distinct words, in order


def test_cfg_calls_are_cond_then_uncond(pipe):
    """``guidance_scale > 1``: per step a ``cond`` call, then an ``uncond`` call (negative prompt), one row each."""
    run = dict(negative_prompt="a green triangle", guidance_scale=4.0, **{**KW, "num_inference_steps": 3})
    with kernel_inputs(pipe.transformer) as seen:
        base = pipe(PROMPTS[0], generator=torch.manual_seed(0), **run).images
    with mp.AttentionRecorder(pipe, words=True) as rec:
        out = pipe(PROMPTS[0], generator=torch.manual_seed(0), **run).images
    res = rec.result
    assert torch.equal(out, base)
    assert res.branches == ("cond", "uncond")
    assert [lay.prompt for lay in res.layouts] == [PROMPTS[0], "a green triangle"]
    assert res.mass.shape["step"] == 3 and len(seen) == 3 * 2 * N_LAYERS
    assert res.timesteps == pytest.approx(pipe.scheduler.timesteps[:3].tolist(), rel=1e-5)
    for i, (q, k, mask) in enumerate(seen):
        step, row, layer = i // (2 * N_LAYERS), (i // N_LAYERS) % 2, i % N_LAYERS
        P, _ = masked_softmax64(q, k, mask)
        got = res.mass.values[step, layer, 0, row, :, 0, 1].double()  # image->text
        assert torch.allclose(got, P[0][:, 16:, :16].sum(-1).mean(-1), atol=2e-6), (step, row, layer)


def test_processors_and_hooks_restored_after_an_exception(pipe):
    tr = pipe.transformer
    before = dict(tr.attn_processors)

    def boom(*args):
        raise RuntimeError("boom")

    h = tr.single_transformer_blocks[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with mp.AttentionRecorder(pipe, words=True), mp.intervene(pipe, mp.KnockOut("image->text", layers=[0])):
                pipe(PROMPTS[0], guidance_scale=1.0, **KW)
    finally:
        h.remove()
    assert all(tr.attn_processors[name] is proc for name, proc in before.items())
    assert not tr._forward_pre_hooks and not tr._forward_hooks and not pipe.text_encoder._forward_hooks
    assert "_mmdit_probe_controller" not in tr.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tr.modules())


class Spy(mp.Edit):
    """Keeps the ``q, k, v`` the kernel gets and the per-head output after the attention edits."""

    def __init__(self, layers):
        super().__init__(layers)
        self.seen: list[list[torch.Tensor]] = []

    def edit_qkv(self, call, q, k, v):
        self.seen.append([q.detach().clone(), k.detach().clone(), v.detach().clone()])
        return q, k, v

    def edit_heads(self, call, out):
        self.seen[-1].append(out.detach().clone())
        return out


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
@pytest.mark.parametrize("quadrant", ["image->text", "text->image"])
def test_knock_out_equals_fp64_masked_reference(pipe, mask_kind, quadrant):
    layers = [1, 2]  # a double-stream and a single-stream block
    inputs = dict(prompt=PROMPTS[:1]) if mask_kind == "float" else _bool_mask_inputs(pipe, PROMPTS[:1])
    layout = None if mask_kind == "float" else mp.prompt_layout(pipe, PROMPTS[0], height=32, width=40,
                                                                max_sequence_length=16)
    masks = []
    attn = [pipe.transformer.transformer_blocks[1].attn, pipe.transformer.single_transformer_blocks[0].attn]
    hooks = [a.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"].clone()), with_kwargs=True)
             for a in attn]
    spy = Spy(layers)
    try:
        with mp.intervene(pipe, mp.KnockOut(quadrant, layers=layers), spy, layout=layout), \
                mp.AttentionRecorder(pipe, layers=layers, layout=layout, entropy=True) as rec:
            pipe(**inputs, guidance_scale=1.0, generator=torch.manual_seed(0), **KW)
    finally:
        for h in hooks:
            h.remove()
    assert len(spy.seen) == len(masks) == 2 * len(layers)
    n_text = 16
    qs, ks = quadrant.split("->")
    rows = torch.arange(96) < n_text if qs == "text" else torch.arange(96) >= n_text
    cols = torch.arange(96) < n_text if ks == "text" else torch.arange(96) >= n_text
    knocked = (rows[:, None] & cols[None, :])[None, None]
    for i, ((q, k, v, out), mask) in enumerate(zip(spy.seen, masks)):
        P, _ = masked_softmax64(q, k, mask, knocked)
        assert torch.allclose(out.double(), P @ v.double(), atol=1e-5), (i, (out.double() - P @ v.double()).abs().max())
        layer = layers[i % 2]
        got = rec.result.mass.values[i // 2, rec.result.mass.labels("layer").index(layer), 0, 0].double()
        sl = {"image": slice(n_text, 96), "text": slice(0, n_text)}
        for qi, qn in enumerate(("image", "text")):
            for ki, kname in enumerate(("image", "text")):
                ref = P[0][:, sl[qn], sl[kname]].sum(-1).mean(-1)
                assert torch.allclose(got[:, qi, ki], ref, atol=2e-6)
        assert (got[:, ("image", "text").index(qs), ("image", "text").index(ks)] == 0).all()
        H_ref = -(P[0] * torch.log(P[0].clamp_min(1e-300))).sum(-1)  # needs the LSE of the masked, knocked logits
        ent = rec.result.stat("entropy").values[i // 2, rec.result.mass.labels("layer").index(layer), 0, 0].double()
        assert torch.allclose(ent, torch.stack([H_ref[:, sl["image"]].mean(-1), H_ref[:, sl["text"]].mean(-1)], -1),
                              atol=1e-5)


def _identity(module, args, kwargs, output):
    """The block returns its inputs, in its own (encoder_hidden_states, hidden_states) order."""
    return kwargs["encoder_hidden_states"], kwargs["hidden_states"]


def test_skip_double_stream_block_equals_identity_block(pipe):
    block = pipe.transformer.transformer_blocks[1]
    h = block.register_forward_hook(_identity, with_kwargs=True)
    try:
        reference = pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    finally:
        h.remove()
    with mp.intervene(pipe, mp.SkipLayers([1])):
        out = pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, reference)
    assert not torch.equal(out, pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images)


@pytest.mark.parametrize("layer", [1, 3])  # a double-stream and a single-stream block
def test_skip_attention_equals_zero_attention_output(pipe, layer):
    attn = (list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks))[layer].attn

    def zero(module, args, output):
        return tuple(torch.zeros_like(o) for o in output) if isinstance(output, tuple) else torch.zeros_like(output)

    h = attn.register_forward_hook(zero)
    try:
        reference = pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    finally:
        h.remove()
    with mp.intervene(pipe, mp.SkipLayers([layer], mode="attention")):
        out = pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, reference)


@contextlib.contextmanager
def diffusers_knows_chroma_single_blocks():
    """diffusers 0.42.1 has no skip metadata for Chroma's blocks; its single block returns one tensor, the joined
    hidden states, so its metadata is ``return_hidden_states_index=0`` and no encoder output (registered here only)."""
    TransformerBlockRegistry._register()
    TransformerBlockRegistry.register(model_class=ChromaSingleTransformerBlock, metadata=TransformerBlockMetadata(
        return_hidden_states_index=0, return_encoder_hidden_states_index=None))
    try:
        yield
    finally:
        TransformerBlockRegistry._registry.pop(ChromaSingleTransformerBlock, None)


def test_skip_single_stream_block_equals_identity_and_diffusers_layer_skip(pipe):
    run = lambda: pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images  # noqa: E731
    block = pipe.transformer.single_transformer_blocks[1]  # layer 3
    h = block.register_forward_hook(lambda m, a, kw, out: kw["hidden_states"], with_kwargs=True)
    try:
        identity = run()
    finally:
        h.remove()
    with diffusers_knows_chroma_single_blocks():
        apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[1], fqn="single_transformer_blocks"))
        try:
            layer_skip = run()
        finally:
            pipe.transformer._diffusers_hook.remove_hook("layer_skip_hook", recurse=True)
    with mp.intervene(pipe, mp.SkipLayers([3])):
        out = run()
    assert torch.equal(out, identity) and torch.equal(out, layer_skip) and not torch.equal(out, run())


def test_skip_image_stream_and_zero_text_on_single_stream_block(pipe):
    """Joined ``[text; image]`` in and out: the image part passes through / the text part of the input is zeroed."""
    run = lambda: pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images  # noqa: E731
    block = pipe.transformer.single_transformer_blocks[0]  # layer 2
    lay = mp.prompt_layout(pipe, PROMPTS[0], height=32, width=40, max_sequence_length=16)
    red = lay.word_positions("red")  # joined positions: text first

    def image_through(module, args, kwargs, out):
        return torch.cat([out[:, :16], kwargs["hidden_states"][:, 16:]], dim=1)

    def zero_red(module, args, kwargs):
        hs = kwargs["hidden_states"].clone()
        hs[:, red] = 0
        return args, {**kwargs, "hidden_states": hs}

    for spec, hook, pre in ((mp.SkipLayers([2], mode="image"), image_through, False),
                            (mp.ZeroText(layers=[2], words=["red"]), zero_red, True)):
        h = (block.register_forward_pre_hook if pre else block.register_forward_hook)(hook, with_kwargs=True)
        try:
            reference = run()
        finally:
            h.remove()
        with mp.intervene(pipe, spec):
            out = run()
        assert torch.equal(out, reference), spec


def test_pooled_specs_are_refused_before_any_compute(pipe):
    with pytest.raises(AblationError, match="no pooled text conditioning"), mp.intervene(pipe, mp.ZeroText(pooled=True)):
        pass


def test_zero_text_word_on_double_stream_block(pipe):
    lay = mp.prompt_layout(pipe, PROMPTS[0], height=32, width=40, max_sequence_length=16)
    pos = [p - lay.text_slice.start for p in lay.word_positions("red")]

    def zero(module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"].clone()
        ehs[:, pos] = 0
        return args, {**kwargs, "encoder_hidden_states": ehs}

    h = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(zero, with_kwargs=True)
    try:
        reference = pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    finally:
        h.remove()
    with mp.intervene(pipe, mp.ZeroText(layers=[1], words=["red"])):
        out = pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(out, reference)


def test_family_is_chroma_and_refusal_lists_it(pipe):
    assert isinstance(mp.families.resolve_family(pipe), ChromaFamily)
    with pytest.raises(TypeError, match=r"Chroma \(ChromaTransformer2DModel\)"):
        mp.AttentionRecorder(torch.nn.Linear(2, 2))


def test_load_pipeline_reads_a_chroma_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "chroma")
    loaded = mp.load_pipeline(tmp_path / "chroma", local_files_only=True)
    assert type(loaded).__name__ == "ChromaPipeline"
    loaded.set_progress_bar_config(disable=True)
    kw = dict(guidance_scale=1.0, **{**KW, "num_inference_steps": 1})
    a = pipe(PROMPTS[0], generator=torch.manual_seed(0), **kw).images
    with mp.AttentionRecorder(loaded) as rec:
        b = loaded(PROMPTS[0], generator=torch.manual_seed(0), **kw).images
    assert torch.equal(a, b) and rec.result.meta["family"] == "chroma"


def test_a_mask_that_is_not_a_padding_mask_is_refused_before_the_kernel():
    """Flux passes ``joint_attention_kwargs`` to its processors: a causal mask there is named, not mis-recorded."""
    flux = mp.tiny_flux_pipeline(seed=0)
    causal = torch.ones(96, 96, dtype=torch.bool).tril()
    with mp.AttentionRecorder(flux), pytest.raises(MaskFoldError, match="not \\(query rows\\) × \\(keys\\)"):
        flux(PROMPTS[0], joint_attention_kwargs={"attention_mask": causal}, **{**KW, "num_inference_steps": 1})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_on_cuda(dtype):
    cuda = tiny_chroma_pipeline(seed=1).to("cuda", dtype)
    with kernel_inputs(cuda.transformer) as seen:
        base = cuda(PROMPTS, guidance_scale=1.0, generator=torch.Generator("cuda").manual_seed(0), **KW).images
    with mp.AttentionRecorder(cuda, entropy=True) as rec:
        out = cuda(PROMPTS, guidance_scale=1.0, generator=torch.Generator("cuda").manual_seed(0), **KW).images
    assert torch.equal(out, base)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for i, (q, k, mask) in enumerate(seen):
        P, _ = masked_softmax64(q.cpu(), k.cpu(), mask.cpu())
        got = rec.result.mass.values[i // N_LAYERS, i % N_LAYERS, 0, :, :, 0, 1].double()  # image->text [B, H]
        assert torch.allclose(got, P[:, :, 16:, :16].sum(-1).mean(-1), atol=tol), (i, dtype)
