"""Tests for mmdit_probe.ablate / ablate_specs / ablate_cache: every spec against an independent reference.

References: diffusers' own ``transformer(..., skip_layers=)``, nnsight traces on a separate copy of the
transformer (NNsight replaces the wrapped module's forward), an explicit fp64 masked softmax from the
model's own projections, and plain torch hooks written here.
"""

from __future__ import annotations

import copy
import math

import pytest

import mmdit_probe as mp
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from nnsight import NNsight

from mmdit_probe.ablate import intervene
from mmdit_probe.ablate import record_activations, record_head_means
from mmdit_probe.ablate import AblationError
from mmdit_probe.ablate import AblateHeads, KnockOut, Patch, SkipLayers, ZeroText
from mmdit_probe.layout import TokenLayout
from mmdit_probe.models import tiny_sd3_pipeline
from mmdit_probe.record import AttentionRecorder

PROMPT = "a red circle left of a blue square"
CALL = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=16, guidance_scale=5.0)
N_LAYERS = 4


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pipe(request):
    return tiny_sd3_pipeline(request.param)


@pytest.fixture(scope="module")
def tr(pipe):
    return pipe.transformer


@pytest.fixture(scope="module")
def nn(tr):
    """nnsight wrapper of an identical copy (NNsight patches the module it wraps)."""
    return NNsight(copy.deepcopy(tr))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 16, 8, 12, generator=g), encoder_hidden_states=torch.randn(2, 93, 32, generator=g),
                pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.tensor([500.0, 500.0]), return_dict=False)


def run(tr, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return tr(**inputs, **extra)[0]


def run_pipe(pipe, prompt=PROMPT, **kw) -> torch.Tensor:
    return pipe(prompt, generator=torch.manual_seed(0), output_type="pt", **{**CALL, **kw}).images


def assert_restored(tr) -> None:
    assert all(type(p) is JointAttnProcessor2_0 for p in tr.attn_processors.values())
    for name, m in tr.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name or 'transformer'}"
    assert "_mmdit_probe_controller" not in tr.__dict__


def nn_zero_text(nn, inputs, layers, positions=None) -> torch.Tensor:
    """nnsight reference: zero ``encoder_hidden_states`` entering ``layers`` (at text ``positions``)."""
    with torch.no_grad(), nn.trace(**inputs):
        for k in layers:
            args, kwargs = nn.transformer_blocks[k].inputs
            kw = dict(kwargs)
            ehs = kw["encoder_hidden_states"].clone()
            if positions is None:
                ehs[:] = 0
            else:
                ehs[:, positions] = 0
            kw["encoder_hidden_states"] = ehs
            nn.transformer_blocks[k].inputs = (args, kw)
        out = nn.output.save()
    return out[0]


# ------------------------------------------------------------------------------------------ SkipLayers
@pytest.mark.parametrize("layers", [[0], [N_LAYERS - 1], [1, 2]])
def test_skip_block_equals_diffusers_skip_layers(tr, inputs, layers):
    reference = run(tr, inputs, skip_layers=layers)
    with intervene(tr, SkipLayers(layers)):
        out = run(tr, inputs)
    assert torch.equal(out, reference)
    assert not torch.equal(out, run(tr, inputs))
    assert_restored(tr)


def test_skip_block_one_branch_keeps_other_rows(tr, inputs):
    base, skipped = run(tr, inputs), run(tr, inputs, skip_layers=[1])
    with intervene(tr, SkipLayers([1], branch="cond"), branches=("uncond", "cond")):
        out = run(tr, inputs)
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], skipped[1])
    assert not torch.equal(out[1], base[1])


def test_skip_block_at_one_step_in_pipeline(pipe):
    calls = []

    def inject(module, args, kwargs):  # independent reference: diffusers' skip_layers on the 2nd call only
        calls.append(1)
        return (args, {**kwargs, "skip_layers": [2]}) if len(calls) == 2 else None

    h = pipe.transformer.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        reference = run_pipe(pipe)
    finally:
        h.remove()
    with intervene(pipe, SkipLayers([2], steps=[1])):
        out = run_pipe(pipe)
    assert torch.equal(out, reference) and not torch.equal(out, run_pipe(pipe))


