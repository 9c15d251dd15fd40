"""Tests of the shapes world, its detector, the shipped trained model and the training script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmdit_probe.shapes.detect import check_prompt, colour_masks
from mmdit_probe.shapes.world import (
    COLOURS, WorldConfig, all_captions, is_heldout_caption, make_batch, parse_caption, world_vocab,
)

# Measured on the shipped weights (docs/shapes.md); asserted with a margin below.
# Full run: 48 held-out prompts, 20 steps, the model's guidance 5 (python -m mmdit_probe.shapes.evaluate --n 48).
MEASURED = {"steps": 20, "guidance": 5.0, "colour": 1.0, "shape": 0.44, "all": 0.27,
            "best_layer_colour_pointing": 0.83, "best_layer_colour_iou": 0.51, "mean_layers_colour_pointing": 0.83}


def test_world_is_deterministic():
    a, b = make_batch(64, 3), make_batch(64, 3)
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.images, b.images)
    assert make_batch(64, 4).captions != a.captions


def test_masks_and_captions_agree():
    batch = make_batch(200, 1)
    for s in batch.scenes:
        objs, rel = parse_caption(s.caption)
        assert [(o.colour, o.shape) for o in s.objects] == objs and s.relation == rel
        assert len(s.masks) == len(objs) and not (s.masks.sum(0) > 1).any()  # no overlap
        for o, m in zip(s.objects, s.masks):
            assert m.sum() > 100 and np.allclose(s.image[m], COLOURS[o.colour])
        assert np.allclose(s.image[~s.masks.any(0)], 0.0)
        assert not is_heldout_caption(s.caption)
        assert set(s.caption.split()) <= set(world_vocab())


def test_objects_snap_to_the_grid():
    scenes = make_batch(300, 5, WorldConfig(grid=4)).scenes
    objs = [o for s in scenes for o in s.objects]
    assert all(o.size % 4 == 0 and (o.cx - o.size / 2) % 4 == 0 and (o.cy - o.size / 2) % 4 == 0 for o in objs)
    assert len({o.cx for o in objs}) >= 8 and len({o.size for o in objs}) >= 3  # still random
    for s in scenes:  # boxes stay inside the image
        assert all(o.size / 2 <= o.cx <= 64 - o.size / 2 and o.size / 2 <= o.cy <= 64 - o.size / 2 for o in s.objects)
    free = make_batch(50, 5).scenes  # the default (shipped) world is continuous
    assert any((o.cx - o.size / 2) % 4 != 0 for s in free for o in s.objects)


def test_heldout_split():
    held = make_batch(100, 2, split="heldout")
    assert all(is_heldout_caption(c) for c in held.captions)
    pairs = WorldConfig().heldout_pairs
    train = make_batch(500, 2)
    assert not any(o in pairs for c in train.captions for o in parse_caption(c)[0])
    assert 0 < sum(map(is_heldout_caption, all_captions())) < len(all_captions())
    from mmdit_probe.shapes.evaluate import heldout_prompts, validation_prompts

    val = validation_prompts(48)  # model-selection prompts: training distribution, disjoint from evaluation
    assert not any(map(is_heldout_caption, val)) and not set(val) & set(heldout_prompts(48))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_detector_on_ground_truth(split):
    batch = make_batch(300, 7, split=split)
    checks = [check_prompt(s.image, s.caption) for s in batch.scenes]
    assert np.mean([c.all for c in checks]) >= 0.95
    for s in batch.scenes[:50]:  # detector colour masks equal the ground-truth masks
        masks = colour_masks(s.image)
        for o, m in zip(s.objects, s.masks):
            np.testing.assert_array_equal(masks[o.colour], m)


def test_detector_rejects_wrong_captions():
    s = make_batch(1, 0).scenes[0]
    o = s.objects[0]
    other_colour = next(c for c in COLOURS if c not in {x.colour for x in s.objects})
    assert not check_prompt(s.image, f"a {other_colour} {o.shape}").colour
    other_shape = next(sh for sh in ("circle", "square", "triangle") if sh != o.shape)
    assert not check_prompt(s.image, f"a {o.colour} {other_shape}").shape


@pytest.fixture(scope="module")
def pipe():
    from mmdit_probe.shapes import shapes_pipeline

    return shapes_pipeline()


def test_shipped_pipeline_loads_and_generates(pipe):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(pipe, StableDiffusion3Pipeline)
    out = pipe("a red circle", num_inference_steps=4, max_sequence_length=pipe.shapes_config.max_sequence_length,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_small_evaluation_matches_measured(pipe):
    from mmdit_probe.shapes.evaluate import EvalConfig, evaluate

    # The adherence target (>= 90 % of held-out prompts with the right colours and shapes) is MISSED by this
    # model (0.44: unseen colour-shape pairs fail); the grounding target (best layer >= 80 % pointing) is met on
    # 48 prompts. These asserts pin the measured figures minus a margin (16 instead of 48 prompts).
    assert pipe.shapes_config.default_guidance == MEASURED["guidance"]
    cfg = EvalConfig(n=16, steps=MEASURED["steps"], batch=16, ablations=False)
    rep = evaluate(pipe, cfg, log=lambda m: None)
    assert rep["config"]["guidance"] == MEASURED["guidance"]
    assert rep["adherence"]["colour"] >= MEASURED["colour"] - 0.2
    assert rep["adherence"]["shape"] >= MEASURED["shape"] - 0.2
    g = rep["grounding"]
    best = max(g[str(L)]["colour"]["pointing"] for L in range(len(pipe.transformer.transformer_blocks)))
    assert best >= MEASURED["best_layer_colour_pointing"] - 0.2
    best_iou = max(g[str(L)]["colour"]["iou"] for L in range(len(pipe.transformer.transformer_blocks)))
    assert best_iou >= MEASURED["best_layer_colour_iou"] - 0.15
    assert g["mean"]["colour"]["pointing"] >= MEASURED["mean_layers_colour_pointing"] - 0.25
    assert g["mean"]["colour"]["pointing"] > 2 * g["chance_pointing"]


def test_zero_text_ablation_hurts(pipe):
    from mmdit_probe.shapes.evaluate import EvalConfig, ablation_context, adherence, generate, heldout_prompts

    cfg = EvalConfig(n=8, steps=MEASURED["steps"], batch=8)
    prompts = heldout_prompts(8, 1)
    base = adherence(generate(pipe, prompts, cfg)[0], prompts)
    with ablation_context(pipe, "zero_text_pooled"):
        zero = adherence(generate(pipe, prompts, cfg)[0], prompts)
    assert zero["all"] <= base["all"] and zero["colour"] < base["colour"]


def test_training_smoke_and_resume(tmp_path):
    from mmdit_probe.shapes.train import TrainConfig, train

    tc = TrainConfig(out=str(tmp_path), max_steps=2, vae_minutes=0.02, decoder_minutes=0.01, n_scenes=64, batch=4,
                     vae_batch=4, ckpt_minutes=100.0, grid=4, encoder_dropout=0.463, threads=1)
    s1 = train(tc)
    assert s1["steps"] == 2 and s1["train"]["grid"] == 4
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 2
    s2 = train(TrainConfig(**{**tc.__dict__, "max_steps": 3}), resume=True)
    assert s2["steps"] == 3
    from mmdit_probe.shapes import shapes_pipeline

    assert shapes_pipeline(path=tmp_path / "final").transformer.config.num_layers == 4


def test_unshift_sigmas_inverts_the_scheduler_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmdit_probe.shapes.recovery import unshift_sigmas

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(20)
    wanted = sched.sigmas[5:-1].clone()
    sched.set_timesteps(sigmas=unshift_sigmas(wanted, 3.0).tolist())
    torch.testing.assert_close(sched.sigmas[:-1], wanted, rtol=0, atol=1e-6)
    assert sched.sigmas[-1] == 0


def test_recovery_from_pure_noise_is_the_plain_pipeline(pipe):
    from mmdit_probe.shapes.recovery import noised_latents, unshift_sigmas

    images = make_batch(2, 3).images
    lat = noised_latents(pipe, images, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(lat, torch.randn(lat.shape, generator=torch.Generator().manual_seed(4)))  # sigma 1: noise only
    kw = dict(guidance_scale=7.0, max_sequence_length=pipe.shapes_config.max_sequence_length, output_type="np")
    plain = pipe(["a red circle"] * 2, latents=lat, num_inference_steps=6, **kw).images
    pipe.scheduler.set_timesteps(6)
    sig = unshift_sigmas(pipe.scheduler.sigmas[:-1], pipe.scheduler.config.shift).tolist()
    via_sigmas = pipe(["a red circle"] * 2, latents=lat, sigmas=sig, **kw).images
    np.testing.assert_allclose(via_sigmas, plain, atol=1e-4)


def test_recovery_late_start_keeps_the_ground_truth(pipe):
    from mmdit_probe.shapes.recovery import RecoveryConfig, recovery

    # From a low noise level the sampler only has to finish edges: the scene's caption must still hold.
    rep = recovery(pipe, RecoveryConfig(n=8, starts=(0.3,)), log=lambda m: None)
    (row,) = rep["rows"]
    assert row["sigma"] <= 0.3 and row["steps_left"] < 20
    assert row["shape"] >= 0.85


def test_encoder_masks_match_the_pipeline_without_t5(pipe):
    from diffusers import StableDiffusion3Pipeline

    from mmdit_probe.shapes.train import encoder_masks

    n = pipe.shapes_config.max_sequence_length
    tokens, pooled = encoder_masks(pipe, n)
    assert torch.equal(tokens.sum(0), torch.ones_like(tokens[0])) and torch.equal(pooled[:2].sum(0), torch.ones(pooled.shape[1]))
    kw = dict(do_classifier_free_guidance=False, max_sequence_length=n)
    emb, _, pool, _ = pipe.encode_prompt("a red circle left of a blue square", None, None, **kw)
    no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    emb2, _, pool2, _ = no_t5.encode_prompt("a red circle left of a blue square", None, None, **kw)
    assert torch.equal(emb * (1 - tokens[2]), emb2) and torch.equal(pool * (1 - pooled[2]), pool2)
    assert torch.count_nonzero(emb * tokens[0]) > 0 and torch.count_nonzero(emb * tokens[1]) > 0


def test_recover_shapes_command(tmp_path, capsys):
    from mmdit_probe import cli

    out = tmp_path / "rec.json"
    assert cli.main(["recover-shapes", "--n", "2", "--steps", "6", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    sig = [r["sigma"] for r in rep["rows"]]
    left = [r["steps_left"] for r in rep["rows"]]
    assert sig[0] == 1.0 and left[0] == 6 and sig == sorted(sig, reverse=True) and left == sorted(left, reverse=True)
    assert rep["config"]["guidance"] == 5.0  # the model's own default, resolved
    assert "| start σ | steps left |" in capsys.readouterr().out
