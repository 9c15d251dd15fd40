"""Figure helpers shared by the plot modules: axes, layout, saving, colours, image conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

#: Lines up to this many get seaborn's colour-blind-safe palette; more get a sampled ``cividis``.
CATEGORICAL_MAX = 10


def clamp(x: float, lo: float, hi: float) -> float:
    """``x`` limited to ``[lo, hi]``."""
    return float(min(max(x, lo), hi))


def use_layout(fig: Figure) -> Figure:
    """Give a figure without a layout engine constrained layout, so titles, tick labels and
    colour bars of neighbouring panels drawn with ``ax=`` make room for each other."""
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    return fig


def new_axes(ax: Axes | None = None, figsize: tuple[float, float] = (6, 4)) -> tuple[Figure, Axes]:
    """``(fig, ax)``: the given axes and its figure (see :func:`use_layout`), or a new
    constrained-layout figure."""
    if ax is not None:
        return use_layout(ax.figure), ax
    fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return fig, ax


def layout_now(fig: Figure) -> None:
    """Run the figure's layout engine now, so axes positions are those that will be drawn."""
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)


def _column_fraction(spec: Any) -> float:
    """Share of the figure width the columns of a subplot spec get (nested grids included)."""
    gs = spec.get_gridspec()
    ratios = list(gs.get_width_ratios() or [1.0] * gs.ncols)
    frac = sum(ratios[c] for c in spec.colspan) / sum(ratios)
    parent = getattr(gs, "_subplot_spec", None)  # set on a GridSpecFromSubplotSpec (subgridspec)
    return frac * (_column_fraction(parent) if parent is not None else 1.0)


def slot_width_pt(ax: Axes) -> float:
    """Width in points that a title over ``ax`` can use: its grid slot under constrained layout
    (less room for tick labels beside the axes), else its box from the subplot parameters."""
    fig = ax.figure
    spec = ax.get_subplotspec()
    if spec is None:
        return ax.get_position().width * fig.get_figwidth() * 72.0
    if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):
        return _column_fraction(spec) * fig.get_figwidth() * 72.0 - 30.0
    return spec.get_position(fig).width * fig.get_figwidth() * 72.0


def axes_size_pt(ax: Axes) -> tuple[float, float]:
    """``(width, height)`` of the axes box in points, at the figure's current layout."""
    fig = ax.figure
    box = ax.get_position()
    return box.width * fig.get_figwidth() * 72.0, box.height * fig.get_figheight() * 72.0


def finish(fig: Figure, path: str | Path | None = None, dpi: int = 100) -> Figure:
    """Save ``fig`` as PNG when ``path`` is given (folders created); return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def many_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinguishable colours: seaborn ``colorblind`` up to 10, else evenly spaced ``cividis``."""
    if n <= CATEGORICAL_MAX:
        return list(sns.color_palette("colorblind", max(n, 1)))[:n]
    return [tuple(c[:3]) for c in plt.get_cmap("cividis")(np.linspace(0.0, 0.92, n))]


def step_tick_labels(steps: Sequence[int], timesteps: Sequence[float]) -> list[str]:
    """``"0\\nt=1000"`` style labels: step index with its scheduler timestep."""
    out = []
    for s in steps:
        s = int(s)
        out.append(f"{s}\nt={timesteps[s]:.0f}" if s < len(timesteps) else str(s))
    return out


def to_image_array(image: Any) -> np.ndarray:
    """PIL image / ``[H, W, C]`` or ``[C, H, W]`` array or tensor (0–1 or 0–255) → float ``[H, W, C]`` in 0–1."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.max() > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)