@pytest.mark.parametrize("layer", [1, N_LAYERS - 1])
def test_skip_attention_and_image_stream_match_nnsight(tr, nn, inputs, layer):
    with torch.no_grad(), nn.trace(**inputs):
        o = nn.transformer_blocks[layer].attn.output
        nn.transformer_blocks[layer].attn.output = (torch.zeros_like(o[0]), torch.zeros_like(o[1]))
        if tr.transformer_blocks[layer].attn2 is not None:
            nn.transformer_blocks[layer].attn2.output = torch.zeros_like(nn.transformer_blocks[layer].attn2.output)
        no_attention = nn.output.save()
    with torch.no_grad(), nn.trace(**inputs):
        args, kwargs = nn.transformer_blocks[layer].inputs
        out = nn.transformer_blocks[layer].output
        nn.transformer_blocks[layer].output = (out[0], kwargs["hidden_states"])
        image_through = nn.output.save()
    with intervene(tr, SkipLayers([layer], mode="attention")):
        a = run(tr, inputs)
    with intervene(tr, SkipLayers([layer], mode="image")):
        b = run(tr, inputs)
    assert torch.equal(a, no_attention[0]) and torch.equal(b, image_through[0])
    base = run(tr, inputs)
    assert not torch.equal(a, base) and not torch.equal(b, base) and not torch.equal(a, b)


# ------------------------------------------------------------------------------------------- ZeroText
@pytest.mark.parametrize("layer", [0, 2, N_LAYERS - 1])
def test_zero_text_block_matches_nnsight(tr, nn, inputs, layer):
    with intervene(tr, ZeroText(layers=[layer])):
        out = run(tr, inputs)
    assert torch.equal(out, nn_zero_text(nn, inputs, [layer]))
    assert not torch.equal(out, run(tr, inputs))


def test_zero_text_every_block_and_groups_match_nnsight(tr, nn, inputs):
    with intervene(tr, ZeroText()):
        every = run(tr, inputs)
    assert torch.equal(every, nn_zero_text(nn, inputs, range(N_LAYERS)))
    layout = TokenLayout.from_prompt(tiny_sd3_pipeline("sd3"), PROMPT, height=16, width=24, max_sequence_length=16)
    with intervene(tr, ZeroText(layers=[1], groups=["t5"]), layout=layout):
        t5 = run(tr, inputs)
    assert torch.equal(t5, nn_zero_text(nn, inputs, [1], positions=list(range(77, 93))))  # T5 follows 77 CLIP positions


def test_zero_text_word_in_pipeline_touches_only_prompt_rows(pipe):
    layout = TokenLayout.from_prompt(pipe, PROMPT, height=32, width=48, max_sequence_length=16)
    pos = [p - layout.text_slice.start for p in layout.word_positions("red")]

    def zero_red(module, args, kwargs):  # reference: the cond half (row 1) holds the prompt, row 0 the empty prompt
        ehs = kwargs["encoder_hidden_states"].clone()
        ehs[1, pos] = 0
        return args, {**kwargs, "encoder_hidden_states": ehs}

    h = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(zero_red, with_kwargs=True)
    try:
        reference = run_pipe(pipe)
    finally:
        h.remove()
    with intervene(pipe, ZeroText(layers=[1], words=["Red"])):
        out = run_pipe(pipe)
    assert torch.equal(out, reference) and not torch.equal(out, run_pipe(pipe))


