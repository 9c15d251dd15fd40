"""Category ticks thinned at draw time to what fits the axis, and heatmap cell annotation that
only happens when the numbers fit their cells."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.ticker import FuncFormatter, Locator, NullLocator

from .text import LINE_SPACING, text_size_pt
from .util import axes_size_pt

NICE_STRIDES = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)


def nice_stride(n: int, length_pt: float, label_pt: float) -> int:
    """Smallest stride in 1, 2, 5, 10, 20, 25, 50, … so that every ``stride``-th of ``n`` equal cells
    along ``length_pt`` points has room for a label ``label_pt`` long."""
    cell = length_pt / max(n, 1)
    for k in NICE_STRIDES:
        if k * cell >= label_pt:
            return k
    return max(n, 1)


class CategoryLocator(Locator):
    """Ticks at ``offset + i`` for every ``stride``-th category, the stride chosen when the axis is
    drawn from its length and the size of the longest label, so labels never run together."""

    def __init__(self, labels: Sequence[str], offset: float = 0.5, fontsize: float = 8.0, rotation: float = 0.0):
        self.labels = [str(l) for l in labels]
        self.offset, self.fontsize, self.rotation = offset, fontsize, rotation

    def label_extent_pt(self, along_x: bool) -> float:
        """Room one label needs along the axis, gap included."""
        if not self.labels:
            return 0.0
        sizes = [text_size_pt(l, self.fontsize) for l in self.labels]
        upright = (self.rotation % 180 == 0)
        use_width = upright == along_x
        ext = max(w for w, _ in sizes) if use_width else max(h for _, h in sizes) / LINE_SPACING * 1.1
        return ext + 0.5 * self.fontsize

    def stride(self) -> int:
        """The stride that fits the axis at its current size."""
        ax = self.axis.axes
        along_x = self.axis.axis_name == "x"
        w, h = axes_size_pt(ax)
        return nice_stride(len(self.labels), w if along_x else h, self.label_extent_pt(along_x))

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        k = self.stride() if self.axis is not None else 1
        return [self.offset + i for i in range(0, len(self.labels), k)]

    def __call__(self) -> list[float]:
        return self.tick_values(0.0, 0.0)


def set_category_ticks(ax: Axes, which: str, labels: Sequence[str], *, offset: float = 0.5,
                       fontsize: float = 8.0, rotation: float = 0.0) -> None:
    """Label category ``i`` (at ``offset + i``) on the ``which`` axis ("x" or "y"), thinned to fit."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    labels = [str(l) for l in labels]

    def fmt(x: float, _pos: int | None = None) -> str:
        i = int(round(x - offset))
        return labels[i] if 0 <= i < len(labels) else ""

    axis.set_major_locator(CategoryLocator(labels, offset, fontsize, rotation))
    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_locator(NullLocator())
    ax.tick_params(axis=which, labelsize=fontsize, labelrotation=rotation)


def cells_fit(ax: Axes, n_rows: int, n_cols: int, sample: str, fontsize: float) -> bool:
    """Whether ``sample`` (e.g. "0.00") fits inside one of ``n_rows`` × ``n_cols`` cells of ``ax``."""
    w, h = axes_size_pt(ax)
    tw, th = text_size_pt(sample, fontsize)
    return w / max(n_cols, 1) >= tw + 3 and h / max(n_rows, 1) >= th + 1


def annotate_cells(ax: Axes, data: np.ndarray, cmap: Colormap, norm: Normalize, fmt: str = ".2f",
                   fontsize: float = 7.0) -> None:
    """Write each finite value of ``data`` (rows = y) at its heatmap cell centre, dark or light
    text depending on the cell colour."""
    for (r, c), v in np.ndenumerate(data):
        if not np.isfinite(v):
            continue
        rgb = np.asarray(cmap(norm(v)))[:3]
        lum = float(rgb @ np.array([0.2126, 0.7152, 0.0722]))
        ax.text(c + 0.5, r + 0.5, format(v, fmt), ha="center", va="center", fontsize=fontsize,
                color="black" if lum > 0.45 else "white")
