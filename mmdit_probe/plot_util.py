"""Small helpers shared by the plot modules (axes creation, saving, image conversion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np


def new_axes(ax=None, figsize: tuple[float, float] = (6, 4)):
    """``(fig, ax)``: the given axes and its figure, or a new constrained-layout figure."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return fig, ax


def finish(fig, path: str | Path | None = None, dpi: int = 100):
    """Save ``fig`` as PNG when ``path`` is given (folders created); return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


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
