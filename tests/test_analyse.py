"""Real-image analysis (issue 16): ``analyse_image`` at σ is the pipeline's own step at σ — the same transformer
inputs and output (bitwise, CPU fp32) and the same recorded statistics and labels — on SD3, SD3.5 and Flux;
VAE encoding and noising against a hand computation; bad input refused before anything computes; the CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import mmdit_probe as mp
from mmdit_probe import cli
from mmdit_probe.analyse import analyse_image, analysis_inputs
from mmdit_probe.concepts import ConceptProbe

PROMPT = "a red circle left of a blue square"
L = 16  # T5 length of the tiny models
CONCEPTS = ["circle", "square", "blue"]


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": mp.tiny_sd3_pipeline("sd3"), "sd35": mp.tiny_sd3_pipeline("sd35"), "flux": mp.tiny_flux_pipeline()}


def _image(h=32, w=40, seed=0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _scheduler_sigma(pipe, sigmas_in: list[float]) -> float:
    """The σ the pipeline's scheduler runs at step 0 when given ``sigmas=sigmas_in`` (it shifts them)."""
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(sigmas=sigmas_in)
    return float(sched.sigmas[0])


def _hand_latents(pipe, image: torch.Tensor, seed: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 (VAE posterior mean, normalised as the pipeline decodes, inverted) and x_σ in fp64, unpacked [1, C, h, w]."""
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(image[None] * 2 - 1).latent_dist.mean
    x0 = ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).double()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).double()
    return x0, (1 - sigma) * x0 + sigma * eps


def _unpack(pipe, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    if isinstance(pipe, FluxPipeline):
        return pipe._unpack_latents(x, image.shape[-2], image.shape[-1], pipe.vae_scale_factor)
    return x


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_analysis_equals_pipeline_step(pipes, name):
    """Step 0 of a pipeline run whose scheduler starts at σ, with the noised image latents as ``latents``: the
    transformer gets the same tensors, returns the same output, and the recorder the same statistics."""
    pipe = pipes[name]
    image, seed, guidance = _image(), 3, (5.0 if name != "flux" else 3.5)
    sigmas_in = [0.45, 0.2]
    sigma = _scheduler_sigma(pipe, sigmas_in)
    inputs = analysis_inputs(pipe, image, PROMPT, [sigma], seed=seed, guidance_scale=guidance, max_sequence_length=L)
    # the VAE / noising path against a hand computation
    x0, xs = _hand_latents(pipe, image, seed, sigma)
    torch.testing.assert_close(_unpack(pipe, inputs.clean, image).double(), x0, rtol=0, atol=1e-5)
    mine = inputs.calls[0]["hidden_states"][-1:]
    torch.testing.assert_close(_unpack(pipe, mine, image).double(), xs, rtol=0, atol=1e-5)

    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: seen.append((dict(kw), out[0].clone())), with_kwargs=True)
    try:
        with mp.AttentionRecorder(pipe, words=True, groups=True) as rec, \
                ConceptProbe(pipe, CONCEPTS, max_sequence_length=L) as cp:
            pipe(PROMPT, latents=inputs.calls[0]["hidden_states"][-1:].clone(), sigmas=sigmas_in, guidance_scale=guidance,
                 max_sequence_length=L, height=image.shape[-2], width=image.shape[-1], output_type="latent")
    finally:
        hook.remove()
    ref_kwargs, ref_out = seen[0]
    assert torch.equal(ref_kwargs["timestep"], inputs.calls[0]["timestep"])
    for k, v in inputs.calls[0].items():
        if torch.is_tensor(v):
            assert torch.equal(ref_kwargs[k], v), k
        else:
            assert ref_kwargs.get(k) == v, k
    with torch.no_grad():
        out = pipe.transformer(**inputs.calls[0])[0]
    assert torch.equal(out, ref_out)  # also: the call under analyse_image's recorder below changes nothing

    res = analyse_image(pipe, image, PROMPT, [sigma], seed=seed, guidance_scale=guidance, max_sequence_length=L,
                        words=True, groups=True, concepts=CONCEPTS)
    ref = rec.result.sel(step=[0])
    assert res.branches == ref.branches == (("uncond", "cond") if name != "flux" else ("cond",))
    assert res.mass.aux["prompt"] == ref.mass.aux["prompt"]
    assert res.timesteps == ref.timesteps and res.mass.aux["sigma"] == ("step", (sigma,))
    assert [l.prompt for l in res.layouts] == [l.prompt for l in ref.layouts]
    assert [l.text for l in res.layouts] == [l.text for l in ref.layouts]
    for stat in ("mass", "group_mass", "word_map"):
        a, b = res.stat(stat), ref.stat(stat)
        assert a.dims == b.dims and a.coords == b.coords
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(a.recorded, b.recorded)
    mine, theirs = res.concepts, cp.result
    assert mine.branches == theirs.branches and mine.steps == (0,) and mine.concepts == theirs.concepts
    for field in ("raw", "image_mass", "scores"):
        torch.testing.assert_close(getattr(mine, field), getattr(theirs, field)[:1], rtol=0, atol=0, equal_nan=True)


def test_steps_are_sigmas_and_match_single_calls(pipes):
    """Several σ: step i is σ_i (coordinate, timestep 1000·σ), each equal to analysing that σ alone; the frame has a
    ``sigma`` column; results save and load with it."""
    pipe, image = pipes["sd3"], _image()
    sigmas = [0.8, 0.25]
    res = analyse_image(pipe, image, PROMPT, sigmas, seed=1, max_sequence_length=L, words=["circle", "square"])
    assert res.mass.labels("step") == (0, 1) and res.mass.aux["sigma"] == ("step", tuple(sigmas))
    np.testing.assert_allclose(res.timesteps, [1000 * s for s in sigmas], rtol=1e-6)
    for i, s in enumerate(sigmas):
        one = analyse_image(pipe, image, PROMPT, [s], seed=1, max_sequence_length=L, words=["circle", "square"])
        torch.testing.assert_close(res.sel(step=[i]).mass.values, one.mass.values, rtol=0, atol=0)
        torch.testing.assert_close(res.word_map("circle", step=i), one.word_map("circle"), rtol=0, atol=0, equal_nan=True)
    df = res.to_dataframe()
    assert sorted(df.sigma.unique()) == sorted(sigmas)
    assert set(df.groupby("step").sigma.first().round(6)) == {round(s, 6) for s in sigmas}
    assert res.meta["analysis"]["sigmas"] == sigmas


def test_saved_and_loaded(pipes, tmp_path):
    res = analyse_image(pipes["flux"], _image(), PROMPT, [0.6, 0.3], max_sequence_length=L, words=True)
    back = mp.AttentionResult.load(res.save(tmp_path / "a.safetensors"))
    assert back.mass.aux["sigma"] == ("step", (0.6, 0.3)) and back.meta["analysis"]["family"] == "flux"
    torch.testing.assert_close(back.word_map("red"), res.word_map("red"), rtol=0, atol=0)


def test_noise_is_shared_and_seeded(pipes):
    pipe, image = pipes["sd3"], _image()
    a = analysis_inputs(pipe, image, PROMPT, [0.0, 1.0, 0.5], seed=7, max_sequence_length=L)
    b = analysis_inputs(pipe, image, PROMPT, [0.5], seed=8, max_sequence_length=L)
    x = [c["hidden_states"][-1:] for c in a.calls]
    assert torch.equal(x[0], a.clean) and torch.equal(x[1], a.noise)  # σ = 0: the clean latents; σ = 1: the noise
    torch.testing.assert_close(x[2], (a.clean + a.noise) / 2, rtol=0, atol=1e-6)
    assert not torch.equal(b.noise, a.noise) and torch.equal(b.clean, a.clean)


def test_pil_tensor_and_array_give_the_same_inputs(pipes):
    from PIL import Image

    pipe = pipes["sd3"]
    arr = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    outs = [analysis_inputs(pipe, im, PROMPT, [0.5], max_sequence_length=L).clean
            for im in (pil, t, arr.astype(np.float32) / 255, t[None])]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-5)  # uint8 → float rounding differs by path


def test_height_and_width_resize(pipes):
    """``height`` / ``width`` resize the image as the pipeline's image processor does; the grid follows."""
    pipe = pipes["flux"]
    inp = analysis_inputs(pipe, _image(30, 40), PROMPT, [0.5], height=32, width=48, max_sequence_length=L)
    ref = pipe.image_processor.preprocess(_image(30, 40), height=32, width=48)
    assert tuple(ref.shape[-2:]) == (32, 48)
    assert inp.calls[0]["hidden_states"].shape[1] == (32 // 4) * (48 // 4)  # packed tokens: VAE 2×, then 2×2
    assert inp.layouts[0].image_grid == (8, 12) and inp.settings["height"] == 32


def test_specs_apply_and_processors_restored(pipes):
    pipe = pipes["sd35"]
    before = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    res = analyse_image(pipe, _image(), PROMPT, [0.5, 0.7], max_sequence_length=L,
                        specs=[mp.KnockOut("image->text", layers=[1], steps=[1])])
    m = res.mass.sel(attention="attn", query="image", key="text")
    assert float(m.sel(step=1, layer=1).values.abs().max()) == 0.0
    assert float(m.sel(step=0, layer=1).values.min()) > 0.0
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == before

    class Boom(mp.Statistic):
        name, dims, attentions = "boom", (), ("attn",)

        def compute(self, call, q, k, v, lse):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        analyse_image(pipe, _image(), PROMPT, [0.5], max_sequence_length=L, statistics=[Boom()])
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == before
    assert not hasattr(pipe.transformer, "_mmdit_probe_controller") or \
        "_mmdit_probe_controller" not in pipe.transformer.__dict__


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"sigmas": [0.3, 1.5]}, ValueError, "out of range: [1.5]"),
    ({"sigmas": []}, ValueError, "non-empty"),
    ({"sigmas": ["x"]}, ValueError, "numbers in [0, 1]"),
    ({"image": torch.rand(3, 30, 40)}, ValueError, "pass height=28, width=40"),
    ({"image": torch.rand(30, 40, 3)}, ValueError, "[3, H, W]"),
    ({"image": torch.rand(3, 32, 40) * 2}, ValueError, "in 0…1"),
    ({"image": "scene.png"}, TypeError, "PIL image"),
    ({"prompt": ["a", "b"]}, TypeError, "one string"),
    ({"seed": -1}, ValueError, "seed"),
    ({"layout": None}, TypeError, "leave out layout"),
    ({"layers": [9]}, Exception, "9"),
    ({"maps": mp.MapSelection("image->text", steps=[2])}, ValueError, "steps [2] do not exist"),
    ({"specs": [mp.SkipLayers([0], steps=[5])]}, ValueError, "steps [5] do not exist"),
])
def test_bad_input_refused_before_compute(pipes, kwargs, error, needle):
    pipe = pipes["sd3"]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (pipe.vae, pipe.transformer,
                                                                                 pipe.text_encoder)]
    args = {"image": _image(), "prompt": PROMPT, "sigmas": [0.3, 0.6], **kwargs}
    try:
        with pytest.raises(error) as info:
            analyse_image(pipe, args.pop("image"), args.pop("prompt"), args.pop("sigmas"), max_sequence_length=L,
                          **args)
    finally:
        for h in hooks:
            h.remove()
    assert needle in str(info.value)
    assert calls == []


