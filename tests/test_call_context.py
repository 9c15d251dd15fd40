"""Call context: steps, branches, prompts and layouts per row come from the pipeline's own state.

References are independent of the recorder: our own transformer pre-hook logging what each call
received, diffusers' own PAG processors and scheduler timesteps, explicit fp64 softmax from the
model's projections (``reference.py``), and hand-written block hooks for ablations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3PAGPipeline
from diffusers.models.attention_processor import PAGJointAttnProcessor2_0
from reference import capture_attention_inputs, projections, reference_probs

import mmdit_probe as mp

PROMPT = "a red circle left of a blue square"
KW = dict(height=32, width=40, max_sequence_length=12, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return mp.tiny_sd3_pipeline("sd3", seed=1)


def _components(pipe):
    return {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}


def _log_calls(transformer, log):
    """Our own record of each transformer call: (timestep, batch, skip_layers)."""
    def hook(module, args, kwargs):
        log.append((float(kwargs["timestep"].reshape(-1)[0]), kwargs["hidden_states"].shape[0], kwargs.get("skip_layers")))
    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _mass_from_probs(P, n_img):
    """``[B, H, 2, 2]`` quadrant masses from a full fp64 softmax ``[B, H, N, N]`` ([image ; text])."""
    to_img = P[..., :n_img].sum(-1)
    return torch.stack([torch.stack([to_img[..., :n_img].mean(-1), 1 - to_img[..., :n_img].mean(-1)], -1),
                        torch.stack([to_img[..., n_img:].mean(-1), 1 - to_img[..., n_img:].mean(-1)], -1)], -2)


def test_skip_layer_guidance_rows_steps_and_layouts(pipe):
    log: list = []
    h = _log_calls(pipe.transformer, log)
    try:
        with capture_attention_inputs(pipe.transformer) as calls, mp.AttentionRecorder(pipe, words=True) as rec:
            pipe(PROMPT, num_inference_steps=6, guidance_scale=5.0, skip_guidance_layers=[2],
                 generator=torch.manual_seed(0), **KW)
    finally:
        h.remove()
    res = rec.result
    main = [c for c in log if c[2] is None]
    slg = [c for c in log if c[2] is not None]
    assert len(main) == 6 and len(slg) >= 1 and all(c[1] == 1 for c in slg)
    assert res.mass.shape["step"] == 6  # denoising steps, not transformer calls
    assert res.timesteps == pytest.approx([c[0] for c in main])
    assert res.timesteps == pytest.approx(pipe.scheduler.timesteps.tolist())
    assert res.branches == ("uncond", "cond", "slg")
    assert res.layouts[2].prompt == res.layouts[1].prompt == PROMPT and res.layouts[0].prompt == ""
    m = res.mass.values[:, 0, 0, 2, 0, 0, 0]  # slg row: finite exactly at the steps SLG ran
    slg_steps = [i for i, t in enumerate(res.timesteps) if any(abs(t - c[0]) < 1e-6 for c in slg)]
    assert [i for i in range(6) if torch.isfinite(m[i])] == slg_steps
    wm = res.stat("word_map").values
    ran = [l for l in range(4) if l != 2]  # SLG skips block 2 in its call
    assert torch.isfinite(wm[slg_steps[0], ran, 0, 2]).all()  # the slg row's word maps use the prompt's layout
    assert torch.isnan(wm[slg_steps[0], 2, 0, 2]).all()
    # exactness of the slg row against fp64 from what its attention received
    call_of = {}
    for i, (t, b, s) in enumerate(log):
        call_of.setdefault(i, (t, b, s))
    n_img = res.image_grid[0] * res.image_grid[1]
    for ci, layer, name, hs, ehs in calls:
        if call_of[ci][2] is None or name != "attn" or layer == 2:
            continue
        P = reference_probs(pipe.transformer.transformer_blocks[layer].attn, hs, ehs)
        got = res.mass.values[slg_steps[0], layer, 0, 2].double()
        assert torch.allclose(got, _mass_from_probs(P, n_img)[0], atol=2e-6)


@pytest.fixture(scope="module")
def pag(pipe):
    return StableDiffusion3PAGPipeline(**_components(pipe), pag_applied_layers=["blocks.1"])


def test_pag_rows_recorded_exactly_and_output_bitwise(pag):
    args = dict(num_inference_steps=3, guidance_scale=5.0, pag_scale=3.0, **KW)
    base = pag(PROMPT, generator=torch.manual_seed(0), **args).images
    with capture_attention_inputs(pag.transformer) as calls, mp.AttentionRecorder(pag, words=True) as rec:
        out = pag(PROMPT, generator=torch.manual_seed(0), **args).images
    assert torch.equal(out, base)
    res = rec.result
    assert res.branches == ("uncond", "cond", "perturbed")
    assert res.layouts[2].prompt == PROMPT
    assert torch.isfinite(res.mass.values[:, 1, 0]).all()  # the PAG layer is recorded for every row
    n_img = res.image_grid[0] * res.image_grid[1]
    attn = pag.transformer.transformer_blocks[1].attn
    checked = 0
    for ci, layer, name, hs, ehs in calls:
        if layer != 1 or name != "attn":
            continue
        with torch.no_grad():
            q, k = (t.double() for t in projections(attn, hs, ehs))
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = torch.zeros(logits.shape[-2:], dtype=torch.float64)
        mask[:n_img, :n_img] = float("-inf")
        mask[:n_img, :n_img].fill_diagonal_(0)  # PAG: an image query sees its own key and the text keys
        logits[2] = logits[2] + mask
        ref = _mass_from_probs(torch.softmax(logits, -1), n_img)
        assert torch.allclose(res.mass.values[ci, 1, 0].double(), ref, atol=2e-6)
        checked += 1
    assert checked == 3


def test_zero_text_cond_under_pag_touches_only_cond_row(pag):
    args = dict(num_inference_steps=2, guidance_scale=5.0, pag_scale=3.0, **KW)
    seen = []

    def zero_cond(module, a, kw):
        ehs = kw["encoder_hidden_states"].clone()
        seen.append(ehs.shape[0])
        ehs[1] = 0  # [uncond, cond, perturbed]: the cond row only
        return a, {**kw, "encoder_hidden_states": ehs}

    h = pag.transformer.transformer_blocks[0].register_forward_pre_hook(zero_cond, with_kwargs=True)
    try:
        reference = pag(PROMPT, generator=torch.manual_seed(0), **args).images
    finally:
        h.remove()
    assert set(seen) == {3}
    with mp.intervene(pag, mp.ZeroText(layers=[0], branch="cond")):
        out = pag(PROMPT, generator=torch.manual_seed(0), **args).images
    assert torch.equal(out, reference)


def test_user_edit_reproduces_pag_perturbed_prediction(pipe):
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 8, 10, generator=g), encoder_hidden_states=torch.randn(1, 89, 32, generator=g),
             pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0]))

    class SelfAndText(mp.Edit):
        """Image queries attend to their own key and the text keys only (PAG's perturbation)."""

        def edit_attention(self, call, q, k, v, out, lse):
            img, txt = call.image_slice, call.text_slice
            qi = q[:, :, img].float()
            own = call.scale * (qi * k[:, :, img].float()).sum(-1, keepdim=True)          # [B, H, N, 1]
            to_txt = call.scale * qi @ k[:, :, txt].float().transpose(-1, -2)             # [B, H, N, T]
            w = torch.softmax(torch.cat([own, to_txt], -1), -1)
            o = w[..., :1] * v[:, :, img].float() + w[..., 1:] @ v[:, :, txt].float()
            out = out.clone()
            out[:, :, img] = o.to(out.dtype)
            return out, lse

    with torch.no_grad():
        procs = dict(tr.attn_processors)
        tr.set_attn_processor({**procs, "transformer_blocks.1.attn.processor": PAGJointAttnProcessor2_0()})
        try:
            doubled = {k: torch.cat([v, v]) if v.dim() and k != "timestep" else v for k, v in x.items()}
            doubled["timestep"] = torch.cat([x["timestep"]] * 2)
            ref = tr(**doubled)[0][1:]  # PAG's perturbed row
        finally:
            tr.set_attn_processor(procs)
        with mp.intervene(tr, SelfAndText(layers=[1])):
            got = tr(**x)[0]
        plain = tr(**x)[0]
    assert (got - ref).abs().max() <= 1e-5
    assert (plain - ref).abs().max() > 1e-3  # the edit mattered


def test_prompt_embeds_rows_have_no_borrowed_layout(pipe):
    emb = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=12)
    with mp.AttentionRecorder(pipe):
        pipe(PROMPT, num_inference_steps=1, **KW)  # ids of an earlier run must not be reused
    with mp.AttentionRecorder(pipe) as rec:
        pipe(prompt_embeds=emb[0], pooled_prompt_embeds=emb[2], num_inference_steps=2, guidance_scale=5.0, **KW)
    res = rec.result
    assert res.branches == ("uncond", "cond")
    assert res.layouts[0].prompt == "" and res.layouts[1] is None
    assert res.mass.aux["prompt"][1] == (0, -1)
    with pytest.raises(mp.CallContextError, match="prompt_embeds"):
        with mp.AttentionRecorder(pipe, words=True):
            pipe(prompt_embeds=emb[0], pooled_prompt_embeds=emb[2], num_inference_steps=1, guidance_scale=5.0, **KW)


