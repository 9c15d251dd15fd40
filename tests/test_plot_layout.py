"""Figures read at any real size: rendered from synthetic results (2–50 steps, 4–38 layers, up to 40
heads, long words), saved like the CLI saves them, then checked with text bounding boxes: tick labels
on one axis never overlap, titles lie inside the canvas, error bars stay in the metric's range, and
layer 0 sits at the bottom (y) or left (x)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.transforms import Bbox

import mmdit_probe as mp
from mmdit_probe import plot
from mmdit_probe.layout import KEY_GROUPS, QUERY_GROUPS
from mmdit_probe.named import Stat

SIZES = [(2, 4, 4), (28, 24, 24), (50, 38, 40)]  # (steps, layers, heads)
LONG_WORD = "supercalifragilisticexpialidocious"
QUADS = ("image->image", "image->text", "text->image", "text->text")
LEAD = ("step", "layer", "attention", "batch", "head")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def synthetic_result(steps: int, layers: int, heads: int, words=("red", LONG_WORD), grid=(4, 4), seed: int = 0):
    """An ``AttentionResult`` shaped like a recording (uncond + cond rows, masses summing to 1)."""
    g = torch.Generator().manual_seed(seed)
    lead = (steps, layers, 1, 2, heads)
    p = torch.rand(*lead, 2, generator=g)
    gm = torch.rand(*lead, 2, len(KEY_GROUPS), generator=g)
    coords = {"step": tuple(range(steps)), "layer": tuple(range(layers)), "attention": ("attn",), "batch": (0, 1),
              "head": tuple(range(heads)), "query": QUERY_GROUPS}
    timesteps = tuple(float(t) for t in np.linspace(1000, 1000 / steps, steps))
    aux = {"timestep": ("step", timesteps), "branch": ("batch", ("uncond", "cond"))}
    stats = {"mass": Stat(torch.stack([p, 1 - p], -1), LEAD + ("query", "key"), {**coords, "key": QUERY_GROUPS}, aux),
             "group_mass": Stat(gm / gm.sum(-1, keepdim=True), LEAD + ("query", "key_group"),
                                {**coords, "key_group": KEY_GROUPS}, aux)}
    wm = torch.rand(steps, layers, 1, 2, len(words), grid[0] * grid[1], generator=g)
    wcoords = {k: v for k, v in coords.items() if k not in ("head", "query")}
    stats["word_map"] = Stat(wm, LEAD[:4] + ("word", "image_token"), {**wcoords, "word": tuple(words)}, aux)
    return mp.AttentionResult(stats, meta={"image_grid": list(grid)})


def sweep_frame(layers: int, steps: int, metric: str = "image_mse", seeds: int = 3, quadrants=QUADS) -> pd.DataFrame:
    """A knock-out sweep frame (columns as ``mmdit_probe.sweep`` writes them) with skewed values near 0."""
    rng = np.random.default_rng(0)
    rows = [dict(prompt="p", seed=s, spec=f"knock out {q} in block {l}", spec_index=l * len(quadrants) + i,
                 layer=l, quadrant=q, metric=metric, step=st, value=float(rng.exponential(0.05)))
            for s in range(seeds) for l in range(layers) for i, q in enumerate(quadrants) for st in range(steps)]
    return pd.DataFrame(rows)


# ---- checks --------------------------------------------------------------------------------
def draw(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def saved(fig, path):
    """The PNG exists and is the whole canvas (nothing cropped or padded)."""
    img = mpimg.imread(path)
    w, h = fig.canvas.get_width_height()
    assert img.shape[:2] == (h, w)


def visible_ticklabels(ax, which: str):
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(axis.get_view_interval())
    return [t.label1 for t in axis.get_major_ticks()
            if t.label1.get_visible() and t.label1.get_text() and lo - 1e-9 <= t.get_loc() <= hi + 1e-9]


def assert_no_overlap(texts, renderer, what: str):
    """No two of ``texts`` overlap by half a pixel or more (all pairs, vectorised)."""
    texts = [t for t in texts if t.get_text()]
    if len(texts) < 2:
        return
    b = np.array([t.get_window_extent(renderer).extents for t in texts])  # x0, y0, x1, y1
    w = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
    h = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
    hit = (w >= 0.5) & (h >= 0.5)
    np.fill_diagonal(hit, False)
    i, j = np.argwhere(hit)[0] if hit.any() else (None, None)
    assert i is None, f"{what}: {texts[i].get_text()!r} overlaps {texts[j].get_text()!r}"


def assert_ticks_readable(fig, renderer):
    for ax in fig.axes:
        for which in ("x", "y"):
            assert_no_overlap(visible_ticklabels(ax, which), renderer, f"{which} tick labels of {ax.get_title()!r}")


def titles(fig):
    out = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        out += [t for t in (ax.title, ax._left_title, ax._right_title) if t.get_text()]
    return out


def assert_inside_canvas(fig, renderer, artists):
    canvas = fig.bbox
    for t in artists:
        if (hasattr(t, "get_text") and not t.get_text()) or not t.get_visible():
            continue
        b = t.get_window_extent(renderer)
        assert b.x0 >= canvas.x0 - 1 and b.x1 <= canvas.x1 + 1 and b.y0 >= canvas.y0 - 1 and b.y1 <= canvas.y1 + 1, \
            f"{t} at {b.bounds} is outside the {canvas.bounds} canvas"


def assert_readable(fig, path):
    """Draw, check the PNG is the whole canvas, tick labels don't collide, and titles, axis labels and
    legends are inside the canvas."""
    renderer = draw(fig)
    saved(fig, path)
    assert_ticks_readable(fig, renderer)
    labels = [a.label for ax in fig.axes for a in (ax.xaxis, ax.yaxis)]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert_inside_canvas(fig, renderer, titles(fig) + labels + legends)
    return renderer


def heat_axes(fig):
    return [ax for ax in fig.axes if ax.collections and ax.get_ylabel() == "layer"]


def assert_layer_zero_low(ax):
    """Layer 0's tick is the lowest on the y axis."""
    ticks = {t.label1.get_text(): t.label1.get_window_extent().y0 for t in ax.yaxis.get_major_ticks()
             if t.label1.get_text()}
    assert "0" in ticks and ticks["0"] == min(ticks.values())


