"""The observer does not perturb, restores on exit (also after exceptions), and rejects bad input clearly."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

import mmdit_probe as mp

PROMPT = "a red circle left of a blue square"
KW = dict(num_inference_steps=2, height=32, width=40, max_sequence_length=12, output_type="pt")


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pipe(request):
    return mp.tiny_sd3_pipeline(request.param, seed=1)


def _hooks(tr):
    mods = [tr, *tr.modules()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_recording_is_bitwise_identical(pipe, guidance):
    base = pipe(PROMPT, guidance_scale=guidance, generator=torch.manual_seed(0), **KW).images
    with mp.AttentionRecorder(pipe, groups=True, words=True, entropy=True, key_mass=True,
                              maps=mp.MapSelection("image->text")):
        rec = pipe(PROMPT, guidance_scale=guidance, generator=torch.manual_seed(0), **KW).images
    after = pipe(PROMPT, guidance_scale=guidance, generator=torch.manual_seed(0), **KW).images
    assert torch.equal(base, rec)
    assert torch.equal(base, after)


def test_processors_and_hooks_restored_after_exception(pipe):
    tr = pipe.transformer
    before = dict(tr.attn_processors)
    n_hooks = _hooks(tr) + sum(_hooks(getattr(pipe, n)) for n in ("text_encoder", "text_encoder_3"))

    def boom(p, i, t, kw):
        if i == 1:
            raise RuntimeError("boom")
        return kw

    rec = mp.AttentionRecorder(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with rec:
            assert all(type(p).__name__ == "ProbeProcessor" for p in tr.attn_processors.values())
            pipe(PROMPT, guidance_scale=5.0, callback_on_step_end=boom, **KW)
    after = tr.attn_processors
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)
    assert all(type(p) is JointAttnProcessor2_0 for p in after.values())
    assert _hooks(tr) + sum(_hooks(getattr(pipe, n)) for n in ("text_encoder", "text_encoder_3")) == n_hooks
    # what was recorded before the failure is kept: step 0 complete, step 1 complete (callback runs after it)
    res = rec.result
    assert res.mass.shape["step"] == 2
    assert not torch.isnan(res.mass.sel(attention="attn", query="image", key="text").values).any()


def test_exception_in_body_restores(pipe):
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="user error"):
        with mp.AttentionRecorder(pipe):
            raise ValueError("user error")
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())


def test_nesting_is_refused_and_reuse_works(pipe):
    rec = mp.AttentionRecorder(pipe)
    with rec:
        with pytest.raises(RuntimeError, match="already recording"):
            with mp.AttentionRecorder(pipe):
                pass
        with pytest.raises(RuntimeError, match="already recording"):
            rec.__enter__()
        pipe(PROMPT, guidance_scale=1.0, **KW)
    first = rec.result
    assert first.mass.shape["step"] == 2
    with rec:  # sequential re-use records afresh
        pipe(PROMPT, guidance_scale=1.0, num_inference_steps=3, height=32, width=40, max_sequence_length=12)
    assert rec.result.mass.shape["step"] == 3 and first.mass.shape["step"] == 2


def test_bare_transformer_and_layer_selection(pipe):
    tr = pipe.transformer
    n = len(tr.transformer_blocks)
    latents = torch.randn(2, tr.config.in_channels, 16, 20, generator=torch.manual_seed(0))
    ehs = torch.randn(2, 77 + 5, tr.config.joint_attention_dim, generator=torch.manual_seed(1))
    pooled = torch.randn(2, tr.config.pooled_projection_dim, generator=torch.manual_seed(2))
    t = torch.tensor([700.0, 700.0])
    base = tr(latents, ehs, pooled, t).sample
    with mp.AttentionRecorder(tr, layers=[0, n - 1], branches=["uncond", "cond"]) as rec:
        out = tr(latents, ehs, pooled, t).sample
    assert torch.equal(base, out)
    res = rec.result
    assert res.image_grid == (8, 10) and res.timesteps == (700.0,)
    recorded = ~torch.isnan(res.mass.values[0, :, 0, 0, 0, 0, 1])
    assert recorded.tolist() == [i in (0, n - 1) for i in range(n)]
    df = res.to_dataframe()
    assert set(df.layer) == {0, n - 1} and set(df.branch) == {"uncond", "cond"}


def test_dataframe_contract(pipe):
    with mp.AttentionRecorder(pipe) as rec:
        pipe(PROMPT, guidance_scale=5.0, generator=torch.manual_seed(0), **KW)
    res = rec.result
    df = res.to_dataframe()
    assert list(df.columns) == ["step", "timestep", "layer", "block_kind", "attention", "batch", "branch", "prompt", "head", "query", "key", "mass"]
    n_heads = pipe.transformer.config.num_attention_heads
    n_layers = len(pipe.transformer.transformer_blocks)
    n_attn2 = sum(b.attn2 is not None for b in pipe.transformer.transformer_blocks)
    assert len(df) == 2 * 2 * n_heads * (n_layers * 4 + n_attn2 * 1)
    assert set(df.attention) == ({"attn", "attn2"} if n_attn2 else {"attn"})
    sums = df[df.attention == "attn"].groupby(["step", "layer", "batch", "head", "query"]).mass.sum()
    assert torch.allclose(torch.tensor(sums.to_numpy()), torch.ones(len(sums)), atol=1e-5)
    assert (df.groupby("batch").branch.first() == ["uncond", "cond"]).all()
    assert df.step.min() == 0 and sorted(set(df.timestep)) == sorted(res.timesteps)
    # selection and reduction by name
    sel = res.sel(layer=[0, 1]).mass.mean("head", "step")
    assert sel.dims == ("layer", "attention", "batch", "query", "key") and sel.shape["layer"] == 2


# ---- bad input --------------------------------------------------------------------------
def test_wrong_model_class():
    with pytest.raises(TypeError, match="SD3Transformer2DModel.*FluxTransformer2DModel.*not supported yet"):
        mp.AttentionRecorder(torch.nn.Linear(2, 2))


def test_layer_out_of_range(pipe):
    n = len(pipe.transformer.transformer_blocks)
    with pytest.raises(ValueError, match=f"layers 0..{n - 1}"):
        mp.AttentionRecorder(pipe, layers=[n])
    with pytest.raises(ValueError, match=f"layers 0..{n - 1}"):
        mp.AttentionRecorder(pipe, maps=mp.MapSelection("image->text", layers=[n + 3]))


def test_unknown_quadrant():
    with pytest.raises(ValueError, match="image->text"):
        mp.MapSelection("image->pixels")
    with pytest.raises(ValueError, match="only the 'image->image' quadrant"):
        mp.MapSelection("image->text", attention="attn2")


def test_unknown_word(pipe):
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(KeyError, match="words present: a, red, circle"):
        with mp.AttentionRecorder(pipe, words=["zebra"]):
            pipe(PROMPT, guidance_scale=1.0, **KW)
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())
    with mp.AttentionRecorder(pipe, words=["red"]) as rec:
        pipe(PROMPT, guidance_scale=1.0, **KW)
    with pytest.raises(KeyError, match="recorded words: red"):
        rec.result.word_map("circle")
    with pytest.raises(KeyError, match="key_mass=True"):
        rec.result.stat("key_mass")


def test_over_budget_map_selection_refused_before_allocation(pipe):
    sel = mp.MapSelection("image->image")
    rec = mp.AttentionRecorder(pipe, maps=sel, map_budget_bytes=10_000)
    with pytest.raises(mp.MapBudgetError) as err:
        with rec:
            pipe(PROMPT, guidance_scale=5.0, **KW)
    n_img = (32 // 2 // 2) * (40 // 2 // 2)
    layers = len(pipe.transformer.transformer_blocks)
    need = 2 * layers * 2 * pipe.transformer.config.num_attention_heads * n_img * n_img * 4
    assert f"{need:,} bytes" in str(err.value) and "Narrow the MapSelection" in str(err.value)
    assert rec.result.maps == {}  # nothing allocated
    # a narrowed selection within budget works
    small = mp.MapSelection("image->text", layers=[0], steps=[0], heads=[1], batch=[1])
    with mp.AttentionRecorder(pipe, maps=small, map_budget_bytes=40_000) as rec:
        pipe(PROMPT, guidance_scale=5.0, **KW)
    assert rec.result.attention_map(0, 0, "image", "text").shape == (1, 1, n_img, 77 + 12)
    with pytest.raises(KeyError, match="MapSelection"):
        rec.result.attention_map(1, 0, "image", "text")


def test_group_stats_without_prompt_need_layout(pipe):
    emb = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=12)
    with pytest.raises(ValueError, match="TokenLayout.from_prompt"):
        with mp.AttentionRecorder(pipe, groups=True):
            pipe(prompt_embeds=emb[0], pooled_prompt_embeds=emb[2], guidance_scale=1.0, **KW)
    layout = mp.TokenLayout.from_prompt(pipe, PROMPT, height=32, width=40, max_sequence_length=12)
    with mp.AttentionRecorder(pipe, groups=True, layout=layout) as rec:
        pipe(prompt_embeds=emb[0], pooled_prompt_embeds=emb[2], guidance_scale=1.0, **KW)
    assert rec.result.stat("group_mass").shape["key_group"] == len(mp.KEY_GROUPS)


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_recording_bf16_is_bitwise_identical_on_cpu(variant):
    pipe = mp.tiny_sd3_pipeline(variant, seed=4, torch_dtype=torch.bfloat16)
    kw = dict(KW, guidance_scale=4.0, output_type="latent")
    base = pipe(PROMPT, generator=torch.manual_seed(0), **kw).images
    with mp.AttentionRecorder(pipe, groups=True, words=True):
        rec = pipe(PROMPT, generator=torch.manual_seed(0), **kw).images
    assert base.dtype == torch.bfloat16 and torch.equal(base, rec)


def test_model_nan_is_recorded_not_dropped():
    """A diverged run: every mass is NaN. Recorded NaN stays in the table (with a warning naming steps and layers);
    entries never recorded (unselected layers, attn2's text rows) stay absent."""
    pipe = mp.tiny_sd3_pipeline("sd35", seed=1)
    with torch.no_grad():
        pipe.transformer.pos_embed.proj.weight.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match=r"non-finite attention \(NaN/inf\) at steps \[0, 1\], layers \[0, 1\]"):
        with mp.AttentionRecorder(pipe, layers=[0, 1]) as rec:
            pipe(PROMPT, guidance_scale=5.0, generator=torch.manual_seed(0), **KW)
    res = rec.result
    df = res.to_dataframe()
    assert len(df) > 0 and df["mass"].isna().all() and set(df["layer"]) == {0, 1}
    attn = df[df["attention"] == "attn"]
    assert len(attn) == 2 * 2 * 2 * 4 * 4  # steps x layers x rows x heads x (query, key)
    table = res.quadrant_table()
    assert list(table.index) == [0, 1] and table.isna().all().all()
    back = mp.AttentionResult.load(res.save(pytest.importorskip("pathlib").Path(__import__("tempfile").mkdtemp()) / "r.safetensors"))
    assert len(back.to_dataframe()) == len(df)


def test_healthy_run_drops_only_unrecorded_entries(pipe):
    with mp.AttentionRecorder(pipe, layers=[1]) as rec:
        pipe(PROMPT, guidance_scale=5.0, generator=torch.manual_seed(0), **KW)
    st = rec.result.mass
    df = rec.result.to_dataframe()
    assert len(df) == int(torch.isfinite(st.values).sum()) and df["mass"].notna().all()


@pytest.mark.parametrize("sel, match", [(dict(steps=[5]), "steps \\[5\\] out of range: this run has 2"),
                                        (dict(batch=[9]), "batch rows \\[9\\] out of range")])
def test_map_selection_outside_the_run_is_refused_before_compute(pipe, sel, match):
    calls = []
    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            with mp.AttentionRecorder(pipe, maps=mp.MapSelection("image->text", **sel)):
                pipe(PROMPT, guidance_scale=5.0, generator=torch.manual_seed(0), **KW)
    finally:
        h.remove()
    assert calls == []  # refused before any block ran