def test_img2img_steps_are_the_steps_run(pipe):
    i2i = StableDiffusion3Img2ImgPipeline(**_components(pipe))
    log: list = []
    h = _log_calls(i2i.transformer, log)
    try:
        with mp.AttentionRecorder(i2i) as rec:
            i2i(PROMPT, image=torch.rand(1, 3, 32, 40), strength=0.5, num_inference_steps=6, guidance_scale=5.0,
                max_sequence_length=12, output_type="pt")
    finally:
        h.remove()
    res = rec.result
    assert res.mass.labels("step") == tuple(range(len(log))) and len(log) == 3
    assert res.timesteps == pytest.approx([c[0] for c in log])


def test_prompt_list_with_images_per_prompt(pipe):
    prompts = [PROMPT, "a green triangle"]
    with mp.AttentionRecorder(pipe, groups=True) as rec:
        pipe(prompts, num_images_per_prompt=2, num_inference_steps=1, guidance_scale=5.0, **KW)
    res = rec.result
    assert res.branches == ("uncond",) * 4 + ("cond",) * 4
    assert res.mass.aux["prompt"][1] == (0, 0, 1, 1, 0, 0, 1, 1)
    assert [lay.prompt for lay in res.layouts[4:]] == [PROMPT, PROMPT, "a green triangle", "a green triangle"]
    clip_ids = pipe.tokenizer(prompts[1], padding="max_length", max_length=77).input_ids
    assert [t.token_id for t in res.layouts[6].tokens("clip")] == clip_ids