# ---- attention figures ---------------------------------------------------------------------
@pytest.mark.parametrize("steps,layers,heads", SIZES)
def test_quadrant_map_any_size(steps, layers, heads, tmp_path):
    res = synthetic_result(steps, layers, heads)
    fig = plot.quadrant_map(res, path=tmp_path / "q.png")
    assert_readable(fig, tmp_path / "q.png")
    panels = heat_axes(fig)
    assert len(panels) == 4
    for ax in panels:
        labels = [t.get_text() for t in visible_ticklabels(ax, "x")]
        assert labels[0] == f"0\nt={res.timesteps[0]:.0f}" and 2 <= len(labels) <= steps
        assert_layer_zero_low(ax)
        n_annot = len(ax.texts)
        assert n_annot in (0, steps * layers)  # all cells or none
        if n_annot:
            assert_no_overlap(ax.texts, fig.canvas.get_renderer(), "cell numbers")
    assert len(heat_axes(fig)[0].texts) == (steps * layers if steps * layers <= 16 else 0)


@pytest.mark.parametrize("steps,layers,heads", SIZES)
def test_head_grid_any_size(steps, layers, heads, tmp_path):
    res = synthetic_result(min(steps, 3), layers, heads)
    fig = plot.head_grid(res, "image->text", path=tmp_path / "h.png")
    assert_readable(fig, tmp_path / "h.png")
    ax = heat_axes(fig)[0]
    assert_layer_zero_low(ax)
    assert [t.get_text() for t in visible_ticklabels(ax, "x")][0] == "0"
    if ax.texts:
        assert_no_overlap(ax.texts, fig.canvas.get_renderer(), "cell numbers")


def test_head_grids_composed_with_ax(tmp_path):
    res = synthetic_result(3, 4, 4)
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.5))
    plot.head_grid(res, "image->text", ax=axs[0])
    plot.head_grid(res, "text->image", ax=axs[1], path=tmp_path / "two.png")
    renderer = assert_readable(fig, tmp_path / "two.png")
    split = axs[1].get_position().x0
    left = Bbox.union([a.get_tightbbox(renderer) for a in fig.axes if a.get_position().x0 < split])  # + colour bar
    right = Bbox.union([a.get_tightbbox(renderer) for a in fig.axes if a.get_position().x0 >= split])
    assert left.x1 <= right.x0 + 0.5, "the left panel's colour bar or title runs into the right panel"
    assert_no_overlap([axs[0].title, axs[1].title], renderer, "panel titles")


@pytest.mark.parametrize("layers", [4, 24, 38])
def test_text_group_breakdown_any_size(layers, tmp_path):
    fig = plot.text_group_breakdown(synthetic_result(2, layers, 4), path=tmp_path / "t.png")
    assert_readable(fig, tmp_path / "t.png")
    ax = fig.axes[0]
    xs = [t.get_text() for t in visible_ticklabels(ax, "x")]
    assert xs[0] == "0" and [int(x) for x in xs] == sorted(int(x) for x in xs)  # layer 0 at the left


