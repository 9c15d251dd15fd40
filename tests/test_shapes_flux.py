"""The shapes world on Flux.1's architecture (``train-shapes --arch flux``): training wiring against the
pipeline's own transformer call, a short training run, saving/loading, recording and the evaluation per block kind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

import mmdit_probe as mp
from mmdit_probe.shapes.fit import flow_loss, sample_sigmas
from mmdit_probe.shapes.flux_model import (FluxModelConfig, build_flux_pipeline, build_flux_transformer,
                                           encode_flux_captions, flux_velocity)
from mmdit_probe.shapes.model import shapes_pipeline
from mmdit_probe.shapes.train import TrainConfig, encode_latents, images_tensor, train
from mmdit_probe.shapes.world import make_batch

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads made a training step ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    return shapes_pipeline()  # the shipped SD3 shapes model: its VAE and text encoders


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step Flux training run, resumed to 3 steps: its run folder."""
    out = tmp_path_factory.mktemp("flux_run")
    tc = TrainConfig(out=str(out), arch="flux", max_steps=2, n_scenes=32, batch=2, ckpt_minutes=100.0, threads=1)
    s1 = train(tc)
    assert s1["steps"] == 2 and s1["arch"] == "flux"
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == 2
    s2 = train(TrainConfig(**{**tc.__dict__, "max_steps": 3}), resume=True)
    assert s2["steps"] == 3
    return out


def _unpack(packed: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """Hand-written inverse of Flux's 2x2 packing: token (i, j), channel c·4 + 2·di + dj -> pixel (2i+di, 2j+dj)."""
    b = packed.shape[0]
    return packed.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_training_call_is_the_pipelines_call(base):
    # What training feeds the transformer (unpacked latents, sigma, caption embeddings) must be exactly what
    # FluxPipeline feeds it at inference: same packing, ids, timestep scale and text.
    cfg = FluxModelConfig()
    torch.manual_seed(0)
    pipe = build_flux_pipeline(cfg, build_flux_transformer(cfg).eval(), base)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out[0])), with_kwargs=True)
    try:
        pipe(PROMPT, num_inference_steps=2, max_sequence_length=cfg.max_sequence_length, output_type="latent",
             generator=torch.manual_seed(1))
    finally:
        hook.remove()
    kw, out = seen[1]  # the second step: sigma < 1
    c, n = cfg.latent_channels, cfg.latent_size
    assert kw["hidden_states"].shape == (1, (n // 2) ** 2, 4 * c)  # 64x64 px -> 16x16 latents -> 8x8 tokens
    torch.testing.assert_close(kw["timestep"], pipe.scheduler.sigmas[1:2], rtol=0, atol=1e-6)  # timestep = sigma
    text, pooled = encode_flux_captions(pipe, [PROMPT], cfg.max_sequence_length)
    assert torch.equal(text, kw["encoder_hidden_states"]) and torch.equal(pooled, kw["pooled_projections"])
    x = _unpack(kw["hidden_states"], c, n, n)
    with torch.no_grad():
        pred = flux_velocity(pipe.transformer, x, kw["timestep"], text, pooled)
    assert torch.equal(pred, _unpack(out, c, n, n))


def test_flux_loss_is_finite_and_falls_on_a_fixed_batch(base):
    cfg = FluxModelConfig()
    torch.manual_seed(0)
    transformer = build_flux_transformer(cfg)
    pipe = build_flux_pipeline(cfg, transformer, base)
    scenes = make_batch(4, 0)
    with torch.no_grad():
        mean, _ = encode_latents(base.vae, images_tensor(scenes.images))
    x0 = (mean.float() - base.vae.config.shift_factor) * base.vae.config.scaling_factor
    text, pooled = encode_flux_captions(pipe, scenes.captions, cfg.max_sequence_length)
    g = torch.Generator().manual_seed(0)
    noise, sigma = torch.randn(x0.shape, generator=g), sample_sigmas(4, cfg.scheduler_shift, g)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = flow_loss(flux_velocity, transformer, x0, noise, sigma, text, pooled)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_trained_weights_load_as_a_flux_pipeline(trained):
    final = trained / "final"
    meta = json.loads((final / "config.json").read_text())
    assert meta["arch"] == "flux" and meta["training"]["steps"] == 3
    pipe = shapes_pipeline(path=final)  # the folder's config.json picks the architecture
    assert isinstance(pipe, FluxPipeline) and not pipe.transformer.config.guidance_embeds
    ema = load_file(str(trained / "ckpt" / "ema.safetensors"))  # the EMA weights, shipped as fp16
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[k], v.half().float()) for k, v in ema.items()) and set(ema) == set(state)
    run = mp.default_run_kwargs(pipe)
    assert run["true_cfg_scale"] == 5.0 and run["max_sequence_length"] == 12
    again = shapes_pipeline(path=final, arch="flux")
    kw = dict(output_type="np", **run)
    a = pipe(PROMPT, generator=torch.manual_seed(0), **{**kw, "num_inference_steps": 2}).images
    with mp.AttentionRecorder(again, words=True) as rec:
        b = again(PROMPT, generator=torch.manual_seed(0), **{**kw, "num_inference_steps": 2}).images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b)  # reloaded + recorded: bitwise the same image
    res = rec.result
    assert res.mass.aux["block_kind"] == ("layer", ("joint", "joint", "single", "single", "single", "single"))
    assert set(res.branches) == {"cond", "uncond"}  # true CFG: the empty prompt's call is the uncond row
    assert res.layouts[0].order == ("text", "image") and res.layouts[0].n_text == 12