@pytest.mark.parametrize("branch,zeroed_batches", [("cond", (2,)), ("slg", (1,)), (None, (1, 2))])
def test_zero_text_word_with_skip_layer_guidance(pipe, branch, zeroed_batches):
    """SLG adds a cond-only call (batch 1) at some steps, labelled ``slg``: ``branch="cond"`` leaves it alone,
    ``branch="slg"`` touches only it. Reference: a hand-written block pre-hook keyed on the batch size."""
    layout = TokenLayout.from_prompt(pipe, PROMPT, height=32, width=48, max_sequence_length=16)
    pos = [p - layout.text_slice.start for p in layout.word_positions("red")]
    batches = []

    def zero_red(module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"].clone()
        batches.append(ehs.shape[0])
        if ehs.shape[0] in zeroed_batches:
            ehs[ehs.shape[0] - 1, pos] = 0  # the prompt's row (the negative prompt has no "red")
        return args, {**kwargs, "encoder_hidden_states": ehs}

    slg = dict(num_inference_steps=6, skip_guidance_layers=[2])
    h = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(zero_red, with_kwargs=True)
    try:
        reference = run_pipe(pipe, **slg)
    finally:
        h.remove()
    assert 1 in batches and 2 in batches
    with intervene(pipe, ZeroText(layers=[1], words=["red"], branch=branch)):
        out = run_pipe(pipe, **slg)
    assert torch.equal(out, reference)


def test_zero_pooled_equals_zero_pooled_projections(tr, inputs):
    reference = run(tr, {**inputs, "pooled_projections": torch.zeros_like(inputs["pooled_projections"])})
    with intervene(tr, ZeroText(pooled=True)):
        out = run(tr, inputs)
    assert torch.equal(out, reference) and not torch.equal(out, run(tr, inputs))


def test_specs_compose(tr, nn, inputs):
    with torch.no_grad(), nn.trace(**inputs, skip_layers=[0]):
        args, kwargs = nn.transformer_blocks[2].inputs
        nn.transformer_blocks[2].inputs = (args, {**kwargs, "encoder_hidden_states": torch.zeros_like(kwargs["encoder_hidden_states"])})
        reference = nn.output.save()
    with intervene(tr, SkipLayers([0]), ZeroText(layers=[2])):
        out = run(tr, inputs)
    assert torch.equal(out, reference[0])


# ------------------------------------------------------------------------------------------- KnockOut
class MaskedSoftmaxReference:
    """Joint attention as explicit fp64 softmax with ``-inf`` on one quadrant of ``heads``.

    diffusers' JointAttnProcessor2_0 concatenates [image ; text]; this reference follows it literally.
    """

    def __init__(self, quadrant: str, heads):
        self.q_stream, self.k_stream = quadrant.split("->")
        self.heads = heads

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, h = hidden_states.shape[0], attn.heads
        d = attn.to_q.out_features // h

        def proj(linear, x, norm):
            t = linear(x).view(b, -1, h, d).transpose(1, 2)
            return norm(t) if norm is not None else t

        q = torch.cat([proj(attn.to_q, hidden_states, attn.norm_q), proj(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q)], 2)
        k = torch.cat([proj(attn.to_k, hidden_states, attn.norm_k), proj(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k)], 2)
        v = torch.cat([proj(attn.to_v, hidden_states, None), proj(attn.add_v_proj, encoder_hidden_states, None)], 2)
        n_img, n = hidden_states.shape[1], q.shape[2]
        part = {"image": slice(0, n_img), "text": slice(n_img, n)}
        mask = torch.zeros(h, n, n, dtype=torch.bool)
        for head in self.heads:
            mask[head, part[self.q_stream], part[self.k_stream]] = True
        logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
        p = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
        out = (p @ v.double()).float().transpose(1, 2).reshape(b, n, h * d)
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


@pytest.mark.parametrize("quadrant", ["image->text", "image->image", "text->image", "text->text"])
@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_knock_out_equals_fp64_masked_softmax(tr, inputs, quadrant, heads):
    layer = 1
    ref_tr = copy.deepcopy(tr)
    ref_tr.transformer_blocks[layer].attn.set_processor(MaskedSoftmaxReference(quadrant, heads or range(4)))
    captured = {}

    def keep(name):
        return lambda m, a, out: captured.__setitem__(name, out)

    h1 = ref_tr.transformer_blocks[layer].attn.register_forward_hook(keep("ref"))
    reference = run(ref_tr, inputs)
    h1.remove()
    h2 = tr.transformer_blocks[layer].attn.register_forward_hook(keep("ours"))
    try:
        with intervene(tr, KnockOut(quadrant, layers=[layer], heads=heads)):
            out = run(tr, inputs)
        captured["base"] = captured["ours"]
        base = run(tr, inputs)
        captured["base"], captured["ours"] = captured["ours"], captured["base"]
    finally:
        h2.remove()
    for ours, ref in zip(captured["ours"], captured["ref"]):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    changed = {s: (o - p).abs().max() for s, o, p in zip(("image", "text"), captured["ours"], captured["base"])}
    assert changed[quadrant.split("->")[0]] > 1e-2  # the knock-out changed the attention: the comparison can fail
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert (out - base).abs().max() > 1e-4


def test_knock_out_nothing_is_bitwise_noop(tr, inputs):
    base = run(tr, inputs)
    with intervene(tr, KnockOut("image->text", steps=[1])):  # installed on every block, inactive at step 0
        assert torch.equal(run(tr, inputs), base)
        assert not torch.equal(run(tr, inputs), base)  # step 1: active
    with intervene(tr, KnockOut("image->text", branch="uncond"), branches=("cond", "uncond")):
        out = run(tr, inputs)
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])


