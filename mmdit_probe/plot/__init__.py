"""Seaborn/matplotlib figures from :class:`~mmdit_probe.AttentionResult` objects and sweep DataFrames.

Every function returns the ``matplotlib.figure.Figure``, draws into ``ax=``/``axes=`` when given
(otherwise a new figure), and saves a PNG when ``path=`` is given. Quadrants are always named
query → key in full: "image → text (image queries attending to text keys)".

Figures read at any size: category ticks (steps, layers, heads) are thinned at draw time to what
fits, heatmap cells carry numbers only when they fit, titles are wrapped to their panel, and a
figure passed in through ``ax=``/``axes=`` that has no layout engine is given constrained layout
(so neighbouring panels' titles and colour bars make room for each other). Layer 0 is at the
bottom of a layer y axis and at the left of a layer x axis.

Imported lazily (``mmdit_probe.plot``): ``import mmdit_probe`` does not import matplotlib.
"""

from __future__ import annotations

from .ablation import effect_by_layer, final_values, metric_range, step_effect_curves
from .attention import GROUP_LABELS, head_grid, quadrant_label, quadrant_map, text_group_breakdown
from .images import image_strip
from .util import finish, many_colors, new_axes, step_tick_labels, to_image_array
from .words import upsample, word_grid, word_maps

__all__ = [
    "quadrant_label", "quadrant_map", "head_grid", "text_group_breakdown", "word_maps",
    "effect_by_layer", "step_effect_curves", "image_strip", "GROUP_LABELS",
    "word_grid", "upsample", "final_values", "metric_range", "many_colors",
    "finish", "new_axes", "step_tick_labels", "to_image_array",
]