def test_user_statistic_matches_fp64_and_round_trips(pipe, tmp_path):
    class TextLogit(mp.Statistic):
        """Mean logit s·q·k of image queries on text keys, per head."""

        name, dims = "text_logit", ("head",)
        attentions = ("attn",)

        def compute(self, call, q, k, v, lse):
            logits = call.scale * q[:, :, call.image_slice].float() @ k[:, :, call.text_slice].float().transpose(-1, -2)
            return logits.mean((-1, -2))

    with capture_attention_inputs(pipe.transformer) as calls, mp.AttentionRecorder(pipe, statistics=[TextLogit()]) as rec:
        pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, **KW)
    res = rec.result
    st = res.stat("text_logit")
    assert st.dims == ("step", "layer", "attention", "batch", "head")
    n_img = res.image_grid[0] * res.image_grid[1]
    for ci, layer, name, hs, ehs in calls:
        with torch.no_grad():
            q, k = (t.double() for t in projections(pipe.transformer.transformer_blocks[layer].attn, hs, ehs))
        ref = (q[:, :, :n_img] @ k[:, :, n_img:].transpose(-1, -2) / q.shape[-1] ** 0.5).mean((-1, -2))
        assert torch.allclose(st.values[ci, layer, 0].double(), ref, atol=1e-5)
    path = res.save(tmp_path / "r.safetensors")
    back = mp.AttentionResult.load(path)
    assert torch.equal(back.stat("text_logit").values, st.values)
    df = back.to_dataframe("text_logit")
    assert {"branch", "prompt", "head", "value"} <= set(df.columns) and len(df) == st.values.numel()


