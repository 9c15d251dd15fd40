"""Images side by side with wrapped titles (e.g. a baseline and each ablation)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .attention import set_suptitle
from .text import wrap_text
from .util import finish, slot_width_pt, to_image_array, use_layout

TITLE_SIZE = 9.0
MAX_TITLE_LINES = 4


def image_strip(images: Sequence[Any], titles: Sequence[str] | None = None, *, axes=None, path: str | None = None,
                title: str | None = None, size: float = 2.2, max_columns: int = 8) -> Figure:
    """Images side by side (e.g. baseline then each ablation), each with its title wrapped to the
    image width; more than ``max_columns`` images continue on further rows."""
    images = list(images)
    if not images:
        raise ValueError("image_strip needs at least one image")
    titles = list(titles) if titles is not None else [f"image {i}" for i in range(len(images))]
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if axes is None:
        n_c = min(len(images), max(1, max_columns))
        n_r = math.ceil(len(images) / n_c)
        lines = MAX_TITLE_LINES * TITLE_SIZE * 1.2 / 72.0
        fig, grid = plt.subplots(n_r, n_c, figsize=(size * n_c + 0.2, (size + lines) * n_r + 0.5), squeeze=False,
                                 constrained_layout=True)
        axs = list(grid.ravel())
        for extra in axs[len(images):]:
            fig.delaxes(extra)
        axs = axs[: len(images)]
    else:
        axs = list(np.ravel(axes))
        fig = use_layout(axs[0].figure)
    for ax, img, t in zip(axs, images, titles):
        ax.imshow(to_image_array(img))
        ax.set_title(wrap_text(str(t), 0.95 * slot_width_pt(ax), TITLE_SIZE, max_lines=MAX_TITLE_LINES),
                     fontsize=TITLE_SIZE)
        ax.set_axis_off()
    if title and axes is None:
        set_suptitle(fig, title, fontsize=10)
    return finish(fig, path)
