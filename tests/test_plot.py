"""Figures from real recorded results (tiny model): panels, labels, shared scales, data = result numbers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import mmdit_probe as mp
from mmdit_probe import plot
from mmdit_probe.layout import TEXT_GROUPS

PROMPT = "a red circle left of a blue square"
STEPS = 3


@pytest.fixture(scope="module")
def recorded():
    pipe = mp.tiny_sd3_pipeline()
    with mp.AttentionRecorder(pipe, groups=True, words=True) as rec:
        out = pipe(PROMPT, num_inference_steps=STEPS, max_sequence_length=16, guidance_scale=5.0,
                   generator=torch.manual_seed(0))
    return rec.result, out.images[0]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _mesh(ax) -> np.ndarray:
    """The data of a seaborn heatmap drawn on ``ax`` as a 2-D array."""
    mesh = ax.collections[0]
    arr = np.ma.filled(mesh.get_array(), np.nan)
    rows = mesh.get_coordinates().shape[0] - 1
    return np.asarray(arr).reshape(rows, -1)


def test_quadrant_map_panels_labels_and_data(recorded, tmp_path):
    res, _ = recorded
    path = tmp_path / "q.png"
    fig = plot.quadrant_map(res, branch="cond", path=path)
    assert path.stat().st_size > 0
    heat = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert len(heat) == 4
    titles = [ax.get_title() for ax in heat]
    assert "image → text (image queries attending to text keys)" in titles
    assert "text → image (text queries attending to image keys)" in titles
    table = res.quadrant_table(by=("layer", "step"), branch="cond")
    for ax, quad in zip(heat, mp.QUADRANTS):
        assert ax.get_ylabel() == "layer" and "step" in ax.get_xlabel() and "timestep" in ax.get_xlabel()
        np.testing.assert_allclose(_mesh(ax), table[quad].unstack("step").to_numpy(), rtol=1e-6)
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks[0].endswith(f"t={res.timesteps[0]:.0f}") and len(ticks) == STEPS
    # image->text panel equals the layer-level quadrant table when averaged over steps
    np.testing.assert_allclose(_mesh(heat[1]).mean(1), res.quadrant_table()["image->text"].to_numpy(), rtol=1e-5)
    norms = {(ax.collections[0].norm.vmin, ax.collections[0].norm.vmax) for ax in heat}
    assert len(norms) == 1  # one shared colour scale
    assert len(fig.axes) == 5 and "attention mass" in fig.axes[-1].get_ylabel()  # one colour bar
    assert "cond branch" in fig._suptitle.get_text()


def test_quadrant_map_uncond_and_given_axes(recorded):
    res, _ = recorded
    fig, axs = plt.subplots(2, 2)
    out = plot.quadrant_map(res, branch="uncond", axes=axs)
    assert out is fig
    table = res.quadrant_table(by=("layer", "step"), branch="uncond")
    np.testing.assert_allclose(_mesh(axs[0, 0]), table["image->image"].unstack("step").to_numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="branch"):
        plot.quadrant_map(res, branch="nope")


def test_head_grid(recorded):
    res, _ = recorded
    fig = plot.head_grid(res, "text->image", steps=[0, 1])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert "text → image (text queries attending to image keys)" in ax.get_title() and "steps 0, 1" in ax.get_title()
    want = res.mass.sel(query="text", key="image", attention="attn", batch=[1], step=[0, 1]).mean("step", "batch")
    np.testing.assert_allclose(_mesh(ax), want.values.numpy(), rtol=1e-6)
    assert _mesh(ax).shape == (4, 4)
    with pytest.raises(ValueError, match="quadrant"):
        plot.head_grid(res, "image->sound")


def test_text_group_breakdown(recorded):
    res, _ = recorded
    fig, ax = plt.subplots()
    assert plot.text_group_breakdown(res, ax=ax) is fig
    assert ax.get_xlabel() == "layer" and "image → text" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [plot.GROUP_LABELS[g] for g in TEXT_GROUPS]
    n_layers = res.mass.shape["layer"]
    heights = np.array([p.get_height() for p in ax.patches]).reshape(len(TEXT_GROUPS), n_layers).T
    np.testing.assert_allclose(heights.sum(1), 1.0, rtol=1e-5)
    gm = res.stat("group_mass").sel(query="image", attention="attn", batch=[1], key_group=list(TEXT_GROUPS))
    raw = gm.mean("step", "batch", "head").values.numpy()
    np.testing.assert_allclose(heights, raw / raw.sum(1, keepdims=True), rtol=1e-5)
    fig2 = plot.text_group_breakdown(res, normalize=False)
    heights2 = np.array([p.get_height() for p in fig2.axes[0].patches]).reshape(len(TEXT_GROUPS), n_layers).T
    np.testing.assert_allclose(heights2, raw, rtol=1e-5)


def test_word_maps_overlay_equals_result(recorded, tmp_path):
    res, image = recorded
    words = ["red", "square"]
    fig = plot.word_maps(res, words=words, image=image, layers=[2, 3], path=tmp_path / "w.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and [ax.get_title() for ax in panels] == ["“red”", "“square”"]
    assert "image → word" in fig.axes[-1].get_ylabel()
    for ax, w in zip(panels, words):
        assert len(ax.images) == 2  # generated image + heatmap
        grid = res.word_map(w, layer=[2, 3], batch=1).numpy()
        want = plot.upsample(grid, (image.size[1], image.size[0]))
        np.testing.assert_allclose(np.asarray(ax.images[1].get_array()), want, rtol=1e-5)
    assert (tmp_path / "w.png").stat().st_size > 0
    vmaxes = {ax.images[1].norm.vmax for ax in panels}
    assert len(vmaxes) == 1


def test_word_maps_by_layer_grid(recorded):
    res, _ = recorded
    fig = plot.word_maps(res, words=["blue"], by="layer")
    panels = sorted((ax for ax in fig.axes if ax.images), key=lambda ax: ax.get_position().y0)
    assert len(panels) == 4 and [ax.get_ylabel() for ax in panels] == [f"layer {i}" for i in range(4)]  # layer 0 at the bottom
    with pytest.raises(KeyError, match="not recorded"):
        plot.word_maps(res, words=["green"])


def _sweep_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [dict(prompt="p", seed=s, spec=f"SkipLayers(layers=({l},))", spec_index=l, metric="image_mse",
                 step=st, value=float(rng.random())) for s in range(2) for l in range(4) for st in range(3)]
    return pd.DataFrame(rows)


def test_effect_plots_from_sweep_frame():
    df = _sweep_frame()
    fig = plot.effect_by_layer(df)
    ax = fig.axes[0]
    assert "image_mse" in ax.get_ylabel() and "ablation" in ax.get_xlabel()
    ticks = [t.get_text().replace("\n", "") for t in ax.get_xticklabels()]  # long names are wrapped
    assert ticks == [f"SkipLayers(layers=({l},))" for l in range(4)]
    last = df[df.step == 2].groupby("spec_index").value.mean().to_numpy()
    np.testing.assert_allclose([p.get_height() for p in ax.patches], last, rtol=1e-6)
    fig = plot.step_effect_curves(df)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "denoising step" and len(ax.get_legend().get_texts()) == 4
    with pytest.raises(ValueError, match="metric"):
        plot.effect_by_layer(pd.concat([df, df.assign(metric="other")]))


def test_image_strip(recorded, tmp_path):
    _, image = recorded
    fig = plot.image_strip([image, np.asarray(image), torch.rand(3, 8, 8)], ["baseline", "array", "tensor"],
                           path=tmp_path / "s.png")
    assert [ax.get_title() for ax in fig.axes] == ["baseline", "array", "tensor"]
    assert (tmp_path / "s.png").exists()


def test_plot_is_lazy():
    import subprocess
    import sys

    code = "import sys, mmdit_probe, mmdit_probe.cli; assert 'matplotlib' not in sys.modules, 'eager matplotlib'"
    subprocess.run([sys.executable, "-c", code], check=True)
