"""describe(): every entry checked against the configs and against shapes measured in real calls."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from mmdit_probe import AttentionRecorder, cli
from mmdit_probe.describe import Description, describe, format_value
from mmdit_probe.models import _tiny_clip, tiny_sd3_pipeline
from mmdit_probe.shapes import default_pipeline, default_run_kwargs

PROMPT = "a red circle left of a blue square"
H, W, T5_LEN = 32, 48, 16


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pipe(request):
    return tiny_sd3_pipeline(request.param)


def _transformer_inputs(pipe, prompt=PROMPT, **kw):
    """kwargs the transformer receives in a real pipeline call (forward pre-hook), and the timesteps used."""
    seen, steps = [], []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    tok = pipe.transformer.pos_embed.register_forward_hook(lambda m, a, out: seen[-1].__setitem__("_tokens", out.shape))
    try:
        pipe(prompt, num_inference_steps=kw.pop("num_inference_steps", 2), generator=torch.manual_seed(0),
             output_type="latent", callback_on_step_end=lambda p, i, t, c: (steps.append(float(t)), {})[1], **kw)
    finally:
        hook.remove()
        tok.remove()
    return seen, steps


def test_components_match_modules(pipe):
    d = describe(pipe)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert d.value("components", f"{name}.class") == type(module).__name__
            assert d.value("components", f"{name}.parameters") == module.num_parameters()
            assert d.value("components", f"{name}.dtype") == str(module.dtype)
            assert d.value("components", f"{name}.device") == str(module.device)
    assert d.value("components", "tokenizer_3.vocab") == len(pipe.tokenizer_3)


def test_text_shapes_measured_equal_configs_and_pipeline(pipe):
    measured = describe(pipe, PROMPT, height=H, width=W, max_sequence_length=T5_LEN)
    config = describe(pipe, height=H, width=W, max_sequence_length=T5_LEN)
    for item in ("CLIP-L hidden_states[-2]", "CLIP-L pooled (text_embeds)", "CLIP-G hidden_states[-2]",
                 "CLIP-G pooled (text_embeds)", "T5 hidden states", "joint text length", "pooled (L ⊕ G)"):
        assert measured.value("text", item) == config.value("text", item), item
    te, te2, te3 = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.text_encoder_3.config
    assert measured.value("text", "CLIP-L hidden_states[-2]") == (pipe.tokenizer_max_length, te.hidden_size)
    assert measured.value("text", "CLIP-G pooled (text_embeds)") == (te2.projection_dim,)
    assert measured.value("text", "T5 hidden states") == (T5_LEN, te3.d_model)
    assert measured.value("text", "CLIP joined width (L ⊕ G)") == te.hidden_size + te2.hidden_size
    seen, _ = _transformer_inputs(pipe, height=H, width=W, max_sequence_length=T5_LEN, guidance_scale=1.0)
    ehs, pooled = seen[0]["encoder_hidden_states"], seen[0]["pooled_projections"]
    assert measured.value("text", "joint text length") == ehs.shape[1]
    assert measured.value("text", "prompt_embeds") == tuple(ehs.shape[1:])
    assert measured.value("text", "pooled (L ⊕ G)") == (pooled.shape[1],) == (pipe.transformer.config.pooled_projection_dim,)
    assert measured.value("text", "context_embedder")[0] == ehs.shape[2]


def test_clip_zero_padding_measured():
    """Narrow CLIP encoders (8 + 8 channels) are zero-padded to the T5 width (32) by the pipeline."""
    base = tiny_sd3_pipeline("sd3")
    clips = {}
    for name, tok in (("text_encoder", base.tokenizer), ("text_encoder_2", base.tokenizer_2)):
        torch.manual_seed(1)
        clips[name] = _tiny_clip(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 8, 32).eval()
    pipe = StableDiffusion3Pipeline(**{**{k: v for k, v in base.components.items() if k not in clips}, **clips})
    d = describe(pipe, PROMPT, max_sequence_length=T5_LEN)
    joined = d.value("text", "CLIP joined width (L ⊕ G)")
    assert joined == 16
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=T5_LEN)[0]
    n_clip = pipe.tokenizer_max_length
    assert d.value("text", "CLIP zero-padding") == embeds.shape[-1] - joined == 16
    assert torch.all(embeds[:, :n_clip, joined:] == 0) and embeds[:, :n_clip, :joined].abs().sum() > 0


def test_t5_omitted_is_zeros():
    pipe = tiny_sd3_pipeline("sd35", with_t5=False)
    d = describe(pipe, PROMPT, max_sequence_length=T5_LEN)
    assert d.value("text", "T5 present") is False
    assert d.value("text", "T5 zeros (omitted)") == (T5_LEN, pipe.transformer.config.joint_attention_dim)
    seen, _ = _transformer_inputs(pipe, max_sequence_length=T5_LEN, guidance_scale=1.0)
    ehs = seen[0]["encoder_hidden_states"]
    assert d.value("text", "joint text length") == ehs.shape[1]
    assert torch.all(ehs[:, pipe.tokenizer_max_length:] == 0) and not torch.all(ehs[:, : pipe.tokenizer_max_length] == 0)


def test_image_path_matches_pipeline_call(pipe):
    d = describe(pipe, height=H, width=W, max_sequence_length=T5_LEN)
    seen, _ = _transformer_inputs(pipe, height=H, width=W, max_sequence_length=T5_LEN, guidance_scale=1.0)
    hs = seen[0]["hidden_states"]
    assert d.value("image", "latent shape") == tuple(hs.shape[1:])
    assert d.value("image", "image tokens") == seen[0]["_tokens"][1]
    assert d.value("image", "patch size") == pipe.transformer.config.patch_size
    assert d.value("image", "vae_scale_factor") == H // hs.shape[2] == W // hs.shape[3]
    assert d.value("image", "joint sequence length") == seen[0]["_tokens"][1] + seen[0]["encoder_hidden_states"].shape[1]


def test_transformer_section_matches_config(pipe):
    cfg = pipe.transformer.config
    d = describe(pipe)
    assert d.value("transformer", "blocks") == cfg.num_layers
    assert d.value("transformer", "heads × head dim") == (
        f"{cfg.num_attention_heads} × {cfg.attention_head_dim} = {cfg.num_attention_heads * cfg.attention_head_dim}")
    assert d.value("transformer", "blocks with attn2") == list(cfg.dual_attention_layers)
    qk = d.value("transformer", "qk-norm (image)")
    assert (qk is None) == (cfg.qk_norm is None)
    if cfg.qk_norm is not None:
        assert qk.lower().startswith(cfg.qk_norm.replace("_", "")[:3])  # "rms_norm" -> RMSNorm
    assert d.value("transformer", "context_pre_only blocks") == [cfg.num_layers - 1]


@pytest.mark.parametrize("dynamic", [False, True])
def test_scheduler_matches_pipeline_and_is_not_mutated(dynamic):
    pipe = tiny_sd3_pipeline("sd3")
    if dynamic:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    before = pipe.scheduler.timesteps.clone()
    d = describe(pipe, height=H, width=W, num_inference_steps=3)
    assert torch.equal(pipe.scheduler.timesteps, before)
    _, used = _transformer_inputs(pipe, height=H, width=W, max_sequence_length=T5_LEN, guidance_scale=1.0,
                                  num_inference_steps=3)
    assert d.value("scheduler", "timesteps") == pytest.approx(used, abs=0.01)
    sigmas = d.value("scheduler", "sigmas")
    assert len(sigmas) == 4 and sigmas[-1] == 0
    assert [s * pipe.scheduler.config.num_train_timesteps for s in sigmas[:-1]] == pytest.approx(used, abs=0.1)
    assert d.value("scheduler", "shift") == pipe.scheduler.config.shift
    assert d.value("scheduler", "dynamic shifting") is dynamic


def test_table_and_text_rendering(pipe):
    d = describe(pipe, PROMPT, max_sequence_length=T5_LEN)
    assert isinstance(d, Description)
    df = d.to_dataframe()
    assert list(df.columns) == ["section", "item", "value", "source"] and len(df) == len(d.rows)
    assert set(df["section"]) == {"components", "text", "image", "transformer", "scheduler"}
    text = str(d)
    for r in d.rows:
        assert r.item in text and format_value(r.value) in text


def test_default_model_reports_what_a_recorded_run_uses():
    """T5 length, text tokens and steps of describe(default model) = those of a real run with its run kwargs."""
    pipe = default_pipeline()
    run = default_run_kwargs(pipe)
    d = describe(pipe)
    with AttentionRecorder(pipe) as rec:
        pipe(PROMPT, generator=torch.manual_seed(0), output_type="latent", **run)
    res = rec.result
    layout = next(lay for lay in res.layouts if lay is not None)
    assert d.value("text", "T5 length (max_sequence_length)") == run["max_sequence_length"] == len(layout.tokens("t5"))
    assert d.value("text", "joint text length") == layout.n_text == res.meta["n_text"]
    assert d.value("scheduler", "num_inference_steps") == run["num_inference_steps"] == len(res.timesteps)
    assert d.value("scheduler", "timesteps") == pytest.approx([float(t) for t in res.timesteps], abs=0.01)
    assert "run kwargs" in d.table.set_index("item").loc["num_inference_steps", "source"]


def test_explicit_arguments_override_the_run_kwargs():
    pipe = default_pipeline()
    d = describe(pipe, max_sequence_length=T5_LEN, num_inference_steps=3)
    assert d.value("text", "T5 length (max_sequence_length)") == T5_LEN
    assert d.value("scheduler", "num_inference_steps") == 3 == len(d.value("scheduler", "timesteps"))
    plain = tiny_sd3_pipeline("sd3")  # no shipped run kwargs: pipe(...)'s own defaults
    assert describe(plain).value("scheduler", "num_inference_steps") == 28


def test_cli(tmp_path, capsys):
    out = tmp_path / "d.csv"
    argv = ["describe", "tiny-sd35", "--prompt", PROMPT, "--max-sequence-length", "16", "--format", "csv", "-o", str(out)]
    assert cli.main(argv) == 0
    table = pd.read_csv(out)
    expected = describe(tiny_sd3_pipeline("sd35"), PROMPT, max_sequence_length=16).table
    assert list(table["item"]) == list(expected["item"])
    assert cli.main(["describe", str(tmp_path / "missing-model-dir")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["describe", "tiny", "--no-sources"]) == 0
    text = capsys.readouterr().out
    # the run kwargs `mmdit-probe record --model tiny` uses, not pipe(...)'s 256 / 28
    assert re.search(r"T5 length \(max_sequence_length\)\s+16\n", text) and re.search(r"num_inference_steps\s+8\n", text)