def test_refused_while_the_pipeline_is_probed(pipes):
    pipe = pipes["sd3"]
    with mp.intervene(pipe, mp.SkipLayers([0])):
        with pytest.raises(RuntimeError, match="specs="):
            analyse_image(pipe, _image(), PROMPT, [0.5], max_sequence_length=L)
    with pytest.raises(TypeError, match="whole pipeline"):
        analysis_inputs(pipe.transformer, _image(), PROMPT, [0.5])


def test_flux_refuses_negative_prompt(pipes):
    with pytest.raises(ValueError, match="negative_prompt"):
        analyse_image(pipes["flux"], _image(), PROMPT, [0.5], negative_prompt="blurry", max_sequence_length=L)


# ---- command line -----------------------------------------------------------------------------------------------
def _png(path, h=32, w=32):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_cli_analyse_writes_results(tmp_path, capsys):
    img = _png(tmp_path / "img.png")
    out = tmp_path / "out"
    assert cli.main(["analyse", str(img), "--prompt", "a red circle", "--sigmas", "0.7", "0.2", "--out", str(out),
                     "--model", "tiny", "--max-sequence-length", "16", "--groups", "--no-figure",
                     "--concepts", "square", "blue"]) == 0
    res = mp.AttentionResult.load(out / "analysis.safetensors")
    assert res.mass.aux["sigma"] == ("step", (0.7, 0.2)) and set(res.words) == {"a", "red", "circle"}
    assert "group_mass" in res.stats and res.meta["run"]["image"] == "analysis_image.png"
    assert (out / "analysis_image.png").is_file() and (out / "analysis_summary.csv").is_file()
    ref = analyse_image(mp.tiny_sd3_pipeline(), _png_tensor(img), "a red circle", [0.7, 0.2],
                        max_sequence_length=16, guidance_scale=5.0, words=True, concepts=["square", "blue"])
    torch.testing.assert_close(res.word_map("red"), ref.word_map("red"), rtol=0, atol=1e-6, equal_nan=True)
    saved = np.load(out / "concept_maps.npz")
    assert list(saved["concepts"]) == ["square", "blue"] and list(saved["sigmas"]) == [0.7, 0.2]
    np.testing.assert_allclose(saved["output_space"], ref.concepts.output_space.numpy(), rtol=0, atol=1e-5)
    assert "0.700" in capsys.readouterr().out