def test_recorder_sees_knocked_out_attention(pipe):
    with intervene(pipe, KnockOut("image->text", layers=[1])):
        with AttentionRecorder(pipe, groups=True, key_mass=True, entropy=True) as rec:
            run_pipe(pipe)
    with AttentionRecorder(pipe, groups=True, key_mass=True, entropy=True) as plain:
        run_pipe(pipe)
    mass = rec.result.mass.sel(attention="attn")
    i2t = mass.sel(query="image", key="text").values  # step, layer, batch, head
    assert torch.all(i2t[:, 1] == 0) and torch.all(mass.sel(query="image", key="image").values[:, 1] == 1)
    assert torch.all(i2t[:, [0, 2, 3]] > 0)
    assert torch.all(mass.sel(query="text", key="image").values[:, 1] > 0)
    layer0 = dict(step=0, layer=0, attention="attn")  # before the knocked-out block: identical statistics
    assert torch.equal(rec.result.mass.sel(**layer0).values, plain.result.mass.sel(**layer0).values)
    group = rec.result.stat("group_mass").sel(attention="attn", layer=1, query="image").values
    assert torch.all(group[..., 1:] == 0)  # every text key group
    key_mass = rec.result.stat("key_mass").sel(attention="attn", layer=1, query="image").values
    n_image = (CALL["height"] // 4) * (CALL["width"] // 4)  # VAE factor 2, patch 2
    assert torch.all(key_mass[..., n_image:] == 0)
    torch.testing.assert_close(key_mass.sum(-1), torch.full_like(key_mass.sum(-1), float(n_image)))
    ent = rec.result.stat("entropy").sel(attention="attn", layer=1, query="image").values
    assert torch.isfinite(ent).all() and not torch.equal(ent, plain.result.stat("entropy").sel(attention="attn", layer=1, query="image").values)


# ---------------------------------------------------------------------------------------- AblateHeads
def head_columns_hook(heads, d, values=None):
    """Reference: replace the merged-head columns feeding to_out / to_add_out (0 or ``values[h]`` [N, D])."""
    def hook(module, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * d:(h + 1) * d] = 0 if values is None else values(x.shape[1])[h]
        return (x,)
    return hook


@pytest.mark.parametrize("attention", ["attn", "attn2"])
def test_ablate_heads_zero_matches_column_hooks(tr, inputs, attention):
    block = tr.transformer_blocks[1]
    if getattr(block, attention) is None:
        pytest.skip("SD3 has no attn2")
    att = getattr(block, attention)
    hook = head_columns_hook([0, 2], 8)
    hs = [att.to_out[0].register_forward_pre_hook(hook)]
    if attention == "attn":
        hs.append(att.to_add_out.register_forward_pre_hook(hook))
    reference = run(tr, inputs)
    for h in hs:
        h.remove()
    with intervene(tr, AblateHeads(layers=[1], heads=[0, 2], attention=attention)):
        out = run(tr, inputs)
    assert torch.equal(out, reference) and not torch.equal(out, run(tr, inputs))


def test_ablate_heads_mean_matches_reference_means(tr, inputs):
    ref_inputs = {**inputs, "hidden_states": inputs["hidden_states"].flip(0) * 0.5 + 0.1}
    att = tr.transformer_blocks[2].attn
    seen = []
    pre = [att.to_out[0].register_forward_pre_hook(lambda m, a: seen.append(("img", a[0].clone()))),
           att.to_add_out.register_forward_pre_hook(lambda m, a: seen.append(("txt", a[0].clone())))]
    run(tr, ref_inputs)
    for p in pre:
        p.remove()
    joint = torch.cat([dict(seen)["img"], dict(seen)["txt"]], 1).mean(0)  # [N, H*D], mean over batch rows
    means = joint.view(joint.shape[0], 4, 8).transpose(0, 1)  # [H, N, D]
    n_img = inputs["hidden_states"].shape[-2] * inputs["hidden_states"].shape[-1] // 4
    hook_img = head_columns_hook([1, 3], 8, lambda n: means[:, :n_img])
    hook_txt = head_columns_hook([1, 3], 8, lambda n: means[:, n_img:])
    hs = [att.to_out[0].register_forward_pre_hook(hook_img), att.to_add_out.register_forward_pre_hook(hook_txt)]
    reference = run(tr, inputs)
    for x in hs:
        x.remove()
    with record_head_means(tr, layers=[2]) as ref:
        run(tr, ref_inputs)
    with intervene(tr, AblateHeads(layers=[2], heads=[1, 3], mode="mean", reference=ref)):
        out = run(tr, inputs)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
    assert (out - run(tr, inputs)).abs().max() > 1e-3
    assert_restored(tr)


# ---------------------------------------------------------------------------------------------- Patch
def test_patch_run_into_itself_is_noop(pipe):
    with record_activations(pipe) as cache:
        clean = run_pipe(pipe)
    specs = [Patch(cache, stream=s) for s in ("image", "text", "attention", "pooled")]
    with intervene(pipe, *specs[:2], specs[3]):
        out_streams = run_pipe(pipe)
    with intervene(pipe, specs[2]):
        out_attention = run_pipe(pipe)
    assert torch.equal(out_streams, clean) and torch.equal(out_attention, clean)


def test_patch_every_layer_and_step_reproduces_source(pipe):
    with record_activations(pipe) as cache:
        clean = run_pipe(pipe)
    corrupt = run_pipe(pipe, "a green star above a yellow ring")
    assert not torch.equal(clean, corrupt)
    with intervene(pipe, Patch(cache, stream="image"), Patch(cache, stream="text"), Patch(cache, stream="pooled")):
        patched = run_pipe(pipe, "a green star above a yellow ring")
    assert torch.equal(patched, clean)
    with intervene(pipe, Patch(cache, layers=[1], stream="image", steps=[0])):
        partial = run_pipe(pipe, "a green star above a yellow ring")
    assert not torch.equal(partial, clean) and not torch.equal(partial, corrupt)


def test_patch_one_block_matches_nnsight(tr, nn, inputs):
    source_inputs = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].flip(1)}
    with torch.no_grad(), nn.trace(**source_inputs):
        src_attn = nn.transformer_blocks[1].attn.output.save()
        src = nn.transformer_blocks[2].output.save()
    with torch.no_grad(), nn.trace(**inputs):
        out = nn.transformer_blocks[1].attn.output
        nn.transformer_blocks[1].attn.output = (src_attn[0], src_attn[1])
        out = nn.transformer_blocks[2].output
        nn.transformer_blocks[2].output = (out[0], src[1])
        reference = nn.output.save()
    with record_activations(tr, layers=[1, 2]) as cache:
        run(tr, source_inputs)
    with intervene(tr, Patch(cache, layers=[2], stream="image"), Patch(cache, layers=[1], stream="attention")):
        out = run(tr, inputs)
    assert torch.equal(out, reference[0]) and not torch.equal(out, run(tr, inputs))


