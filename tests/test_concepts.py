"""Concept maps (mmdit_probe.concepts): outputs untouched, maps equal to a hand-written fp64 reference.

The reference recomputes the concept stream on its own: concepts encoded one by one with the pipeline's
``encode_prompt``, then block by block a hand-written fp64 forward of the block's text path (adaLN, projections,
RMS qk-norm, RoPE, softmax over [image keys, concept keys], output projection, gates, MLP) from the block inputs
captured with the test's own hooks. Image attention outputs for the output-space map are captured at the input of
``attn.to_out[0]`` (Flux single blocks: the attention module's output).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import mmdit_probe as mp
from mmdit_probe.concepts import ConceptError, ConceptProbe, concept_maps
from mmdit_probe.families import model_blocks

PROMPT = "a red circle left of a blue square"
CONCEPTS = ["circle", "sky", "blue square"]
L = 12  # T5 length of every run here


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": mp.tiny_sd3_pipeline("sd3"), "sd35": mp.tiny_sd3_pipeline("sd35"), "flux": mp.tiny_flux_pipeline()}


def run_kwargs(name, steps=1):
    kw = dict(num_inference_steps=steps, max_sequence_length=L, output_type="latent")
    return kw | (dict(height=32, width=40) if name == "flux" else {})


# ---- hand-written fp64 reference ------------------------------------------------------------------------------------
def lin(x, m):
    return F.linear(x, m.weight.double(), None if m.bias is None else m.bias.double())


def ln(x, eps):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def rms(x, m):
    return x if m is None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * m.weight.double()


def gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ff(x, m):
    return lin(gelu(lin(x, m.net[0].proj)), m.net[2])


def ada(norm, temb, n):
    t = temb.double()
    return lin(t * torch.sigmoid(t), norm.linear).chunk(n, 1)


def modulate(x, eps, shift, scale):
    return ln(x, eps) * (1 + scale[:, None]) + shift[:, None]


def heads(x, h):
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def rope(x, cos, sin):
    """``x [B, H, S, D]`` rotated with ``cos, sin [S, D]`` (pairs of channels (2i, 2i+1))."""
    if cos is None:
        return x
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-im, re], -1).flatten(-2)
    return x * cos.double() + rotated * sin.double()


def attend(q, k, v, k_img, v_img):
    """Concept queries over [image keys, concept keys], fp64: (renormalised image probs, image mass, output)."""
    p = torch.softmax(torch.cat([q @ k_img.transpose(-1, -2), q @ k.transpose(-1, -2)], -1) / math.sqrt(q.shape[-1]), -1)
    n = k_img.shape[2]
    return p[..., :n] / p[..., :n].sum(-1, keepdim=True), p[..., :n].sum(-1), p @ torch.cat([v_img, v], 2)


def reference_block(block, kind, x, inp):
    """One block's concept path in fp64: (image probs [B,H,T,N], mass [B,H,T], out [B,H,T,D], next stream)."""
    attn, h = block.attn, block.attn.heads
    hs, temb = inp["hidden_states"].double(), inp["temb"]
    rot = inp.get("image_rotary_emb")
    n_txt = inp["encoder_hidden_states"].shape[1]
    cos_i, sin_i = (None, None) if rot is None else (rot[0][n_txt:], rot[1][n_txt:])
    cos_t, sin_t = (None, None) if rot is None else (rot[0][:1], rot[1][:1])
    if kind == "single":
        sh, sc, g = ada(block.norm, temb, 3)
        nh, nx = modulate(hs, block.norm.norm.eps, sh, sc), modulate(x, block.norm.norm.eps, sh, sc)
        img_k, img_v, txt = (attn.to_k, attn.to_v, (attn.to_q, attn.to_k, attn.to_v))
        qn, kn = attn.norm_q, attn.norm_k
    else:
        e = ada(block.norm1, temb, 9 if getattr(block, "use_dual_attention", False) else 6)
        nh = modulate(hs, block.norm1.norm.eps, e[0], e[1])
        img_k, img_v, txt = attn.to_k, attn.to_v, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        qn, kn = attn.norm_added_q, attn.norm_added_k
        if getattr(block, "context_pre_only", False):
            sc, sh = ada(block.norm1_context, temb, 2)
            nx = modulate(x, block.norm1_context.norm.eps, sh, sc)
        else:
            sh, sc, g, sh2, sc2, g2 = ada(block.norm1_context, temb, 6)
            nx = modulate(x, block.norm1_context.norm.eps, sh, sc)
    k_img = rope(rms(heads(lin(nh, img_k), h), attn.norm_k), cos_i, sin_i)
    v_img = heads(lin(nh, img_v), h)
    q, k = (rope(rms(heads(lin(nx, p), h), n), cos_t, sin_t) for p, n in zip(txt[:2], (qn, kn)))
    v = heads(lin(nx, txt[2]), h)
    probs, mass, out = attend(q, k, v, k_img, v_img)
    merged = out.transpose(1, 2).flatten(2)
    if kind == "single":
        nxt = x + g[:, None] * lin(torch.cat([merged, gelu(lin(nx, block.proj_mlp))], 2), block.proj_out)
    elif getattr(block, "context_pre_only", False):
        nxt = None
    else:
        x = x + g[:, None] * lin(merged, attn.to_add_out)
        nxt = x + g2[:, None] * ff(modulate(x, block.norm2_context.eps, sh2, sc2), block.ff_context)
    return probs, mass, out, nxt