def _png_tensor(path):
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


@pytest.fixture
def no_model(monkeypatch):
    import mmdit_probe.models
    import mmdit_probe.shapes

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    for mod, name in ((mmdit_probe.models, "load_pipeline"), (mmdit_probe.shapes, "default_pipeline"),
                      (mmdit_probe.shapes, "shapes_pipeline")):
        monkeypatch.setattr(mod, name, loaded)


@pytest.mark.parametrize("argv, needle", [
    (["analyse", "missing.png", "--prompt", "x"], "does not exist"),
    (["analyse", "img.png", "--prompt", "x", "--sigmas", "2"], "sigma is in [0, 1]"),
    (["analyse", "img.png", "--prompt", "x", "--out", "img.png"], "is a file"),
    (["analyse", "img.png", "--prompt", " "], "--prompt is empty"),
    (["analyse", "notimage.txt", "--prompt", "x"], "not an image file"),
    (["analyse", "img.png", "--prompt", "x", "--device", "foo"], "unknown --device"),
])
def test_cli_inputs_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model, argv, needle):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "img.png")
    (tmp_path / "notimage.txt").write_text("hello")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_cli_image_size_refused_with_the_fix(tmp_path, capsys):
    img = _png(tmp_path / "img.png", h=30, w=32)
    assert cli.main(["analyse", str(img), "--prompt", "a", "--model", "tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pass height=28, width=32" in err and not (tmp_path / "o" / "analysis.safetensors").exists()