# ------------------------------------------------------------------------------------------ restoring
def _spec_factories():
    def patch(model):
        with record_activations(model) as cache:
            model(**{**_INPUTS, "encoder_hidden_states": _INPUTS["encoder_hidden_states"].flip(1)})
        return Patch(cache, layers=[1], stream="text")

    def means(model):
        with record_head_means(model, branches=("uncond", "cond")) as ref:
            model(**{**_INPUTS, "hidden_states": _INPUTS["hidden_states"].flip(0)})
        return AblateHeads(layers=[0], heads=[1], mode="mean", reference=ref)

    return {
        "skip": lambda m: SkipLayers([1]), "skip_branch": lambda m: SkipLayers([1], branch="cond"),
        "skip_attention": lambda m: SkipLayers([2], mode="attention"), "skip_image": lambda m: SkipLayers([0], mode="image"),
        "zero_text": lambda m: ZeroText(layers=[1]), "zero_pooled": lambda m: ZeroText(pooled=True),
        "knock_out": lambda m: KnockOut("text->image", layers=[2], heads=[0]), "heads": lambda m: AblateHeads(layers=[2]),
        "heads_mean": means, "patch": patch,
    }


_INPUTS = dict(hidden_states=torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)),
               encoder_hidden_states=torch.randn(2, 93, 32, generator=torch.Generator().manual_seed(2)),
               pooled_projections=torch.randn(2, 64, generator=torch.Generator().manual_seed(3)),
               timestep=torch.tensor([300.0, 300.0]), return_dict=False)


