"""describe() on Chroma, Qwen-Image and Flux.2: every entry checked against the configs and the inputs of real
pipeline calls; ``mp.schedule`` and describe's schedule against the timesteps the transformer receives."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageImg2ImgPipeline, UniPCMultistepScheduler

import mmdit_probe as mp
from mmdit_probe import cli
from mmdit_probe.describe import describe, format_value
from mmdit_probe.families.flux import FluxFamily

PROMPT = "a red circle left of a blue square"
H, W = 32, 40


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class Case:
    make: Callable[[], Any]
    call: dict = field(default_factory=dict)  # keywords every test call passes (text length, no true CFG)

    def kw(self, **extra) -> dict:
        return {"height": H, "width": W, **self.call, **extra}


CASES = {
    "chroma": Case(lambda: mp.tiny_chroma_pipeline(seed=3, num_layers=2, num_single_layers=3),
                   {"max_sequence_length": 16}),
    "qwen_image": Case(lambda: mp.tiny_qwen_image_pipeline(seed=3), {"true_cfg_scale": 1.0}),
    "flux2": Case(lambda: mp.tiny_flux2_pipeline(seed=3, num_layers=1, num_single_layers=2),
                  {"max_sequence_length": 48}),
}
NAMES = list(CASES)


@pytest.fixture(scope="module")
def pipes():
    return {}


def get(pipes, name):
    if name not in pipes:
        pipes[name] = CASES[name].make()
    return pipes[name]


def calls(pipe, steps=2, prompt=PROMPT, **kw):
    """Keyword arguments of every transformer call of a real ``pipe(...)`` run."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        pipe(prompt=prompt, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="latent", **kw)
    finally:
        handle.remove()
    return seen


def describe_call(pipe, case, prompt=PROMPT, **extra):
    kw = case.kw(**extra)
    return describe(pipe, prompt, kw["height"], kw["width"], kw.get("max_sequence_length"), kw.get("num_inference_steps"))


@pytest.mark.parametrize("name", NAMES)
def test_components_match_modules(pipes, name):
    pipe = get(pipes, name)
    d = describe(pipe)
    for key, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert d.value("components", f"{key}.class") == type(module).__name__
            assert d.value("components", f"{key}.parameters") == module.num_parameters()
            assert d.value("components", f"{key}.dtype") == str(module.dtype)
    assert d.value("components", "tokenizer.vocab") == len(pipe.tokenizer)


