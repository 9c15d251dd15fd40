"""Attention-mass figures of one :class:`~mmdit_probe.AttentionResult`: quadrant maps, per-head
grids and the text key group breakdown. Layer 0 is at the bottom of a layer y axis (left of an x axis)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..layout import TEXT_GROUPS
from ..maps import QUADRANTS, parse_quadrant, quadrant_name
from .text import wrap_text
from .ticks import annotate_cells, cells_fit, set_category_ticks
from .util import clamp, finish, layout_now, new_axes, slot_width_pt, step_tick_labels, use_layout

#: Readable names of the text key groups.
GROUP_LABELS = {
    "clip_real": "CLIP prompt tokens", "clip_special": "CLIP special (BOS/EOS)", "clip_padding": "CLIP padding",
    "t5_real": "T5 prompt tokens", "t5_special": "T5 special (EOS)", "t5_padding": "T5 padding",
}
TITLE_SIZE = 10.0
TICK_SIZE = 8.0
ANNOT_SIZES = (9.0, 7.0)  # cell numbers: the largest size that fits, or none


def quadrant_label(quadrant: str, short: bool = False) -> str:
    """``"image->text"`` → ``"image → text (image queries attending to text keys)"``."""
    q, k = parse_quadrant(quadrant)
    name = f"{q} → {k}"
    return name if short else f"{name} ({q} queries attending to {k} keys)"


def branch_rows(res: Any, branch: str | None) -> list[int]:
    """Batch rows of ``branch`` ("cond", "uncond"; None: all rows)."""
    branches = res.branches or ("cond",) * res.mass.shape["batch"]
    if branch is None:
        return list(range(len(branches)))
    rows = [i for i, b in enumerate(branches) if b == branch]
    if not rows:
        raise ValueError(f"branch {branch!r} not in this result; branches: {sorted(set(branches))} (or branch=None for all)")
    return rows


def check_attention(res: Any, attention: str) -> None:
    """Raise a readable error when ``attention`` ("attn"/"attn2") was not recorded."""
    have = res.mass.labels("attention")
    if attention not in have:
        raise ValueError(f"attention {attention!r} not recorded; available: {list(have)}")


def title_suffix(branch: str | None, attention: str) -> str:
    """``"cond branch, joint attention (attn)"``."""
    b = "all CFG branches" if branch is None else f"{branch} branch"
    a = "joint attention (attn)" if attention == "attn" else "image self-attention (attn2)"
    return f"{b}, {a}"


def set_title(ax: Axes, text: str, fontsize: float = TITLE_SIZE) -> None:
    """Axes title wrapped to the width of the axes' grid slot."""
    ax.set_title(wrap_text(text, 0.92 * slot_width_pt(ax), fontsize), fontsize=fontsize)


def set_suptitle(fig: Figure, text: str, fontsize: float = TITLE_SIZE + 1) -> None:
    """Figure title wrapped to the figure width."""
    fig.suptitle(wrap_text(text, 0.95 * fig.get_figwidth() * 72.0, fontsize), fontsize=fontsize)


def layer_heatmap(ax: Axes, grid: pd.DataFrame, *, cmap: str, vmin: float | None = None, vmax: float | None = None,
                  cbar: bool = False, cbar_label: str = "", x_labels: Sequence[str] | None = None) -> Any:
    """Seaborn heatmap of ``grid`` (rows = layers) with layer 0 at the bottom and thinned ticks; returns the mesh."""
    sns.heatmap(grid, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, cbar=cbar, xticklabels=False, yticklabels=False,
                linewidths=0.3 if grid.size <= 600 else 0.0, linecolor="white",
                cbar_kws={"label": cbar_label} if cbar else None)
    ax.invert_yaxis()  # seaborn draws row 0 at the top; layer 0 goes at the bottom
    set_category_ticks(ax, "x", x_labels if x_labels is not None else list(grid.columns), fontsize=TICK_SIZE - 1)
    set_category_ticks(ax, "y", list(grid.index), fontsize=TICK_SIZE)
    return ax.collections[0]


def maybe_annotate(ax: Axes, data: np.ndarray, mesh: Any, annot: bool | None) -> None:
    """Annotate cells when ``annot`` is True, or (None) when the numbers fit the cells as laid out."""
    if annot is False or (annot is None and data.size > 2500):
        return
    fits = [s for s in ANNOT_SIZES if cells_fit(ax, data.shape[0], data.shape[1], "0.00", s)]
    if fits or annot:
        annotate_cells(ax, data, mesh.cmap, mesh.norm, fontsize=fits[0] if fits else ANNOT_SIZES[-1])