@pytest.mark.parametrize("kind", list(_spec_factories()))
def test_every_spec_restores_model_after_exception(tr, kind):
    with torch.no_grad():
        base = tr(**_INPUTS)[0]
        spec = _spec_factories()[kind](tr)
        with pytest.raises(RuntimeError, match="boom"):
            with intervene(tr, spec, branches=("uncond", "cond")):
                changed = tr(**_INPUTS)[0]
                raise RuntimeError("boom")
        assert not torch.equal(changed, base)
        assert_restored(tr)
        assert torch.equal(tr(**_INPUTS)[0], base)
        with pytest.raises(mp.CallContextError, match="transformer batch"):  # raised inside a hook mid-call
            with intervene(tr, spec, branches=("uncond", "cond", "cond")):
                tr(**_INPUTS)
        assert_restored(tr)


def test_restores_under_recorder_and_nested(pipe):
    with AttentionRecorder(pipe):
        with pytest.raises(KeyError):
            with intervene(pipe, ZeroText(layers=[0])):
                raise KeyError("x")
        assert all(type(p).__name__ == "ProbeProcessor" for p in pipe.transformer.attn_processors.values())
        assert all(not p.edits for p in pipe.transformer.attn_processors.values())
    assert_restored(pipe.transformer)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make, match", [
    (lambda: SkipLayers([]), "empty layers"),
    (lambda: SkipLayers([1], mode="mlp"), "unknown mode"),
    (lambda: ZeroText(groups=["clip", "bert"]), "unknown token group"),
    (lambda: ZeroText(words=[]), "empty words"),
    (lambda: ZeroText(pooled=True, layers=[1]), "compose it with a second spec"),
    (lambda: KnockOut("image->audio"), "unknown quadrant"),
    (lambda: KnockOut("image->text", heads=[]), "empty heads"),
    (lambda: KnockOut("image->text", steps=[-1]), "negative"),
    (lambda: AblateHeads(layers=[1], branch="both"), "branch must be"),
    (lambda: AblateHeads(layers=[1], mode="mean"), "needs reference"),
    (lambda: Patch({"a": 1}, layers=[1]), "source must be"),
])
def test_bad_specs_fail_at_construction(make, match):
    with pytest.raises(AblationError, match=match):
        make()


@pytest.mark.parametrize("spec, match", [
    (SkipLayers([4]), r"layer \[4\] out of range: this model has layers 0\.\.3"),
    (ZeroText(layers=[0, 9]), r"this model has layers 0\.\.3"),
    (KnockOut("image->text", heads=[4]), r"head \[4\] out of range: this model has heads 0\.\.3"),
    (AblateHeads(layers=[3], attention="attn2"), "have no attn2"),
])
def test_out_of_range_fails_on_entry(tr, spec, match):
    with pytest.raises(AblationError, match=match):
        with intervene(tr, spec):
            pytest.fail("entered")
    assert_restored(tr)


@pytest.mark.parametrize("specs", [
    (SkipLayers([1]), KnockOut("image->text", layers=[1])),
    (SkipLayers([1]), ZeroText()),
    (SkipLayers([2], mode="attention"), AblateHeads(layers=[2], heads=[0])),
    (KnockOut("image->text", layers=[0], heads=[0, 1]), KnockOut("image->image", layers=[0], heads=[1])),
    (SkipLayers([0], mode="image"), SkipLayers([0], mode="image", steps=[0])),
    (ZeroText(pooled=True, branch="cond"), ZeroText(pooled=True)),
])
def test_contradicting_specs_fail_on_entry(tr, specs):
    with pytest.raises(AblationError, match="contradict"):
        with intervene(tr, *specs):
            pytest.fail("entered")
    assert_restored(tr)