def test_compile_once_per_shape(pipe):
    from torch._dynamo.utils import counters

    small = mp.tiny_sd3_pipeline("sd3", seed=1, num_layers=2)
    eager = small(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.manual_seed(0), **KW).images
    small.transformer = torch.compile(small.transformer)
    torch._dynamo.reset()
    counters.clear()
    after_first = {}

    def snapshot(p, i, t, kw):
        if i == 0:
            after_first.update(graphs=counters["stats"]["unique_graphs"], frames=counters["frames"]["total"])
        return kw

    with mp.AttentionRecorder(small) as rec:
        out = small(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.manual_seed(0),
                    callback_on_step_end=snapshot, **KW).images
    assert after_first["graphs"] > 0
    assert counters["stats"]["unique_graphs"] == after_first["graphs"]  # calls 2 and 3 compiled nothing
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.isfinite(rec.result.mass.values[:, :, 0]).all()


def test_word_map_bytes_estimate_equals_held(pipe):
    with mp.AttentionRecorder(pipe, words=True) as rec:
        pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, **KW)
    est, held = rec.estimated_bytes["word_map"], rec.held_bytes("word_map")
    assert held > 0 and abs(est - held) <= 0.1 * held
    with pytest.raises(mp.MapBudgetError, match="word maps"):
        with mp.AttentionRecorder(pipe, words=True, word_heads="all", map_budget_bytes=held):
            pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, **KW)


def test_sel_slices_stats_layouts_and_maps(pipe):
    maps = mp.MapSelection("image->text", layers=[1], steps=[0])
    with mp.AttentionRecorder(pipe, maps=maps) as rec:
        pipe(["", PROMPT], num_inference_steps=1, guidance_scale=5.0, **KW)
    res = rec.result
    one = res.sel(batch=[3])
    assert one.mass.shape["batch"] == 1 and len(one.layouts) == 1 and one.layouts[0].prompt == PROMPT
    (key,) = one.maps
    assert one.maps[key].shape[0] == 1 and one.map_meta[key]["batch"] == [3]
    assert torch.equal(one.maps[key][0], res.maps[key][3])
    assert one.sel(layer=[0]).maps == {}
    cond = mp.branch_view(res, "cond")
    assert cond.mass.labels("batch") == (0, 1) and [l.prompt for l in cond.layouts] == ["", PROMPT]
    assert torch.equal(cond.mass.values, res.sel(branch="cond").mass.values)
    assert torch.equal(cond.maps[key], res.maps[key][2:])
    xa = res.to_xarray()
    assert xa.dims == res.mass.dims and list(xa.coords["branch"].values) == list(res.branches)
    assert float(xa.sel(step=0, layer=1, attention="attn", batch=3, head=0, query="image", key="text")) == pytest.approx(
        float(res.mass.values[0, 1, 0, 3, 0, 0, 1]))


def test_one_selection_normaliser(pipe):
    n = np.int64(2)
    assert mp.KnockOut("image->text", layers=n).layers == (2,)
    assert mp.MapSelection("image->text", layers=n, heads=range(2)).layers == (2,)
    assert mp.AttentionRecorder(pipe, layers=n).layers == (2,)
    assert mp.AttentionRecorder(pipe, layers=3).layers == (3,)
    assert mp.AttentionRecorder(pipe, layers=torch.tensor(1)).layers == (1,)
    for bad in (1.7, [-1], "2", [], True):
        with pytest.raises((mp.SelectionError, mp.AblationError)):
            mp.MapSelection("image->text", heads=bad)
        with pytest.raises((mp.SelectionError, mp.AblationError)):
            mp.KnockOut("image->text", heads=bad)
    with pytest.raises(mp.SelectionError, match="out of range"):
        mp.AttentionRecorder(pipe, maps=mp.MapSelection("image->text", heads=[7]))


