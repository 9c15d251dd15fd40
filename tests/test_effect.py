"""Tests for mmdit_probe.effect: metrics, runs under an intervention, per-step effects."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmdit_probe as mp

from mmdit_probe.ablate import intervene
from mmdit_probe.ablate import record_head_means
from mmdit_probe.ablate import AblationError
from mmdit_probe.ablate import AblateHeads, SkipLayers
from mmdit_probe.effect import DEFAULT_METRICS, Metric, cosine, mse, psnr, resolve_metrics, run_pipeline, run_with_effects
from mmdit_probe.models import tiny_sd3_pipeline

PROMPT = "a red circle left of a blue square"
CALL = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=16, guidance_scale=5.0)


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def pipe(request):
    return tiny_sd3_pipeline(request.param)


def count_calls(pipe):
    calls = []
    return calls, pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)


def test_metrics_match_textbook_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    assert mse(a, b) == pytest.approx(F.mse_loss(b.double(), a.double()).item(), rel=1e-12)
    rng = (a.max() - a.min()).item()
    assert psnr(a, b) == pytest.approx(10 * math.log10(rng**2 / F.mse_loss(a.double(), b.double()).item()), rel=1e-9)
    assert psnr(a, b, data_range=1.0) == pytest.approx(-10 * math.log10(F.mse_loss(a.double(), b.double()).item()), rel=1e-9)
    rows = [F.cosine_similarity(a[i].flatten().double(), b[i].flatten().double(), dim=0).item() for i in range(2)]
    assert cosine(a, b) == pytest.approx(sum(rows) / 2, rel=1e-12)
    assert mse(a, a) == 0.0 and psnr(a, a) == math.inf and cosine(a, a) == pytest.approx(1.0, abs=1e-12)


def test_run_pipeline_matches_the_pipeline(pipe):
    seen = []
    h = pipe.transformer.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    try:
        images = pipe(PROMPT, generator=torch.manual_seed(3), output_type="pt", **CALL).images
        latents = pipe(PROMPT, generator=torch.manual_seed(3), output_type="latent", **CALL).images
    finally:
        h.remove()
    out = run_pipeline(pipe, PROMPT, 3, (), **CALL)
    assert torch.equal(out.images, images) and torch.equal(out.latents, latents)
    assert len(out.velocities) == CALL["num_inference_steps"]
    assert all(torch.equal(v, s) for v, s in zip(out.velocities, seen[:3]))
    assert not pipe.transformer._forward_hooks


def test_effects_are_resolved_per_step(pipe):
    spec = SkipLayers([1], steps=[1])
    eff = run_with_effects(pipe, PROMPT, spec, seed=0, **CALL)
    t = eff.table.set_index(["metric", "step"])["value"]
    assert t[("velocity_mse", 0)] == 0.0 and t[("velocity_psnr", 0)] == math.inf
    assert t[("velocity_mse", 1)] > 0.0 and t[("velocity_cosine", 1)] < 1.0
    assert t[("velocity_mse", 2)] > 0.0  # later steps start from different latents
    with intervene(pipe, spec):
        ablated = pipe(PROMPT, generator=torch.manual_seed(0), output_type="pt", **CALL).images
    baseline = pipe(PROMPT, generator=torch.manual_seed(0), output_type="pt", **CALL).images
    final = eff.table[eff.table.step.isna()].set_index("metric")["value"]
    assert final["image_mse"] == pytest.approx(F.mse_loss(ablated.double(), baseline.double()).item(), rel=1e-9)
    assert final["image_mse"] > 0 and final["latent_cosine"] < 1.0
    assert list(eff.table.columns) == ["metric", "step", "value"]
    assert {m.name for m in DEFAULT_METRICS} == set(eff.table.metric)


def test_no_op_spec_has_no_effect(pipe):
    with record_head_means(pipe) as own:  # one row per CFG branch: the "mean" is the run itself
        pipe(PROMPT, generator=torch.manual_seed(1), **CALL)
    eff = run_with_effects(pipe, PROMPT, AblateHeads(heads=[0, 3], mode="mean", reference=own), seed=1, **CALL)
    mses = eff.table[eff.table.metric.str.endswith("mse")]
    assert len(mses) == 2 + CALL["num_inference_steps"] and (mses.value == 0).all()
    other = run_with_effects(pipe, PROMPT, AblateHeads(heads=[0, 3], mode="mean", reference=own), seed=2, **CALL)
    assert (other.table[other.table.metric.str.endswith("mse")].value > 0).all()  # another seed: a real change


def test_custom_metrics(pipe):
    seen = {}

    def brightness_drop(baseline, ablated):
        seen["shape"] = tuple(baseline.shape)
        return float(baseline.mean() - ablated.mean())

    metrics = {"drop": brightness_drop, "lat_l1": Metric("x", lambda b, a: float((b - a).abs().mean()), on="latent"),
               "vel_max": Metric("v", lambda b, a: float((b - a).abs().max()), on="velocity")}
    eff = run_with_effects(pipe, PROMPT, SkipLayers([0]), seed=0, metrics=metrics, **CALL)
    assert seen["shape"] == (1, 3, 32, 32)
    assert set(eff.table.metric) == {"drop", "lat_l1", "vel_max"}
    assert len(eff.table.query("metric == 'vel_max'")) == CALL["num_inference_steps"]
    expected = float(eff.baseline.images.mean() - eff.ablated.images.mean())
    assert eff.table.query("metric == 'drop'").value.item() == pytest.approx(expected)
    assert [m.name for m in resolve_metrics([brightness_drop])] == ["brightness_drop"]


def test_bad_input_fails_before_any_run(pipe):
    calls, h = count_calls(pipe)
    try:
        with pytest.raises(AblationError, match="out of range"):
            run_with_effects(pipe, PROMPT, SkipLayers([9]), **CALL)
        with pytest.raises(ValueError, match="unique"):
            run_with_effects(pipe, PROMPT, SkipLayers([0]), metrics=[mse, mse], **CALL)
        with pytest.raises(TypeError, match="callables"):
            resolve_metrics(["mse"])
        with pytest.raises(ValueError, match="set by the effect runner"):
            run_pipeline(pipe, PROMPT, 0, (), generator=torch.manual_seed(0), **CALL)
        with pytest.raises(ValueError, match="on must be"):
            Metric("x", mse, on="pixels")
    finally:
        h.remove()
    assert calls == []


def test_effects_on_flux_match_a_plain_pipeline_call():
    """Effect runs on Flux (packed latents): the images are what the pipeline decodes itself, the latents are the
    final packed latents, and an ablation's image MSE equals the MSE of two plain calls computed by hand."""
    pipe = mp.tiny_flux_pipeline(seed=1)
    kw = dict(height=32, width=40, max_sequence_length=16, num_inference_steps=2)
    eff = mp.run_with_effects(pipe, "a red circle", mp.SkipLayers([2]), seed=3, **kw)
    plain = pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    with mp.intervene(pipe, mp.SkipLayers([2])):
        skipped = pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    latents = pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    assert torch.equal(eff.baseline.images, plain) and torch.equal(eff.ablated.images, skipped)
    assert torch.equal(eff.baseline.latents, latents) and latents.shape == (1, 80, 16)
    assert len(eff.baseline.velocities) == 2
    got = eff.table.query("metric == 'image_mse'").value.item()
    assert got == pytest.approx(float(((plain - skipped) ** 2).mean()), rel=1e-6) and got > 0