def test_non_contradicting_neighbours_are_accepted(tr, inputs):
    with intervene(tr, SkipLayers([1], steps=[0]), KnockOut("image->text", layers=[1], steps=[1]),
                   KnockOut("image->text", layers=[0], heads=[0]), KnockOut("image->image", layers=[0], heads=[1])):
        run(tr, inputs)


def test_patch_source_checks(tr, inputs):
    with record_activations(tr, layers=[1]) as cache:
        run(tr, inputs)
    with pytest.raises(AblationError, match="both write the same image out"):
        with intervene(tr, Patch(cache, layers=[1]), Patch(cache, layers=[1], steps=[0])):
            pass
    with pytest.raises(AblationError, match="did not record layers"):
        with intervene(tr, Patch(cache, layers=[2])):
            pass
    with pytest.raises(AblationError, match="context_pre_only"):
        with intervene(tr, Patch(cache, layers=[3], stream="text")):
            pass
    with record_activations(tr, layers=[1], streams=["image"], steps=[1], to="cpu") as later:
        run(tr, inputs)
        run(tr, inputs)
    assert later.steps == (1,) and len(later) == 1
    with pytest.raises(AblationError, match=r"no steps \[0\]"):
        with intervene(tr, Patch(later, layers=[1], steps=[0, 1])):
            pass
    with pytest.raises(AblationError, match="did not record the 'text' stream"):
        with intervene(tr, Patch(later, layers=[1], stream="text")):
            pass
    with intervene(tr, Patch(later, layers=[1])):  # steps default to every step: step 0 is missing
        with pytest.raises(AblationError, match="no image activation at step 0"):
            run(tr, inputs)
    assert_restored(tr)


@pytest.mark.parametrize("spec, match", [
    (ZeroText(words=["zebra"]), r"word 'zebra' is not in the prompt; words present: a, red, circle, left, of, blue, square"),
    (KnockOut("image->text", steps=[0, 2]), r"steps \[2\] out of range: this run has 2 denoising steps"),
    (SkipLayers([0], branch="uncond"), "selects no batch rows"),
    (ZeroText(groups=["clip_padding"], branch="uncond"), "selects no batch rows"),
])
def test_run_dependent_errors_come_before_any_block_runs(pipe, spec, match):
    blocks_run = []
    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: blocks_run.append(1))
    try:
        with pytest.raises(AblationError, match=match):
            with intervene(pipe, spec):
                run_pipe(pipe, guidance_scale=1.0 if "uncond" in str(spec) else 5.0)
    finally:
        h.remove()
    assert blocks_run == []
    assert_restored(pipe.transformer)


def test_word_checked_on_entry_with_explicit_layout(tr):
    layout = TokenLayout.from_prompt(tiny_sd3_pipeline("sd3"), PROMPT, height=16, width=24, max_sequence_length=16)
    with pytest.raises(AblationError, match="words present: a, red"):
        with intervene(tr, ZeroText(words=["zebra"]), layout=layout):
            pytest.fail("entered")
    with pytest.raises(AblationError, match="need the token layout"):
        with intervene(tr, ZeroText(words=["red"])):
            run(tr, _INPUTS)
    assert_restored(tr)


def test_describe_is_one_line():
    specs = [SkipLayers([1, 2, 3], steps=[0, 1], branch="cond"), ZeroText(layers=[0], groups=["t5"], words=["red"]),
             ZeroText(pooled=True), KnockOut("image→text", layers=[2], heads=[0, 1]), AblateHeads(layers=[1], heads=[3])]
    texts = [s.describe() for s in specs]
    assert texts == ["skip blocks 1-3 at steps 0-1 (cond)", "zero text [t5, 'red'] into block 0", "zero pooled text",
                     "knock out image->text in block 2 heads 0-1", "zero head 3 of block 1"]
    assert all("\n" not in t for t in texts)