def test_fused_qkv_projections_recorded_bitwise():
    pipe = mp.tiny_sd3_pipeline("sd3", seed=2)
    pipe.transformer.fuse_qkv_projections()
    args = dict(num_inference_steps=2, guidance_scale=5.0, **KW)
    base = pipe(PROMPT, generator=torch.manual_seed(0), **args).images
    with capture_attention_inputs(pipe.transformer) as calls, mp.AttentionRecorder(pipe) as rec:
        out = pipe(PROMPT, generator=torch.manual_seed(0), **args).images
    assert torch.equal(out, base)
    assert all(type(p).__name__ == "FusedJointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())
    res = rec.result
    n_img = res.image_grid[0] * res.image_grid[1]
    for ci, layer, name, hs, ehs in calls:
        P = reference_probs(pipe.transformer.transformer_blocks[layer].attn, hs, ehs)
        assert torch.allclose(res.mass.values[ci, layer, 0].double(), _mass_from_probs(P, n_img), atol=2e-6)


def test_refused_entry_leaves_nothing_behind(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    tr = mp.tiny_sd3_pipeline("sd3", seed=3).transformer
    tr.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(TypeError, match="JointAttnProcessor2_0"):
        with mp.AttentionRecorder(tr):
            pass
    assert "_mmdit_probe_controller" not in tr.__dict__
    assert all(type(p) is AttnProcessor2_0 for p in tr.attn_processors.values())


def test_intervene_steps_on_img2img_are_the_steps_run(pipe):
    """``KnockOut(steps=[0])`` acts at the first step img2img actually runs (not at a skipped early timestep)."""
    i2i = StableDiffusion3Img2ImgPipeline(**_components(pipe))
    args = dict(image=torch.rand(1, 3, 32, 40), strength=0.5, num_inference_steps=6, guidance_scale=5.0,
                max_sequence_length=12, output_type="pt")
    with mp.intervene(i2i, mp.KnockOut("image->text", layers=[1], steps=[0])), mp.AttentionRecorder(i2i) as rec:
        i2i(PROMPT, generator=torch.manual_seed(0), **args)
    m = rec.result.mass.values[:, 1, 0, :, :, 0, 1]  # image->text at layer 1: [step, batch, head]
    assert (m[0] == 0).all() and (m[1:] > 0).all()
    with pytest.raises(mp.AblationError, match="steps \\[3\\] out of range: this run has 3 denoising steps"):
        with mp.intervene(i2i, mp.KnockOut("image->text", steps=[3])):
            i2i(PROMPT, generator=torch.manual_seed(0), **args)


def test_intervene_words_follow_each_rows_prompt(pipe):
    """With two prompts × 2 images, ``ZeroText(words=["green"], branch="cond")`` zeroes only the rows whose prompt has it."""
    prompts = [PROMPT, "a green triangle"]
    args = dict(num_images_per_prompt=2, num_inference_steps=1, guidance_scale=5.0, **KW)
    lay = mp.prompt_layout(pipe, prompts[1], height=32, width=40, max_sequence_length=12)
    pos = [p - lay.text_slice.start for p in lay.word_positions("green")]

    def zero(module, a, kw):
        ehs = kw["encoder_hidden_states"].clone()
        ehs[6:, pos] = 0  # [uncond x4, cond x4]: the cond rows of the second prompt
        return a, {**kw, "encoder_hidden_states": ehs}

    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(zero, with_kwargs=True)
    try:
        reference = pipe(prompts, generator=torch.manual_seed(0), **args).images
    finally:
        h.remove()
    with mp.intervene(pipe, mp.ZeroText(layers=[0], words=["green"], branch="cond")):
        out = pipe(prompts, generator=torch.manual_seed(0), **args).images
    assert torch.equal(out, reference)


def test_gradient_checkpointing_records_once_and_keeps_gradients():
    """Backward inside the ``with`` block: recomputed blocks are not recorded again, and edits are re-applied
    in the recomputation, so gradients equal those of the same edited model without checkpointing."""
    def grads(checkpointing: bool):
        tr = mp.tiny_sd3_pipeline("sd3", seed=1).transformer.train()
        if checkpointing:
            tr.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(0)
        x = dict(hidden_states=torch.randn(1, 16, 8, 10, generator=g), encoder_hidden_states=torch.randn(1, 89, 32, generator=g),
                 pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0]))
        with mp.intervene(tr, mp.KnockOut("image->text", layers=[1])), mp.AttentionRecorder(tr) as rec:
            tr(**x)[0].square().mean().backward()
        return rec.held_bytes("mass"), rec.result.mass.values, [p.grad.clone() for p in tr.parameters() if p.grad is not None]

    b0, m0, g0 = grads(False)
    b1, m1, g1 = grads(True)
    assert b1 == b0 and torch.equal(m1, m0)  # recorded once
    assert len(g0) == len(g1) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