def reference_concepts(pipe, concepts):
    """Concept tokens encoded one concept at a time; ``[T, C]`` after ``context_embedder`` (fp64), token owners."""
    rows, owner = [], []
    for c, concept in enumerate(concepts):
        kw = dict(device="cpu", num_images_per_prompt=1, max_sequence_length=L)
        if hasattr(pipe, "text_encoder_3"):
            emb = pipe.encode_prompt(concept, None, None, do_classifier_free_guidance=False, **kw)[0]
        else:
            emb = pipe.encode_prompt(concept, None, **kw)[0]
        lay = mp.prompt_layout(pipe, concept, max_sequence_length=L)
        pos = [t.position for t in lay.text if t.kind == "real" and t.word is not None]
        rows.append(emb[0, pos])
        owner += [c] * len(pos)
    return lin(torch.cat(rows).double(), pipe.transformer.context_embedder), torch.tensor(owner)


def capture(pipe):
    """Hooks keeping every block's inputs and the image tokens' attention outputs ``[B, N, H·D]`` (one call)."""
    tr = pipe.transformer
    kinds = mp.families.resolve_family(tr).block_kinds(tr)
    got = {"inputs": {}, "image_out": {}}
    hooks = []
    for i, (block, kind) in enumerate(zip(model_blocks(tr), kinds)):
        def pre(m, args, kwargs, i=i):
            got["inputs"][i] = dict(inspect.signature(m.forward).bind(*args, **kwargs).arguments)

        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        if kind == "single":
            def out(m, args, kwargs, output, i=i):
                got["image_out"][i] = output[:, got["inputs"][i]["encoder_hidden_states"].shape[1]:]

            hooks.append(block.attn.register_forward_hook(out, with_kwargs=True))
        else:
            hooks.append(block.attn.to_out[0].register_forward_pre_hook(
                lambda m, args, i=i: got["image_out"].__setitem__(i, args[0])))
    return got, hooks


def per_concept(x, owner, dim):
    w = torch.zeros(int(owner.max()) + 1, len(owner), dtype=x.dtype)
    w[owner, torch.arange(len(owner))] = 1
    return (x.movedim(dim, -1) @ (w / w.sum(1, keepdim=True)).t()).movedim(-1, dim)


