"""describe() on Flux.1 / Kontext: every entry checked against the configs and the inputs of real pipeline calls."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import mmdit_probe as mp
from mmdit_probe import cli
from mmdit_probe.describe import describe, format_value
from mmdit_probe.families.kontext import split_image_ids

PROMPT = "a red circle left of a blue square"


class _Stop(Exception):
    pass

H, W, T5 = 32, 40, 16


@pytest.fixture(scope="module")
def pipe():
    return mp.tiny_flux_pipeline(seed=2, num_layers=2, num_single_layers=3)


def _calls(pipe, prompt=PROMPT, **kw):
    """Keyword arguments of every transformer call of a real ``pipe(...)`` run, and the timesteps it used."""
    seen, steps = [], []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=kw.pop("num_inference_steps", 2), generator=torch.manual_seed(0),
             output_type="latent", callback_on_step_end=lambda p, i, t, c: (steps.append(float(t)), {})[1], **kw)
    finally:
        hook.remove()
    return seen, steps


def test_components_match_modules(pipe):
    d = describe(pipe)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert d.value("components", f"{name}.class") == type(module).__name__
            assert d.value("components", f"{name}.parameters") == module.num_parameters()
            assert d.value("components", f"{name}.dtype") == str(module.dtype)
    assert d.value("components", "tokenizer_2.vocab") == len(pipe.tokenizer_2)


def test_text_and_image_match_a_pipeline_call(pipe):
    measured = describe(pipe, PROMPT, height=H, width=W, max_sequence_length=T5)
    config = describe(pipe, height=H, width=W, max_sequence_length=T5)
    for item in ("T5 hidden states", "CLIP pooled (pooler_output)", "joint text length", "text_ids"):
        assert measured.value("text", item) == config.value("text", item), item
    (kw, *_), _ = _calls(pipe, height=H, width=W, max_sequence_length=T5)
    ehs, pooled, hs = kw["encoder_hidden_states"], kw["pooled_projections"], kw["hidden_states"]
    assert measured.value("text", "prompt_embeds") == tuple(ehs.shape[1:]) == measured.value("text", "T5 hidden states")
    assert measured.value("text", "pooled_prompt_embeds") == tuple(pooled.shape[1:])
    assert measured.value("text", "CLIP pooled (pooler_output)") == (pipe.transformer.config.pooled_projection_dim,)
    assert measured.value("text", "joint text length") == ehs.shape[1] == T5
    assert measured.value("text", "text_ids") == tuple(kw["txt_ids"].shape)
    assert measured.value("text", "token groups").startswith(f"{T5} (t5_real=")
    assert measured.value("image", "image tokens") == hs.shape[1]
    assert measured.value("image", "packed channels (2×2 patches)") == hs.shape[2] == pipe.transformer.config.in_channels
    assert measured.value("image", "img_ids") == tuple(kw["img_ids"].shape)
    assert measured.value("image", "patch grid") == split_image_ids(kw["img_ids"]).grid
    assert measured.value("image", "joint sequence length") == ehs.shape[1] + hs.shape[1]


def test_transformer_section_matches_config(pipe):
    cfg = pipe.transformer.config
    d = describe(pipe)
    assert d.value("transformer", "double-stream blocks") == cfg.num_layers == 2
    assert d.value("transformer", "single-stream blocks") == cfg.num_single_layers == 3
    assert d.value("transformer", "block kinds by layer") == "joint 0–1, single 2–4"
    assert d.value("transformer", "joint order") == mp.joint_order(pipe) == ("text", "image")
    assert d.value("transformer", "heads × head dim") == (
        f"{cfg.num_attention_heads} × {cfg.attention_head_dim} = {cfg.num_attention_heads * cfg.attention_head_dim}")
    assert d.value("transformer", "rotary axes (t, y, x)") == tuple(cfg.axes_dims_rope)
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert d.value("transformer", "guidance_embeds") is cfg.guidance_embeds
    with mp.AttentionRecorder(pipe) as rec:  # the recorder's layers carry the same kinds
        pipe(PROMPT, height=H, width=W, max_sequence_length=T5, num_inference_steps=1)
    kinds = rec.result.mass.aux["block_kind"][1]
    assert kinds == ("joint",) * cfg.num_layers + ("single",) * cfg.num_single_layers


@pytest.mark.parametrize("dynamic", [False, True])
def test_scheduler_matches_pipeline_and_is_not_mutated(dynamic):
    pipe = mp.tiny_flux_pipeline(seed=2)
    if dynamic:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    before = pipe.scheduler.timesteps.clone()
    d = describe(pipe, height=H, width=W, num_inference_steps=3)
    assert torch.equal(pipe.scheduler.timesteps, before)
    _, used = _calls(pipe, height=H, width=W, max_sequence_length=T5, num_inference_steps=3)
    assert d.value("scheduler", "timesteps") == pytest.approx(used, abs=0.01)
    sigmas = d.value("scheduler", "sigmas")
    assert len(sigmas) == 4 and sigmas[-1] == 0
    assert [s * 1000 for s in sigmas[:-1]] == pytest.approx(used, abs=0.1)
    assert d.value("scheduler", "dynamic shifting") is dynamic
    if dynamic:  # mu depends on the image tokens: a larger image shifts the schedule
        _, used_big = _calls(pipe, height=2 * H, width=2 * W, max_sequence_length=T5, num_inference_steps=3)
        big = describe(pipe, height=2 * H, width=2 * W, num_inference_steps=3).value("scheduler", "timesteps")
        assert big == pytest.approx(used_big, abs=0.01) and big != pytest.approx(used, abs=0.01)


def test_run_section_is_what_a_run_uses(pipe):
    d = describe(pipe, max_sequence_length=T5, num_inference_steps=3)
    assert d.value("run", "num_inference_steps") == 3 and d.value("run", "max_sequence_length") == T5
    assert d.value("run", "guidance_scale") == 3.5 and d.value("run", "true_cfg_scale") == 1.0
    assert d.value("run", "transformer calls per step") == 1
    with mp.AttentionRecorder(pipe) as rec:
        pipe(PROMPT, height=H, width=W, max_sequence_length=T5, num_inference_steps=3)
    res = rec.result
    assert len(res.timesteps) == 3 and res.branches == ("cond",)  # one row, one call per step
    assert res.layouts[0].n_text == d.value("text", "joint text length") == T5
    calls, _ = _calls(pipe, height=H, width=W, max_sequence_length=T5, num_inference_steps=3)
    assert float(calls[0]["guidance"][0]) == d.value("run", "guidance_scale")
    plain = describe(pipe)  # no shipped run kwargs: FluxPipeline's own defaults
    assert plain.value("run", "num_inference_steps") == 28 and plain.value("run", "max_sequence_length") == 512
    assert set(d.table["section"]) == {"components", "text", "image", "transformer", "scheduler", "run"}
    text = str(d)
    assert all(r.item in text and format_value(r.value) in text for r in d.rows)


def test_kontext_reports_the_rescaled_size():
    kp = mp.tiny_flux_pipeline(seed=2, kontext=True)
    d = describe(kp, height=H, width=W)
    seen = []

    def stop(module, args, kwargs):
        seen.append(kwargs)
        raise _Stop  # before the 65k-token transformer call runs

    h = kp.transformer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            kp(prompt=PROMPT, height=H, width=W, max_sequence_length=T5, num_inference_steps=1)
    finally:
        h.remove()
    assert d.value("image", "patch grid") == split_image_ids(seen[0]["img_ids"]).grid != (H // 4, W // 4)
    assert d.value("image", "image tokens") == seen[0]["hidden_states"].shape[1]
    assert d.value("run", "max_area") == 1024 ** 2 and d.value("run", "_auto_resize") is True
    assert "context image tokens" in d.section("image")


def test_cli_describes_a_flux_folder(pipe, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "flux")
    out = tmp_path / "d.csv"
    argv = ["describe", str(tmp_path / "flux"), "--prompt", PROMPT, "--max-sequence-length", str(T5), "--format", "csv",
            "-o", str(out)]
    assert cli.main(argv) == 0
    table = pd.read_csv(out)
    expected = describe(pipe, PROMPT, max_sequence_length=T5).table
    assert list(table["item"]) == list(expected["item"])
    assert table.set_index("item").loc["block kinds by layer", "value"] == "joint 0–1, single 2–4"


def test_other_families_are_refused_by_name():
    with pytest.raises(TypeError, match="not supported yet"):
        describe(torch.nn.Linear(2, 2))
