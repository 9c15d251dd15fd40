"""Figures of a :class:`~mmdit_probe.study.Study` with bootstrap interval bands (matplotlib / seaborn).

Imported only by the ``Study.plot_*`` methods. Every function returns the figure, draws into ``ax=`` /
``axes=`` when given and saves a PNG with ``path=``. Bands and whiskers are the percentile bootstrap
intervals over prompts of :meth:`Study.summary` / :meth:`Study.difference` (level in the titles).
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from ..maps import QUADRANTS
from ..plot.attention import GROUP_LABELS, quadrant_label
from ..plot.util import finish, many_colors, new_axes, use_layout

__all__ = ["quadrant_lines", "group_bars", "difference_map", "word_map_grid"]


def _level(study: Any, kw: dict) -> float:
    return kw.get("level") or study.options["level"]


def quadrant_lines(study: Any, x: str = "layer", *, setting: str | Sequence[str] | None = None, branch: str = "cond",
                   attention: str = "attn", ax: Any = None, path: Any = None, title: str | None = None, **kw) -> Any:
    """Mass of each quadrant (query → key) against ``x`` (``layer`` or ``step``), the other cell dims
    averaged within each prompt; a line per quadrant (and line style per setting) with its interval band."""
    if x not in ("layer", "step"):
        raise ValueError(f"x must be 'layer' or 'step', got {x!r}")
    names = study.settings[:1] if setting is None else [setting] if isinstance(setting, str) else list(setting)
    df = study.summary(by=[x, "query", "key"], setting=names, statistic="mass",
                       where={"branch": branch, "attention": attention}, **kw)
    if df is None or not len(df):
        raise ValueError(f"no mass cells for branch {branch!r}, attention {attention!r}")
    fig, ax = new_axes(ax, figsize=(7, 4.2))
    colors = dict(zip(QUADRANTS, many_colors(len(QUADRANTS))))
    styles = ["-", "--", ":", "-."]
    for si, name in enumerate(names):
        for quad in QUADRANTS:
            q, k = quad.split("->")
            d = df[(df["setting"] == name) & (df["query"] == q) & (df["key"] == k)].sort_values(x)
            if not len(d):
                continue
            label = quadrant_label(quad, short=True) + (f" — {name}" if len(names) > 1 else "")
            ax.plot(d[x], d["mean"], styles[si % len(styles)], marker="o", ms=3, color=colors[quad], label=label)
            ax.fill_between(d[x], d["ci_low"], d["ci_high"], color=colors[quad], alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel("attention mass")
    n = int(df["n"].max())
    ax.set_title(title or f"quadrant mass by {x}, {branch} branch, {attention} (mean over {n} prompts, "
                          f"{_level(study, kw):.0%} bootstrap interval)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return finish(fig, path)


def group_bars(study: Any, *, setting: str | None = None, query: str = "image", branch: str = "cond",
               attention: str = "attn", ax: Any = None, path: Any = None, **kw) -> Any:
    """Mass of ``query`` tokens on each key group (image, CLIP/T5 real/special/padding): bars with interval whiskers."""
    name = setting or study.settings[0]
    df = study.summary(by=["query", "key"], setting=name, statistic="group_mass",
                       where={"branch": branch, "attention": attention}, **kw)
    df = df[df["query"] == query]
    if not len(df):
        raise ValueError(f"no group_mass cells for {query} queries (record statistics with 'group_mass')")
    order = ["image"] + [g for g in GROUP_LABELS if g in set(df["key"])]
    df = df.set_index("key").loc[[g for g in order if g in df["key"].values]].reset_index()
    fig, ax = new_axes(ax, figsize=(7, 3.6))
    ypos = np.arange(len(df))
    err = np.vstack([df["mean"] - df["ci_low"], df["ci_high"] - df["mean"]])
    ax.barh(ypos, df["mean"], xerr=np.nan_to_num(err), color=many_colors(len(df)), capsize=3)
    ax.set_yticks(ypos)
    ax.set_yticklabels([GROUP_LABELS.get(g, g) for g in df["key"]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("attention mass")
    ax.set_title(f"{query} queries: mass per key group ({name}, {branch}, {attention}; mean over "
                 f"{int(df['n'].max())} prompts, {_level(study, kw):.0%} bootstrap interval)", fontsize=9)
    return finish(fig, path)


def difference_map(study: Any, a: str | None = None, b: str | None = None, *, branch: str = "cond",
                   attention: str = "attn", statistic: str = "mass", axes: Any = None, path: Any = None,
                   cmap: str = "RdBu_r", **kw) -> Any:
    """``b − a`` per quadrant as a layer × step map (red: ``b`` attends more); a dot marks a cell whose
    interval excludes 0."""
    df = study.difference(a, b, by=["step", "layer", "query", "key"], statistic=statistic,
                          where={"branch": branch, "attention": attention}, **kw)
    if df is None or not len(df):
        raise ValueError("no cells in common between the two settings")
    a, b = df["a"].iloc[0], df["b"].iloc[0]
    quads = [q for q in QUADRANTS if ((df["query"] + "->" + df["key"]) == q).any()]
    steps, layers = sorted(df["step"].unique()), sorted(df["layer"].unique())
    lim = float(np.nanmax(np.abs(df["mean"].to_numpy()))) or 1e-12
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    if axes is None:
        fig, axes = plt.subplots(1, len(quads), figsize=(3.2 * len(quads) + 1, 3.4), squeeze=False,
                                 constrained_layout=True)
        axes = axes[0]
    else:
        axes = np.ravel(axes)
        fig = use_layout(axes[0].figure)
    im = None
    for ax, quad in zip(axes, quads):
        q, k = quad.split("->")
        d = df[(df["query"] == q) & (df["key"] == k)]
        grid = np.full((len(layers), len(steps)), np.nan)
        sig = np.zeros_like(grid, dtype=bool)
        li = {v: i for i, v in enumerate(layers)}
        si = {v: i for i, v in enumerate(steps)}
        for _, r in d.iterrows():
            grid[li[r["layer"]], si[r["step"]]] = r["mean"]
            sig[li[r["layer"]], si[r["step"]]] = r["ci_low"] > 0 or r["ci_high"] < 0
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", origin="lower")
        yy, xx = np.nonzero(sig)
        ax.scatter(xx, yy, s=6, c="k", marker="o", linewidths=0)
        ax.set_title(quadrant_label(quad, short=True), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        stride_s, stride_l = max(1, len(steps) // 10), max(1, len(layers) // 12)
        ax.set_xticks(range(0, len(steps), stride_s))
        ax.set_xticklabels([str(s) for s in steps[::stride_s]], fontsize=7)
        ax.set_yticks(range(0, len(layers), stride_l))
        ax.set_yticklabels([str(v) for v in layers[::stride_l]], fontsize=7)
    fig.colorbar(im, ax=list(axes), shrink=0.85, label=f"{statistic}: {b} − {a}")
    fig.suptitle(f"{statistic} difference {b} − {a} ({branch}, {attention}; mean over {int(df['n'].max())} prompts "
                 f"paired by prompt and seed; dot: {_level(study, kw):.0%} bootstrap interval excludes 0)", fontsize=9)
    return finish(fig, path)


def word_map_grid(study: Any, words: Sequence[str] | None = None, *, setting: str | None = None, branch: str = "cond",
                  max_words: int = 8, path: Any = None, **kw) -> Any:
    """Top row: each word's mean map over the prompts naming it; bottom row: the interval width
    (``ci_high − ci_low``), on shared colour scales. Default words: the ``max_words`` most frequent."""
    words = list(words) if words is not None else list(study.word_counts(setting))[:max_words]  # most frequent
    if not words:
        raise ValueError("no word maps in this study (statistics must include 'word_map')")
    maps = {w: study.word_map(w, setting, branch, **kw) for w in words}
    vmax = max(float(np.nanmax(m["mean"])) for m in maps.values())
    wmax = max(float(np.nanmax(m["ci_high"] - m["ci_low"])) if np.isfinite(m["ci_high"]).any() else 0.0
               for m in maps.values()) or 1e-12
    fig, axes = plt.subplots(2, len(words), figsize=(1.9 * len(words) + 1.2, 4.2), squeeze=False,
                             constrained_layout=True)
    top = bottom = None
    for j, w in enumerate(words):
        m = maps[w]
        top = axes[0, j].imshow(m["mean"], cmap="magma", vmin=0, vmax=vmax)
        bottom = axes[1, j].imshow(m["ci_high"] - m["ci_low"], cmap="viridis", vmin=0, vmax=wmax)
        axes[0, j].set_title(f"{w!r} (n={m['n']})", fontsize=8)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mean", fontsize=8)
    axes[1, 0].set_ylabel("interval width", fontsize=8)
    fig.colorbar(top, ax=list(axes[0]), shrink=0.8)
    fig.colorbar(bottom, ax=list(axes[1]), shrink=0.8)
    fig.suptitle(f"image→word attention ({setting or study.settings[0]}, {branch}; head mean, steps and layers "
                 f"averaged; {_level(study, kw):.0%} bootstrap interval over prompts)", fontsize=9)
    return finish(fig, path)