def test_evaluation_reports_grounding_per_block_kind(trained):
    from mmdit_probe.shapes.detect import DetectorConfig, colour_masks, largest_component
    from mmdit_probe.shapes.evaluate import (EvalConfig, _point_iou, generate, grounding, grounding_by_kind,
                                             guidance_kwargs, model_blocks)

    pipe = shapes_pipeline(path=trained / "final")
    kinds = model_blocks(pipe)
    assert kinds == ("joint",) * 2 + ("single",) * 4
    assert set(guidance_kwargs(pipe, 5.0, 2)) == {"true_cfg_scale", "negative_prompt"}
    assert set(guidance_kwargs(shapes_pipeline(), 5.0, 2)) == {"guidance_scale"}
    scenes = make_batch(2, 7)  # rendered scenes: the detector finds every object, whatever the model draws
    prompts = scenes.captions
    cfg = EvalConfig(n=2, steps=2, batch=2)
    _, results = generate(pipe, prompts, cfg, lambda p: mp.AttentionRecorder(p, words=True, word_heads="mean"))
    g = grounding(scenes.images, prompts, results, len(kinds), cfg.batch, block_kinds=kinds)
    assert {"mean_joint", "mean_single"} <= set(g) and g["mean_joint"]["colour"]["n"] > 0
    res = results[0]
    cond = [r for r, b in enumerate(res.branches) if b == "cond"]
    for name, layers in (("mean_joint", [0, 1]), ("mean_single", [2, 3, 4, 5]), ("3", [3])):
        hits, ious = [], []
        for j, row in enumerate(cond):  # by hand: the average of the layers' own maps, scored against the mask
            for colour in {o.colour for o in scenes.scenes[j].objects}:
                mask = largest_component(colour_masks(scenes.images[j], DetectorConfig())[colour])
                amap = torch.stack([res.word_map(colour, layer=L)[row] for L in layers]).mean(0)
                hit, iou = _point_iou(amap, mask)
                hits.append(hit)
                ious.append(iou)
        assert g[name]["colour"]["pointing"] == pytest.approx(np.mean(hits)), name
        assert g[name]["colour"]["iou"] == pytest.approx(np.mean(ious), abs=1e-6), name
    by_kind = grounding_by_kind(g, kinds)
    assert by_kind["joint"]["layers"] == [0, 1] and by_kind["single"]["mean"] == g["mean_single"]
    assert by_kind["single"]["best_layer"] in (2, 3, 4, 5)


def test_bad_settings_are_refused_before_any_work(trained, tmp_path):
    with pytest.raises(ValueError, match="encoder-dropout"):
        train(TrainConfig(out=str(tmp_path / "x"), arch="flux", encoder_dropout=0.4))
    with pytest.raises(ValueError, match="unknown arch"):
        train(TrainConfig(out=str(tmp_path / "x"), arch="dit"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="arch='flux'"):
        shapes_pipeline(path=trained / "final", arch="sd3")
    with pytest.raises(ValueError, match="unknown shapes arch"):
        shapes_pipeline(arch="unet")
    other = tmp_path / "other"
    shutil.copytree(trained / "final", other)
    meta = json.loads((other / "config.json").read_text())
    meta["base"]["vae_sha256"] = "0" * 64
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="another VAE"):
        shapes_pipeline(path=other)