@pytest.mark.parametrize("by,steps,layers", [(None, 2, 4), ("step", 28, 4), ("layer", 2, 24)])
def test_word_maps_long_words(by, steps, layers, tmp_path):
    res = synthetic_result(steps, layers, 2, words=("red", LONG_WORD, "antidisestablishmentarianism"))
    sel = {"steps": [0, steps // 2, steps - 1]} if by == "step" else {"layers": [0, 1, layers - 1]} if by else {}
    fig = plot.word_maps(res, by=by, path=tmp_path / "w.png", **sel)
    renderer = assert_readable(fig, tmp_path / "w.png")
    top = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert len(top) == 3
    assert_no_overlap([ax.title for ax in top], renderer, "word titles")
    if by == "layer":
        rows = sorted((ax for ax in fig.axes if ax.images and ax.get_ylabel()), key=lambda a: a.get_position().y0)
        assert rows[0].get_ylabel() == "layer 0"


# ---- ablation figures ----------------------------------------------------------------------
def _errorbar_ys(ax) -> np.ndarray:
    segs = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
    return np.concatenate([np.asarray(s)[:, 1] for s in segs]) if segs else np.array([])


@pytest.mark.parametrize("layers", [4, 24, 38])
def test_effect_by_layer_any_size_and_range(layers, tmp_path):
    df = sweep_frame(layers, 2)
    fig = plot.effect_by_layer(df, "image_mse", x="layer", hue="quadrant", path=tmp_path / "e.png")
    assert_readable(fig, tmp_path / "e.png")
    ax = fig.axes[0]
    ys = _errorbar_ys(ax)
    assert ys.size and ys.min() >= 0.0, "mse error bars go below 0"
    assert ax.get_ylim()[0] >= 0.0
    xs = [int(t.get_text()) for t in visible_ticklabels(ax, "x")]
    assert xs[0] == 0 and xs == sorted(xs)


def test_effect_by_layer_cosine_and_long_spec_names(tmp_path):
    df = sweep_frame(6, 1, metric="velocity_cosine")
    df["value"] = 1.0 - df["value"]  # cosines just under 1
    df["spec"] = df["spec"].str.replace("knock out", f"zero text ['{LONG_WORD}'] and knock out")
    fig = plot.effect_by_layer(df, x="spec", path=tmp_path / "c.png")
    assert_readable(fig, tmp_path / "c.png")
    ys = _errorbar_ys(fig.axes[0])
    assert ys.max() <= 1.0, "cosine error bars go above 1"
    labels = [t.get_text() for t in visible_ticklabels(fig.axes[0], "x")]
    assert len(set(labels)) == len(labels) == 24  # shortened names stay distinct


@pytest.mark.parametrize("steps", [2, 28, 50])
def test_step_effect_curves_many_lines(steps, tmp_path):
    df = sweep_frame(4, steps, metric="velocity_mse")  # 16 ablations
    fig = plot.step_effect_curves(df, path=tmp_path / "s.png")
    assert_readable(fig, tmp_path / "s.png")
    ax = fig.axes[0]
    lines = [l for l in ax.get_lines() if l.get_label() and not l.get_label().startswith("_")]
    assert len(lines) == 16
    styles = {(tuple(np.round(matplotlib.colors.to_rgb(l.get_color()), 3)), l.get_linestyle()) for l in lines}
    assert len(styles) == 16, "lines are not distinguishable"
    ticks = [t.get_loc() for t in ax.xaxis.get_major_ticks() if t.label1.get_text()]
    assert all(float(x).is_integer() for x in ticks), "step ticks are not integers"
    few = plot.step_effect_curves(sweep_frame(1, steps, metric="velocity_mse"))
    bands = [p.vertices[:, 1] for c in few.axes[0].collections if isinstance(c, PolyCollection) for p in c.get_paths()]
    assert bands and np.concatenate(bands).min() >= 0.0, "mse s.d. band goes below 0"
    pal = [matplotlib.colors.to_hex(l.get_color()) for l in few.axes[0].get_lines()[:4]]
    assert pal == [matplotlib.colors.to_hex(c) for c in plot.many_colors(4)]


def test_metric_range():
    assert plot.metric_range("image_mse") == (0.0, float("inf"))
    assert plot.metric_range("velocity_cosine") == (-1.0, 1.0)
    assert plot.metric_range("image_psnr") == (float("-inf"), float("inf"))


@pytest.mark.parametrize("n", [3, 17])
def test_image_strip_long_titles(n, tmp_path):
    names = ["baseline"] + [f"KnockOut(quadrant='image->text', layers=({i}, {i + 1}, {i + 2}), steps=None)"
                            for i in range(n - 1)]
    images = [torch.rand(3, 8, 8) for _ in names]
    fig = plot.image_strip(images, names, title=f"'a red circle left of a blue square', seed 0: {LONG_WORD} " * 2,
                           path=tmp_path / "i.png")
    renderer = assert_readable(fig, tmp_path / "i.png")
    assert_no_overlap(titles(fig), renderer, "image titles")
    assert len(fig.axes) == n


def test_public_names_kept():
    for name in ("quadrant_label", "quadrant_map", "head_grid", "text_group_breakdown", "word_maps", "word_grid",
                 "upsample", "effect_by_layer", "step_effect_curves", "image_strip", "GROUP_LABELS"):
        assert getattr(mp.plot, name) is getattr(plot, name)