@pytest.mark.parametrize("name", NAMES)
def test_text_and_image_match_a_pipeline_call(pipes, name):
    pipe, case = get(pipes, name), CASES[name]
    measured = describe_call(pipe, case)
    config = describe_call(pipe, case, prompt=None)
    kw = calls(pipe, steps=1, **case.kw())[0]
    ehs, hs = kw["encoder_hidden_states"], kw["hidden_states"]
    cfg = pipe.transformer.config
    assert measured.value("text", "prompt_embeds") == tuple(ehs.shape[1:])
    assert measured.value("text", "joint text length") == ehs.shape[1]
    assert measured.value("text", "token groups").startswith(f"{ehs.shape[1]} (")
    assert measured.value("image", "image tokens") == config.value("image", "image tokens") == hs.shape[1]
    assert measured.value("image", "joint sequence length") == ehs.shape[1] + hs.shape[1]
    packed = "patchified channels (2×2)" if name == "flux2" else "packed channels (2×2 patches)"
    assert measured.value("image", packed) == hs.shape[2] == cfg.in_channels
    assert measured.value("transformer", "joint_attention_dim") == ehs.shape[2] == cfg.joint_attention_dim
    if name == "chroma":
        n_text = ehs.shape[1]
        mask = kw["attention_mask"]
        assert config.value("text", "joint text length") == n_text == case.call["max_sequence_length"]
        assert measured.value("text", "text_ids") == config.value("text", "text_ids") == tuple(kw["txt_ids"].shape)
        assert measured.value("image", "img_ids") == tuple(kw["img_ids"].shape)
        ids = kw["img_ids"]
        assert measured.value("image", "patch grid") == (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        assert measured.value("text", "text positions kept by the mask") == int(mask[0, :n_text].sum()) < n_text
        assert bool(mask[0, n_text:].all())  # every image token kept
        assert measured.value("transformer", "attention mask dtype") == str(mask.dtype)
        assert ("added" in measured.value("transformer", "attention mask effect")) is mask.dtype.is_floating_point
        assert measured.value("text", "T5 hidden states") == config.value("text", "T5 hidden states")
    elif name == "qwen_image":
        shapes = kw["img_shapes"][0]
        assert measured.value("image", "img_shapes") == [tuple(shapes[0])]
        assert measured.value("image", "patch grid") == tuple(shapes[0][1:])
        assert measured.value("text", "prompt_embeds_mask") is kw["encoder_hidden_states_mask"] is None
        # the template's closing tokens: what an empty prompt leaves after the dropped system prefix
        empty, _ = pipe.encode_prompt("", max_sequence_length=512)
        assert measured.value("text", "template closing tokens") == empty.shape[1]
        assert config.value("text", "joint text length") == f"prompt tokens + {empty.shape[1]} (≤ 512)"
        assert measured.value("text", "encoder hidden width") == ehs.shape[2]
    else:
        L = case.call["max_sequence_length"]
        assert config.value("text", "joint text length") == ehs.shape[1] == L
        assert measured.value("text", "text_ids") == config.value("text", "text_ids") == tuple(kw["txt_ids"].shape[1:])
        assert measured.value("image", "img_ids") == tuple(kw["img_ids"].shape[1:])
        ids = kw["img_ids"][0]
        assert measured.value("image", "patch grid") == (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        assert measured.value("text", "text stream width") == ehs.shape[2]
        assert measured.value("transformer", "attention mask") is None
        assert "attention_mask" not in kw and not (kw.get("joint_attention_kwargs") or {})


@pytest.mark.parametrize("name", NAMES)
def test_transformer_section_matches_config(pipes, name):
    pipe, case = get(pipes, name), CASES[name]
    cfg = pipe.transformer.config
    d = describe(pipe)
    n_double = cfg.num_layers
    n_single = cfg.get("num_single_layers", 0)
    assert d.value("transformer", "double-stream blocks") == n_double
    expected = f"joint 0–{n_double - 1}" + (f", single {n_double}–{n_double + n_single - 1}" if n_single else "")
    assert d.value("transformer", "block kinds by layer") == expected
    assert d.value("transformer", "joint order") == mp.joint_order(pipe) == ("text", "image")
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    assert d.value("transformer", "heads × head dim") == f"{heads} × {dim} = {heads * dim}"
    axes = {"chroma": "rotary axes (t, y, x)", "qwen_image": "rotary axes (frame, y, x)",
            "flux2": "rotary axes (t, h, w, l)"}[name]
    assert d.value("transformer", axes) == tuple(cfg.axes_dims_rope) and sum(cfg.axes_dims_rope) == dim
    with mp.AttentionRecorder(pipe) as rec:  # the recorder's layers carry the kinds describe reports
        pipe(prompt=PROMPT, num_inference_steps=1, output_type="latent", **case.kw())
    assert rec.result.mass.aux["block_kind"][1] == ("joint",) * n_double + ("single",) * n_single
    if name == "chroma":
        assert d.value("transformer", "single-stream blocks") == n_single
        assert d.value("transformer", "modulation approximator (channels, hidden, layers)") == (
            cfg.approximator_num_channels, cfg.approximator_hidden_dim, cfg.approximator_layers)
        assert d.value("transformer", "single-stream MLP width") == 4 * heads * dim  # ChromaSingleTransformerBlock
    elif name == "qwen_image":
        grid = d.value("image", "patch grid")
        start = d.value("transformer", "rotary text start")
        _, txt = pipe.transformer.pos_embed([(1, *grid)], device=torch.device("cpu"), max_txt_seq_len=7)
        assert torch.equal(txt, pipe.transformer.pos_embed.pos_freqs[start:start + 7])
        assert d.value("transformer", "guidance_embeds") is cfg.guidance_embeds
    else:
        assert d.value("transformer", "single-stream blocks") == n_single
        assert d.value("transformer", "rope_theta") == cfg.rope_theta
        assert d.value("transformer", "single-stream MLP width") == int(heads * dim * cfg.mlp_ratio)
        assert d.value("transformer", "guidance_embeds") is cfg.guidance_embeds is True


@contextlib.contextmanager
def swapped_scheduler(pipe, scheduler):
    """``pipe`` with ``scheduler`` for the duration; its own scheduler is put back after."""
    old = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = old


def timesteps_seen(pipe, steps, name, **kw):
    """The timestep of each step as the transformer receives it, × 1000 (these pipelines pass ``timestep / 1000``)."""
    seen = [float(k["timestep"].reshape(-1)[0]) * 1000 for k in calls(pipe, steps, **kw)]
    if name == "chroma":  # guidance_scale 5: a cond and an uncond call per step, at the same timestep
        assert seen[0::2] == seen[1::2]
        seen = seen[0::2]
    return seen


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", NAMES)
def test_schedule_is_the_one_the_pipeline_runs(pipes, name, dynamic):
    """``mp.schedule`` and describe's scheduler rows equal the timesteps the transformer receives in real calls; a 4×
    larger image shifts a dynamic schedule (its mu), not a static one; Flux.2's empirical mu also moves with the steps."""
    pipe, case = get(pipes, name), CASES[name]
    config = pipe.scheduler.config
    scheduler = (FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=True, base_shift=0.3,
                                                             max_shift=1.4, base_image_seq_len=64) if dynamic
                 else FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=False))
    with swapped_scheduler(pipe, scheduler):
        used, mus = {}, {}
        for steps, scale in ((3, 1), (3, 2)) + (((5, 1),) if name == "flux2" else ()):
            size = {"height": H * scale, "width": W * scale}
            seen = timesteps_seen(pipe, steps, name, **case.kw(**size))
            sched = mp.schedule(pipe, steps, **size)
            assert len(seen) == steps and list(sched.timesteps) == pytest.approx(seen, abs=1e-3)
            d = describe(pipe, height=size["height"], width=size["width"], num_inference_steps=steps)
            assert d.value("scheduler", "timesteps") == pytest.approx(seen, abs=0.01)
            sigmas = d.value("scheduler", "sigmas")
            assert len(sigmas) == steps + 1 and sigmas[-1] == 0
            assert [s * 1000 for s in sigmas[:-1]] == pytest.approx(seen, abs=0.1)
            assert d.value("scheduler", "dynamic shifting") is dynamic
            assert d.value("scheduler", "mu") == pytest.approx(sched.mu, abs=1e-4)
            used[steps, scale], mus[steps, scale] = seen, sched.mu
    assert (used[3, 2] != pytest.approx(used[3, 1], abs=0.01)) is dynamic
    if name == "flux2":  # compute_empirical_mu(image tokens, steps)
        assert mus[5, 1] != pytest.approx(mus[3, 1])