# ---- tests ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_outputs_bitwise_unchanged(pipes, name):
    pipe = pipes[name]
    plain = pipe(PROMPT, generator=torch.manual_seed(0), **run_kwargs(name, 2)).images
    with mp.AttentionRecorder(pipe, words=True) as rec:
        alone = pipe(PROMPT, generator=torch.manual_seed(0), **run_kwargs(name, 2)).images
    with mp.AttentionRecorder(pipe, words=True) as rec2, ConceptProbe(pipe, CONCEPTS, max_sequence_length=L) as cp:
        both = pipe(PROMPT, generator=torch.manual_seed(0), **run_kwargs(name, 2)).images
    assert torch.equal(plain, alone) and torch.equal(plain, both)
    for stat in ("mass", "word_map"):  # the recorder beside the probe records what it records alone
        assert torch.equal(rec.result.stat(stat).values.nan_to_num(7), rec2.result.stat(stat).values.nan_to_num(7))
    cm = cp.result
    n_layers = len(model_blocks(pipe))
    assert cm.raw.shape[:4] == (2, n_layers, 1 if name == "flux" else 2, len(CONCEPTS))
    assert torch.isfinite(cm.raw).all() and torch.isfinite(cm.scores).all()


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_recorder_concepts_equal_a_probe_beside_it(pipes, name):
    """``AttentionRecorder(..., concepts=...)`` enters a ConceptProbe with it: ``rec.concepts`` equals the maps of a
    separate probe beside a plain recorder, the recorded statistics are unchanged, and the probe leaves with it."""
    pipe = pipes[name]
    opts = {"max_sequence_length": L}
    with mp.AttentionRecorder(pipe, words=True) as rec, ConceptProbe(pipe, CONCEPTS, **opts) as cp:
        a = pipe(PROMPT, generator=torch.manual_seed(0), **run_kwargs(name, 2)).images
    with mp.AttentionRecorder(pipe, words=True, concepts=CONCEPTS, concept_options=opts) as rec2:
        b = pipe(PROMPT, generator=torch.manual_seed(0), **run_kwargs(name, 2)).images
    assert torch.equal(a, b)
    for field in ("raw", "image_mass", "scores", "output_space"):
        assert torch.equal(getattr(rec2.concepts, field), getattr(cp.result, field))
    assert torch.equal(rec.result.mass.values.nan_to_num(7), rec2.result.mass.values.nan_to_num(7))
    with pytest.raises(ConceptError):
        mp.AttentionRecorder(pipe, concepts=["!!!"])  # refused when the recorder is built, before any run
    assert mp.AttentionRecorder(pipe).concepts is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model_blocks(pipe))


