"""Ablation figures from sweep DataFrames (columns prompt, seed, spec, spec_index, metric, step, value)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .plot_util import finish, new_axes, to_image_array

REQUIRED = ("spec", "metric", "value")


def _check(df, metric: str | None):
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


def _spec_order(df) -> list[str]:
    if "spec_index" in df.columns:
        return list(df.sort_values("spec_index")["spec"].drop_duplicates())
    return list(dict.fromkeys(df["spec"]))


def final_values(df):
    """One value per (spec, seed, prompt): rows without a step if there are any, else the last step."""
    if "step" not in df.columns:
        return df
    no_step = df[df["step"].isna()]
    if len(no_step):
        return no_step
    return df[df["step"] == df["step"].max()]


def _label(spec: str) -> str:
    return spec if len(spec) <= 28 else spec[:26] + "…"


def effect_by_layer(df, metric: str | None = None, *, x: str | None = None, hue: str | None = None,
                    kind: str = "bar", ax=None, path: str | None = None, title: str | None = None):
    """Effect of each ablation (one per layer, in ``spec_index`` order) with spread over seeds/prompts.

    Uses the final value of ``metric`` (rows without a step, else the last step). ``x``: a column to
    put on the x axis (default ``"layer"`` when present, else ``"spec"``); ``hue``: a column splitting the
    bars (e.g. ``"quadrant"``). ``kind``: ``"bar"`` or ``"line"``.
    """
    d, metric = _check(df, metric)
    d = final_values(d)
    x = x or ("layer" if "layer" in d.columns else "spec")
    fig, ax = new_axes(ax, figsize=(max(5.0, 0.55 * d[x].nunique() + 2.5) + (2.0 if hue else 0.0), 4))
    order = _spec_order(d) if x == "spec" else sorted(d[x].dropna().unique())
    plot_d = d.assign(**{x: d[x].map(_label)}) if x == "spec" else d
    order = [_label(o) for o in order] if x == "spec" else order
    color = None if hue else sns.color_palette()[0]
    if kind == "bar":
        sns.barplot(data=plot_d, x=x, y="value", order=order, hue=hue, errorbar="sd", ax=ax, color=color)
        if hue is None:
            sns.stripplot(data=plot_d, x=x, y="value", order=order, ax=ax, color="black", size=3, alpha=0.6)
    elif kind == "line":
        sns.pointplot(data=plot_d, x=x, y="value", order=order, hue=hue, errorbar="sd", ax=ax, color=color)
    else:
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}")
    if x == "spec":
        ax.tick_params(axis="x", rotation=45)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    n_seeds = d["seed"].nunique() if "seed" in d.columns else 1
    ax.set_xlabel("ablation (in sweep order)" if x == "spec" else f"ablated {x}")
    ax.set_ylabel(f"{metric} (effect vs. unablated run)")
    ax.set_title(title or f"Effect of each ablation on {metric}\n(bars: mean, error bars: s.d. over {n_seeds} seed(s) "
                 f"and prompts)", fontsize=10)
    if hue and ax.get_legend() is not None:
        ax.legend(title="knocked-out quadrant (query → key)" if hue == "quadrant" else hue, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    sns.despine(ax=ax)
    return finish(fig, path)


def step_effect_curves(df, metric: str | None = None, *, hue: str = "spec", ax=None, path: str | None = None,
                       title: str | None = None):
    """``metric`` against denoising step, one line per ablation (``hue``), band = s.d. over seeds/prompts."""
    d, metric = _check(df, metric)
    if "step" not in d.columns or d["step"].isna().all():
        raise ValueError(f"metric {metric!r} has no per-step values (column 'step' is empty)")
    d = d[d["step"].notna()]
    fig, ax = new_axes(ax, figsize=(7, 4))
    order = _spec_order(d) if hue == "spec" else None
    sns.lineplot(data=d, x="step", y="value", hue=hue, hue_order=order, errorbar="sd", marker="o", ax=ax)
    ax.set_xlabel("denoising step")
    ax.set_ylabel(f"{metric} (effect vs. unablated run)")
    ax.set_title(title or f"Effect on {metric} by denoising step", fontsize=10)
    if ax.get_legend() is not None:
        ax.legend(title="ablation" if hue == "spec" else hue, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=7)
    sns.despine(ax=ax)
    return finish(fig, path)


def image_strip(images: Sequence[Any], titles: Sequence[str] | None = None, *, axes=None, path: str | None = None,
                title: str | None = None, size: float = 2.2):
    """Images side by side (e.g. baseline then each ablation), each with its title."""
    images = list(images)
    if not images:
        raise ValueError("image_strip needs at least one image")
    titles = list(titles) if titles is not None else [f"image {i}" for i in range(len(images))]
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if axes is None:
        fig, axs = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.6), squeeze=False,
                                constrained_layout=True)
        axs = list(axs[0])
    else:
        axs = list(np.ravel(axes))
        fig = axs[0].figure
    for ax, img, t in zip(axs, images, titles):
        ax.imshow(to_image_array(img))
        ax.set_title(t, fontsize=9)
        ax.set_axis_off()
    if title and axes is None:
        fig.suptitle(title, fontsize=10)
    return finish(fig, path)
