"""Ablation figures from sweep DataFrames (columns prompt, seed, spec, spec_index, metric, step, value).

Error bars and bands are mean ± s.d., clipped to the metric's valid range (:func:`metric_range`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .attention import TICK_SIZE, set_title
from .text import shorten, text_size_pt, wrap_text
from .ticks import set_category_ticks
from .util import clamp, finish, many_colors, new_axes, slot_width_pt

REQUIRED = ("spec", "metric", "value")
#: Valid value range of metrics by name suffix (``image_mse`` → ``mse``).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "mse": (0.0, math.inf), "mae": (0.0, math.inf), "l1": (0.0, math.inf), "l2": (0.0, math.inf),
    "rmse": (0.0, math.inf), "cosine": (-1.0, 1.0),
}
LINE_STYLES = ("-", "--", ":", "-.")
MAX_BANDS = 6  # more lines than this are drawn without s.d. bands, which would hide each other
LEGEND_CHARS = 48
TICK_CHARS = 40


def metric_range(metric: str) -> tuple[float, float]:
    """``(low, high)`` a metric's values can take: ``(0, inf)`` for ``*_mse``, ``(-1, 1)`` for
    ``*_cosine``, unbounded for anything else (e.g. PSNR)."""
    for key, rng in METRIC_RANGES.items():
        if metric == key or metric.endswith("_" + key):
            return rng
    return (-math.inf, math.inf)


def spread(values: pd.Series, metric: str) -> tuple[float, float, float]:
    """``(mean, low, high)``: mean ± sample s.d. clipped to ``metric_range`` (low = high = mean for one value)."""
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    lo, hi = metric_range(metric)
    return m, float(np.clip(m - sd, lo, hi)), float(np.clip(m + sd, lo, hi))


def _check(df: pd.DataFrame, metric: str | None) -> tuple[pd.DataFrame, str]:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"sweep DataFrame lacks column(s) {missing}; expected columns prompt, seed, spec, "
                         f"spec_index, metric, step, value (from mmdit_probe.sweep)")
    metrics = list(dict.fromkeys(df["metric"]))
    if metric is None:
        if len(metrics) != 1:
            raise ValueError(f"the sweep has several metrics {metrics}; pass metric=")
        metric = metrics[0]
    elif metric not in metrics:
        raise ValueError(f"metric {metric!r} not in the sweep; metrics: {metrics}")
    return df[df["metric"] == metric], metric


def _spec_order(df: pd.DataFrame) -> list[str]:
    if "spec_index" in df.columns:
        return list(df.sort_values("spec_index", kind="stable")["spec"].drop_duplicates())
    return list(dict.fromkeys(df["spec"]))


def _levels(d: pd.DataFrame, col: str) -> list[Any]:
    """Levels of ``col``: sweep order for ``spec``, sorted for numbers, else first appearance."""
    if col == "spec":
        return _spec_order(d)
    vals = d[col].dropna()
    return sorted(vals.unique()) if pd.api.types.is_numeric_dtype(vals) else list(dict.fromkeys(vals))


def final_values(df: pd.DataFrame) -> pd.DataFrame:
    """One value per (spec, seed, prompt): rows without a step if there are any, else the last step."""
    if "step" not in df.columns:
        return df
    no_step = df[df["step"].isna()]
    if len(no_step):
        return no_step
    return df[df["step"] == df["step"].max()]


def tick_labels(labels: list[str], cell_pt: float, fontsize: float = TICK_SIZE) -> tuple[list[str], float]:
    """Category labels and their rotation: wrapped upright labels (up to 3 lines) when they fit a
    ``cell_pt``-wide cell, else vertical labels shortened to ``TICK_CHARS`` characters."""
    wrapped = [wrap_text(l, cell_pt - 4.0, fontsize) for l in labels]
    if all(w.count("\n") < 3 and text_size_pt(w, fontsize)[0] <= cell_pt - 4.0 for w in wrapped):
        return wrapped, 0.0
    return [shorten(l, TICK_CHARS) for l in labels], 90.0


def _clip_ylim(ax: Axes, metric: str) -> None:
    lo, hi = metric_range(metric)
    bottom, top = ax.get_ylim()
    ax.set_ylim(max(bottom, lo) if math.isfinite(lo) else bottom, min(top, hi + 0.02 * (hi - lo)) if math.isfinite(hi) else top)


def _legend(ax: Axes, title: str, n: int, per_column: int = 18) -> None:
    if n:
        ax.legend(title=title, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=7, title_fontsize=8,
                  ncol=max(1, math.ceil(n / per_column)))


def effect_by_layer(df: pd.DataFrame, metric: str | None = None, *, x: str | None = None, hue: str | None = None,
                    kind: str = "bar", ax: Axes | None = None, path: str | None = None,
                    title: str | None = None) -> Figure:
    """Effect of each ablation (one per layer, in ``spec_index`` order) with spread over seeds/prompts.

    Uses the final value of ``metric`` (rows without a step, else the last step). ``x``: a column to
    put on the x axis (default ``"layer"`` when present, else ``"spec"``); ``hue``: a column splitting the
    bars (e.g. ``"quadrant"``). ``kind``: ``"bar"`` or ``"line"``. Error bars: mean ± s.d. clipped
    to the metric's range.
    """
    if kind not in ("bar", "line"):
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}")
    d, metric = _check(df, metric)
    d = final_values(d)
    x = x or ("layer" if "layer" in d.columns else "spec")
    xs = _levels(d, x)
    hues = _levels(d, hue) if hue else [None]
    n_legend_cols = max(1, math.ceil(len(hues) / 18)) if hue else 0
    fig, ax = new_axes(ax, figsize=(clamp(2.5 + 0.3 * len(xs) * max(1.0, len(hues) / 3), 6.0, 16.0)
                                    + 2.2 * n_legend_cols, 4.5))
    colors = many_colors(len(hues)) if hue else [sns.color_palette("colorblind")[0]]
    width = 0.8 / len(hues)
    rng = np.random.default_rng(0)
    for k, (level, color) in enumerate(zip(hues, colors)):
        sub = d if level is None else d[d[hue] == level]
        stats = [spread(sub.loc[sub[x] == v, "value"], metric) for v in xs]
        mean, lo, hi = (np.array(a, dtype=float) for a in zip(*stats))
        pos = np.arange(len(xs)) + (k - (len(hues) - 1) / 2) * (width if kind == "bar" else 0.15 / len(hues))
        label = None if level is None else shorten(str(level), LEGEND_CHARS)
        if kind == "bar":
            ax.bar(pos, mean, width=width, color=color, label=label)
            ax.errorbar(pos, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="0.2", elinewidth=1, capsize=2)
            if hue is None:
                for i, v in enumerate(xs):
                    vals = sub.loc[sub[x] == v, "value"].to_numpy(dtype=float)
                    ax.scatter(i + rng.uniform(-0.15, 0.15, vals.size), vals, s=6, color="black", alpha=0.6,
                               zorder=3, linewidths=0)
        else:
            ax.errorbar(pos, mean, yerr=[mean - lo, hi - mean], color=color, marker="o", ms=4, capsize=2, label=label,
                        linestyle=LINE_STYLES[k % len(LINE_STYLES)] if len(hues) > 10 else "-")
    labels, rotation = tick_labels([str(v) for v in xs], 0.75 * slot_width_pt(ax) / len(xs))
    set_category_ticks(ax, "x", labels, offset=0.0, fontsize=TICK_SIZE, rotation=rotation)
    ax.set_xlim(-0.6, len(xs) - 0.4)
    if kind == "bar":
        ax.axhline(0.0, color="0.3", linewidth=0.6)
    _clip_ylim(ax, metric)
    n_seeds = d["seed"].nunique() if "seed" in d.columns else 1
    ax.set_xlabel("ablation (in sweep order)" if x == "spec" else f"ablated {x}")
    ax.set_ylabel(f"{metric}\n(effect vs. unablated run)")
    what = "bars" if kind == "bar" else "points"
    set_title(ax, title or f"Effect of each ablation on {metric}\n({what}: mean, error bars: s.d. over {n_seeds} "
                           f"seed(s) and prompts)")
    if hue:
        _legend(ax, "knocked-out quadrant (query → key)" if hue == "quadrant" else hue, len(hues))
    sns.despine(ax=ax)
    return finish(fig, path)


def step_effect_curves(df: pd.DataFrame, metric: str | None = None, *, hue: str = "spec", ax: Axes | None = None,
                       path: str | None = None, title: str | None = None) -> Figure:
    """``metric`` against denoising step, one line per ablation (``hue``); band = s.d. over seeds and
    prompts clipped to the metric's range (up to 6 lines). Colour-blind-safe colours up to 10 lines,
    then ``cividis`` with varied line styles; integer step ticks."""
    d, metric = _check(df, metric)
    if "step" not in d.columns or d["step"].isna().all():
        raise ValueError(f"metric {metric!r} has no per-step values (column 'step' is empty)")
    d = d[d["step"].notna()]
    levels = _levels(d, hue)
    n_cols = max(1, math.ceil(len(levels) / 18))
    fig, ax = new_axes(ax, figsize=(7.0 + 2.3 * n_cols, 4.5))
    n_steps = d["step"].nunique()
    for k, (level, color) in enumerate(zip(levels, many_colors(len(levels)))):
        sub = d[d[hue] == level]
        steps = sorted(sub["step"].unique())
        mean, lo, hi = (np.array(a, dtype=float) for a in zip(*[spread(sub.loc[sub["step"] == s, "value"], metric)
                                                                 for s in steps]))
        style = LINE_STYLES[k % len(LINE_STYLES)] if len(levels) > 10 else "-"
        ax.plot(steps, mean, color=color, linestyle=style, linewidth=1.4, marker="o" if n_steps <= 25 else None,
                ms=3, label=shorten(str(level), LEGEND_CHARS))
        if len(levels) <= MAX_BANDS and np.any(hi > lo):
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _clip_ylim(ax, metric)
    ax.set_xlabel("denoising step")
    ax.set_ylabel(f"{metric}\n(effect vs. unablated run)")
    band = "band: s.d. over seeds and prompts" if len(levels) <= MAX_BANDS else "mean over seeds and prompts"
    set_title(ax, title or f"Effect on {metric} by denoising step ({band})")
    _legend(ax, "ablation" if hue == "spec" else hue, len(levels))
    sns.despine(ax=ax)
    return finish(fig, path)