@pytest.mark.parametrize("name,heads", [("sd3", "mean"), ("sd35", "all"), ("flux", "all")])
def test_maps_equal_fp64_reference(pipes, name, heads):
    pipe, tr = pipes[name], pipes[name].transformer
    got, hooks = capture(pipe)
    try:
        cm = concept_maps(pipe, CONCEPTS, PROMPT, generator=torch.manual_seed(0), heads=heads, **run_kwargs(name))
    finally:
        for h in hooks:
            h.remove()
    x, owner = reference_concepts(pipe, CONCEPTS)
    kinds = mp.families.resolve_family(tr).block_kinds(tr)
    x = x.expand(got["inputs"][0]["hidden_states"].shape[0], -1, -1)
    assert {k for k in kinds} == ({"joint", "single"} if name == "flux" else {"joint"})
    for layer, (block, kind) in enumerate(zip(model_blocks(tr), kinds)):
        probs, mass, out, nxt = reference_block(block, kind, x, got["inputs"][layer])
        raw, m = per_concept(probs, owner, 2), per_concept(mass, owner, 2)  # [B,H,C,N], [B,H,C]
        raw, m = (raw.mean(1), m.mean(1)) if heads == "mean" else (raw.transpose(1, 2), m.transpose(1, 2))
        torch.testing.assert_close(cm.raw[0, layer].flatten(-2).double(), raw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cm.image_mass[0, layer].double(), m, rtol=1e-5, atol=1e-7)
        # output space: captured image attention outputs · the concept's (fp64 reference) attention output
        img = got["image_out"][layer].double()  # [B, N, H·D]
        concept_out = per_concept(out, owner, 2).transpose(1, 2).flatten(2)  # [B, C, H·D]
        scores = img @ concept_out.transpose(1, 2)  # [B, N, C]
        torch.testing.assert_close(cm.scores[0, layer].flatten(-2).double(), scores.transpose(1, 2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cm.output_space[0, layer].flatten(-2).double(),
                                   torch.softmax(scores, -1).transpose(1, 2), rtol=1e-5, atol=1e-7)
        if nxt is None:
            assert layer == len(kinds) - 1 and block.context_pre_only  # SD3's last block ends the text stream
        x = nxt


def test_layer_and_step_selection_and_bare_call_match_the_full_run(pipes):
    pipe = pipes["sd35"]
    seen = {}

    def keep(module, args, kwargs):  # the inputs of the pipeline's first transformer call
        seen.setdefault("kw", dict(kwargs))

    h = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        full = concept_maps(pipe, CONCEPTS, PROMPT, generator=torch.manual_seed(0), **run_kwargs("sd35", 2))
    finally:
        h.remove()
    part = concept_maps(pipe, CONCEPTS, PROMPT, generator=torch.manual_seed(0), layers=[2], steps=[1],
                        **run_kwargs("sd35", 2))
    assert part.layers == (2,) and part.steps == (1,)
    torch.testing.assert_close(part.raw[0, 0], full.raw[1, 2], rtol=0, atol=0)
    torch.testing.assert_close(part.scores[0, 0], full.scores[1, 2], rtol=0, atol=0)
    # one bare transformer call (what analyse_image does) with the first call's inputs
    bare = concept_maps(pipe, CONCEPTS, call=lambda: pipe.transformer(**seen["kw"]), target=pipe.transformer,
                        branches=["uncond", "cond"], max_sequence_length=L)
    assert bare.branches == ("uncond", "cond") and bare.steps == (0,)
    torch.testing.assert_close(bare.raw[0], full.raw[0], rtol=0, atol=0)
    torch.testing.assert_close(bare.scores[0], full.scores[0], rtol=0, atol=0)
    assert torch.equal(bare.call_output[0], pipe.transformer(**seen["kw"])[0])
    # the accessors aggregate what is stored
    c = full.concept_index("sky")
    torch.testing.assert_close(full.raw_map("sky", layer=[1, 2]), full.raw[:, 1:3, full.row("cond"), c].mean((0, 1)))
    torch.testing.assert_close(full.output_map("sky"), full.output_space[:, :, 1, c].mean((0, 1)))
    ds = full.to_xarray()
    assert ds.raw.dims == ("step", "layer", "row", "concept", "y", "x") and list(ds.branch.values) == ["uncond", "cond"]


def untouched(pipe):
    tr = pipe.transformer
    mods = [tr] + model_blocks(tr)
    return (all(not m._forward_pre_hooks and not m._forward_hooks for m in mods)
            and "_mmdit_probe_controller" not in tr.__dict__
            and all(type(p).__name__ in ("JointAttnProcessor2_0", "FluxAttnProcessor") for p in tr.attn_processors.values()))


def counting(*mods):
    calls = {"n": 0}
    hs = [m.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for m in mods]
    return calls, hs


@pytest.mark.parametrize("concepts,match", [([], "empty"), ("dog", "list of strings"), (["dog", ""], "no word token"),
                                            (["!!!"], "no word token"), (["dog", "Dog"], "same concept"),
                                            ([3], "strings")])
def test_bad_concepts_refused_before_compute(pipes, concepts, match):
    pipe = pipes["sd3"]
    calls, hs = counting(pipe.transformer, pipe.text_encoder, pipe.text_encoder_3)
    try:
        with pytest.raises(ConceptError, match=match):
            concept_maps(pipe, concepts, PROMPT, **run_kwargs("sd3"))
    finally:
        for h in hs:
            h.remove()
    assert calls["n"] == 0 and untouched(pipe)


def test_bad_models_and_options_refused_before_compute(pipes):
    pipe = pipes["flux"]
    calls, hs = counting(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    blocks, block_hooks = counting(*model_blocks(pipe))
    try:
        with pytest.raises(TypeError, match="supports"):
            concept_maps(torch.nn.Linear(2, 2), ["dog"], PROMPT)
        with pytest.raises(ConceptError, match="target=pipe.transformer"):
            ConceptProbe(pipe.transformer, ["dog"])
        with pytest.raises(ConceptError, match="either prompt"):
            concept_maps(pipe, ["dog"])
        with pytest.raises(ConceptError, match="heads"):
            ConceptProbe(pipe, ["dog"], heads="max")
        with pytest.raises(mp.SelectionError, match="out of range"):
            ConceptProbe(pipe, ["dog"], layers=[9])
        assert calls["n"] == 0
        with pytest.raises(mp.MapBudgetError, match="budget"):  # at the run's first transformer call, before any block
            concept_maps(pipe, ["dog"], PROMPT, budget_bytes=1000, **run_kwargs("flux"))
    finally:
        for h in hs + block_hooks:
            h.remove()
    assert blocks["n"] == 0 and untouched(pipe)


def test_hooks_removed_after_an_exception(pipes):
    pipe = pipes["flux"]
    plain = pipe(PROMPT, generator=torch.manual_seed(0), **run_kwargs("flux", 2)).images

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    probe = ConceptProbe(pipe, CONCEPTS, max_sequence_length=L)
    with pytest.raises(RuntimeError, match="boom"):
        with probe:
            pipe(PROMPT, generator=torch.manual_seed(0), callback_on_step_end=boom, **run_kwargs("flux", 2))
    assert untouched(pipe)
    assert probe.result.steps == (0,) and torch.isfinite(probe.result.raw).all()  # the step that ran is kept
    assert torch.equal(plain, pipe(PROMPT, generator=torch.manual_seed(0), **run_kwargs("flux", 2)).images)
