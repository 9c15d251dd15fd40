"""Image → word attention maps over the image grid, overlaid on the generated image."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .attention import TITLE_SIZE, branch_rows, set_suptitle
from .text import wrap_text
from .util import clamp, finish, layout_now, slot_width_pt, to_image_array, use_layout


def word_grid(res: Any, word: str, *, layers=None, steps=None, head: int | str = "mean", batch: int | None = None,
              branch: str | None = "cond", attention: str = "attn") -> np.ndarray:
    """The ``[h, w]`` image → ``word`` mass that :func:`word_maps` shows (before upsampling)."""
    if batch is None:
        rows = [r for r in branch_rows(res, branch) if res.layouts and res.layouts[r] is not None]
        batch = rows[0] if rows else branch_rows(res, branch)[0]
    m = res.word_map(word, step=steps, layer=layers, attention=attention, head=head, batch=batch)
    return m.numpy()


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an ``[h, w]`` grid to ``size = (H, W)`` pixels."""
    t = torch.as_tensor(grid, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _rows(res: Any, by: str | None, layers, steps) -> list[tuple[str | None, Any, Any]]:
    """``(row label, layers, steps)`` per figure row; layer rows run bottom-up (layer 0 at the bottom)."""
    st = res.stat("word_map")
    if by is None:
        return [(None, layers, steps)]
    if by == "layer":
        sel = st.labels("layer") if layers is None else ([layers] if isinstance(layers, int) else list(layers))
        return [(f"layer {l}", l, steps) for l in reversed(list(sel))]
    sel = st.labels("step") if steps is None else ([steps] if isinstance(steps, int) else list(steps))
    ts = res.timesteps
    return [(f"step {s} (t={ts[s]:.0f})" if s < len(ts) else f"step {s}", layers, s) for s in sel]


def _panel_figure(n_r: int, n_c: int, size: tuple[int, int], words: Sequence[str], labelled: bool):
    """A constrained-layout grid whose panels come out with the image's aspect ratio (drawn with
    ``aspect="auto"``, which constrained layout places exactly)."""
    panel = clamp(16.0 / max(n_r, n_c), 1.2, 2.3)
    lines = max(wrap_text(f"“{w}”", 0.92 * panel * 72.0, TITLE_SIZE, max_lines=3).count("\n") + 1 for w in words)
    line_in = TITLE_SIZE * 1.2 / 72.0
    width = n_c * (panel + 0.06) + 1.0 + (0.3 if labelled else 0.0)
    height = n_r * (panel * size[0] / size[1] + 0.06) + (lines + 2.5) * line_in + 0.35
    fig, axs = plt.subplots(n_r, n_c, figsize=(width, height), squeeze=False, constrained_layout=True)
    return fig, axs


def _fit_height(fig: Figure, axs: np.ndarray, size: tuple[int, int]) -> None:
    """Change the figure height so that, laid out, the panels have the image's aspect ratio."""
    layout_now(fig)
    box = axs[0, 0].get_position()
    have = box.height * fig.get_figheight()
    want = box.width * fig.get_figwidth() * size[0] / size[1]
    fig.set_figheight(fig.get_figheight() + axs.shape[0] * (want - have))


def word_maps(res: Any, words: Sequence[str] | None = None, image: Any = None, layers=None, steps=None, *,
              by: str | None = None, head: int | str = "mean", batch: int | None = None,
              branch: str | None = "cond", attention: str = "attn", alpha: float = 0.55, cmap: str = "magma",
              shared_scale: bool = True, axes=None, path: str | None = None) -> Figure:
    """Per-word image → word attention over the image grid, upsampled and overlaid on ``image``.

    ``layers``/``steps`` (int, list or None = all) are averaged; ``by="layer"`` (layer 0 in the
    bottom row) or ``by="step"`` draws one row per layer/step instead. ``image``: PIL image, array
    or tensor (None: no overlay).
    """
    all_words = res.words
    if not all_words:
        raise ValueError("no word maps in this result: record with AttentionRecorder(pipe, words=True)")
    words = list(all_words if words is None else ([words] if isinstance(words, str) else words))
    if by not in (None, "layer", "step"):
        raise ValueError(f"by must be None, 'layer' or 'step', got {by!r}")
    rows = _rows(res, by, layers, steps)
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
        fig, axs = _panel_figure(n_r, n_c, size, words, labelled=by is not None)
    else:
        axs = np.asarray(axes, dtype=object).reshape(n_r, n_c)
        fig = use_layout(axs[0, 0].figure)
    aspect = "auto" if axes is None else "equal"  # own figures are sized to the image's shape
    for r, (row_label, l, s) in enumerate(rows):
        for c, w in enumerate(words):
            ax = axs[r, c]
            up = upsample(grids[r][c], size)
            if img is not None:
                ax.imshow(img, extent=(0, size[1], size[0], 0), aspect=aspect)
            im = ax.imshow(up, cmap=cmap, alpha=alpha if img is not None else 1.0, vmin=0.0, vmax=vmax,
                           extent=(0, size[1], size[0], 0), aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            title = wrap_text(f"“{w}”", 0.92 * slot_width_pt(ax), TITLE_SIZE, max_lines=3) if r == 0 else ""
            ax.set_title(title, fontsize=TITLE_SIZE)
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
        set_suptitle(fig, f"Image → word attention (image queries attending to each prompt word)\n"
                          f"{', '.join(what)}, {hd}", fontsize=TITLE_SIZE)
        _fit_height(fig, axs, size)
    return finish(fig, path)
