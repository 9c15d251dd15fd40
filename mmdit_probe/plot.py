"""Seaborn/matplotlib figures from :class:`~mmdit_probe.AttentionResult` objects and sweep DataFrames.

Every function returns the ``matplotlib.figure.Figure``, draws into ``ax=``/``axes=`` when given
(otherwise a new figure), and saves a PNG when ``path=`` is given. Quadrants are always named
query → key in full: "image → text (image queries attending to text keys)".

Imported lazily (``mmdit_probe.plot``): ``import mmdit_probe`` does not import matplotlib.
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch

from .layout import TEXT_GROUPS
from .maps import QUADRANTS, parse_quadrant, quadrant_name
from .plot_ablation import effect_by_layer, image_strip, step_effect_curves
from .plot_util import finish, new_axes, step_tick_labels, to_image_array

__all__ = [
    "quadrant_label", "quadrant_map", "head_grid", "text_group_breakdown", "word_maps",
    "effect_by_layer", "step_effect_curves", "image_strip", "GROUP_LABELS",
]

#: Readable names of the text key groups.
GROUP_LABELS = {
    "clip_real": "CLIP prompt tokens", "clip_special": "CLIP special (BOS/EOS)", "clip_padding": "CLIP padding",
    "t5_real": "T5 prompt tokens", "t5_special": "T5 special (EOS)", "t5_padding": "T5 padding",
}


def quadrant_label(quadrant: str, short: bool = False) -> str:
    """``"image->text"`` → ``"image → text (image queries attending to text keys)"``."""
    q, k = parse_quadrant(quadrant)
    name = f"{q} → {k}"
    return name if short else f"{name} ({q} queries attending to {k} keys)"


def _branch_rows(res, branch: str | None) -> list[int]:
    branches = res.branches or ("cond",) * res.mass.shape["batch"]
    if branch is None:
        return list(range(len(branches)))
    rows = [i for i, b in enumerate(branches) if b == branch]
    if not rows:
        raise ValueError(f"branch {branch!r} not in this result; branches: {sorted(set(branches))} (or branch=None for all)")
    return rows


def _check_attention(res, attention: str) -> None:
    have = res.mass.labels("attention")
    if attention not in have:
        raise ValueError(f"attention {attention!r} not recorded; available: {list(have)}")


def _title_suffix(branch: str | None, attention: str) -> str:
    b = "all CFG branches" if branch is None else f"{branch} branch"
    a = "joint attention (attn)" if attention == "attn" else "image self-attention (attn2)"
    return f"{b}, {a}"


def quadrant_map(res, branch: str | None = "cond", attention: str = "attn", *, axes: Sequence[Any] | None = None,
                 path: str | None = None, cmap: str = "viridis", annot: bool | None = None):
    """Four layer × step heatmaps of mean attention mass, one per quadrant, on one shared colour scale.

    Each cell is ``res.quadrant_table(by=("layer", "step"))``: mass summed over the key group,
    averaged over query tokens, heads and the ``branch`` rows. The step axis shows timesteps.
    """
    _check_attention(res, attention)
    _branch_rows(res, branch)
    table = res.quadrant_table(by=("layer", "step"), branch=branch, attention=attention)
    quads = [q for q in QUADRANTS if q in table.columns]
    if axes is None:
        fig, axs = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
        axs = list(np.ravel(axs))
    else:
        axs = list(np.ravel(axes))
        if len(axs) < len(QUADRANTS):
            raise ValueError(f"quadrant_map needs {len(QUADRANTS)} axes, got {len(axs)}")
        fig = axs[0].figure
    grids = {q: table[q].unstack("step") for q in quads}
    finite = np.concatenate([g.to_numpy().ravel() for g in grids.values()]) if grids else np.array([0.0])
    finite = finite[np.isfinite(finite)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    timesteps = res.timesteps
    for i, q in enumerate(QUADRANTS):
        ax = axs[i]
        if q not in grids:
            ax.set_axis_off()
            ax.set_title(f"{quadrant_label(q)}\n(not recorded)")
            continue
        g = grids[q]
        show_annot = g.size <= 120 if annot is None else annot
        sns.heatmap(g, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, cbar=False, annot=show_annot, fmt=".2f",
                    annot_kws={"fontsize": 7}, linewidths=0.3, linecolor="white")
        ax.set_title(quadrant_label(q), fontsize=10)
        ax.set_ylabel("layer")
        ax.set_xlabel("denoising step (timestep)")
        ax.set_xticklabels(step_tick_labels(list(g.columns), timesteps), rotation=0, fontsize=7)
        ax.tick_params(axis="y", rotation=0)
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(vmin, vmax), cmap=cmap)
    fig.colorbar(mappable, ax=axs[: len(QUADRANTS)], label="attention mass (mean over queries and heads)", shrink=0.8)
    if axes is None:
        fig.suptitle(f"Attention mass by quadrant, layer × step ({_title_suffix(branch, attention)})")
    return finish(fig, path)


def head_grid(res, quadrant: str = "image->text", steps: Sequence[int] | int | None = None, *,
              branch: str | None = "cond", attention: str = "attn", ax=None, path: str | None = None,
              cmap: str = "viridis", annot: bool | None = None):
    """Layer × head heatmap of one quadrant's attention mass, averaged over ``steps`` (None: all)."""
    _check_attention(res, attention)
    q, k = parse_quadrant(quadrant)
    st = res.mass.sel(query=q, key=k, attention=attention, batch=_branch_rows(res, branch))
    if steps is not None:
        steps = [steps] if isinstance(steps, int) else list(steps)
        st = st.sel(step=steps)
    st = st.mean("step", "batch")
    data = st.values.numpy()  # [layer, head]
    import pandas as pd

    df = pd.DataFrame(data, index=pd.Index(st.labels("layer"), name="layer"),
                      columns=pd.Index(st.labels("head"), name="head"))
    fig, ax = new_axes(ax, figsize=(1.2 + 0.6 * data.shape[1], 1.2 + 0.5 * data.shape[0]))
    show_annot = data.size <= 150 if annot is None else annot
    sns.heatmap(df, ax=ax, cmap=cmap, annot=show_annot, fmt=".2f", annot_kws={"fontsize": 7},
                cbar_kws={"label": "attention mass"})
    which = "all steps" if steps is None else "steps " + ", ".join(map(str, steps))
    ax.set_title(f"{quadrant_label(quadrant_name(q, k))}\nper head, {which}; {_title_suffix(branch, attention)}",
                 fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.tick_params(axis="y", rotation=0)
    return finish(fig, path)


def text_group_breakdown(res, *, branch: str | None = "cond", attention: str = "attn",
                         steps: Sequence[int] | None = None, normalize: bool = True, ax=None,
                         path: str | None = None):
    """Stacked bars by layer: how image queries split their text attention over CLIP/T5 real,
    special and padding tokens (``group_mass``). ``normalize=True`` shows fractions of the text
    attention (bars sum to 1); ``False`` shows raw mass (bars sum to image → text mass)."""
    _check_attention(res, attention)
    st = res.stat("group_mass").sel(query="image", attention=attention, key_group=list(TEXT_GROUPS),
                                    batch=_branch_rows(res, branch))
    if steps is not None:
        st = st.sel(step=list(steps))
    st = st.mean("step", "batch", "head")  # [layer, key_group]
    data = st.values.numpy()
    if normalize:
        total = data.sum(axis=1, keepdims=True)
        data = np.divide(data, total, out=np.zeros_like(data), where=total > 0)
    fig, ax = new_axes(ax, figsize=(8, 4.5))
    layers = list(st.labels("layer"))
    colors = sns.color_palette("Blues", 4)[1:] + sns.color_palette("Oranges", 4)[1:]
    bottom = np.zeros(len(layers))
    for gi, group in enumerate(TEXT_GROUPS):
        ax.bar(np.arange(len(layers)), data[:, gi], bottom=bottom, color=colors[gi], label=GROUP_LABELS[group],
               edgecolor="white", linewidth=0.5)
        bottom += np.nan_to_num(data[:, gi])
    ax.set_xticks(np.arange(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of image → text attention" if normalize else "attention mass (image → text group)")
    ax.set_title(f"Where image queries attend among text keys, by layer\n({_title_suffix(branch, attention)})",
                 fontsize=10)
    ax.legend(title="text key group", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    sns.despine(ax=ax)
    return finish(fig, path)


def word_grid(res, word: str, *, layers=None, steps=None, head: int | str = "mean", batch: int | None = None,
              branch: str | None = "cond", attention: str = "attn") -> np.ndarray:
    """The ``[h, w]`` image → ``word`` mass that :func:`word_maps` shows (before upsampling)."""
    if batch is None:
        rows = [r for r in _branch_rows(res, branch) if res.layouts and res.layouts[r] is not None]
        batch = rows[0] if rows else _branch_rows(res, branch)[0]
    m = res.word_map(word, step=steps, layer=layers, attention=attention, head=head, batch=batch)
    return m.numpy()


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an ``[h, w]`` grid to ``size = (H, W)`` pixels."""
    t = torch.as_tensor(grid, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def word_maps(res, words: Sequence[str] | None = None, image: Any = None, layers=None, steps=None, *,
              by: str | None = None, head: int | str = "mean", batch: int | None = None,
              branch: str | None = "cond", attention: str = "attn", alpha: float = 0.55, cmap: str = "magma",
              shared_scale: bool = True, axes=None, path: str | None = None):
    """Per-word image → word attention over the image grid, upsampled and overlaid on ``image``.

    ``layers``/``steps`` (int, list or None = all) are averaged; ``by="layer"`` or ``by="step"``
    draws one row per layer/step instead. ``image``: PIL image, array or tensor (None: no overlay).
    """
    all_words = res.words
    if not all_words:
        raise ValueError("no word maps in this result: record with AttentionRecorder(pipe, words=True)")
    words = list(all_words if words is None else ([words] if isinstance(words, str) else words))
    if by not in (None, "layer", "step"):
        raise ValueError(f"by must be None, 'layer' or 'step', got {by!r}")
    st = res.stat("word_map")
    if by is None:
        rows = [(None, layers, steps)]
    elif by == "layer":
        sel = st.labels("layer") if layers is None else ([layers] if isinstance(layers, int) else list(layers))
        rows = [(f"layer {l}", l, steps) for l in sel]
    else:
        sel = st.labels("step") if steps is None else ([steps] if isinstance(steps, int) else list(steps))
        ts = res.timesteps
        rows = [(f"step {s} (t={ts[s]:.0f})" if s < len(ts) else f"step {s}", layers, s) for s in sel]
    img = to_image_array(image) if image is not None else None
    grid_hw = res.image_grid
    size = img.shape[:2] if img is not None else (grid_hw[0] * 16, grid_hw[1] * 16)
    grids = [[word_grid(res, w, layers=l, steps=s, head=head, batch=batch, branch=branch, attention=attention)
              for w in words] for _, l, s in rows]
    finite = np.concatenate([g.ravel() for row in grids for g in row])
    finite = finite[np.isfinite(finite)]
    vmax = float(finite.max()) if finite.size and shared_scale else None
    n_r, n_c = len(rows), len(words)
    if axes is None:
        fig, axs = plt.subplots(n_r, n_c, figsize=(2.3 * n_c + 0.8, 2.4 * n_r + 0.6), squeeze=False,
                                constrained_layout=True)
    else:
        axs = np.asarray(axes, dtype=object).reshape(n_r, n_c)
        fig = axs[0, 0].figure
    for r, (row_label, l, s) in enumerate(rows):
        for c, w in enumerate(words):
            ax = axs[r, c]
            up = upsample(grids[r][c], size)
            if img is not None:
                ax.imshow(img, extent=(0, size[1], size[0], 0))
            im = ax.imshow(up, cmap=cmap, alpha=alpha if img is not None else 1.0, vmin=0.0, vmax=vmax,
                           extent=(0, size[1], size[0], 0))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"“{w}”" if r == 0 else "", fontsize=10)
            if c == 0 and row_label:
                ax.set_ylabel(row_label)
    if shared_scale:
        fig.colorbar(im, ax=list(np.ravel(axs)), label="image → word attention mass", shrink=0.8)
    if axes is None:
        what = []
        if by != "layer":
            what.append("all layers" if layers is None else f"layers {layers}")
        if by != "step":
            what.append("all steps" if steps is None else f"steps {steps}")
        hd = "mean over heads" if head == "mean" else f"head {head}"
        fig.suptitle(f"Image → word attention (image queries attending to each prompt word)\n{', '.join(what)}, {hd}",
                     fontsize=10)
    return finish(fig, path)
