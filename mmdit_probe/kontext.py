"""Flux Kontext in one place: the context image's layout, its statistics, and reading them from a result.

>>> from mmdit_probe.kontext import ContextMass, ContextWordMap, context_table, context_word_map, kontext_layout
>>> layout = kontext_layout(pipe, prompt, image, max_area=..., auto_resize=...)   # [text, image, context]
>>> with mp.AttentionRecorder(pipe, statistics=[ContextMass(), ContextWordMap()], layout=layout) as rec:
...     pipe(image=image, prompt=prompt, ...)
>>> context_table(rec.result)            # 3 × 3 quadrants: text / image / context, query -> key

``layout=`` is optional for the statistics (they read the context size from each call); it gives the context
word maps their grid. Sizes: :mod:`mmdit_probe.families.kontext`; statistics: :mod:`mmdit_probe.stats.context_group`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .families.kontext import ImageIds, kontext_layout, kontext_sizes, split_image_ids
from .result import word_values
from .stats.context_group import STREAM_GROUPS, ContextMass, ContextWordMap

__all__ = ["STREAM_GROUPS", "ContextMass", "ContextWordMap", "ImageIds", "context_table", "context_word_map",
           "kontext_layout", "kontext_sizes", "split_image_ids"]


def context_table(res: Any, by: Sequence[str] = ("layer",), branch: str | None = "cond"):
    """Mean :class:`~mmdit_probe.ContextMass` per quadrant (columns ``text->image``, ``image->context`` …,
    query → key) grouped by ``by`` (rows); averaged over heads, steps and the branch's rows."""
    df = res.to_dataframe("context_mass")
    if branch is not None and "branch" in df:
        df = df[df["branch"] == branch]
    df = df.assign(quadrant=df["query"] + "->" + df["key"])
    return df.pivot_table(index=list(by), columns="quadrant", values="value", aggfunc="mean", dropna=False)


def context_word_map(res: Any, word: str, *, step: int | Sequence[int] | None = None,
                     layer: int | Sequence[int] | None = None, head: int | str = "mean",
                     batch: int | Sequence[int] | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Context→``word`` attention over the context image's grid: ``[batch, h, w]`` (``[batch, head, h, w]`` with
    ``head="all"``). Steps/layers given as a list or None (all) are averaged. ``grid``: the context grid, when
    the result's layouts do not carry it (recorded without ``layout=kontext_layout(...)``, or loaded from a file).
    """
    vals = word_values(res.stat("context_word_map"), word, step=step, layer=layer, head=head, batch=batch)
    if grid is None:
        grid = next((lay.context_grid for lay in res.layouts if lay is not None and lay.context_grid), None)
    if grid is None or grid[0] * grid[1] != vals.shape[-1]:
        raise ValueError(f"no context grid of {vals.shape[-1]} tokens is known for this result; pass grid=(h, w), or "
                         f"record with layout=mmdit_probe.kontext.kontext_layout(pipe, prompt, image, ...)")
    return vals.reshape(*vals.shape[:-1], *grid)