@pytest.mark.parametrize("name", NAMES)
def test_describe_does_not_touch_the_scheduler(pipes, name):
    pipe = get(pipes, name)
    pipe.scheduler.set_timesteps(7, mu=0.5)
    before = pipe.scheduler.timesteps.clone()
    describe(pipe, num_inference_steps=3)
    assert torch.equal(pipe.scheduler.timesteps, before)


@pytest.mark.parametrize("name", ["chroma", "qwen_image"])
def test_schedule_with_flow_sigmas_is_not_the_flux_one(pipes, name):
    """ChromaPipeline and QwenImagePipeline pass their linspace sigmas even to a ``use_flow_sigmas`` scheduler
    (FluxPipeline passes None): the Flux.1 rule (which Chroma used to inherit) gives other timesteps there."""
    pipe = get(pipes, name)
    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    with swapped_scheduler(pipe, unipc):
        seen = timesteps_seen(pipe, 10, name, **CASES[name].kw())
        assert list(mp.schedule(pipe, 10, height=H, width=W).timesteps) == pytest.approx(seen, abs=1e-3)
        assert describe(pipe, height=H, width=W, num_inference_steps=10).value("scheduler", "timesteps") == (
            pytest.approx(seen, abs=0.01))
        tokens = describe(pipe, height=H, width=W).value("image", "image tokens")
        assert FluxFamily.schedule_for_tokens(pipe, 10, tokens)[0] != pytest.approx(seen, abs=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_run_section_is_what_a_run_uses(pipes, name):
    pipe, case = get(pipes, name), CASES[name]
    d = describe(pipe, height=H, width=W)
    # the pipeline's defaults: the steps it sets and the text length it encodes, up to its first transformer call
    seen = []

    def stop(module, args, kwargs):
        seen.append(kwargs)
        raise _Stop

    handle = pipe.transformer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            pipe(prompt=PROMPT, height=H, width=W, output_type="latent")
    finally:
        handle.remove()
    first = seen[0]
    assert d.value("run", "num_inference_steps") == len(pipe.scheduler.timesteps)
    assert d.value("scheduler", "timesteps") == pytest.approx(pipe.scheduler.timesteps.tolist(), abs=0.01)
    if name != "qwen_image":  # padded to max_sequence_length (Qwen: the prompt's own length, capped)
        assert d.value("run", "max_sequence_length") == first["encoder_hidden_states"].shape[1]
    # transformer calls per step, without and with a negative prompt, at the described guidance
    run_kw = case.kw(true_cfg_scale=d.value("run", "true_cfg_scale")) if name == "qwen_image" else case.kw()
    plain = calls(pipe, 2, **run_kw)
    assert len(plain) == 2 * d.value("run", "transformer calls per step")
    if name != "flux2":  # Flux2Pipeline takes no negative prompt
        negative = calls(pipe, 2, negative_prompt="a green triangle", **run_kw)
        assert len(negative) == 2 * d.value("run", "transformer calls per step with a negative_prompt") == 4
    if name == "flux2":
        assert float(plain[0]["guidance"][0]) == d.value("run", "guidance_scale")
        assert d.value("text", "text_encoder_out_layers") == tuple(mp.families.flux2.HIDDEN_LAYERS)
    assert set(d.table["section"]) == {"components", "text", "image", "transformer", "scheduler", "run"}
    text = str(d)
    assert all(r.item in text and format_value(r.value) in text for r in d.rows)


@pytest.mark.parametrize("name", NAMES)
def test_cli_describes_a_saved_folder(pipes, name, tmp_path):
    pipe, case = get(pipes, name), CASES[name]
    pipe.save_pretrained(tmp_path / name)
    out = tmp_path / "d.csv"
    length = case.call.get("max_sequence_length", 512)
    argv = ["describe", str(tmp_path / name), "--prompt", PROMPT, "--max-sequence-length", str(length),
            "--height", str(H), "--width", str(W), "--steps", "3", "--format", "csv", "-o", str(out)]
    assert cli.main(argv) == 0
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected = describe(pipe, PROMPT, H, W, length, 3).table
    assert list(table["item"]) == list(expected["item"])
    assert list(table["value"]) == [format_value(v) for v in expected["value"]]


def test_other_pipelines_of_a_family_are_refused_by_name(pipes):
    qwen = get(pipes, "qwen_image")
    img2img = QwenImageImg2ImgPipeline(**qwen.components)
    with pytest.raises(NotImplementedError, match="describe\\(\\) reads QwenImagePipeline"):
        describe(img2img)