def quadrant_map(res: Any, branch: str | None = "cond", attention: str = "attn", *, axes: Sequence[Any] | None = None,
                 path: str | None = None, cmap: str = "viridis", annot: bool | None = None) -> Figure:
    """Four layer × step heatmaps of mean attention mass, one per quadrant, on one shared colour scale.

    Each cell is ``res.quadrant_table(by=("layer", "step"))``: mass summed over the key group,
    averaged over query tokens, heads and the ``branch`` rows. The step axis shows timesteps.
    ``annot=None`` writes the numbers only when they fit their cells.
    """
    check_attention(res, attention)
    branch_rows(res, branch)
    table = res.quadrant_table(by=("layer", "step"), branch=branch, attention=attention)
    quads = [q for q in QUADRANTS if q in table.columns]
    grids = {q: table[q].unstack("step") for q in quads}
    n_steps = max((g.shape[1] for g in grids.values()), default=1)
    n_layers = max((g.shape[0] for g in grids.values()), default=1)
    if axes is None:
        figsize = (clamp(9.0 + 0.06 * n_steps, 10.0, 15.0), clamp(6.0 + 0.08 * n_layers, 7.0, 12.0))
        fig, axs = plt.subplots(2, 2, figsize=figsize, constrained_layout=True)
        axs = list(np.ravel(axs))
    else:
        axs = list(np.ravel(axes))
        if len(axs) < len(QUADRANTS):
            raise ValueError(f"quadrant_map needs {len(QUADRANTS)} axes, got {len(axs)}")
        fig = use_layout(axs[0].figure)
    finite = np.concatenate([g.to_numpy().ravel() for g in grids.values()]) if grids else np.array([0.0])
    finite = finite[np.isfinite(finite)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    meshes = {}
    for i, q in enumerate(QUADRANTS):
        ax = axs[i]
        if q not in grids:
            ax.set_axis_off()
            set_title(ax, f"{quadrant_label(q)}\n(not recorded)")
            continue
        g = grids[q]
        meshes[q] = layer_heatmap(ax, g, cmap=cmap, vmin=vmin, vmax=vmax,
                                  x_labels=step_tick_labels(list(g.columns), res.timesteps))
        set_title(ax, quadrant_label(q))
        ax.set_ylabel("layer")
        ax.set_xlabel("denoising step (timestep)")
    mappable = plt.cm.ScalarMappable(norm=Normalize(vmin, vmax), cmap=cmap)
    fig.colorbar(mappable, ax=axs[: len(QUADRANTS)], label="attention mass (mean over queries and heads)", shrink=0.8)
    if axes is None:
        set_suptitle(fig, f"Attention mass by quadrant, layer × step ({title_suffix(branch, attention)})")
    layout_now(fig)
    for i, q in enumerate(QUADRANTS):
        if q in grids:
            maybe_annotate(axs[i], grids[q].to_numpy(), meshes[q], annot)
    return finish(fig, path)


def head_grid(res: Any, quadrant: str = "image->text", steps: Sequence[int] | int | None = None, *,
              branch: str | None = "cond", attention: str = "attn", ax: Axes | None = None, path: str | None = None,
              cmap: str = "viridis", annot: bool | None = None) -> Figure:
    """Layer × head heatmap of one quadrant's attention mass, averaged over ``steps`` (None: all)."""
    check_attention(res, attention)
    q, k = parse_quadrant(quadrant)
    st = res.mass.sel(query=q, key=k, attention=attention, batch=branch_rows(res, branch))
    if steps is not None:
        steps = [steps] if isinstance(steps, int) else list(steps)
        st = st.sel(step=steps)
    st = st.mean("step", "batch")
    data = st.values.numpy()  # [layer, head]
    df = pd.DataFrame(data, index=pd.Index(st.labels("layer"), name="layer"),
                      columns=pd.Index(st.labels("head"), name="head"))
    n_layers, n_heads = data.shape
    fig, ax = new_axes(ax, figsize=(clamp(2.0 + 0.42 * n_heads, 6.0, 16.0), clamp(2.0 + 0.3 * n_layers, 4.0, 13.0)))
    which = "all steps" if steps is None else "steps " + ", ".join(map(str, steps))
    set_title(ax, f"{quadrant_label(quadrant_name(q, k))}\nper head, {which}; {title_suffix(branch, attention)}")
    mesh = layer_heatmap(ax, df, cmap=cmap, cbar=True, cbar_label="attention mass")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    layout_now(fig)
    maybe_annotate(ax, data, mesh, annot)
    return finish(fig, path)


def text_group_breakdown(res: Any, *, branch: str | None = "cond", attention: str = "attn",
                         steps: Sequence[int] | None = None, normalize: bool = True, ax: Axes | None = None,
                         path: str | None = None) -> Figure:
    """Stacked bars by layer: how image queries split their text attention over CLIP/T5 real,
    special and padding tokens (``group_mass``). ``normalize=True`` shows fractions of the text
    attention (bars sum to 1); ``False`` shows raw mass (bars sum to image → text mass)."""
    check_attention(res, attention)
    st = res.stat("group_mass").sel(query="image", attention=attention, key_group=list(TEXT_GROUPS),
                                    batch=branch_rows(res, branch))
    if steps is not None:
        st = st.sel(step=list(steps))
    st = st.mean("step", "batch", "head")  # [layer, key_group]
    data = st.values.numpy()
    if normalize:
        total = data.sum(axis=1, keepdims=True)
        data = np.divide(data, total, out=np.zeros_like(data), where=total > 0)
    layers = list(st.labels("layer"))
    fig, ax = new_axes(ax, figsize=(clamp(4.5 + 0.16 * len(layers), 8.0, 16.0), 4.5))
    colors = sns.color_palette("Blues", 4)[1:] + sns.color_palette("Oranges", 4)[1:]
    bottom = np.zeros(len(layers))
    for gi, group in enumerate(TEXT_GROUPS):
        ax.bar(np.arange(len(layers)), data[:, gi], bottom=bottom, color=colors[gi], label=GROUP_LABELS[group],
               edgecolor="white", linewidth=0.5 if len(layers) <= 40 else 0.0)
        bottom += np.nan_to_num(data[:, gi])
    set_category_ticks(ax, "x", [str(l) for l in layers], offset=0.0, fontsize=TICK_SIZE)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of image → text attention" if normalize else "attention mass (image → text group)")
    set_title(ax, f"Where image queries attend among text keys, by layer ({title_suffix(branch, attention)})")
    ax.legend(title="text key group", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    sns.despine(ax=ax)
    return finish(fig, path)
